"""Every grouped-GEMM config compiles for Hopper (sm_90a) into wgmma code without spills. No GPU needed.

triton.compile with GPUTarget("cuda", 90, 32) builds the cubin on this CPU machine and the wheel's cuobjdump
reads it (kernels/_sm90.py). A config that falls back to mma.sync (no HGMMA), spills its accumulator to
local memory or needs more shared memory than an H100 SM has would run, but slowly or not at all.
Run with -s to see the table of registers / shared memory / HGMMA per config.

Every job of the module compiles in one compile_sm90_all call (child processes cost ~3 s each to start).
"""

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from tritonmoe.kernels._sm90 import SM90_SMEM_LIMIT, compile_sm90_all  # noqa: E402
from tritonmoe.kernels._sm90_jobs import grouped_gemm_jobs  # noqa: E402

# The config lists _launch picks: 16-bit operands, and fp32 under both of torch's fp32 matmul settings
# ("high" -> tf32 wgmma; "highest", torch's default -> ieee, which runs on FMA).
VARIANTS = {"bf16": (torch.bfloat16, "tf32"), "fp32-tf32": (torch.float32, "tf32"),
            "fp32-ieee": (torch.float32, "ieee")}


def _detector_jobs():
    # The checks mean something only if the utility can see a bad kernel. fp32 with "ieee" precision cannot
    # use wgmma (FMA instead); a 256 x 128 fp32 accumulator on one warpgroup needs 256 registers a thread for
    # the accumulator alone, past the 255 limit, so it must spill.
    _, _, fp32 = grouped_gemm_jobs(torch.float32)[-1]
    _, _, bf16 = grouped_gemm_jobs(torch.bfloat16)[0]
    return [
        replace(fp32, constexprs=fp32.constexprs | dict(INPUT_PRECISION="ieee", BLOCK_N=32, BLOCK_D=32),
                num_warps=4, num_stages=2),
        replace(bf16, constexprs=bf16.constexprs | dict(BLOCK_M=256, BLOCK_N=128), num_warps=4, num_stages=2),
    ]


@pytest.fixture(scope="module")
def reports():
    groups = {name: grouped_gemm_jobs(dtype, precision) for name, (dtype, precision) in VARIANTS.items()}
    detectors = _detector_jobs()
    flat = [job for jobs in groups.values() for _, _, job in jobs] + detectors
    reps = iter(compile_sm90_all(flat))
    out = {name: [(layout, cfg, next(reps)) for layout, cfg, _ in jobs] for name, jobs in groups.items()}
    out["detectors"] = list(reps)
    print(f"\n{'variant':9} {'kernel':6} {'BM':>4} {'BN':>4} {'BD':>4} {'warps':>5} {'stages':>6} {'regs':>5} "
          f"{'spill':>5} {'smem KiB':>8} {'HGMMA':>5}")
    for name in VARIANTS:
        for layout, cfg, rep in out[name]:
            print(f"{name:9} {layout:6} {cfg.block_m:4} {cfg.block_n:4} {cfg.block_d:4} {cfg.num_warps:5} "
                  f"{cfg.num_stages:6} {rep.registers:5} {rep.spill_bytes:5} {rep.shared_bytes / 1024:8.0f} "
                  f"{rep.hgmma:5}")
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_gemm_config_fits_without_spills(reports, variant):
    rows = reports[variant]
    assert {layout for layout, _, _ in rows} == {"fwd", "dgrad", "wgrad", "fwd-gather", "wgrad-gather"}
    for layout, cfg, rep in rows:
        where = f"{variant} {layout} {cfg}"
        # ieee fp32 has no tensor-core path; everything else must lower tl.dot to wgmma.
        assert (rep.hgmma > 0) == (variant != "fp32-ieee"), f"{where}: {rep.hgmma} HGMMA in the SASS"
        assert rep.spill_bytes == 0 and rep.local_ops == 0, (
            f"{where}: {rep.spill_bytes} bytes of stack/local memory, {rep.local_ops} LDL/STL")
        assert rep.shared_bytes <= SM90_SMEM_LIMIT, f"{where}: {rep.shared_bytes} B shared > {SM90_SMEM_LIMIT}"
        assert ".target sm_90a" in rep.ptx


@pytest.mark.parametrize("variant", ["bf16", "fp32-tf32"])
def test_gemm_operands_are_pipelined_with_cp_async(reports, variant):
    # num_stages > 1 only helps if the loads became asynchronous copies into shared memory; a plain
    # ld.global per element would mean the divisibility specialisation did not take.
    for layout, cfg, rep in reports[variant]:
        assert "cp.async" in rep.ptx, f"{variant} {layout} {cfg}: operand loads are not cp.async"


def test_compile_sm90_sees_spills_and_missing_wgmma(reports):
    no_wgmma, spills = reports["detectors"]
    assert no_wgmma.hgmma == 0 and no_wgmma.spill_bytes == 0
    assert spills.hgmma > 0 and spills.spill_bytes > 0 and spills.local_ops > 0
