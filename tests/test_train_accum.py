"""Gradient accumulation and the step's global denominators (issue 11): the loss of a step does not depend on how
its global batch is cut into ranks and micro-batches, and a resume in the middle of an accumulated run continues
bit-identically. Also the metrics every line records, and DeepSeek-V3's schedules.

fp32 on CPU, the kernels' twins, real gloo ranks (tests/dist_utils.py).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from helpers import tiny_aux_preset

# seq_aux_loss_alpha > 0 so the sequence-wise term's denominator is under test too.
COMMON = ["--batch-size", "8", "--seq-len", "32", "--lr", "3e-3", "--warmup", "2", "--decay-steps", "10",
          "--val-every", "0", "--seed", "11", "--log-every", "100", "--load-every", "5"]
REL = 1e-6


def _train(argv):
    import torch.distributed as dist

    from tritonmoe.dsv3.moe import routers
    from tritonmoe.dsv3.train import main

    biases = {}

    def on_step(step, model, record):
        biases[step] = torch.cat([r.e_score_correction_bias for r in routers(model)]).clone()

    out = main(argv, on_step=on_step)
    return {"losses": out["losses"], "biases": biases, "rank": dist.get_rank()}


def _rel(a, b):
    return abs(a - b) / abs(b)


def test_losses_do_not_depend_on_the_cut(tmp_path):
    preset = tiny_aux_preset(tmp_path)
    base = COMMON + ["--preset", preset, "--steps", "10"]

    def run(world, *extra, name):
        return run_distributed(_train, world, base + list(extra) + ["--out", str(tmp_path / name)])[0]

    ref = run(1, name="w1a1")
    cuts = {"world 1, accumulation 4": run(1, "--micro-batch-size", "2", name="w1a4"),
            "world 2, ep 2, accumulation 2": run(2, "--ep", "2", "--micro-batch-size", "2", name="w2a2"),
            "world 4, ep 2, accumulation 2, no sync": run(4, "--ep", "2", "--micro-batch-size", "1", "--accum-no-sync",
                                                          name="w4a2")}
    worst = {}
    for name, got in cuts.items():
        assert sorted(got["losses"]) == list(range(1, 11)), name
        worst[name] = max(_rel(got["losses"][s], ref["losses"][s]) for s in range(1, 11))
        for s in range(1, 11):
            assert torch.allclose(got["biases"][s], ref["biases"][s], rtol=0, atol=1e-6), (name, s)
    print("\nmax relative loss difference vs world 1, no accumulation:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= REL, worst

    # The metrics of an accumulated step: the layout on the first line, per-layer loads on every line, full
    # counts every --load-every steps and at the last.
    lines = [json.loads(ln) for ln in (tmp_path / "w4a2" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["world"] == 4 and lines[0]["ep"] == 2 and lines[0]["micro_batches"] == 2
    assert lines[0]["pp"] == 1 and lines[0]["compiled"] is False and lines[0]["fp8"] is False
    assert "world" not in lines[1]
    n_moe = 3  # tiny: layers 1 and 2, and the MTP block
    for ln in lines:
        for key in ("step", "loss", "lm_loss", "mtp_loss", "seq_aux_loss", "tokens_per_s", "lr", "grad_norm",
                    "memory_mb"):
            assert key in ln, key
        assert len(ln["layer_load"]) == n_moe and ln["seq_aux_loss"] > 0
        for ld in ln["layer_load"]:
            assert ld["max_over_mean"] >= 1 >= ld["min_over_mean"] >= 0 and 0 <= ld["idle_experts"] <= 8
    assert [ln["step"] for ln in lines if "expert_counts" in ln] == [5, 10]
    counts = torch.tensor(lines[4]["expert_counts"])
    # every token of the step, top-2, per layer; the MTP block sees the 31 positions that have a token ahead
    assert counts.shape == (n_moe, 8) and counts.sum(1).tolist() == [8 * 32 * 2, 8 * 32 * 2, 8 * 31 * 2]


def test_resume_inside_an_accumulated_run_is_bit_identical(tmp_path):
    preset = tiny_aux_preset(tmp_path)
    base = COMMON + ["--preset", preset, "--micro-batch-size", "1", "--ep", "2"]
    straight = run_distributed(_train, 2, base + ["--steps", "10", "--ckpt-every", "5", "--out",
                                                  str(tmp_path / "a")])[0]
    stopped = tmp_path / "b"
    stopped.mkdir()
    shutil.copytree(tmp_path / "a" / "step_00000005", stopped / "step_00000005")
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[:5]
    (stopped / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:17])  # + a half-written line
    resumed = run_distributed(_train, 2, base + ["--steps", "10", "--resume", "--out", str(stopped)])[0]
    assert sorted(resumed["losses"]) == list(range(6, 11))
    for s in range(6, 11):
        assert resumed["losses"][s] == straight["losses"][s], s
        assert torch.equal(resumed["biases"][s], straight["biases"][s]), s
    steps = [json.loads(ln)["step"] for ln in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


# ---------------------------------------------------------------------------------------------- schedules
def _schedules(**kw):
    from argparse import Namespace

    from tritonmoe.dsv3.schedules import Schedules

    args = Namespace(lr=1.0, min_lr_ratio=0.1, batch_size=kw.pop("batch_size", 16), seq_len=kw.pop("seq_len", 10),
                     batch_size_ramp=None, mtp_weight_schedule=None, bias_rate_schedule=None)
    for k, v in kw.items():
        setattr(args, k, v)
    return Schedules.from_args(args, warmup=2, decay_steps=20)


def test_batch_ramp_mtp_weight_and_bias_rate_schedules():
    s = _schedules(batch_size_ramp="400:4")  # 4 -> 16 over the first 400 tokens, in levels of 4
    sizes = [s.batch_at(step)[0] for step in range(1, 12)]
    # tokens before: 0, 40, 80, 120 (-> 8 at 1/3 of the ramp... levels 1 + 3 * t / 400)
    assert sizes[0] == 4 and sizes[-1] == 16 and sizes == sorted(sizes)
    assert set(sizes) <= {4, 8, 12, 16} and len(set(sizes)) == 4
    tokens = 0
    for step in range(1, 12):
        b, before = s.batch_at(step)
        assert before == tokens  # the tokens before a step are those of the steps before it
        tokens += b * 10
    m = _schedules(mtp_weight_schedule="0.3:1K:0.1")
    assert m.mtp_weight_at(999, 0.5) == 0.3 and m.mtp_weight_at(1000, 0.5) == 0.1
    assert _schedules().mtp_weight_at(10**9, 0.5) == 0.5
    g = _schedules(bias_rate_schedule="800:0")  # 20 steps x 160 tokens = 3200: the last 800 from token 2400 on
    assert g.bias_rate_at(2399, 1e-3) == 1e-3 and g.bias_rate_at(2400, 1e-3) == 0.0
    for bad, match in ((dict(batch_size_ramp="400:5"), "must divide --batch-size"),
                       (dict(batch_size_ramp="x:4"), "not a token count"),
                       (dict(mtp_weight_schedule="0.3:1K"), "BEFORE:TOKENS:AFTER"),
                       (dict(mtp_weight_schedule="nan:1K:0.1"), "finite number"),
                       (dict(bias_rate_schedule="800:0.1"), "TOKENS_LEFT:0")):
        with pytest.raises(ValueError, match=match):
            _schedules(**bad)


def test_schedules_are_recorded_and_checked_on_resume(tmp_path):
    def go(root):
        from tritonmoe.dsv3.train import main

        run = str(Path(root) / "r")
        schedules = ["--batch-size-ramp", "300:4", "--mtp-weight-schedule", "0.3:300:0.1", "--bias-rate-schedule",
                     "1K:0"]
        first = main(COMMON + schedules + ["--out", run, "--steps", "4"])
        other = schedules[:3] + ["0.3:3K:0.1"] + schedules[4:]
        with pytest.raises(ValueError, match="was trained with --mtp-weight-schedule 0.3:300:0.1, this run asks "
                                             "for --mtp-weight-schedule 0.3:3000:0.1"):
            main(COMMON + other + ["--out", run, "--steps", "5", "--resume"])
        lines = [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        return first["losses"], [ln["batch_size"] for ln in lines], [ln["mtp_weight"] for ln in lines]

    (losses, sizes, weights), = run_distributed(go, 1, str(tmp_path))
    # 4 x 32 = 128 tokens a step while the batch is 4: 0, 128, 256 tokens before steps 1-3, 384 >= 300 before step 4
    assert sizes == [4, 4, 4, 8] and weights == [0.3, 0.3, 0.3, 0.1]
