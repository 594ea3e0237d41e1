"""Permute / unpermute benchmark: token rows moved into expert order and combined back, as GB/s.

Shape letters: T tokens, K top-k, H hidden, E experts, R = T*K routed rows. DeepSeek-V3: K=8, H=7168,
E=256, T = 4096..32768 on CUDA; on CPU H is divided by 16 (32 with --quick) and T is small.

Bytes counted are the activation traffic the op cannot avoid, the same for every provider:
  permute:   read x [T,H] once, write x_sorted [R,H]           -> (T + R) * H * elsize
  unpermute: read y_sorted [R,H], write y [T,H]                -> (R + T) * H * elsize
(index and routing-weight traffic, <1% at H=7168, is left out.)

Providers, same buffers, one run:
  ours         tritonmoe.kernels.permute / unpermute
  torch_index  permute: tritonmoe.kernels.permute_torch, the PyTorch twin (stable argsort + bincount +
               index_select + row_map scatter: the whole op, as a plain-PyTorch dispatcher does it);
               unpermute: index_add_ of weighted rows into [T,H], with the row -> token map and per-row
               weights computed beforehand (untimed, as a dispatcher that kept them from permute would)
  copy         one device copy moving the same number of bytes (the ceiling)
Forward only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tritonmoe.kernels import permute_torch

from . import common

NAME = "permute"
PROVIDERS = ("ours", "torch_index", "copy")
PEERS = ("torch_index",)
CASE_KEYS = ("op", "T", "K", "H", "E")
DSV3_H, DSV3_K, DSV3_E = 7168, 8, 256


@dataclass(frozen=True)
class Sweep:
    H: int  # hidden size
    tokens: tuple[int, ...]  # token counts T


def sweep_for(device: torch.device, quick: bool) -> Sweep:
    if device.type == "cuda":
        return Sweep(DSV3_H, (4096, 16384) if quick else (4096, 8192, 16384, 32768))
    return Sweep(DSV3_H // 32, (256, 1024)) if quick else Sweep(DSV3_H // 16, (1024, 4096))


def random_routing(T: int, K: int, E: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """K distinct experts per token (as top-k routing gives) and positive fp32 weights summing to 1."""
    topk_idx = torch.rand(T, E, device=device).topk(K, dim=1).indices
    topk_w = torch.rand(T, K, device=device) + 0.1
    return topk_idx, topk_w / topk_w.sum(1, keepdim=True)


def combine_metadata(row_map_TK: torch.Tensor, topk_w_TK: torch.Tensor, dtype: torch.dtype):
    """Per sorted row: the token it returns to and its routing weight (what index_add_ needs)."""
    T, K = row_map_TK.shape
    tok_R = torch.empty(T * K, dtype=torch.long, device=row_map_TK.device)
    tok_R[row_map_TK.reshape(-1)] = torch.arange(T * K, device=row_map_TK.device) // K
    w_R = torch.empty(T * K, dtype=dtype, device=row_map_TK.device)
    w_R[row_map_TK.reshape(-1)] = topk_w_TK.reshape(-1).to(dtype)
    return tok_R, w_R


def torch_index_unpermute(y_sorted_RH: torch.Tensor, tok_R: torch.Tensor, w_R: torch.Tensor, T: int):
    y_TH = y_sorted_RH.new_zeros(T, y_sorted_RH.shape[1])
    return y_TH.index_add_(0, tok_R, y_sorted_RH * w_R[:, None])


def run_case(T: int, K: int, H: int, E: int, device: torch.device, quick: bool) -> list[dict[str, Any]]:
    dtype = common.bench_dtype(device)
    es = torch.finfo(dtype).bits // 8
    R = T * K
    n_sets = common.rotation_count((T + 2 * R) * H * es, device)
    sets = []
    for i in range(n_sets):
        topk_idx, topk_w = random_routing(T, K, E, device)
        x = torch.randn(T, H, device=device, dtype=dtype)
        y_sorted = torch.randn(R, H, device=device, dtype=dtype)
        perm = permute_torch(x, topk_idx, E)
        if i == 0:
            ref_p = perm  # set 0's torch permute: what ours is checked against
        row_map = perm[2]
        sets.append({"x": x, "idx": topk_idx, "w": topk_w, "y_sorted": y_sorted, "row_map": row_map,
                     "meta": combine_metadata(row_map, topk_w, dtype)})
    del perm
    n_bytes = (T + R) * H * es
    copy_sets = common.copy_sets(n_bytes, dtype, device, n_sets)
    torch_backend = f"torch {torch.__version__} ({device.type})"
    case = {"T": T, "K": K, "H": H, "E": E, "dtype": str(dtype).replace("torch.", ""), "bytes": n_bytes}
    rows: list[dict[str, Any]] = []

    perm_fn, perm_backend = common.ours_op("permute", device)
    unperm_fn, unperm_backend = common.ours_op("unpermute", device)
    s0 = sets[0]
    ours_p = perm_fn(s0["x"], s0["idx"], E)
    perm_ok = torch.equal(ours_p[0], ref_p[0]) and all(  # index outputs must match exactly
        torch.equal(a.long(), b.long()) for a, b in zip(ours_p[1:], ref_p[1:]))
    ours_u = unperm_fn(s0["y_sorted"], s0["row_map"], s0["w"])
    ref_u = torch_index_unpermute(s0["y_sorted"], *s0["meta"], T)
    unperm_err = common.max_rel_err(ours_u, ref_u)

    ops = {
        "permute": {
            "ours": (perm_fn, [(s["x"], s["idx"], E) for s in sets], perm_backend, {"matches_torch_index": perm_ok}),
            "torch_index": (permute_torch, [(s["x"], s["idx"], E) for s in sets], torch_backend, {}),
        },
        "unpermute": {
            "ours": (unperm_fn, [(s["y_sorted"], s["row_map"], s["w"]) for s in sets], unperm_backend,
                     {"max_rel_err_vs_torch_index": common.sig(unperm_err)}),
            "torch_index": (torch_index_unpermute, [(s["y_sorted"], *s["meta"], T) for s in sets],
                            torch_backend, {}),
        },
    }
    for op, provs in ops.items():
        provs["copy"] = (torch.Tensor.copy_, copy_sets, torch_backend, {})
        for name in PROVIDERS:
            fn, arg_sets, backend, extra = provs[name]
            t = common.time_fn(fn, arg_sets, device, quick=quick)
            rows.append(common.row(NAME, {**case, "op": op}, name, backend, t,
                                   n_bytes / (t.median_ms * 1e-3) / 1e9, "GB/s", **extra))
    common.add_ratios(rows, CASE_KEYS, "ours", PEERS, "copy")
    return rows


def run(device: torch.device, quick: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    sw = sweep_for(device, quick)
    rows: list[dict[str, Any]] = []
    for T in sw.tokens:
        torch.manual_seed(T)
        rows += run_case(T, DSV3_K, sw.H, DSV3_E, device, quick)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, []


def table(rows: list[dict[str, Any]]) -> str:
    return common.format_table(rows, CASE_KEYS, PROVIDERS,
                               "permute / unpermute (GB/s of activation bytes; vs_best_peer = ours / torch_index; "
                               "of_ceiling = ours / copy)")
