"""DCP checkpoints and sharded state on real gloo processes: experts stored as global tensors load into
the right rank's slice under any EP degree, with and without FSDP; weights-only loading (converted
checkpoints); atomic saves; and the global gradient norm under FSDP + EP equal to the single-process norm.
"""

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_distributed  # noqa: E402
from helpers import assert_close  # noqa: E402


def _model(seed: int = 0):
    from tritonmoe.dsv3.config import DeepseekV3Config
    from tritonmoe.dsv3.model import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    return DeepseekV3ForCausalLM(DeepseekV3Config.from_hf("tiny"))


def _tagged_model():
    """Expert e's weights all lie in [e, e + 0.01): a rank holding the wrong experts cannot go unnoticed."""
    from tritonmoe.parallel import find_moe_layers

    model = _model(0)
    with torch.no_grad():
        for _, moe in find_moe_layers(model):
            for w in (moe.experts.gate_up_proj, moe.experts.down_proj):
                w.copy_(torch.arange(w.shape[0], dtype=w.dtype).view(-1, 1, 1) + 0.01 * torch.rand_like(w))
    return model


def _weights_only_dir(root: Path) -> tuple[Path, dict]:
    """A checkpoint holding only {"model": ...}, as `convert hf2dcp` writes it (saved without a group)."""
    import torch.distributed.checkpoint as dcp

    model = _tagged_model()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = root / "weights_only"
    dcp.save({"model": sd}, checkpoint_id=str(path), no_dist=True)
    return path, sd


def _load_sharded(path: str, expected: dict) -> dict:
    """Rank r of an ep group must receive exactly experts [r*E/ep, (r+1)*E/ep) of the global tensors."""
    import torch.distributed as dist

    from tritonmoe.parallel import (apply_expert_parallel, apply_fsdp, build_meshes, clip_grad_norm_,
                                    find_moe_layers, load_model_weights)

    checked = {}
    for ep in (2, 4):
        meshes = build_meshes(ep, num_experts=8)
        model = _model(seed=123)  # different weights, overwritten by the load
        apply_expert_parallel(model, meshes.expert)
        load_model_weights(model, path)
        j, L = meshes.expert["ep"].get_local_rank(), 8 // ep
        for name, moe in find_moe_layers(model):
            for w in ("gate_up_proj", "down_proj"):
                local = getattr(moe.experts, w).to_local()
                assert torch.equal(local, expected[f"{name}.experts.{w}"][j * L:(j + 1) * L]), (ep, name, w)
        checked[ep] = j

    # FSDP + EP (experts 2-D sharded over edp x ep, dense params over all ranks): every tensor round-trips.
    meshes = build_meshes(2, num_experts=8)
    model = _model(seed=123)
    apply_expert_parallel(model, meshes.expert)
    apply_fsdp(model, meshes.dense, meshes.expert)
    load_model_weights(model, path)
    for key, p in model.state_dict().items():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        assert torch.equal(full, expected[key]), key

    # Global gradient norm: FSDP + EP shards vs one process holding the whole model and the whole batch.
    ref = _model(seed=5)
    sharded = _model(seed=5)
    apply_expert_parallel(sharded, meshes.expert)
    apply_fsdp(sharded, meshes.dense, meshes.expert)
    ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(9))
    ref(ids, labels=ids).loss.backward()
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = ids[rank * 2:(rank + 1) * 2]
    sharded(mine, labels=mine).loss.backward()
    norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=1e-3)
    norm = clip_grad_norm_(list(sharded.parameters()), max_norm=1e-3)
    assert_close(norm, norm_ref, 1e-5, what="global grad norm")
    # after clipping, every shard equals the clipped reference gradient
    ref_grads = dict(ref.named_parameters())
    for name, p in sharded.named_parameters():
        assert_close(p.grad.full_tensor(), ref_grads[name].grad, 1e-4, what=f"clipped grad {name}")
    checked["norm_rel_err"] = ((norm - norm_ref).abs() / norm_ref).item()
    return checked


def test_global_experts_load_into_each_ranks_slice(tmp_path):
    path, expected = _weights_only_dir(tmp_path)
    out = run_distributed(_load_sharded, 4, str(path), expected)
    assert [o[2] for o in out] == [0, 1, 0, 1] and [o[4] for o in out] == [0, 1, 2, 3]
    print(f"\ngrad norm FSDP+EP vs single process: max rel err {max(o['norm_rel_err'] for o in out):.2e}")


def test_weights_only_load_without_process_group(tmp_path):
    from tritonmoe.parallel import CheckpointError, load_model_weights

    path, expected = _weights_only_dir(tmp_path)
    model = load_model_weights(_model(seed=1), path)
    for key, v in model.state_dict().items():
        assert torch.equal(v, expected[key]), key
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_weights(model, tmp_path / "missing")
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_model_weights(model, tmp_path / "half")


def _atomic(root: str) -> list[str]:
    import json

    from tritonmoe.parallel import latest_checkpoint, load_checkpoint, read_train_state, save_checkpoint
    from tritonmoe.parallel import checkpoint as ckpt

    root = Path(root)
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters())
    first = save_checkpoint(root, 1, model, opt, {"tokens": 11}, config={"vocab_size": 256})
    assert json.loads((first / "config.json").read_text()) == {"vocab_size": 256}  # self-describing
    with mock.patch.object(ckpt, "_rng_state", side_effect=RuntimeError("simulated crash during save")):
        with pytest.raises(RuntimeError, match="simulated crash"):
            save_checkpoint(root, 2, model, opt, {"tokens": 22})
    assert latest_checkpoint(root) == first  # the half-written step 2 is not taken for a checkpoint
    names = sorted(p.name for p in root.iterdir())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(root, 2, model, opt, {"tokens": 22})
    assert latest_checkpoint(root).name == "step_00000002"
    state = load_checkpoint(first, _model(3), None, {"tokens": 0})
    assert state == {"step": 1, "tokens": 11}
    # Train-state keys a checkpoint does not hold (an older one) are left out rather than failing the load;
    # read_train_state reads the whole train state without a model.
    assert load_checkpoint(first, _model(3), None, {"tokens": 0, "lr": 0.0}) == {"step": 1, "tokens": 11}
    assert read_train_state(first) == {"step": 1, "tokens": 11}
    return names


def test_save_is_atomic(tmp_path):
    (names,) = run_distributed(_atomic, 1, str(tmp_path))
    assert names == [".step_00000002.tmp", "step_00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]


def test_older_nested_optimizer_state_is_refused_with_the_way_out(tmp_path):
    # Before: resuming a checkpoint whose optimizer state has the nested layout (param_groups.0.lr, written
    # before the optimizer state was flattened per parameter for pipeline stages) failed inside DCP with
    # "Missing key in checkpoint state_dict: optim.param_groups.model....". Now it names the fix.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from tritonmoe.parallel import CheckpointError, load_checkpoint, load_model_weights

    model = _model(0)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 256, (1, 8))).logits.float().sum().backward()
    opt.step()
    old = tmp_path / "step_00000001"
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
              "train": {"step": 1}}, checkpoint_id=old, no_dist=True)
    with pytest.raises(CheckpointError, match="nested layout.*--init-from"):
        other = _model(1)
        load_checkpoint(old, other, torch.optim.AdamW(other.parameters()), {})
    fresh = _model(2)
    load_model_weights(fresh, old)  # its weights still load
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
