"""HF checkpoints <-> our state dict (dsv3/checkpoint.py): key mapping, FP8 dequantization, reader safety,
from_pretrained against transformers' logits, save_pretrained loaded back by transformers.

Synthetic checkpoints only: tiny configs saved by transformers' own save_pretrained, then re-sharded,
FP8-quantized and given hand-made MTP layers by `make_hf_checkpoint` (also used by test_convert.py).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import assert_close
from tritonmoe.dsv3 import checkpoint as ck
from tritonmoe.dsv3 import hf_mapping as hm
from tritonmoe.dsv3 import safetensors_io as sio

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, n_routed_experts=12, n_shared_experts=1,
            num_experts_per_tok=3, n_group=2, topk_group=2, first_k_dense_replace=1, q_lora_rank=16,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, tie_word_embeddings=False,
            num_nextn_predict_layers=1)


def _transformers_model(**overrides):
    cfg = transformers.DeepseekV3Config(**{**TINY, **overrides})
    torch.manual_seed(1)
    model = transformers.DeepseekV3ForCausalLM(cfg).float()
    with torch.no_grad():  # larger than the 0.02 init so routing and every term matter; a nonzero router bias
        for p in model.parameters():
            p.normal_(0, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model.eval()


def _read_all(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def quantize_fp8_blockwise(w: torch.Tensor, block: int = sio.FP8_BLOCK):
    """Test-side quantizer: per 128x128 tile, scale_inv = amax / 448 (e4m3 max), q = w / scale_inv."""
    N, K = w.shape
    scale_inv = torch.empty(math.ceil(N / block), math.ceil(K / block))
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s = tile.abs().max().clamp_min(1e-12) / 448.0
            scale_inv[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return q, scale_inv


def _is_quantizable(key: str, t: torch.Tensor) -> bool:
    # The published checkpoint quantizes the linear weights of decoder layers; norms, router, embeddings stay.
    return (t.dim() == 2 and key.startswith("model.layers.") and "norm" not in key and ".mlp.gate." not in key
            and "embed_tokens" not in key and "shared_head.head" not in key)


def make_hf_checkpoint(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict, num_shards: int = 3,
                       fp8: bool = False) -> Path:
    """Write `tensors` as a sharded HF checkpoint (index + config.json), optionally FP8 with block scales.
    Keys are spread round-robin over shards so a layer's tensors live in several files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for n, (k, t) in enumerate(sorted(tensors.items())):
        if fp8 and _is_quantizable(k, t):
            q, s = quantize_fp8_blockwise(t)
            shards[n % num_shards][k] = q
            shards[(n + 1) % num_shards][k + sio.SCALE_SUFFIX] = s  # scale in another shard than its weight
        else:
            shards[n % num_shards][k] = t.contiguous()
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file(shard, out_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (out_dir / sio.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out_dir / sio.CONFIG_FILE).write_text(json.dumps(config))
    return out_dir


def add_mtp_layers(tensors: dict[str, torch.Tensor], num_layers: int, num_mtp: int, seed: int = 2):
    """Hand-made MTP layers as the published checkpoint stores them: layer L+k holds enorm, hnorm, eh_proj,
    shared_head.{norm,head}, its own embed_tokens (copies of the main ones) and a full MoE decoder layer."""
    g = torch.Generator().manual_seed(seed)
    out = dict(tensors)
    last = f"model.layers.{num_layers - 1}."
    H = tensors["model.embed_tokens.weight"].shape[1]
    for k in range(num_mtp):
        base = f"model.layers.{num_layers + k}."
        for key, t in tensors.items():
            if key.startswith(last):
                out[base + key[len(last):]] = torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.3
        out[base + "enorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        out[base + "hnorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        out[base + "eh_proj.weight"] = 0.3 * torch.randn(H, 2 * H, generator=g)
        out[base + "shared_head.norm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        out[base + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
        out[base + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    return out


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A transformers-saved tiny checkpoint (per-expert layout, no MTP layers) and its model."""
    model = _transformers_model()
    path = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def hf_mtp(tmp_path_factory, hf_tiny):
    """The same weights re-sharded into 3 files with one hand-made MTP layer."""
    path, model = hf_tiny
    tensors = add_mtp_layers(_read_all(path), TINY["num_hidden_layers"], 1)
    config = json.loads((path / sio.CONFIG_FILE).read_text())
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf_mtp"), tensors, config), model


def _layout(**overrides):
    return hm.CheckpointLayout.from_hf_config({**TINY, **overrides})


# ------------------------------------------------------------------------------------------------------------
# Key mapping (no model needed)
def test_experts_stack_in_integer_order_gate_rows_first(hf_tiny):
    path, _ = hf_tiny
    hf = _read_all(path)
    layout = _layout()
    ours = {m.key: t for m, t in hm.iter_hf_to_ours(list(hf), hf.__getitem__, layout)}
    w13 = ours["model.layers.1.mlp.experts.gate_up_proj"]
    w2 = ours["model.layers.1.mlp.experts.down_proj"]
    assert w13.shape == (12, 32, 32) and w2.shape == (12, 32, 16)
    for e in (0, 2, 10, 11):  # 10 and 11 sort before 2 as strings
        assert torch.equal(w13[e, :16], hf[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"])
        assert torch.equal(w13[e, 16:], hf[f"model.layers.1.mlp.experts.{e}.up_proj.weight"])
        assert torch.equal(w2[e], hf[f"model.layers.1.mlp.experts.{e}.down_proj.weight"])
    # Our names are exactly transformers 5's in-memory names (for layers without MTP).
    tf_names = set(hf_tiny[1].state_dict())
    assert set(ours) == tf_names


def test_mapping_round_trip_reproduces_published_layout_with_mtp(hf_mtp):
    path, _ = hf_mtp
    hf = _read_all(path)
    layout = _layout()
    ours, shared = {}, []
    for m, t in hm.iter_hf_to_ours(list(hf), hf.__getitem__, layout):
        (shared.append(m) if m.op is hm.Op.SHARED else ours.__setitem__(m.key, t))
    assert ours["model.mtp.0.eh_proj.weight"] is hf["model.layers.3.eh_proj.weight"]
    assert ours["model.mtp.0.norm.weight"] is hf["model.layers.3.shared_head.norm.weight"]
    assert "model.mtp.0.layer.self_attn.kv_b_proj.weight" in ours
    assert ours["model.mtp.0.layer.mlp.experts.gate_up_proj"].shape == (12, 32, 32)
    assert not any("shared_head.head" in k or "mtp.0.embed" in k for k in ours)  # shared, not stored twice
    assert sorted(m.sources[0] for m in shared) == ["model.layers.3.embed_tokens.weight",
                                                    "model.layers.3.shared_head.head.weight"]
    back = dict(hm.iter_ours_to_hf(ours, layout, ours.__getitem__))
    assert back.keys() == hf.keys()
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


def test_mapping_accepts_fused_transformers5_keys(hf_tiny):
    _, model = hf_tiny
    sd = model.state_dict()  # in-memory names: mlp.experts.gate_up_proj / down_proj
    ours = {m.key: t for m, t in hm.iter_hf_to_ours(list(sd), sd.__getitem__, _layout())}
    assert ours["model.layers.2.mlp.experts.gate_up_proj"] is sd["model.layers.2.mlp.experts.gate_up_proj"]


def test_mapping_names_missing_unexpected_and_mismatched_keys(hf_mtp):
    path, _ = hf_mtp
    hf = _read_all(path)
    layout = _layout()
    keys = [k for k in hf if k != "model.layers.2.mlp.experts.7.up_proj.weight"]
    keys.append("model.layers.2.mlp.experts.12.up_proj.weight")  # E = 12: ids 0..11
    keys.append("model.layers.9.input_layernorm.weight")          # past the MTP layers
    with pytest.raises(ValueError) as e:
        list(hm.iter_hf_to_ours(keys, hf.__getitem__, layout))
    msg = str(e.value)
    assert "model.layers.2.mlp.experts.7.up_proj.weight" in msg and "missing" in msg
    assert "model.layers.2.mlp.experts.12.up_proj.weight" in msg and "model.layers.9.input_layernorm.weight" in msg

    bad = dict(hf)
    bad["model.layers.1.mlp.experts.5.down_proj.weight"] = torch.zeros(32, 15)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.5\.down_proj\.weight: shape \(32, 15\)"):
        list(hm.iter_hf_to_ours(list(bad), bad.__getitem__, layout))


def test_rotary_buffers_ignored():
    plan = hm.plan_hf_keys(["model.layers.0.self_attn.rotary_emb.inv_freq", "model.norm.weight"], _layout())
    assert plan.ignored == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert [t.key for t in plan.tensors] == ["model.norm.weight"] and not plan.unexpected


# ------------------------------------------------------------------------------------------------------------
# FP8 and reader safety
# Shapes: multiples of the block, edge blocks on both dims, fewer rows than one block.
@pytest.mark.parametrize("shape", [(256, 128), (300, 200), (70, 130)])
def test_fp8_dequantization_matches_direct_computation(shape):
    w = torch.randn(shape) * 3
    q, s = quantize_fp8_blockwise(w)
    got = sio.dequantize_fp8_blockwise(q, s, torch.float32)
    direct = torch.empty(shape)
    for i in range(s.shape[0]):  # the definition, tile by tile
        for j in range(s.shape[1]):
            rows, cols = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            direct[rows, cols] = q[rows, cols].float() * s[i, j]
    assert torch.equal(got, direct)
    assert_close(got, w, 0.07, 0.04, what="fp8 round trip")  # e4m3 keeps 3 mantissa bits
    assert torch.equal(sio.dequantize_fp8_blockwise(q, s, torch.bfloat16), direct.bfloat16())
    with pytest.raises(ValueError, match=r"_scale_inv: shape"):
        sio.dequantize_fp8_blockwise(q, s[:-1], torch.float32, name="w")


def test_reader_dequantizes_fp8_and_refuses_missing_scale(tmp_path, hf_tiny):
    path, _ = hf_tiny
    hf = _read_all(path)
    make_hf_checkpoint(tmp_path / "fp8", hf, TINY, fp8=True)
    ckpt = sio.SafetensorsCheckpoint(tmp_path / "fp8")
    key = "model.layers.1.self_attn.kv_b_proj.weight"
    assert key + sio.SCALE_SUFFIX not in ckpt.keys() and key in ckpt.keys()
    q, s = quantize_fp8_blockwise(hf[key])
    assert torch.equal(ckpt.get(key, torch.float32), q.float() * s[0, 0])
    assert ckpt.get(key).dtype == torch.bfloat16

    index = json.loads((tmp_path / "fp8" / sio.INDEX_FILE).read_text())
    del index["weight_map"][key + sio.SCALE_SUFFIX]
    (tmp_path / "fp8" / sio.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{key} is stored as float8_e4m3fn but {key}_scale_inv is absent"):
        sio.SafetensorsCheckpoint(tmp_path / "fp8").get(key)


def test_reader_refuses_pickles_and_names_missing_shards(tmp_path, hf_tiny):
    (tmp_path / "bin").mkdir()
    torch.save({"w": torch.ones(1)}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*execute arbitrary code"):
        sio.SafetensorsCheckpoint(tmp_path / "bin")
    (tmp_path / "bin" / sio.INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "pytorch_model.bin"}}))
    with pytest.raises(ValueError, match="non-safetensors.*arbitrary code"):
        sio.SafetensorsCheckpoint(tmp_path / "bin")

    path, _ = hf_tiny
    make_hf_checkpoint(tmp_path / "sharded", _read_all(path), TINY)
    (tmp_path / "sharded" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match=r"shard model-00002-of-00003.safetensors .*holding model\.\S+ .*missing"):
        sio.SafetensorsCheckpoint(tmp_path / "sharded")


# ------------------------------------------------------------------------------------------------------------
# from_pretrained / save_pretrained against transformers
def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_from_pretrained_logits_match_transformers(hf_mtp):
    from tritonmoe.dsv3 import DeepseekV3ForCausalLM

    path, tf_model = hf_mtp
    ours = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        ref = tf_model(input_ids).logits
        got = ours(input_ids).logits
    print(f"from_pretrained fp32 logits max rel err vs transformers: {_rel_err(got, ref):.2e}")
    assert_close(got, ref, 1e-5, what="logits")
    hf = _read_all(path)
    assert torch.equal(ours.model.mtp[0].eh_proj.weight, hf["model.layers.3.eh_proj.weight"])
    assert ours.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_from_pretrained_builds_on_meta_and_initializes_nothing_it_loads(hf_mtp, monkeypatch, tmp_path, twins):
    """No random init of weights the checkpoint overwrites (1.3 TB of normal_ at 671B in bf16): every init
    call on a real tensor is recorded, and the result equals the checkpoint exactly."""
    from tritonmoe.dsv3 import DeepseekV3ForCausalLM
    from tritonmoe.dsv3.moe import routers

    path, _ = hf_mtp
    inits = []
    with monkeypatch.context() as patch:
        for name in ("normal_", "uniform_", "fill_", "zero_"):
            real = getattr(torch.Tensor, name)

            def record(self, *args, _real=real, _name=name, **kwargs):
                if not self.is_meta:
                    inits.append((_name, tuple(self.shape)))
                return _real(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, record)
        ours = DeepseekV3ForCausalLM.from_pretrained(path)
    assert inits == []
    hf = _read_all(path)
    want = {m.key: t for m, t in hm.iter_hf_to_ours(list(hf), hf.__getitem__, _layout()) if m.op is not hm.Op.SHARED}
    got = ours.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].device.type == "cpu" and torch.equal(got[k], want[k]), k
    # Non-persistent buffers (token counters) are materialized as zeros on the target device and count.
    assert all(r.tokens_per_expert.device.type == "cpu" and (r.tokens_per_expert == 0).all() for r in routers(ours))
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    ours(ids, labels=ids).loss.backward()
    assert all(r.tokens_per_expert.sum() > 0 for r in routers(ours))

    # missing_mtp="init": only the MTP modules are initialized (N(0, 0.02) weights, unit norms).
    path_no_mtp = tmp_path / "no_mtp"
    make_hf_checkpoint(path_no_mtp, {k: v for k, v in hf.items() if not k.startswith("model.layers.3.")},
                       json.loads((path / sio.CONFIG_FILE).read_text()))
    init = DeepseekV3ForCausalLM.from_pretrained(path_no_mtp, missing_mtp="init")
    assert torch.equal(init.model.layers[1].mlp.experts.down_proj, want["model.layers.1.mlp.experts.down_proj"])
    assert 0.015 < init.model.mtp[0].eh_proj.weight.std() < 0.025 and (init.model.mtp[0].enorm.weight == 1).all()


def test_from_pretrained_without_mtp_layers_and_dtype(hf_tiny):
    from tritonmoe.dsv3 import DeepseekV3ForCausalLM

    path, _ = hf_tiny  # transformers' save_pretrained drops MTP although config.json says 1
    with pytest.warns(UserWarning, match="no MTP layers"):
        ours = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert len(ours.model.mtp) == 0
    assert ours.model.layers[2].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert ours.model.layers[2].mlp.gate.e_score_correction_bias.dtype == torch.float32  # buffers keep theirs
    init = DeepseekV3ForCausalLM.from_pretrained(path, missing_mtp="init")  # options reach the loader
    assert len(init.model.mtp) == 1
    with pytest.raises(ValueError, match="num_nextn_predict_layers=1 but the checkpoint holds no MTP layers"):
        DeepseekV3ForCausalLM.from_pretrained(path, missing_mtp="error")


def test_from_pretrained_reports_keys_and_shapes(tmp_path, hf_mtp):
    from tritonmoe.dsv3 import DeepseekV3ForCausalLM

    path, _ = hf_mtp
    hf = _read_all(path)
    cfg = json.loads((path / sio.CONFIG_FILE).read_text())
    broken = {k: v for k, v in hf.items() if k != "model.layers.0.mlp.up_proj.weight"}
    broken["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(32)
    make_hf_checkpoint(tmp_path / "keys", broken, cfg)
    with pytest.raises(ValueError) as e:
        DeepseekV3ForCausalLM.from_pretrained(tmp_path / "keys")
    assert "model.layers.0.mlp.up_proj.weight" in str(e.value) and "model.layers.1.self_attn.o_proj.bias" in str(e.value)

    reshaped = dict(hf)
    reshaped["model.layers.0.self_attn.q_b_proj.weight"] = torch.zeros(25, 16)
    make_hf_checkpoint(tmp_path / "shape", reshaped, cfg)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_b_proj\.weight: shape \(25, 16\)"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path / "shape")

    differing = dict(hf)
    differing["model.layers.3.shared_head.head.weight"] = hf["lm_head.weight"] + 1
    make_hf_checkpoint(tmp_path / "copy", differing, cfg)
    with pytest.raises(ValueError, match=r"model\.layers\.3\.shared_head\.head\.weight differs from lm_head\.weight"):
        DeepseekV3ForCausalLM.from_pretrained(tmp_path / "copy")
    with pytest.warns(UserWarning, match="dropped"):
        ck.from_pretrained(DeepseekV3ForCausalLM, tmp_path / "copy", ignore_mtp_copies=True)


def test_save_pretrained_round_trip_through_transformers(tmp_path, hf_mtp):
    from tritonmoe.dsv3 import DeepseekV3ForCausalLM

    path, tf_model = hf_mtp
    ours = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    ours.save_pretrained(tmp_path / "out")
    written, source = _read_all(tmp_path / "out"), _read_all(path)
    assert written.keys() == source.keys()  # published layout, MTP layer with its embed/head copies included
    assert all(torch.equal(written[k], source[k]) for k in source)
    reloaded = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        ref, got = ours(input_ids).logits, reloaded(input_ids).logits
    print(f"ours -> save_pretrained -> transformers fp32 logits max rel err: {_rel_err(got, ref):.2e}")
    assert_close(got, ref, 1e-5, what="logits")
    again = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for k, v in ours.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
