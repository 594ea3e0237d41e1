"""The sm_90a compilations each kernel family can launch on Hopper, as ``_sm90.Sm90Job`` lists: what
tests/test_sm90_compile.py holds to "wgmma, no spills, fits in shared memory" and what ``python -m bench
--compile-report`` prints. Kept out of the public kernel modules: it is tooling about them, not part of them."""

import torch

from . import _grouped_gemm_kernels as k
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
