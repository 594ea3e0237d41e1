"""SwiGLU benchmark: h = silu(gate) * up on the gate/up GEMM's output [R, 2I], forward and forward+backward,
as GB/s, plus the bytes autograd keeps for the backward.

Shape letters: R routed rows (T tokens x K=8), I expert intermediate. DeepSeek-V3: I=2048 and
T = 4096..16384 (R = 32K..131K) on CUDA; on CPU I is divided by 16 (32 with --quick) and R is small.

Bytes counted are the traffic the op cannot avoid, the same for every provider:
  fwd:      read gate_up [R,2I], write h [R,I]                                     -> 3 R I elsize
  fwd+bwd:  the forward, then read dh [R,I] and gate_up, write d gate_up [R,2I]     -> 8 R I elsize

Providers, same buffers, one run:
  ours         tritonmoe.kernels.swiglu (one pass each way; keeps only gate_up for the backward)
  torch_eager  F.silu(gate) * up on the two halves, as transformers' experts and torchtitan write it
  copy         one device copy moving the same number of bytes (the ceiling)
saved_mib is what autograd keeps alive for the backward (measured with saved_tensors_hooks, storages counted
once).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import common

NAME = "swiglu"
PROVIDERS = ("ours", "torch_eager", "copy")
PEERS = ("torch_eager",)
CASE_KEYS = ("pass", "R", "I")
DSV3_I, DSV3_K = 2048, 8


def torch_eager(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def saved_bytes(fn, gate_up: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward of fn(gate_up)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(gate_up.detach().requires_grad_())
    return sum(seen.values())


def _fwd_bwd(fn):
    def step(gate_up: torch.Tensor, dh: torch.Tensor):
        return torch.autograd.grad(fn(gate_up), gate_up, dh)
    return step


def run_case(R: int, I: int, device: torch.device, quick: bool) -> list[dict[str, Any]]:  # noqa: E741
    dtype = common.bench_dtype(device)
    es = torch.finfo(dtype).bits // 8
    n_sets = common.rotation_count(6 * R * I * es, device)
    sets = [((torch.randn(R, 2 * I, device=device, dtype=dtype) * 2).requires_grad_(),
             torch.randn(R, I, device=device, dtype=dtype)) for _ in range(n_sets)]
    ours_fn, ours_backend = common.ours_op("swiglu", device)
    torch_backend = f"torch {torch.__version__} ({device.type})"
    gu0, dh0 = sets[0]
    ref_in = gu0.detach().float().requires_grad_()  # the eager formula in fp32: the reference for both
    h_ref, (dgu_ref,) = torch_eager(ref_in), _fwd_bwd(torch_eager)(ref_in, dh0.float())
    checks = {"max_rel_err_h": common.sig(common.max_rel_err(ours_fn(gu0), h_ref)),
              "max_rel_err_dgate_up": common.sig(common.max_rel_err(_fwd_bwd(ours_fn)(gu0, dh0)[0], dgu_ref))}
    case = {"R": R, "I": I, "dtype": str(dtype).replace("torch.", "")}
    rows: list[dict[str, Any]] = []
    for pas, elems in (("fwd", 3 * R * I), ("fwd+bwd", 8 * R * I)):
        n_bytes = elems * es
        provs = {"ours": (ours_fn, ours_backend), "torch_eager": (torch_eager, torch_backend)}
        for name in PROVIDERS:
            if name == "copy":
                fn, backend, extra = torch.Tensor.copy_, torch_backend, {}
                arg_sets = common.copy_sets(n_bytes, dtype, device, n_sets)
            else:
                op, backend = provs[name]
                extra = {"saved_mib": round(saved_bytes(op, gu0) / 2**20, 3)}
                if name == "ours":
                    extra.update(checks)
                if pas == "fwd":
                    fn, arg_sets = (lambda t, _op=op: _op(t.detach())), [(gu,) for gu, _ in sets]
                else:
                    fn, arg_sets = _fwd_bwd(op), sets
            t = common.time_fn(fn, arg_sets, device, quick=quick)
            rows.append(common.row(NAME, {**case, "pass": pas}, name, backend, t,
                                   n_bytes / (t.median_ms * 1e-3) / 1e9, "GB/s", **extra))
    common.add_ratios(rows, CASE_KEYS, "ours", PEERS, "copy")
    return rows


def run(device: torch.device, quick: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if device.type == "cuda":
        I, tokens = DSV3_I, ((4096, 16384) if quick else (4096, 8192, 16384))  # noqa: E741
    else:
        I, tokens = (DSV3_I // 32, (256,)) if quick else (DSV3_I // 16, (1024, 4096))  # noqa: E741
    rows: list[dict[str, Any]] = []
    for T in tokens:
        torch.manual_seed(T)
        rows += run_case(T * DSV3_K, I, device, quick)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, []


def table(rows: list[dict[str, Any]]) -> str:
    text = common.format_table(rows, CASE_KEYS, PROVIDERS,
                               "swiglu (GB/s of unavoidable bytes; vs_best_peer = ours / torch_eager; "
                               "of_ceiling = ours / copy)")
    saved = sorted({(r["R"], r["I"], r["provider"], r["saved_mib"]) for r in rows if "saved_mib" in r})
    return text + "\n  saved for backward (MiB): " + "; ".join(f"R={R} I={I} {p}={m}" for R, I, p, m in saved)
