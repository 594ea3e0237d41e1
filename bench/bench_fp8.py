"""FP8 benchmark: the FP8 grouped GEMMs against our BF16 grouped GEMM and torch._scaled_grouped_mm, and the
FP8 quantizers against a device copy, at DeepSeek-V3 expert shapes.

Shape letters: G groups (local experts), M rows (tokens routed to them, sorted), D reduction dim, N output
dim. GEMM cases: (projection, G, tokens per expert, pass); gate_up: D=7168 -> N=4096, down: D=2048 -> N=7168,
balanced sizes; passes fwd (y = x w^T), dgrad (dX = dY w), wgrad (dW = dY^T X). Operands are quantized
before timing (their quantization is the second table), so the GEMM rows compare GEMMs alone:
  fp8                tritonmoe.kernels.fp8: grouped_gemm_fp8 (1 x 128 activation tiles, 128 x 128 weight
                     blocks, fp32 promotion every 128 of D; dgrad on the weight's transposed copy) and
                     grouped_gemm_fp8_wgrad (group-aligned 128 x 1 column tiles); bf16 out (wgrad: fp32)
  bf16               tritonmoe.kernels.grouped_gemm, its backward through autograd for the gradients
  scaled_grouped_mm  torch._scaled_grouped_mm with rowwise scales (one per row of x / dY, one per output
                     channel of w), where the device has it (CUDA sm_90+; elsewhere the row records the error)
Rate: TFLOP/s = 2*M*N*D / median time; vs_bf16 = fp8 / bf16 (issue 15's H100 target: >= 1.6x at >= 2048
tokens per expert), vs_scaled_mm = fp8 / scaled_grouped_mm.

Quantize cases (GB/s of bytes the op must move: its reads plus its writes, scales included):
  rows    quantize_fp8_rows of the gate/up input x [M, 7168] (bf16 -> e4m3 + [M, 56] scales)
  weight  quantize_fp8_weight of w [G, 4096, 7168] (e4m3 plus the transposed copy dgrad reads)
  dy      dY [M, 4096]: the backward's one pass writing rows (dgrad) and group-aligned column tiles (wgrad)
providers: ours, torch (the op's PyTorch twin on the same device), copy (one device copy of the same bytes).

On CPU every dimension is divided by 32 and "ours" is the PyTorch twin of each op (the CPU path of the
public functions): the figures check the harness end to end and say nothing about a GPU.

"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch


from tritonmoe import kernels as K  # noqa: E402
from tritonmoe.kernels import fp8 as F  # noqa: E402
from tritonmoe.kernels._backend import force_twins  # noqa: E402

from . import common

NAME = "fp8"
GEMM_PROVIDERS = ("fp8", "bf16", "scaled_grouped_mm")
QUANT_PROVIDERS = ("ours", "torch", "copy")
PROVIDERS = GEMM_PROVIDERS + QUANT_PROVIDERS
GEMM_KEYS = ("proj", "pass", "G", "tok_per_g", "M", "N", "D")
QUANT_KEYS = ("op", "rows", "cols")
DSV3_H, DSV3_I = 7168, 2048


@dataclass(frozen=True)
class Sweep:
    dim_div: int  # DeepSeek-V3 dims divided by this (1 on CUDA)
    groups: tuple[int, ...]  # local expert counts
    tokens: tuple[int, ...]  # tokens per expert
    passes: tuple[str, ...]


def sweep_for(device: torch.device, quick: bool) -> Sweep:
    passes = ("fwd", "dgrad", "wgrad")
    if device.type == "cuda":
        return Sweep(1, (8,) if quick else (8, 32), (2048,) if quick else (512, 2048, 8192), passes)
    return Sweep(32, (4,), (64,) if quick else (64, 256), passes)


def _rowwise(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 copy of t with one fp32 scale per slice along `dim` (amax / 448): the rowwise recipe
    torch._scaled_grouped_mm takes."""
    s = (t.float().abs().amax(dim, keepdim=True) / F.E4M3_MAX).clamp_min(1e-12)
    return (t.float() / s).to(F.FP8), s.squeeze(dim)


def _per_group_colwise(t: torch.Tensor, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t [M, C] with M split into G equal groups -> (e4m3 t^T [C, M] row-major, scales [G * C]): one scale per
    (group, column), amax over the group's rows / 448."""
    tg = t.float().view(G, -1, t.shape[1])
    s = (tg.abs().amax(1, keepdim=True) / F.E4M3_MAX).clamp_min(1e-12)  # [G, 1, C]
    return (tg / s).to(F.FP8).view(t.shape).t().contiguous(), s.view(-1)


def _gemm_providers(pas: str, x, w, dy, sizes, device) -> dict[str, tuple[Callable, tuple, str]]:
    """name -> (fn, args, backend label) for one pass; every operand prepared beforehand."""
    label = "triton" if device.type == "cuda" else "torch twin (CPU path of the public op)"
    torch_label = f"torch {torch.__version__} ({device.type})"
    offs = torch.cumsum(sizes, 0).to(torch.int32)
    if pas == "fwd":
        xq, xs = F.quantize_fp8_rows(x)
        wq, ws = F.quantize_fp8_blocks(w)
        xr, xrs = _rowwise(x, 1)
        wr, wrs = _rowwise(w, 2)  # [G, N, D], scales [G, N]
        return {
            "fp8": (F.grouped_gemm_fp8, (xq, xs, wq, ws, sizes), label),
            "bf16": (K.grouped_gemm, (x, w, sizes), label),
            "scaled_grouped_mm": (lambda a, b, sa, sb: torch._scaled_grouped_mm(
                a, b.transpose(1, 2), sa, sb, offs=offs, out_dtype=torch.bfloat16), (xr, wr, xrs, wrs), torch_label),
        }
    if pas == "dgrad":
        dq, ds = F.quantize_fp8_rows(dy)
        wq = F.quantize_fp8_weight(w)
        dr, drs = _rowwise(dy, 1)
        wt = w.transpose(1, 2).contiguous()  # [G, D, N]: rows of dX's weight operand, one scale per D
        wtr, wtrs = _rowwise(wt, 2)
        return {
            "fp8": (F.grouped_gemm_fp8, (dq, ds, wq.fp8_t, wq.scale.transpose(1, 2), sizes), label),
            "bf16": (K.grouped_gemm, (dy, w.transpose(1, 2), sizes), label),
            "scaled_grouped_mm": (lambda a, b, sa, sb: torch._scaled_grouped_mm(
                a, b.transpose(1, 2), sa, sb, offs=offs, out_dtype=torch.bfloat16), (dr, wtr, drs, wtrs), torch_label),
        }
    assert pas == "wgrad"
    dyc, dycs = F.quantize_fp8_cols(dy, sizes)
    xc, xcs = F.quantize_fp8_cols(x, sizes)
    # Ours in bf16: the weight gradient through autograd, from a graph in which only w requires grad.
    w_req = w.detach().requires_grad_()
    y = K.grouped_gemm(x, w_req, sizes)
    # The peer grouped along the reduction: dY^T [N, M] row-major and X [M, D] column-major, with one scale
    # per (group, channel) over the group's rows (its 2d x 2d form wants [G * N] and [G * D] scales).
    dr, drs = _per_group_colwise(dy, sizes.shape[0])
    xr, xrs = _per_group_colwise(x, sizes.shape[0])
    return {
        "fp8": (F.grouped_gemm_fp8_wgrad, (dyc, dycs, xc, xcs, sizes), label),
        "bf16": (lambda: torch.autograd.grad(y, w_req, dy, retain_graph=True)[0], (), label),
        "scaled_grouped_mm": (lambda a, b, sa, sb: torch._scaled_grouped_mm(
            a, b, sa, sb, offs=offs, out_dtype=torch.bfloat16), (dr, xr.t(), drs, xrs), torch_label),
    }


def _rms_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float(), ref.float()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def run_gemm_case(proj: str, G: int, tok: int, N: int, D: int, device: torch.device, quick: bool):
    dtype = common.bench_dtype(device)
    sizes = torch.full((G,), tok, dtype=torch.int64, device=device)
    M = G * tok
    x = torch.randn(M, D, device=device, dtype=dtype)
    w = (torch.randn(G, N, D, device=device) / D**0.5).to(dtype)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    flops = 2.0 * M * N * D
    case = {"proj": proj, "G": G, "tok_per_g": tok, "M": M, "N": N, "D": D, "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for pas in sweep_for(device, quick).passes:
        provs = _gemm_providers(pas, x, w, dy, sizes, device)
        ref = provs["bf16"][0](*provs["bf16"][1])
        results: dict[str, dict[str, Any]] = {}
        for name in GEMM_PROVIDERS:
            fn, args, backend = provs[name]
            extra: dict[str, Any] = {}
            try:
                out = fn(*args)
                # FP8 against our bf16 GEMM: E4M3's ~2^-4 rounding per operand gives ~3-4% RMS on random data.
                extra["rms_rel_err_vs_bf16"] = common.sig(_rms_rel(out, ref))
                t = common.time_fn(fn, [args], device, quick=quick)
                rate = flops / (t.median_ms * 1e-3) / 1e12
            except (RuntimeError, NotImplementedError, AttributeError, TypeError) as e:
                if name != "scaled_grouped_mm":
                    raise
                t, rate, extra["error"] = None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            results[name] = common.row(NAME, {**case, "pass": pas, "section": "gemm"}, name, backend, t, rate,
                                       "TFLOP/s", **extra)
        mine = results["fp8"]
        for peer, key in (("bf16", "vs_bf16"), ("scaled_grouped_mm", "vs_scaled_mm")):
            if mine["rate"] and results[peer]["rate"]:
                mine[key] = round(mine["rate"] / results[peer]["rate"], 3)
        rows += list(results.values())
        del provs, ref
    return rows


def run_quant_case(op: str, rows_n: int, cols_n: int, G: int, device: torch.device, quick: bool):
    """One quantizer over rows_n x cols_n elements (for "weight": G experts of rows_n / G rows each)."""
    dtype = torch.bfloat16
    es = 2
    sizes = torch.full((G,), rows_n // G, dtype=torch.int64, device=device)
    tiles = -(-rows_n // 128) + G
    scales = 4 * rows_n * -(-cols_n // 128)
    if op == "rows":
        src = torch.randn(rows_n, cols_n, device=device, dtype=dtype)
        ours, twin, args = F.quantize_fp8_rows, F.quantize_fp8_rows_torch, (src,)
        n_bytes = rows_n * cols_n * (es + 1) + scales
    elif op == "weight":
        src = torch.randn(G, rows_n // G, cols_n, device=device, dtype=dtype)
        ours = F.quantize_fp8_weight

        def twin(w):
            q, s = F.quantize_fp8_blocks_torch(w)
            return q, s, q.transpose(1, 2).contiguous()

        args = (src,)
        n_bytes = rows_n * cols_n * (es + 2) + scales // 128
    else:
        assert op == "dy"
        src = torch.randn(rows_n, cols_n, device=device, dtype=dtype)
        ours = F._quantize_rows_cols_op

        def twin(dy, sizes):
            return (*F.quantize_fp8_rows_torch(dy), *F.quantize_fp8_cols_torch(dy, sizes))

        args = (src, sizes)
        n_bytes = rows_n * cols_n * (es + 1) + scales + cols_n * 128 * tiles + 4 * tiles * cols_n
    case = {"op": op, "rows": rows_n, "cols": cols_n, "G": G, "bytes": n_bytes, "section": "quant"}
    torch_label = f"torch {torch.__version__} ({device.type})"
    label = "triton" if device.type == "cuda" else "torch twin (CPU path of the public op)"
    def raw(t):
        return t.view(torch.uint8) if t.dtype == F.FP8 else t

    check = all(torch.equal(raw(a), raw(b)) for a, b in zip(ours(*args), twin(*args)))
    provs = {"ours": (ours, [args], label, {"bytes_equal_twin": check}), "torch": (twin, [args], torch_label, {}),
             "copy": (torch.Tensor.copy_, common.copy_sets(n_bytes, dtype, device, 1), torch_label, {})}
    rows = []
    for name in QUANT_PROVIDERS:
        fn, arg_sets, backend, extra = provs[name]
        t = common.time_fn(fn, arg_sets, device, quick=quick)
        rows.append(common.row(NAME, case, name, backend, t, n_bytes / (t.median_ms * 1e-3) / 1e9, "GB/s", **extra))
    common.add_ratios(rows, QUANT_KEYS, "ours", ("torch",), "copy")
    return rows


def run(device: torch.device, quick: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every case of the sweep. Returns (result rows, skipped cases with the reason)."""
    sw = sweep_for(device, quick)
    H, I = DSV3_H // sw.dim_div, DSV3_I // sw.dim_div
    rows: list[dict[str, Any]] = []
    # On CPU the twins run (the interpreter, which the test suite switches on, is a correctness tool).
    with force_twins() if device.type == "cpu" else contextlib.nullcontext():
        for proj, (N, D) in {"gate_up": (2 * I, H), "down": (H, I)}.items():
            for G in sw.groups:
                for tok in sw.tokens:
                    torch.manual_seed(G * 100003 + tok)
                    rows += run_gemm_case(proj, G, tok, N, D, device, quick)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        G, M = sw.groups[0], sw.groups[0] * sw.tokens[-1]
        for op, n_rows, cols in (("rows", M, H), ("weight", G * 2 * I, H), ("dy", M, 2 * I)):
            rows += run_quant_case(op, n_rows, cols, G, device, quick)
    return rows, []


def table(rows: list[dict[str, Any]]) -> str:
    gemm = [r for r in rows if r.get("section") == "gemm"]
    quant = [r for r in rows if r.get("section") == "quant"]
    return "\n\n".join([
        common.format_table(gemm, GEMM_KEYS, GEMM_PROVIDERS,
                            "FP8 grouped GEMM (TFLOP/s; vs_bf16 = fp8 / our bf16 grouped GEMM, target >= 1.6x at "
                            ">= 2048 tok/expert on H100; vs_scaled_mm = fp8 / torch._scaled_grouped_mm rowwise)",
                            ratio_keys=("vs_bf16", "vs_scaled_mm")),
        common.format_table(quant, QUANT_KEYS, QUANT_PROVIDERS,
                            "FP8 quantize (GB/s of bytes read + written; vs_best_peer = ours / torch twin; "
                            "of_ceiling = ours / device copy)"),
    ])
