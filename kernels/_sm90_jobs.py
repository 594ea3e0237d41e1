"""The sm_90a compilations each kernel family can launch on Hopper, as ``_sm90.Sm90Job`` lists: what
tests/test_sm90_compile.py holds to "wgmma, no spills, fits in shared memory" and what ``python -m bench
--compile-report`` prints. Kept out of the public kernel modules: it is tooling about them, not part of them."""

import torch
import triton

from . import _fp8_kernels as fk
from . import _grouped_gemm_kernels as k
from . import fp8 as f8
from .grouped_gemm import SWIZZLE_M, forward_configs, wgrad_configs
from ._sm90 import Sm90Job


def grouped_gemm_jobs(dtype: torch.dtype = torch.bfloat16, input_precision: str = "tf32") -> list:
    """One ``_sm90.Sm90Job`` per (kernel, layout, config) this family can launch on Hopper: the forward
    (b = w, D-major), the input gradient (b = w.transpose(1, 2), N-major) and the weight gradient, each over
    its config list for `dtype` and `input_precision` (what grouped_gemm's _launch would pick). Specialised like
    a launch with DeepSeek-V3 shapes: unit strides are constants, pointers, N, D and the other strides are
    multiples of 16; M and G are left unaligned."""
    ty = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    meta = ("BLOCK_G", "BLOCK_M", "BLOCK_N", "BLOCK_D", "UPCAST", "INPUT_PRECISION")

    def job(kernel, ptrs, ints, unit_strides, cfg, **extra):
        sig = {p: f"*{ty}" for p in ptrs} | {n: "*i64" for n in ("group_sizes_ptr", "a_rows_ptr", "x_rows_ptr")}
        sig |= {n: "i32" for n in ints}
        sig |= {n: "constexpr" for n in (*unit_strides, *meta, *extra)}
        consts = {n: 1 for n in unit_strides} | dict(BLOCK_G=256, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                                      BLOCK_D=cfg.block_d, UPCAST=False,
                                                      INPUT_PRECISION=input_precision) | extra
        # Order the signature like the kernel's arguments.
        sig = {n: sig[n] for n in kernel.arg_names}  # (drops the row-index pointer the kernel does not take)
        aligned = [n for n, t in sig.items() if t != "constexpr" and n not in ("M", "G")]
        return Sm90Job(kernel, sig, consts, tuple(aligned), cfg.num_warps, cfg.num_stages)

    strides = ("stride_am", "stride_ad", "stride_bg", "stride_bn", "stride_bd", "stride_om", "stride_on")
    jobs = []
    # "-gather": x's rows read through an index (gather_grouped_gemm), for the forward and weight gradient.
    for layout, units, gather in (("fwd", ("stride_ad", "stride_bd", "stride_on"), False),
                                  ("dgrad", ("stride_ad", "stride_bn", "stride_on"), False),
                                  ("fwd-gather", ("stride_ad", "stride_bd", "stride_on"), True)):
        for cfg in forward_configs(dtype, input_precision):
            ints = ["M", "N", "D", "G", *(s for s in strides if s not in units)]
            jobs.append((layout, cfg, job(k.grouped_mm_kernel, ("a_ptr", "b_ptr", "out_ptr"), ints, units, cfg,
                                          SWIZZLE_M=SWIZZLE_M, GATHER_A=gather)))
    units = ("stride_dyn", "stride_xd", "stride_dwd")
    for layout, gather in (("wgrad", False), ("wgrad-gather", True)):
        for cfg in wgrad_configs(dtype, input_precision):
            ints = ["M", "N", "D", "G", "stride_dym", "stride_xm", "stride_dwg", "stride_dwn"]
            jobs.append((layout, cfg, job(k.grouped_mm_wgrad_kernel, ("dy_ptr", "x_ptr", "dw_ptr"), ints, units, cfg,
                                          GATHER_X=gather)))
    return jobs


def fp8_jobs() -> list:
    """(pass, config, ``_sm90.Sm90Job``) for every kernel and config this family launches on Hopper,
    specialised as Triton's launcher would for DeepSeek-V3's gate/up projection (D=7168 -> N=4096, G=8,
    M=4099 rows, not a multiple of 16): arguments equal to 1 become constants, pointers and integers that are
    multiples of 16 get divisibility 16. Passes: fwd, fwd-gather (rows of x through src_rows), dgrad (the
    weight's K-major transposed copy), dgrad-strided (w_fp8.transpose(1, 2) read through strides, one
    config, for the record), wgrad, and the three quantizers. For tests/test_fp8.py and bench/NOTES.md."""
    M, N, D, G = 4099, 4096, 7168, 8
    nb, db, tiles = f8._cdiv(N, f8.BLOCK), f8._cdiv(D, f8.BLOCK), f8._col_tiles(M, G)

    def job(kernel, args: dict, constexprs: dict, warps: int, stages: int) -> Sm90Job:
        sig, consts, aligned = {}, dict(constexprs), []
        for name in kernel.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
                continue
            value = args[name]
            if isinstance(value, str):  # a pointer: its Triton type
                sig[name] = value
                aligned.append(name)
            elif value == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if value % 16 == 0:
                    aligned.append(name)
        return Sm90Job(kernel, sig, consts, tuple(aligned), warps, stages)

    gemm_ptrs = dict(a_ptr="*fp8e4nv", a_scale_ptr="*fp32", a_rows_ptr="*i64", b_ptr="*fp8e4nv",
                     b_scale_ptr="*fp32", out_ptr="*bf16", group_sizes_ptr="*i64")
    # b strides (g, n, d) and b-scale strides (g, n-block, d-block) for each way the kernel reads the weight.
    layouts = {
        "fwd": (N, D, (N * D, D, 1), (nb * db, db, 1), False),
        "fwd-gather": (N, D, (N * D, D, 1), (nb * db, db, 1), True),
        "dgrad": (D, N, (N * D, N, 1), (nb * db, 1, db), False),
        "dgrad-strided": (D, N, (N * D, 1, D), (nb * db, 1, db), False),
    }
    jobs = []
    for layout, (n_out, d_red, (bg, bn, bd), (sg, sn, sd), gather) in layouts.items():
        configs = f8.forward_configs()[:1] if layout == "dgrad-strided" else f8.forward_configs()
        for cfg in configs:
            args = gemm_ptrs | dict(M=M, N=n_out, D=d_red, G=G, stride_am=d_red, stride_ad=1,
                                    stride_asm=f8._cdiv(d_red, f8.BLOCK), stride_asd=1, stride_bg=bg, stride_bn=bn,
                                    stride_bd=bd, stride_bsg=sg, stride_bsn=sn, stride_bsd=sd, stride_om=n_out,
                                    stride_on=1)
            consts = dict(BLOCK_G=triton.next_power_of_2(G), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          BLOCK_D=f8.BLOCK, SWIZZLE_M=f8.SWIZZLE_M, GATHER_A=gather, UPCAST=False, INTERPRET=False)
            jobs.append((layout, cfg, job(fk.grouped_mm_fp8_kernel, args, consts, cfg.num_warps, cfg.num_stages)))
    for cfg in f8.wgrad_configs():
        args = dict(dyt_ptr="*fp8e4nv", dyt_scale_ptr="*fp32", xt_ptr="*fp8e4nv", xt_scale_ptr="*fp32",
                    dw_ptr="*fp32", group_sizes_ptr="*i64", N=N, D=D, G=G, TILES=tiles, stride_dyn=f8.BLOCK * tiles,
                    stride_dys=N, stride_xd=f8.BLOCK * tiles, stride_xs=D, stride_dwg=N * D, stride_dwn=D, stride_dwd=1)
        consts = dict(BLOCK_G=triton.next_power_of_2(G), BLOCK_M=f8.BLOCK, BLOCK_N=cfg.block_m, BLOCK_D=cfg.block_n,
                      UPCAST=False, INTERPRET=False)
        jobs.append(("wgrad", cfg, job(fk.grouped_mm_fp8_wgrad_kernel, args, consts, cfg.num_warps, cfg.num_stages)))
    # The quantizers, as their launchers issue them (tile and warps fixed, no autotuning).
    rows = f8.Fp8GemmConfig(f8._QUANT_ROWS_BLOCK_M, f8.BLOCK, 4, 1)
    jobs.append(("quant-rows", rows, job(
        fk.quantize_rows_kernel, dict(x_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32", M=M, D=D, stride_xm=D,
                                   stride_xd=1, stride_qm=D, stride_sm=db),
        dict(BLOCK_M=rows.block_m, BLOCK_D=f8.BLOCK, INTERPRET=False), 4, 1)))
    blocks = f8.Fp8GemmConfig(f8.BLOCK, f8.BLOCK, 8, 1)
    jobs.append(("quant-blocks", blocks, job(
        fk.quantize_blocks_kernel, dict(w_ptr="*bf16", q_ptr="*fp8e4nv", qt_ptr="*fp8e4nv", s_ptr="*fp32", N=N, D=D,
                                     stride_wg=N * D, stride_wn=D, stride_wd=1),
        dict(BLOCK=f8.BLOCK, WRITE_T=True, INTERPRET=False), 8, 1)))
    cols_ptrs = dict(x_ptr="*bf16", x_scale_ptr="*fp32", rows_ptr="*i64", qt_ptr="*fp8e4nv", st_ptr="*fp32",
                     qr_ptr="*fp8e4nv", sr_ptr="*fp32", group_sizes_ptr="*i64")
    for layout, c, src, scaled, gather, write_rows in (("quant-cols-dy", N, "*bf16", False, False, True),
                                                       ("quant-cols-x", D, "*fp8e4nv", True, True, False)):
        args = cols_ptrs | dict(x_ptr=src, M=M, C=c, G=G, stride_xm=c, stride_xc=1, stride_xsm=f8._cdiv(c, f8.BLOCK),
                                stride_xsc=1, stride_qtc=f8.BLOCK * tiles, stride_st=c, stride_qrm=c,
                                stride_srm=f8._cdiv(c, f8.BLOCK))
        cfg = f8.Fp8GemmConfig(f8.BLOCK, f8.BLOCK, 8, 1)
        jobs.append((layout, cfg, job(fk.quantize_cols_kernel, args, dict(
            BLOCK_G=triton.next_power_of_2(G), BLOCK_M=f8.BLOCK, BLOCK_C=f8.BLOCK, CHUNK_M=f8._QUANT_COLS_CHUNK_M,
            SRC_SCALED=scaled, GATHER=gather,
            WRITE_ROWS=write_rows, INTERPRET=False), 8, 1)))
    return jobs
