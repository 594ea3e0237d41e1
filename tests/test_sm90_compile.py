"""Every grouped-GEMM config compiles for Hopper (sm_90a) into wgmma code without spills. No GPU needed.

triton.compile with GPUTarget("cuda", 90, 32) builds the cubin on this CPU machine and the wheel's cuobjdump
reads it (kernels/_sm90.py). A config that falls back to mma.sync (no HGMMA), spills its accumulator to
local memory or needs more shared memory than an H100 SM has would run, but slowly or not at all.
Run with -s to see the table of registers / shared memory / HGMMA per config.
"""

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from tritonmoe.kernels._sm90 import SM90_SMEM_LIMIT, compile_sm90_all  # noqa: E402
from tritonmoe.kernels.grouped_gemm import sm90_compile_jobs  # noqa: E402


@pytest.fixture(scope="module")
def gemm_reports():
    jobs = sm90_compile_jobs(torch.bfloat16)
    reports = compile_sm90_all([job for _, _, job in jobs])
    print(f"\n{'kernel':6} {'BM':>4} {'BN':>4} {'BK':>4} {'warps':>5} {'stages':>6} {'regs':>5} {'spill':>5} "
          f"{'smem KiB':>8} {'HGMMA':>5}")
    for (layout, cfg, _), rep in zip(jobs, reports):
        print(f"{layout:6} {cfg.block_m:4} {cfg.block_n:4} {cfg.block_k:4} {cfg.num_warps:5} {cfg.num_stages:6} "
              f"{rep.registers:5} {rep.spill_bytes:5} {rep.shared_bytes / 1024:8.0f} {rep.hgmma:5}")
    return list(zip(jobs, reports))


def test_every_gemm_config_uses_wgmma_without_spills(gemm_reports):
    layouts = {layout for (layout, _, _), _ in gemm_reports}
    assert layouts == {"fwd", "dgrad", "wgrad"}
    for (layout, cfg, _), rep in gemm_reports:
        where = f"{layout} {cfg}"
        assert rep.hgmma > 0, f"{where}: no HGMMA in the SASS (tl.dot did not lower to wgmma)"
        assert rep.spill_bytes == 0 and rep.local_ops == 0, (
            f"{where}: {rep.spill_bytes} bytes of stack/local memory, {rep.local_ops} LDL/STL")
        assert rep.shared_bytes <= SM90_SMEM_LIMIT, f"{where}: {rep.shared_bytes} B shared > {SM90_SMEM_LIMIT}"
        assert ".target sm_90a" in rep.ptx


def test_gemm_operands_are_pipelined_with_cp_async(gemm_reports):
    # num_stages > 1 only helps if the loads became asynchronous copies into shared memory; a plain
    # ld.global per element would mean the divisibility specialisation did not take.
    for (layout, cfg, _), rep in gemm_reports:
        assert "cp.async" in rep.ptx, f"{layout} {cfg}: operand loads are not cp.async"


def test_compile_sm90_sees_spills_and_missing_wgmma():
    # The checks above mean something only if the utility can see a bad kernel. fp32 with "ieee" precision
    # cannot use wgmma (FMA instead); a 256 x 128 fp32 accumulator on one warpgroup needs 256 registers a
    # thread for the accumulator alone, past the 255 limit, so it must spill. One child process compiles
    # both (compile_sm90_all; compile_sm90 is its one-job form).
    _, _, fp32 = sm90_compile_jobs(torch.float32)[-1]
    _, _, bf16 = sm90_compile_jobs(torch.bfloat16)[0]
    no_wgmma, spills = compile_sm90_all([
        replace(fp32, constexprs=fp32.constexprs | dict(INPUT_PRECISION="ieee", BLOCK_N=32, BLOCK_K=32),
                num_warps=4, num_stages=2),
        replace(bf16, constexprs=bf16.constexprs | dict(BLOCK_M=256, BLOCK_N=128), num_warps=4, num_stages=2),
    ])
    assert no_wgmma.hgmma == 0 and no_wgmma.spill_bytes == 0
    assert spills.hgmma > 0 and spills.spill_bytes > 0 and spills.local_ops > 0
