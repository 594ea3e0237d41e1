"""torch.compile: the MoE block traces without a graph break, on the Triton kernels (interpreted here) and on the
CPU path's twins, and `train --compile` gives the eager run's losses.

The trainer run uses the aot_eager backend, which traces exactly what inductor gets but skips its C++ code
generation (~40 s on CI's 2 cores for the tiny model); measured once with inductor, the losses equal eager's too.
"""

import pytest
import torch

from dist_utils import run_distributed
from tritonmoe.dsv3 import DeepseekV3Config, MoE
from tritonmoe.kernels import force_twins


@pytest.mark.parametrize("twins", [False, True], ids=["kernels", "twins"])
def test_moe_block_has_no_graph_break(twins):
    cfg = DeepseekV3Config.from_hf("tiny", seq_aux_loss_alpha=0.01)
    moe = MoE(cfg).train()  # training mode: token counting and the sequence-wise loss are in the graph too
    x = torch.randn(2, 8, cfg.hidden_size, requires_grad=True)
    with force_twins() if twins else torch.enable_grad():
        explanation = torch._dynamo.explain(moe)(x)
        assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
        assert explanation.graph_count == 1
        compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
        counts = moe.gate.tokens_per_expert.clone()
        y = compiled(x)
        y.sum().backward()
        # Counted once by the compiled forward (the op runs at run time, not at trace time).
        assert int((moe.gate.tokens_per_expert - counts).sum()) == 2 * 8 * cfg.num_experts_per_tok
        g = x.grad.clone()
        x.grad = None
        moe(x).sum().backward()
    torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-6)


def _run(argv):
    from tritonmoe.dsv3.moe import routers
    from tritonmoe.dsv3.train import main

    biases = {}

    def on_step(step, model, record):
        biases[step] = torch.cat([r.e_score_correction_bias for r in routers(model)]).clone()

    return {"losses": main(argv, on_step=on_step)["losses"], "biases": biases}


def test_compiled_training_matches_eager(tmp_path):
    argv = ["--steps", "5", "--batch-size", "8", "--seq-len", "32", "--val-every", "0", "--log-every", "100"]
    (eager,) = run_distributed(_run, 1, argv + ["--out", str(tmp_path / "eager")])
    # With --ac the compiled blocks run again during the backward: the tokens must not be counted twice.
    (compiled,) = run_distributed(_run, 1, argv + ["--compile", "--compile-backend", "aot_eager", "--ac", "--out",
                                                   str(tmp_path / "compiled")], timeout=300)
    for s in range(1, 6):
        assert abs(compiled["losses"][s] - eager["losses"][s]) <= 1e-5 * abs(eager["losses"][s]), s
        assert torch.allclose(compiled["biases"][s], eager["biases"][s], rtol=0, atol=1e-6), s
    lines = (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()
    assert '"compiled": true' in lines[0]
