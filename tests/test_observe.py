"""What a person watching a run sees: TensorBoard event files with the run's scalars, the run's picture, and
the MFU arithmetic."""

import json

import pytest
import torch

from dist_utils import run_distributed


def _train(argv):
    from tritonmoe.dsv3.train import main

    return main(argv)["losses"]


def test_tensorboard_and_plot(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tritonmoe.dsv3.plot import main as plot_main

    out = tmp_path / "run"
    losses = run_distributed(_train, 2, ["--steps", "4", "--batch-size", "4", "--seq-len", "16", "--val-every", "2",
                                         "--load-every", "2", "--tensorboard", "--out", str(out)])[0]
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/total", "loss/lm", "loss/mtp", "loss/seq_aux", "loss/val", "optim/lr", "optim/grad_norm",
                "throughput/tokens_per_s", "throughput/tokens_per_s_per_device", "memory/mb",
                "load/layer0/max_over_mean", "load/layer2/idle_experts"):
        assert tag in tags, (tag, sorted(tags))
    assert [e.value for e in acc.Scalars("loss/total")] == pytest.approx([losses[s] for s in range(1, 5)])
    assert [e.step for e in acc.Scalars("loss/val")] == [2, 4]
    assert plot_main([str(out), "--out", str(tmp_path / "run.png")]) == 0
    png = (tmp_path / "run.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert plot_main([str(tmp_path / "nothing")]) == 2


def test_flops_per_token_counts_the_active_path():
    from tritonmoe.dsv3 import DeepseekV3Config
    from tritonmoe.dsv3.flops import flops_per_token, peak_flops

    cfg = DeepseekV3Config.from_hf("671b")
    f = flops_per_token(cfg, 4096)
    # ~37B activated parameters (report: 37B of 671B, embedding excluded) -> 6 * 37e9 = 2.2e11 from the matmuls,
    # plus attention at S = 4096: 3 * 62 layers * 128 heads * (192 + 128) * 4097 = 3.1e10.
    assert 2.2e11 < f < 2.9e11, f
    dense = DeepseekV3Config.from_hf("671b", n_routed_experts=0)
    assert flops_per_token(dense, 4096) < f  # experts add their top-K share
    assert flops_per_token(cfg, 8192) > f    # attention grows with the context
    assert peak_flops(torch.device("cpu"), None, {"H100": 989.0}) is None
    assert peak_flops(torch.device("cpu"), 500.0, {}) == 500e12
