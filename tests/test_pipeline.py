"""Pipeline parallelism (issue 14) on real gloo ranks: every schedule gives world 1's losses and expert biases, a
pipeline checkpoint resumes at another pipeline degree and world size, and the zero-bubble schedules run each
grouped GEMM once per pass (their input- and weight-gradient passes do not both recompute both gradients).
fp32, tiny preset; the stages split the 3 decoder layers (+ head and MTP) by FLOPs.
"""

import json
import shutil

import pytest
import torch

from dist_utils import run_distributed
from helpers import tiny_aux_preset

COMMON = ["--batch-size", "8", "--seq-len", "32", "--lr", "3e-3", "--warmup", "3", "--decay-steps", "20",
          "--val-every", "10", "--val-batches", "2", "--seed", "5", "--log-every", "100"]
REL = 1e-5


def _train(argv):
    import re

    from tritonmoe.dsv3.moe import Router
    from tritonmoe.dsv3.train import main

    biases = {}

    def on_step(step, model, record):  # each MoE layer's bias by its name in the whole model
        biases[step] = {re.sub(r"^\d+\.", "", name): m.e_score_correction_bias.clone()
                        for name, m in model.named_modules() if isinstance(m, Router)}

    out = main(argv, on_step=on_step)
    return {"losses": out["losses"], "biases": biases, "val": out["val_loss"]}


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    # The sequence-wise balance loss on: its term comes from the routers of every stage (torchtitan #2061).
    return ["--preset", tiny_aux_preset(tmp_path_factory.mktemp("preset"))]


@pytest.fixture(scope="module")
def world1(tmp_path_factory, preset):
    out = tmp_path_factory.mktemp("pp") / "w1"
    return run_distributed(_train, 1, COMMON + preset + ["--steps", "10", "--ckpt-every", "5", "--out", str(out)])[0]


@pytest.mark.parametrize("world, args", [
    (4, ["--pp", "2", "--ep", "2", "--pp-schedule", "1F1B"]),                        # pp x edp x ep = 2 x 1 x 2
    (4, ["--pp", "2", "--ep", "1", "--pp-schedule", "Interleaved1F1B"]),             # pp x dp = 2 x 2, 4 stages
    (4, ["--pp", "2", "--pp-schedule", "ZBVZeroBubble"]),                            # V: first and last stage on rank 0
    (2, ["--pp", "2", "--pp-schedule", "DualPipeV"]),                                # 4 micro-batches, 4 stages
], ids=["1F1B-ep2", "Interleaved1F1B-dp2", "ZBV", "DualPipeV"])
def test_schedules_match_world_1(world1, preset, tmp_path, world, args):
    per_rank = run_distributed(_train, world, COMMON + preset + args + ["--steps", "10", "--out", str(tmp_path / "r")],
                               timeout=300)
    got = per_rank[0]
    worst = max(_rel(got["losses"][s], world1["losses"][s]) for s in range(1, 11))
    print(f"\n{' '.join(args)} (world {world}): max relative loss difference vs world 1 {worst:.1e}, val "
          f"{_rel(got['val'], world1['val']):.1e}")
    assert worst <= REL and _rel(got["val"], world1["val"]) <= REL
    # Every rank logs the same global losses; the biases of the layers a rank holds equal world 1's. Each rank holds
    # some of the MoE layers: compare each of them with world 1's layer of the same place in the model.
    lines = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["pp"] == 2 and lines[0]["pp_schedule"] == args[args.index("--pp-schedule") + 1]
    assert all(ln["seq_aux_loss"] > 0 for ln in lines)  # the balance loss is on, and in the compared losses
    assert len(lines[0]["layer_load"]) == 3  # every MoE layer of the model, gathered from the stages
    for r in per_rank[1:]:
        assert r["losses"] == got["losses"]
    held = set()
    for r in per_rank:
        for step in range(1, 11):
            for name, bias in r["biases"][step].items():
                assert torch.allclose(bias, world1["biases"][step][name], atol=1e-6, rtol=0), (name, step)
                held.add(name)
    assert held == set(world1["biases"][1])  # every MoE layer, MTP's included, lives on some rank


def test_pipeline_checkpoint_resumes_at_other_layouts(world1, preset, tmp_path):
    run = tmp_path / "pp2"
    run_distributed(_train, 2, COMMON + preset + ["--pp", "2", "--steps", "5", "--ckpt-every", "5", "--out", str(run)])
    for name, world, args in (("world2", 2, ["--ep", "2"]), ("world1", 1, [])):
        out = tmp_path / name
        out.mkdir()
        shutil.copytree(run / "step_00000005", out / "step_00000005")
        shutil.copy(run / "metrics.jsonl", out / "metrics.jsonl")
        got = run_distributed(_train, world, COMMON + preset + args + ["--steps", "10", "--resume", "--out", str(out)])[0]
        assert sorted(got["losses"]) == list(range(6, 11))
        worst = max(_rel(got["losses"][s], world1["losses"][s]) for s in range(6, 11))
        print(f"\npp 2 checkpoint resumed at {name}: max relative loss difference vs world 1 {worst:.1e}")
        assert worst <= 1e-6, (name, worst)
    # And back: world 1's checkpoint into a pipeline.
    back = tmp_path / "back"
    back.mkdir()
    shutil.copytree(tmp_path / "world1" / "step_00000010", back / "step_00000010")
    (back / "metrics.jsonl").write_text("")
    got = run_distributed(_train, 2, COMMON + preset + ["--pp", "2", "--steps", "11", "--resume", "--out", str(back)])[0]
    assert sorted(got["losses"]) == [11]


def _count_gemms(argv):
    """One step with the Triton kernels (interpreted); the grouped GEMM launches of each kind on this rank."""
    import importlib

    from tritonmoe.dsv3.train import main
    from tritonmoe.kernels import _backend

    gg = importlib.import_module("tritonmoe.kernels.grouped_gemm")  # the module (the package exports the function)

    counts = {"forward/dgrad": 0, "wgrad": 0}
    real_mm, real_wgrad = gg._grouped_mm_launch, gg._grouped_mm_wgrad_launch

    def mm(*a, **k):
        counts["forward/dgrad"] += 1
        return real_mm(*a, **k)

    def wgrad(*a, **k):
        counts["wgrad"] += 1
        return real_wgrad(*a, **k)

    gg._grouped_mm_launch, gg._grouped_mm_wgrad_launch = mm, wgrad
    forced, _backend._twins_forced = _backend._twins_forced, 0  # dist_utils runs the twins; these are the kernels
    try:
        main(argv)
    finally:
        gg._grouped_mm_launch, gg._grouped_mm_wgrad_launch = real_mm, real_wgrad
        _backend._twins_forced = forced
    return counts


@pytest.mark.skipif(not __import__("tritonmoe.kernels._backend", fromlist=["x"]).INTERPRET,
                    reason="counts the Triton kernels' launches (the suite runs them in the interpreter)")
def test_zero_bubble_runs_each_gemm_once_per_pass(tmp_path):
    argv = ["--pp", "2", "--steps", "1", "--batch-size", "4", "--seq-len", "8", "--val-every", "0",
            "--pp-microbatches", "2"]
    zbv = run_distributed(_count_gemms, 2, argv + ["--pp-schedule", "ZBVZeroBubble", "--out", str(tmp_path / "z")],
                          timeout=600)
    one_f_one_b = run_distributed(_count_gemms, 2, argv + ["--pp-schedule", "1F1B", "--out", str(tmp_path / "o")],
                                  timeout=600)
    total = lambda runs, kind: sum(r[kind] for r in runs)  # noqa: E731
    # 3 MoE layers x 2 expert GEMMs x 2 micro-batches: a forward and a dgrad launch each, and one wgrad launch.
    assert total(one_f_one_b, "forward/dgrad") == 3 * 2 * 2 * 2 and total(one_f_one_b, "wgrad") == 3 * 2 * 2
    assert total(zbv, "forward/dgrad") == total(one_f_one_b, "forward/dgrad")
    assert total(zbv, "wgrad") == total(one_f_one_b, "wgrad")
