"""train --fp8 (issue 15): the routed experts' GEMMs in FP8 with EP, FSDP and accumulation; each expert weight
quantized once per step however many micro-batches and recomputations use it; losses close to the bf16 run's.
The 200-step loss comparison lives in bench/ (python -m bench fp8-train) and the README."""

import json

from dist_utils import run_distributed

ARGS = ["--steps", "3", "--batch-size", "8", "--seq-len", "32", "--val-every", "0", "--log-every", "100",
        "--mixed-precision", "bf16", "--micro-batch-size", "2", "--ep", "2", "--ac"]


def _train(argv):
    from tritonmoe.dsv3.moe import GroupedExperts
    from tritonmoe.dsv3.train import main

    stats = {}

    def on_step(step, model, record):
        experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
        cache = experts[0].fp8_cache
        stats[step] = {"fp8": all(m.fp8 for m in experts), "n": len(experts),
                       "hits": cache.hits if cache else 0, "misses": cache.misses if cache else 0}

    return {"losses": main(argv, on_step=on_step)["losses"], "stats": stats}


def test_fp8_experts_train_with_ep_fsdp_and_accumulation(tmp_path):
    bf16 = run_distributed(_train, 2, ARGS + ["--out", str(tmp_path / "bf16")])[0]
    fp8 = run_distributed(_train, 2, ARGS + ["--fp8", "--out", str(tmp_path / "fp8")])[0]
    n = fp8["stats"][1]["n"]
    assert fp8["stats"][1]["fp8"] and n == 3 and not bf16["stats"][1]["fp8"]
    for step in (1, 2, 3):
        s = fp8["stats"][step]
        # Per step: 2 weights x 3 MoE layers quantized once (misses); the other micro-batch (each rank holds 2 of
        # 4 sequences as 2 micro-batches) and --ac's recomputations hit the cache.
        assert s["misses"] == 2 * n * step, s
        assert s["hits"] == 2 * n * 3 * step, s
        rel = abs(fp8["losses"][step] - bf16["losses"][step]) / bf16["losses"][step]
        assert rel < 5e-3, (step, fp8["losses"][step], bf16["losses"][step])
    first = json.loads((tmp_path / "fp8" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["fp8"] is True
