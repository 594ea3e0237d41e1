"""Grouped GEMM benchmark: forward, input gradient and weight gradient at DeepSeek-V3 expert shapes.

Shape letters: G groups (local experts), M rows (tokens routed to this rank's experts, sorted by expert),
K reduction dim, N output dim. A case is (projection, G, tokens per expert, size distribution, pass):
  gate_up: K=7168 -> N=4096 (gate and up fused), down: K=2048 -> N=7168;  G in 8/32/256;
  tokens per expert 128..8192, balanced or Zipf-skewed with some empty groups.
On CPU the dimensions are divided by 16 (32 with --quick) so the sweep finishes; the shapes keep their
ratios but the figures say nothing about a GPU.

Providers, all timed on the same buffers in one run:
  ours        tritonmoe.kernels.grouped_gemm (its backward through autograd for the two gradients)
  grouped_mm  torch._grouped_mm with int32 offsets (the formulas its backward uses, called directly)
  loop        one torch.mm per group; group sizes read on the host beforehand (the sync is not timed)
  dense       one torch.mm with the same FLOPs, 2*M*N*K (the practical ceiling)
Rate: TFLOP/s = 2*M*N*K / median time.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import common

NAME = "grouped_gemm"
PROVIDERS = ("ours", "grouped_mm", "loop", "dense")
PEERS = ("grouped_mm", "loop")
CASE_KEYS = ("proj", "pass", "G", "tok_per_g", "dist", "M", "N", "K")

# DeepSeek-V3 expert dims: hidden 7168, moe intermediate 2048 (gate and up fused -> 4096).
DSV3_H, DSV3_I = 7168, 2048
CUDA_GROUPS, CUDA_TOKENS = (8, 32, 256), (128, 512, 2048, 8192)
# Rows above this are skipped: 131072 x 7168 bf16 is 1.9 GB per activation buffer and covers every layout
# that occurs in training (256 local experts only at EP=1, where 16K tokens x top-8 give 512 per expert).
CUDA_MAX_ROWS = 131072
ZIPF_EXPONENT = 1.2
EMPTY_FRACTION = 1 / 8  # share of groups given no rows in the skewed distribution (at least one)


@dataclass(frozen=True)
class Sweep:
    dim_div: int  # DeepSeek-V3 dims divided by this (1 on CUDA)
    groups: tuple[int, ...]  # local expert counts
    tokens: tuple[int, ...]  # tokens per expert (mean, for the skewed distribution)
    max_rows: int  # cases with more rows are skipped (memory and time)


def sweep_for(device: torch.device, quick: bool) -> Sweep:
    if device.type == "cuda":
        return Sweep(1, (8, 32) if quick else CUDA_GROUPS, (512, 2048) if quick else CUDA_TOKENS, CUDA_MAX_ROWS)
    if quick:
        return Sweep(32, (8,), (32, 128), 1024)
    return Sweep(16, (8, 32), (32, 128, 512), 16384)


def group_sizes_for(G: int, tok_per_g: int, dist: str, seed: int = 0) -> list[int]:
    """Row counts per group summing to G * tok_per_g.

    balanced: all equal. zipf: sizes proportional to 1/rank^1.2 in a random expert order, with
    max(1, G/8) groups empty — the skew aux-loss-free routing still shows early in training.
    """
    total = G * tok_per_g
    if dist == "balanced":
        return [tok_per_g] * G
    if dist != "zipf":
        raise ValueError(f"unknown size distribution {dist!r}; expected 'balanced' or 'zipf'")
    gen = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, G + 1, dtype=torch.float64) ** ZIPF_EXPONENT
    n_empty = max(1, int(G * EMPTY_FRACTION))
    p[G - n_empty:] = 0.0  # the tail ranks get nothing
    p = p[torch.randperm(G, generator=gen)]
    p /= p.sum()
    sizes = torch.floor(p * total).long()
    sizes[torch.argmax(p)] += total - int(sizes.sum())  # rounding remainder to the largest group
    return sizes.tolist()


def _loop_fwd(x: torch.Tensor, w: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    y = x.new_empty(x.shape[0], w.shape[1])
    for g, (s, e) in enumerate(bounds):
        if e > s:
            torch.mm(x[s:e], w[g].t(), out=y[s:e])
    return y


def _loop_dgrad(dy: torch.Tensor, w: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    dx = dy.new_empty(dy.shape[0], w.shape[2])
    for g, (s, e) in enumerate(bounds):
        if e > s:
            torch.mm(dy[s:e], w[g], out=dx[s:e])
    return dx


def _loop_wgrad(dy: torch.Tensor, x: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
    dw = x.new_empty(len(bounds), dy.shape[1], x.shape[1])
    for g, (s, e) in enumerate(bounds):
        torch.mm(dy[s:e].t(), x[s:e], out=dw[g])  # an empty slice writes zeros, the correct gradient
    return dw


def _providers(pas: str, device: torch.device, sets: list[dict[str, Any]], w: torch.Tensor,
               w_dense: torch.Tensor, sizes: torch.Tensor, offs: torch.Tensor,
               bounds: list[tuple[int, int]]) -> dict[str, tuple[Callable, list[tuple], str]]:
    """name -> (fn, argument sets, backend label) for one pass."""
    ours_fn, ours_backend = common.ours_op("grouped_gemm", device)
    torch_backend = f"torch {torch.__version__} ({device.type})"
    if pas == "fwd":
        return {
            "ours": (ours_fn, [(s["x"], w, sizes) for s in sets], ours_backend),
            "grouped_mm": (lambda x: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
                           [(s["x"],) for s in sets], torch_backend),
            "loop": (lambda x: _loop_fwd(x, w, bounds), [(s["x"],) for s in sets], torch_backend),
            "dense": (lambda x: torch.mm(x, w_dense.t()), [(s["x"],) for s in sets], torch_backend),
        }
    # Gradients of ours go through its autograd Function: one forward graph per buffer set, kept alive, in
    # which only the timed pass's input requires grad. Asking autograd.grad for one input is not enough: a
    # custom op's backward sees ctx.needs_input_grad from the forward, so a graph with x and w both
    # requiring grad would time dgrad + wgrad in each pass.
    w_req = w.detach().requires_grad_(pas == "wgrad")
    graphs = []
    for s in sets:
        x_req = s["x"].detach().requires_grad_(pas == "dgrad")
        graphs.append((ours_fn(x_req, w_req, sizes), x_req, s["dy"]))
    if pas == "dgrad":
        return {
            "ours": (lambda y, x, dy: torch.autograd.grad(y, x, dy, retain_graph=True), graphs, ours_backend),
            "grouped_mm": (lambda dy: torch._grouped_mm(dy, w, offs=offs), [(s["dy"],) for s in sets],
                           torch_backend),
            "loop": (lambda dy: _loop_dgrad(dy, w, bounds), [(s["dy"],) for s in sets], torch_backend),
            "dense": (lambda dy: torch.mm(dy, w_dense), [(s["dy"],) for s in sets], torch_backend),
        }
    assert pas == "wgrad"
    return {
        "ours": (lambda y, x, dy: torch.autograd.grad(y, w_req, dy, retain_graph=True), graphs, ours_backend),
        "grouped_mm": (lambda x, dy: torch._grouped_mm(dy.t(), x, offs=offs),
                       [(s["x"], s["dy"]) for s in sets], torch_backend),
        "loop": (lambda x, dy: _loop_wgrad(dy, x, bounds), [(s["x"], s["dy"]) for s in sets], torch_backend),
        "dense": (lambda x, dy: torch.mm(dy.t(), x), [(s["x"], s["dy"]) for s in sets], torch_backend),
    }


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def run_case(proj: str, G: int, tok_per_g: int, dist: str, N: int, K: int, device: torch.device,
             quick: bool, passes=("fwd", "dgrad", "wgrad")) -> list[dict[str, Any]]:
    dtype = common.bench_dtype(device)
    sizes_list = group_sizes_for(G, tok_per_g, dist)
    M = sum(sizes_list)
    bounds, start = [], 0
    for n in sizes_list:
        bounds.append((start, start + n))
        start += n
    sizes = torch.tensor(sizes_list, dtype=torch.int64, device=device)
    offs = torch.cumsum(sizes, 0).to(torch.int32)
    # Random weights scaled like an initialised nn.Linear, so outputs stay O(1) in bf16.
    w = (torch.randn(G, N, K, device=device) / K**0.5).to(dtype)
    w_dense = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    per_set = M * (K + N) * torch.finfo(dtype).bits // 8
    sets = [{"x": torch.randn(M, K, device=device, dtype=dtype), "dy": torch.randn(M, N, device=device, dtype=dtype)}
            for _ in range(common.rotation_count(per_set, device))]
    flops = 2.0 * M * N * K
    case = {"proj": proj, "G": G, "tok_per_g": tok_per_g, "dist": dist, "M": M, "N": N, "K": K,
            "empty_groups": sizes_list.count(0), "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for pas in passes:
        provs = _providers(pas, device, sets, w, w_dense, sizes, offs, bounds)
        # Check every provider against the plainest formula first, then free the reference (a weight
        # gradient at 256 experts is 15 GB) before anything is timed.
        ref = _first(provs["loop"][0](*provs["loop"][1][0]))
        extras: dict[str, dict[str, Any]] = {name: {} for name in PROVIDERS}
        extras["loop"]["max_rel_err_vs_loop"] = 0.0  # the reference itself
        for name in ("ours", "grouped_mm"):  # dense computes a different product
            fn, arg_sets, _ = provs[name]
            try:
                err = common.max_rel_err(_first(fn(*arg_sets[0])), ref)
                extras[name]["max_rel_err_vs_loop"] = common.sig(err)
            except (RuntimeError, NotImplementedError):
                pass  # reported by the timing attempt below
        del ref
        for name in PROVIDERS:
            fn, arg_sets, backend = provs[name]
            extra = extras[name]
            try:
                t = common.time_fn(fn, arg_sets, device, quick=quick)
                rate = flops / (t.median_ms * 1e-3) / 1e12
            except (RuntimeError, NotImplementedError) as e:  # a peer unsupported on this device/dtype
                if name == "ours":
                    raise
                t, rate, extra["error"] = None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(common.row(NAME, {**case, "pass": pas}, name, backend, t, rate, "TFLOP/s", **extra))
        del provs
    common.add_ratios(rows, CASE_KEYS, "ours", PEERS, "dense")
    return rows


def run(device: torch.device, quick: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All cases of the sweep. Returns (result rows, skipped cases with the reason)."""
    sw = sweep_for(device, quick)
    H, I = DSV3_H // sw.dim_div, DSV3_I // sw.dim_div
    projs = {"gate_up": (2 * I, H), "down": (H, I)}  # name -> (N, K)
    rows, skipped = [], []
    for proj, (N, K) in projs.items():
        for G in sw.groups:
            for tok in sw.tokens:
                for dist in ("balanced", "zipf"):
                    if G * tok > sw.max_rows:
                        skipped.append({"bench": NAME, "proj": proj, "G": G, "tok_per_g": tok, "dist": dist,
                                        "reason": f"M={G * tok} > max rows {sw.max_rows}"})
                        continue
                    torch.manual_seed(zlib.crc32(f"{proj}/{G}/{tok}/{dist}".encode()))
                    rows += run_case(proj, G, tok, dist, N, K, device, quick)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows, skipped


def table(rows: list[dict[str, Any]]) -> str:
    return common.format_table(rows, CASE_KEYS, PROVIDERS,
                               "grouped GEMM (TFLOP/s; vs_best_peer = ours / best of grouped_mm, loop; "
                               "of_ceiling = ours / dense mm)")
