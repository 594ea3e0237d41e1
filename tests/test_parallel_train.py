"""The training example on real gloo processes: layout equivalence, exact resume, resume under another EP
degree and world size, and the run-level failure modes.

Ranks are forked (tests/dist_utils.py) and call `tritonmoe.dsv3.train.main` in-process: the same code path as
`torchrun -m tritonmoe.dsv3.train`, without an interpreter start per run; one CLI test runs the real torchrun.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed

# Small enough for CI's 2 cores, large enough that every MoE layer routes to every expert.
# --decay-steps 20 everywhere: runs stopped at step 10 follow the schedule of the 20-step reference.
COMMON = ["--preset", "tiny", "--batch-size", "8", "--seq-len", "32", "--lr", "3e-3", "--warmup", "3",
          "--decay-steps", "20",
          "--val-every", "0", "--seed", "7", "--log-every", "100"]
REL = 1e-5  # fp32: layouts differ only in the order of additions in reductions


def _train(argv: list[str]) -> dict:
    """main(argv) on this rank; also records every rank's expert biases after every step."""
    import torch.distributed as dist

    from tritonmoe.dsv3.moe import routers
    from tritonmoe.dsv3.train import main

    biases = {}

    def on_step(step, model, record):
        biases[step] = torch.cat([r.e_score_correction_bias for r in routers(model)]).clone()

    out = main(argv, on_step=on_step)
    out["biases"] = biases
    out["rank"] = dist.get_rank()
    return out


def _train_many(runs: list[list[str]], bad_config: str | None = None) -> list[dict]:
    results = [_train(argv) for argv in runs]
    if bad_config is not None:  # ep dividing the world (4) but not the experts (6): refused before any write
        from tritonmoe.dsv3.train import main
        out = Path(bad_config).parent / "never"
        with pytest.raises(ValueError, match="ep=4 does not divide n_routed_experts=6"):
            main(COMMON + ["--preset", bad_config, "--ep", "4", "--out", str(out)])
        assert not out.exists()
    return results


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _copy_run_until(src: Path, dst: Path, step: int) -> None:
    """A run that stopped after the checkpoint of `step`: that checkpoint and its metrics lines only."""
    dst.mkdir(parents=True)
    shutil.copytree(src / f"step_{step:08d}", dst / f"step_{step:08d}")
    lines = (src / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= step))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """World 1: 20 steps straight, checkpoints after steps 10 and 20 (the reference for every test here)."""
    out = tmp_path_factory.mktemp("runs") / "w1"
    (res,) = run_distributed(_train, 1, COMMON + ["--steps", "20", "--ckpt-every", "10", "--out", str(out)])
    return res


def test_layouts_and_resume_match_world_1(straight, tmp_path):
    ref = straight["losses"]
    assert sorted(ref) == list(range(1, 21))
    ckpt10 = Path(straight["out"])
    runs = [COMMON + ["--steps", "10", "--ep", str(ep), "--out", str(tmp_path / f"ep{ep}")] for ep in (1, 2, 4)]
    runs[1].append("--ac")  # activation checkpointing recomputes exactly: same losses, composes with FSDP + EP
    # Resume world 1's step-10 checkpoint on 4 ranks with ep 2: another world size and EP degree.
    _copy_run_until(ckpt10, tmp_path / "resume_ep2", 10)
    runs.append(COMMON + ["--steps", "20", "--ep", "2", "--resume", "--out", str(tmp_path / "resume_ep2")])
    from tritonmoe.dsv3.config import DeepseekV3Config
    bad_config = tmp_path / "config.json"
    bad_config.write_text(json.dumps(DeepseekV3Config.from_hf("tiny", n_routed_experts=6, n_group=2).to_hf()))
    per_rank = run_distributed(_train_many, 4, runs, str(bad_config), timeout=300)

    worst = {}
    for i, ep in enumerate((1, 2, 4)):
        results = [r[i] for r in per_rank]
        assert results[0]["ep"] == ep and results[0]["world"] == 4
        assert sorted(results[0]["losses"]) == list(range(1, 11))
        worst[f"world 4 ep {ep}"] = max(_rel(results[0]["losses"][s], ref[s]) for s in range(1, 11))
        for step in range(1, 11):  # the balancing state is replicated: bit-identical on every rank
            for r in results[1:]:
                assert torch.equal(r["biases"][step], results[0]["biases"][step]), (ep, step, r["rank"])
        for r in results[1:]:  # every rank logs the global-batch mean
            assert r["losses"] == results[0]["losses"]
    resumed = per_rank[0][3]
    assert sorted(resumed["losses"]) == list(range(11, 21))
    worst["resume w1->w4 ep2"] = max(_rel(resumed["losses"][s], ref[s]) for s in range(11, 21))
    print("\nmax relative loss difference vs world 1:", {k: f"{v:.2e}" for k, v in worst.items()})
    assert max(worst.values()) <= REL, worst
    # metrics.jsonl continues the stopped run: steps 1..20 once each
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "resume_ep2" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def _without(argv: list[str], *options: str) -> list[str]:
    """argv less each of `options` and its value."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        else:
            out.append(a)
    return out


def test_exact_resume_same_layout(straight, tmp_path):
    """10 steps, stop, --resume to 20: steps 11-20 bit-identical to the straight run. The resume leaves out
    --warmup and --decay-steps (the checkpoint's apply, not defaults from --steps) and logs at another cadence."""
    out = str(tmp_path / "r")
    run_distributed(_train_many, 1, [COMMON + ["--steps", "10", "--out", out]])
    resume = _without(COMMON, "--warmup", "--decay-steps") + ["--log-every", "3"]
    (res,) = run_distributed(_train, 1, resume + ["--steps", "20", "--resume", "--out", out])
    assert sorted(res["losses"]) == list(range(11, 21))
    for s in range(11, 21):
        assert res["losses"][s] == straight["losses"][s], (s, res["losses"][s], straight["losses"][s])
        assert torch.equal(res["biases"][s], straight["biases"][s])
    lines = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == list(range(1, 21))
    for key in ("step", "loss", "lm_loss", "mtp_loss", "tokens_per_s", "max_load_ratio"):
        assert all(key in ln and math.isfinite(ln[key]) for ln in lines), key


class _InfGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by inf: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _tiny_model():
    from tritonmoe.dsv3.config import DeepseekV3Config
    from tritonmoe.dsv3.model import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(DeepseekV3Config.from_hf("tiny"))


def _bad_inputs(root: str, ckpt_src: str) -> dict:
    """User errors on one rank: each must raise a clear error before writing anything."""
    from tritonmoe.dsv3.train import NonFiniteLossError, main
    from tritonmoe.parallel import CheckpointError, load_model_weights

    root = Path(root)
    msgs = {}

    def expect(exc, argv, match):
        with pytest.raises(exc, match=match) as e:
            main(COMMON + argv)
        msgs[match] = str(e.value)

    expect(ValueError, ["--preset", "huge", "--out", str(root / "a")], "unknown --preset 'huge'")
    expect(ValueError, ["--ep", "2", "--out", str(root / "a")], "ep=2 does not divide the world size 1")
    expect(ValueError, ["--batch-size", "0", "--out", str(root / "a")], "--batch-size must be >= 1")
    expect(CheckpointError, ["--resume", "--out", str(root / "a")], "no complete checkpoint")
    assert not (root / "a").exists()

    # An existing run is never overwritten by a fresh start.
    run = root / "run"
    _copy_run_until(Path(ckpt_src), run, 10)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    expect(ValueError, ["--steps", "12", "--out", str(run)], "already holds a run")
    # A crashed save (temp dir) and an incomplete checkpoint dir are skipped; a corrupt one is an error.
    (run / ".step_00000012.tmp").mkdir()
    (run / "step_00000011").mkdir()
    (run / "step_00000011" / "meta.json").write_text("{}")
    meta = run / "step_00000010" / ".metadata"
    meta.write_bytes(b"not a DCP metadata file")
    before[meta] = meta.read_bytes()
    expect(CheckpointError, ["--steps", "12", "--resume", "--out", str(run)], "cannot load checkpoint")
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.parent.name.startswith("step_00000010")
             or p.name == "metrics.jsonl"}
    assert all(after[p] == before[p] for p in after)

    # A NaN loss, or a finite loss with a non-finite gradient norm (which clipping would spread into every
    # weight), stops the run before its optimizer step and names the last good checkpoint, which stays good.
    # The fault enters through a hook on the final norm installed after step 2, so the weights saved at step 2
    # are the healthy ones and must stay so.
    for kind, fault, match in (("nan", lambda m, i, o: o * float("nan"), "step 3: loss is nan"),
                               ("inf_grad", lambda m, i, o: _InfGrad.apply(o), "step 3: gradient norm is (inf|nan)")):
        out = root / kind

        def poison(step, model, record, fault=fault):
            if step == 2:
                model.model.norm.register_forward_hook(fault)

        with pytest.raises(NonFiniteLossError, match=match) as e:
            main(COMMON + ["--steps", "6", "--ckpt-every", "2", "--out", str(out)], on_step=poison)
        msgs[kind] = str(e.value)
        assert "step_00000002" in msgs[kind]
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(ln)["step"] for ln in lines] == [1, 2]
        assert sorted(p.name for p in out.glob("step_*")) == ["step_00000002"]
        saved = load_model_weights(_tiny_model(), out / "step_00000002")
        assert all(torch.isfinite(v).all() for v in saved.state_dict().values()), kind
    return msgs


def test_bad_inputs_fail_clearly(straight, tmp_path):
    (msgs,) = run_distributed(_bad_inputs, 1, str(tmp_path), straight["out"])
    print("\n" + "\n".join(msgs.values()))


def _resume_mismatches(root: str) -> dict:
    """A 1-step run on a token file, then resumes that change the data or the LR schedule: each refused before
    anything is written, naming the option with the checkpoint's and this run's values."""
    import re

    import numpy as np

    from tritonmoe.dsv3.train import main

    root = Path(root)
    tokens = root / "tokens.u16"
    np.random.default_rng(0).integers(0, 256, 20_000).astype(np.uint16).tofile(tokens)
    run = root / "run"
    base = COMMON + ["--data", str(tokens), "--data-dtype", "uint16", "--out", str(run)]
    main(base + ["--steps", "1"])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    msgs = {}
    shutil.copy(tokens, root / "same_tokens.u16")
    for option, old, new in (("--lr", "0.003", "0.001"), ("--warmup", "3", "4"), ("--decay-steps", "20", "30"),
                             ("--min-lr-ratio", "0.1", "0.2"), ("--weight-decay", "0.1", "0.0"),
                             ("--clip", "1.0", "0.5"), ("--seed", "7", "8"),
                             ("--data", str(tokens.resolve()), str((root / "same_tokens.u16").resolve()))):
        with pytest.raises(ValueError, match=re.escape(f"was trained with {option} {old}, this run asks for "
                                                       f"{option} {new}")) as e:
            main(base + ["--steps", "2", "--resume", option, new])
        msgs[option] = str(e.value)
    with tokens.open("ab") as f:  # the same path, other contents
        np.zeros(1000, np.uint16).tofile(f)
    with pytest.raises(ValueError, match="trained with --data holding 19000 train .* asks for --data holding "
                                         "19950 train") as e:
        main(base + ["--steps", "2", "--resume"])
    msgs["contents"] = str(e.value)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    return msgs


def test_resume_refuses_other_data_or_schedule(tmp_path):
    (msgs,) = run_distributed(_resume_mismatches, 1, str(tmp_path))
    print("\n" + "\n".join(msgs.values()))


def _train_bf16(out: str) -> dict:
    """4 steps under EP 2 with bf16 mixed precision and activation checkpointing (which must compose with the
    extra fp32 router unit); records the dtypes that meet inside the first MoE layer and in the stored state."""
    from tritonmoe.dsv3.moe import routers
    from tritonmoe.dsv3.train import main
    from tritonmoe.parallel import find_moe_layers

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    seen = {"master": set(), "bias": set()}

    def note(key, value) -> None:  # hooks must return None (a value would replace args/output)
        seen.setdefault(key, value)

    def on_step(step, model, record):
        if step == 1:  # pre-hooks run after FSDP's own (it prepends), so they see the unsharded weights
            _, moe = find_moe_layers(model)[0]
            moe.experts.register_forward_pre_hook(
                lambda m, args: note("experts x, w", (args[0].dtype, local(m.gate_up_proj).dtype)))
            moe.gate.register_forward_pre_hook(lambda m, args: note("router w", m.weight.dtype))
            moe.gate.register_forward_hook(lambda m, args, out: note("topk_w", out[1].dtype))
            moe.register_forward_hook(lambda m, args, out: note("moe y", out.dtype))
        seen["master"].update(local(p).dtype for p in model.parameters())
        seen["master"].update(local(s).dtype for s in model.state_dict().values() if s.is_floating_point())
        seen["bias"].update(r.e_score_correction_bias.dtype for r in routers(model))

    res = main(COMMON + ["--steps", "4", "--ep", "2", "--mixed-precision", "bf16", "--ac", "--out", out],
               on_step=on_step)
    return {"losses": res["losses"], "seen": seen}


BF16_REL = 3e-3  # bf16 rounds to 2^-9 relative; measured drift over these 4 steps: 3.6e-4


def test_bf16_mixed_precision_matches_fp32(straight, tmp_path):
    """The GPU dtype flow on CPU (`--mixed-precision auto` picks bf16 on GPUs): bf16 compute with fp32 master
    weights, router, expert bias, routing weights and gradient reduction; bf16 rows through the all-to-all, the
    grouped GEMMs and the weighted unpermute. Losses stay finite and close to the fp32 run's."""
    per_rank = run_distributed(_train_bf16, 2, str(tmp_path / "bf16"))
    bf16, f32 = torch.bfloat16, torch.float32
    for res in per_rank:
        seen = res["seen"]
        assert seen["master"] == {f32} and seen["bias"] == {f32}, seen
        assert seen["experts x, w"] == (bf16, bf16) and seen["moe y"] == bf16, seen
        assert seen["router w"] == f32 and seen["topk_w"] == f32, seen
        assert res["losses"] == per_rank[0]["losses"]
    losses = per_rank[0]["losses"]
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    worst = max(_rel(losses[s], straight["losses"][s]) for s in losses)
    print(f"\nbf16 (world 2, ep 2, --ac) vs fp32 (world 1): max relative loss difference {worst:.2e}")
    assert worst <= BF16_REL


def _default_out_runs(root: str) -> list[str]:
    os.chdir(root)  # forked rank: the working directory is this process's own
    from tritonmoe.dsv3.train import main

    first = main(COMMON + ["--steps", "1"])["out"]
    again = main(COMMON + ["--steps", "1"])["out"]
    resumed = main(COMMON + ["--steps", "2", "--resume"])["out"]
    return [first, again, resumed]


def test_default_out_never_reuses_a_run(tmp_path):
    # The README's command without --out must be repeatable: a second run takes runs/tiny-2 (rank 0 picks and
    # broadcasts it), and --resume without --out continues the newest run.
    outs = run_distributed(_default_out_runs, 2, str(tmp_path))
    expected = [os.path.join("runs", "tiny"), os.path.join("runs", "tiny-2"), os.path.join("runs", "tiny-2")]
    assert outs == [expected, expected]  # both ranks agree

    def steps(run: str) -> list[int]:
        return [json.loads(ln)["step"] for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert steps("runs/tiny") == [1]
    assert steps("runs/tiny-2") == [1, 2]


def test_torchrun_cli(tmp_path):
    """The documented command, as a user runs it (2 ranks, default EP = 2), and a user error's exit."""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "tritonmoe.dsv3.train",
           "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--val-every", "3", "--out", str(tmp_path / "o")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ep 2 x edp 1" in res.stdout and "step     3/3" in res.stdout, res.stdout
    lines = [json.loads(ln) for ln in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2, 3] and "val_loss" in lines[-1]
    assert (tmp_path / "o" / "step_00000003" / ".metadata").is_file()
    bad = subprocess.run([sys.executable, "-m", "tritonmoe.dsv3.train", "--preset", "nope",
                          "--out", str(tmp_path / "b")], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error: unknown --preset 'nope'" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "b").exists()


def test_data_sources_and_batch_layout(tmp_path):
    """Step s's global batch depends on (seed, s) only: the DP ranks' shares concatenate to the world-1 batch.
    Token files are memory-mapped; folders are read in sorted order with a held-out file split."""
    import numpy as np

    from tritonmoe.dsv3.data import batch, load_corpus

    tokens = (np.arange(5000) * 7919 % 50000).astype(np.uint16)
    tokens.tofile(tmp_path / "tokens.u16")
    c = load_corpus(tmp_path / "tokens.u16", "uint16")
    assert isinstance(c.train, np.memmap) and c.train.size + c.val.size == 5000
    assert c.vocab_size == int(tokens.max()) + 1
    whole = batch(c.train, 3, 5, 8, 16)
    assert whole.shape == (8, 16) and whole.dtype == torch.int64
    for world in (2, 4):
        shares = [batch(c.train, 3, 5, 8, 16, r, world) for r in range(world)]
        assert torch.equal(torch.cat(shares), whole)
    assert not torch.equal(batch(c.train, 3, 6, 8, 16), whole)
    with pytest.raises(ValueError, match="not divisible by the 3 data-parallel ranks"):
        batch(c.train, 3, 5, 8, 16, 0, 3)

    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(25):
        (folder / f"{i:02d}.txt").write_text(f"document {i} " * 20)
    c = load_corpus(folder)
    assert c.vocab_size == 256 and b"document 19 " in c.val.tobytes() and b"document 19 " not in c.train.tobytes()
    with pytest.raises(ValueError, match="no such file"):
        load_corpus(tmp_path / "absent")
    with pytest.raises(ValueError, match="uint16 or uint32"):
        load_corpus(tmp_path / "tokens.u16", "int8")


def _expert_shares(argv: list[str]) -> dict:
    """main(argv): its losses, and this rank's bytes of the routed-expert parameters, their global bytes and their
    placements."""
    from torch.distributed.tensor import DTensor

    from tritonmoe.dsv3.train import main
    from tritonmoe.parallel import find_moe_layers

    held = {}

    def on_step(step, model, record):
        if step == 1:
            for _, moe in find_moe_layers(model):
                for name, p in moe.experts.named_parameters():
                    local = p.to_local() if isinstance(p, DTensor) else p
                    held[name] = held.get(name, 0) + local.numel() * local.element_size()
                    held[name + ".total"] = held.get(name + ".total", 0) + p.numel() * p.element_size()
                    held[name + ".placements"] = str(getattr(p, "placements", None))

    return {"losses": main(argv, on_step=on_step)["losses"], "held": held}


def test_experts_fewer_than_edp_shard_on_dim_1(tmp_path):
    # 2 experts over 4 ranks with ep 1: edp 4 > L = 2. FSDP2's default Shard(0) would pad dim 0 so each rank
    # held one whole expert (2x its share); Shard(1) gives each rank exactly a quarter of every expert stack,
    # and the losses equal world 1's (the init depends on (seed, name, expert) only).
    from tritonmoe.dsv3.config import DeepseekV3Config

    config = tmp_path / "config.json"
    config.write_text(json.dumps(DeepseekV3Config.from_hf("tiny", n_routed_experts=2, n_group=1, topk_group=1,
                                                          num_experts_per_tok=1).to_hf()))
    argv = COMMON + ["--preset", str(config), "--steps", "4", "--out"]
    (ref,) = run_distributed(_train, 1, argv + [str(tmp_path / "w1")])
    per_rank = run_distributed(_expert_shares, 4, argv + [str(tmp_path / "w4")])
    for r in per_rank:
        for name in ("gate_up_proj", "down_proj"):
            assert r["held"][name] * 4 == r["held"][name + ".total"], (name, r["held"])
            assert "Shard(dim=1)" in r["held"][name + ".placements"], r["held"]
    worst = max(_rel(per_rank[0]["losses"][s], ref["losses"][s]) for s in range(1, 5))
    assert worst <= REL, worst
