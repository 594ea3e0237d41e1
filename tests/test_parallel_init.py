"""Meta-device construction of the training model (dsv3/train.py `_build_model`, parallel/init.py) on real gloo
processes: no rank ever holds a full expert stack or draws the dense tensors beyond its shards (give or take
an init block at each end), the initial global weights are the same for every world size and EP degree (uneven
and empty FSDP shards included) and follow the model's init rule, and `--init-from` starts training from a
converted checkpoint with the loss the single-process model gives on the same batch.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_utils import run_distributed
from helpers import assert_close

# Uneven on purpose: vocab 97 is prime (FSDP chunks 25/25/25/22 over 4 ranks), and with 6 experts under ep 2 on
# 4 ranks each ep rank's 3 experts split 2/1 over edp, while a router's 6 rows leave rank 3 of the dense mesh
# an empty shard.
UNEVEN = dict(vocab_size=97, n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2)


def _config(overrides: dict):
    from tritonmoe.dsv3.config import DeepseekV3Config

    return DeepseekV3Config.from_hf("tiny", **overrides)


def _global_weights(overrides: dict, ep: int, seed: int) -> dict:
    """The initial state of the training model as global tensors (every rank gathers every shard)."""
    from tritonmoe.dsv3.train import _build_model

    model = _build_model(_config(overrides), seed, ep, torch.device("cpu"), None)
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    return out


def test_initial_weights_are_layout_independent_and_follow_the_init_rule():
    (ref,) = run_distributed(_global_weights, 1, UNEVEN, 1, 3)
    for world, ep in ((2, 2), (4, 2)):  # (4, 2): uneven expert shards over edp, an empty router shard
        for rank, got in enumerate(run_distributed(_global_weights, world, UNEVEN, ep, 3)):
            assert got.keys() == ref.keys()
            for name in ref:
                assert torch.equal(got[name], ref[name]), (world, ep, rank, name)

    std = _config(UNEVEN).initializer_range
    for name, t in ref.items():
        if name.endswith("norm.weight"):
            assert (t == 1).all(), name
        elif name.endswith(("e_score_correction_bias", "tokens_per_expert")):
            assert (t == 0).all(), name
        else:  # every weight N(0, initializer_range); the larger ones pin the std to a few percent
            assert abs(t.mean().item()) < 5 * std / t.numel() ** 0.5, name
            if t.numel() >= 4096:
                assert abs(t.std().item() / std - 1) < 0.05, (name, t.std().item())
    experts = ref["model.layers.1.mlp.experts.gate_up_proj"]
    assert not torch.equal(experts[0], experts[1])  # each expert from its own generator
    assert not torch.equal(experts, ref["model.layers.2.mlp.experts.gate_up_proj"])
    (other_seed,) = run_distributed(_global_weights, 1, UNEVEN, 1, 4)
    assert not torch.equal(other_seed["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])


# Experts dominate, as in the real presets: the expert stack [8, 128, 64] has 4x the elements of the largest
# dense tensor (the 256 x 64 embedding and head).
WIDE_EXPERTS = dict(moe_intermediate_size=64)


def _largest_allocation(ep: int) -> dict:
    """The largest real (not meta) tensor any op produced while this rank built the training model."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from tritonmoe.dsv3.train import _build_model

    class Largest(TorchDispatchMode):
        numel, what = 0, ""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                local = t._local_tensor if isinstance(t, DTensor) else t
                if isinstance(local, torch.Tensor) and not local.is_meta and local.numel() > self.numel:
                    self.numel, self.what = local.numel(), f"{func} -> {tuple(local.shape)}"
            return out

    cfg = _config(WIDE_EXPERTS)
    with Largest() as seen:
        model = _build_model(cfg, 0, ep, torch.device("cpu"), None)
    experts = {n for n, _ in model.named_parameters() if ".experts." in n}
    dense = max(p.numel() for n, p in model.named_parameters() if n not in experts)
    stack = model.model.layers[1].mlp.experts.gate_up_proj.numel()
    return {"largest": seen.numel, "what": seen.what, "dense": dense, "stack": stack}


def test_no_rank_materializes_a_full_expert_stack():
    # The former build (the whole model on every rank, then scattered) allocated the 65536-element stack here.
    ep = 4
    for rank, r in enumerate(run_distributed(_largest_allocation, 4, ep)):
        assert r["stack"] == 4 * r["dense"]
        assert r["largest"] <= max(r["dense"], r["stack"] // ep), (rank, r)
    print(f"\nlargest tensor built on a rank (world 4, ep 4): {r['largest']} elements ({r['what']}); full expert "
          f"stack {r['stack']}, largest dense tensor {r['dense']}")


def _dense_draws(overrides: dict, ep: int, block: int) -> dict:
    """Build the training model with init blocks of `block` elements; count the random values this rank drew
    for dense parameters (aten.normal_ on real tensors, less the routed experts' exact per-expert draws)
    against the normal-initialized dense elements it holds; return the global weights too."""
    from unittest import mock

    from torch.utils._python_dispatch import TorchDispatchMode

    from tritonmoe.dsv3.train import _build_model
    from tritonmoe.parallel import init

    class Draws(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.normal_.default and not args[0].is_meta:
                self.n += args[0].numel()
            return func(*args, **(kwargs or {}))

    with mock.patch.object(init, "BLOCK_ELEMENTS", block, create=True), Draws() as draws:
        model = _build_model(_config(overrides), 3, ep, torch.device("cpu"), None)
    normal = [(n, p) for n, p in model.named_parameters() if model.init_rule(n).kind == "normal"]
    dense = [(n, p) for n, p in normal if ".experts." not in n]
    def held(params):
        return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for _, p in params)

    # Experts are drawn whole, once per expert a rank holds rows of (all of it, or its columns under dim-1 FSDP).
    experts = sum(len(init.local_indices(p, 0)) * math.prod(p.shape[1:]) for n, p in normal if ".experts." in n)
    weights = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
               for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    return {"drawn": draws.n - experts, "local": held(dense), "dense_tensors": len(dense),
            "dense_global": sum(p.numel() for _, p in dense), "weights": weights}


def test_dense_init_draws_only_the_local_blocks():
    # Blocks of 256 elements (4 rows of the 97 x 64 embedding): the shards of world 4 start and end inside
    # blocks, a router's 6 rows span two blocks and leave rank 3 an empty shard.
    block = 256
    (ref,) = run_distributed(_dense_draws, 1, UNEVEN, 1, block)
    assert ref["drawn"] == ref["local"]  # one rank holds everything and draws each value once
    for rank, got in enumerate(run_distributed(_dense_draws, 4, UNEVEN, 2, block)):
        for name, t in ref["weights"].items():
            assert torch.equal(got["weights"][name], t), (rank, name)
        # At most a partial block at each end of a rank's rows, per dense tensor; the former init drew every
        # dense tensor whole on every rank (drawn >= dense_global).
        assert got["local"] <= got["drawn"] <= got["local"] + 2 * block * got["dense_tensors"], (rank, got["drawn"])
        assert got["drawn"] < got["dense_global"] / 2, (rank, got["drawn"], got["dense_global"])
    print(f"\ndense values drawn at world 4 (ep 2, blocks of {block}): rank 3 {got['drawn']} for {got['local']} "
          f"held; the dense tensors hold {got['dense_global']}")
    std = _config(UNEVEN).initializer_range
    emb = ref["weights"]["model.embed_tokens.weight"]
    assert not torch.equal(emb[:4], emb[4:8])  # every block from its own generator
    for name, t in ref["weights"].items():  # the same N(0, std) as with one block per tensor
        if t.numel() >= 4096 and ".experts." not in name:
            assert abs(t.mean().item()) < 5 * std / t.numel() ** 0.5, name
            assert abs(t.std().item() / std - 1) < 0.05, (name, t.std().item())


# ----------------------------------------------------------------------------------------------------------
# --init-from a converted checkpoint
# ----------------------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")
from test_checkpoint import TINY, hf_mtp, hf_tiny  # noqa: E402, F401  (module-scoped fixtures)

ARGS = ["--batch-size", "4", "--seq-len", "16", "--steps", "1", "--val-every", "0", "--seed", "5",
        "--data-dtype", "uint16"]


def _init_from_runs(dcp_dir: str, data: str, root: str) -> dict:
    """Step 1 from the converted weights at ep 1 and ep 2, then the user errors."""
    from tritonmoe.dsv3.train import main
    from tritonmoe.parallel import CheckpointError

    root = Path(root)
    common = ARGS + ["--data", data]
    losses = {ep: main(common + ["--init-from", dcp_dir, "--ep", str(ep), "--out", str(root / f"ep{ep}")])["losses"][1]
              for ep in (1, 2)}
    # A training checkpoint's step folder is self-describing (its config.json); --preset still wins.
    step_dir = root / "ep2" / "step_00000001"
    again = main(common + ["--init-from", str(step_dir), "--out", str(root / "from_step")])["losses"][1]
    explicit = main(common + ["--init-from", str(step_dir), "--preset", str(Path(dcp_dir) / "config.json"),
                              "--out", str(root / "from_step_preset")])["losses"][1]
    assert explicit == again
    errors = {}
    with pytest.raises(CheckpointError, match="does not exist") as e:
        main(common + ["--init-from", str(root / "absent"), "--out", str(root / "a")])
    errors["missing"] = str(e.value)
    with pytest.raises(CheckpointError, match=r"does not fit this model: model\.embed_tokens\.weight: \(97, 32\) "
                                              r"in the checkpoint, \(256, 64\) in the model") as e:
        main(common + ["--init-from", dcp_dir, "--preset", "tiny", "--out", str(root / "a")])
    errors["shapes"] = str(e.value)
    assert not (root / "a").exists()
    return {"losses": losses, "from_step": again, "step_dir": str(step_dir), "errors": errors}


def test_init_from_a_folder_without_config_needs_a_preset(tmp_path):
    from tritonmoe.dsv3.train import _load_config

    with pytest.raises(ValueError, match="has no config.json .* pass --preset"):
        _load_config(None, str(tmp_path))
    assert _load_config("tiny", str(tmp_path)).vocab_size == 256


def test_init_from_converted_checkpoint_matches_single_process_loss(tmp_path, hf_mtp, twins):
    from tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, convert
    from tritonmoe.dsv3.data import batch, load_corpus

    hf_dir, _ = hf_mtp
    convert.hf2dcp(hf_dir, tmp_path / "dcp", torch.float32, log=lambda _: None)
    assert json.loads((tmp_path / "dcp" / "config.json").read_text())["vocab_size"] == TINY["vocab_size"]
    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], 20_000).astype(np.uint16)
    tokens.tofile(tmp_path / "tokens.u16")

    per_rank = run_distributed(_init_from_runs, 2, str(tmp_path / "dcp"), str(tmp_path / "tokens.u16"),
                               str(tmp_path / "runs"), timeout=240)

    # The same weights and the same global batch (step 1 of seed 5), in one process.
    model = DeepseekV3ForCausalLM.from_pretrained(hf_dir)
    corpus = load_corpus(tmp_path / "tokens.u16", "uint16")
    rows = batch(corpus.train, 5, 1, 4, 16)
    with torch.no_grad():
        ref = model(rows, labels=rows).loss
    for res in per_rank:
        for ep, loss in res["losses"].items():
            assert_close(torch.tensor(loss), ref, 1e-5, what=f"step-1 loss, --init-from at ep {ep}")
        # From the step-1 checkpoint of the ep 2 run, which trained on this very batch: a little lower.
        assert 0.9 * res["losses"][2] < res["from_step"] < res["losses"][2], res

    # The training checkpoint exports to HF without --config: its own config.json names the model, which
    # computes the loss training resumed from it computed.
    step_dir = Path(per_rank[0]["step_dir"])
    assert DeepseekV3Config.from_hf(step_dir / "config.json") == model.config
    convert.dcp2hf(step_dir, tmp_path / "hf_from_step", log=lambda _: None)
    with torch.no_grad():
        exported = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf_from_step")(rows, labels=rows).loss
    assert_close(exported, torch.tensor(per_rank[0]["from_step"]), 1e-5, what="loss of the dcp2hf export")
    worst = max(abs(v - ref.item()) / ref.item() for v in per_rank[0]["losses"].values())
    print(f"\nstep-1 loss from the converted checkpoint: ep 1 {per_rank[0]['losses'][1]:.6f}, ep 2 "
          f"{per_rank[0]['losses'][2]:.6f}, single process {ref.item():.6f} (max rel diff {worst:.1e}); from the "
          f"ep 2 run's step-1 checkpoint "
          f"{per_rank[0]['from_step']:.6f}\n" + "\n".join(per_rank[0]["errors"].values()))
