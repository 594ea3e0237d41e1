"""DeepseekV3Config: reading both rope spellings, presets, to_hf accepted by transformers with equal
numerics (rope frequencies, attention scales), validation errors, the 671b shapes on the meta device."""

import json

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

from tritonmoe.dsv3 import PRESETS, DeepseekV3Config, DeepseekV3ForCausalLM
from tritonmoe.dsv3.model import rope_inv_freq, softmax_scale

YARN = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def test_presets():
    for name in PRESETS:
        cfg = DeepseekV3Config.from_hf(name)
        assert cfg.n_routed_experts % cfg.n_group == 0
    tiny = DeepseekV3Config.from_hf("tiny")
    assert (tiny.vocab_size, tiny.first_k_dense_replace, tiny.num_nextn_predict_layers) == (256, 1, 1)
    assert DeepseekV3Config.from_hf("16b").q_lora_rank is None
    big = DeepseekV3Config.from_hf("671b")
    assert big.rope_scaling["factor"] == 40 and big.rope_scaling["type"] == "yarn"


def test_both_rope_spellings_read_the_same(tmp_path):
    legacy = dict(PRESETS["tiny"], rope_theta=5e4, rope_scaling=dict(YARN, type="yarn"))
    v5 = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(YARN, rope_type="yarn", rope_theta=5e4)
    a, b = DeepseekV3Config.from_hf(legacy), DeepseekV3Config.from_hf(v5)
    assert a == b and a.rope_theta == 5e4 and a.rope_scaling["mscale_all_dim"] == 1.0
    plain = DeepseekV3Config.from_hf({**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e6
    # A real file, read by path to the file and to its folder; unknown keys ignored; overrides win.
    (tmp_path / "config.json").write_text(json.dumps({**v5, "architectures": ["X"], "torch_dtype": "bfloat16",
                                                      "q_lora_rank": None, "n_shared_experts": 0}))
    c1 = DeepseekV3Config.from_hf(tmp_path)
    c2 = DeepseekV3Config.from_hf(str(tmp_path / "config.json"), mtp_loss_weight=0.1)
    assert c1.q_lora_rank is None and c1.n_shared_experts == 0 and c2.mtp_loss_weight == 0.1
    assert c1.replace(mtp_loss_weight=0.1) == c2


@pytest.mark.parametrize("rope", [None, YARN, dict(YARN, mscale=0.707, factor=8)],
                         ids=["plain", "yarn_v3", "yarn_mscale_ratio"])
def test_to_hf_loads_in_transformers_with_equal_numerics(rope, tmp_path):
    cfg = DeepseekV3Config.from_hf("tiny", rope_scaling=rope, q_lora_rank=None, n_shared_experts=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "DeepseekV3Config"
    for k in ("hidden_size", "q_lora_rank", "kv_lora_rank", "n_routed_experts", "n_shared_experts", "n_group",
              "topk_group", "num_experts_per_tok", "routed_scaling_factor", "first_k_dense_replace",
              "num_nextn_predict_layers", "rope_interleave", "tie_word_embeddings", "rms_norm_eps"):
        assert getattr(hf, k) == getattr(cfg, k), k
    ours_freq, ours_factor = rope_inv_freq(cfg)
    kind = hf.rope_parameters["rope_type"]
    if kind == "default":
        hf_freq, hf_factor = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RotaryEmbedding \
            .compute_default_rope_parameters(hf)
    else:
        hf_freq, hf_factor = ROPE_INIT_FUNCTIONS[kind](hf)
    assert torch.equal(ours_freq, hf_freq) and ours_factor == pytest.approx(hf_factor, rel=1e-12)
    assert softmax_scale(cfg) == pytest.approx(DeepseekV3Attention(hf, 0).scaling, rel=1e-12)
    assert DeepseekV3Config.from_hf(tmp_path) == cfg  # our own round trip, training fields included


# deepseek-ai/DeepSeek-V3's published config.json, verbatim (fields in file order).
PUBLISHED_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def test_published_v3_config_reads_as_the_671b_preset():
    cfg = DeepseekV3Config.from_hf(PUBLISHED_V3)
    # The file asks for the sequence-wise balance loss (seq_aux) at aux_loss_alpha; everything else is the preset.
    assert cfg.seq_aux_loss_alpha == 0.001
    assert cfg.replace(seq_aux_loss_alpha=0.0) == DeepseekV3Config.from_hf("671b")
    # Overrides and our own spelling win; seq_aux false (V2's batch-wise loss, not implemented) adds nothing.
    assert DeepseekV3Config.from_hf(PUBLISHED_V3, seq_aux_loss_alpha=1e-4).seq_aux_loss_alpha == 1e-4
    assert DeepseekV3Config.from_hf({**PUBLISHED_V3, "seq_aux_loss_alpha": 0.0}).seq_aux_loss_alpha == 0.0
    with pytest.warns(UserWarning, match="batch-wise"):
        assert DeepseekV3Config.from_hf({**PUBLISHED_V3, "seq_aux": False}).seq_aux_loss_alpha == 0.0
    assert DeepseekV3Config.from_hf(cfg.to_hf()) == cfg  # the training field survives save_pretrained
    written = cfg.replace(seq_aux_loss_alpha=2e-4).to_hf()
    assert (written["seq_aux"], written["aux_loss_alpha"]) == (True, 2e-4)  # DeepSeek's spelling as well
    assert DeepseekV3Config.from_hf({k: v for k, v in written.items() if k != "seq_aux_loss_alpha"}) == \
        cfg.replace(seq_aux_loss_alpha=2e-4)


def test_num_mtp_layers_spelling():
    d = {k: v for k, v in PRESETS["tiny"].items() if k != "num_nextn_predict_layers"}
    assert DeepseekV3Config.from_hf({**d, "num_mtp_layers": 2}).num_nextn_predict_layers == 2


@pytest.mark.parametrize("change, message", [
    (dict(n_routed_experts=10, n_group=4), "not divisible by n_group"),
    (dict(n_group=2, topk_group=3), "topk_group=3 > n_group=2"),
    (dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "chosen groups hold"),
    (dict(n_routed_experts=8, n_group=8, topk_group=2), "top-2"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok=0"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim must be even"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(rope_scaling={"type": "yarn", "factor": -2.0}), "factor"),
])
def test_invalid_configs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        DeepseekV3Config.from_hf("tiny", **change)


def test_unknown_sources_raise():
    with pytest.raises(ValueError, match="neither a preset"):
        DeepseekV3Config.from_hf("huge")
    with pytest.raises(ValueError, match="rope type"):
        DeepseekV3Config.from_hf({**PRESETS["tiny"], "rope_scaling": {"type": "longrope", "factor": 2.0}})
    with pytest.raises(ValueError, match="not DeepSeek-V3"):
        DeepseekV3Config.from_hf({**PRESETS["tiny"], "model_type": "llama"})
    with pytest.raises(ValueError, match="moe_layer_freq"):
        DeepseekV3Config.from_hf("tiny", moe_layer_freq=2).to_hf()


def test_671b_on_meta_device():
    cfg = DeepseekV3Config.from_hf("671b")
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.model.mtp.parameters())
    # DeepSeek-V3 report: 671B parameters in the main model; MTP adds ~14B with its own copies of the
    # embedding and head (2 x 0.93B), which we share instead.
    assert 670.5e9 < total - mtp < 671.5e9, total - mtp
    assert 11.4e9 < mtp < 11.8e9, mtp
    layer = model.model.layers[3]
    assert layer.mlp.experts.gate_up_proj.shape == (256, 4096, 7168)
    assert model.model.layers[2].mlp.__class__.__name__ == "MLP"  # first_k_dense_replace=3


def test_16b_matches_moonlight_size():
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf("16b"))
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.mtp."))
    assert 15.9e9 < main < 16.0e9, main  # Moonlight-16B-A3B: 15.96B parameters
    assert not hasattr(model.model.layers[1].self_attn, "q_a_proj")  # q_lora_rank None: plain q_proj


def test_moe_layer_pattern():
    # DeepSeek's rule: MoE where layer >= first_k_dense_replace and layer % moe_layer_freq == 0.
    cfg = DeepseekV3Config.from_hf("tiny", num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert [cfg.is_moe_layer(i) for i in range(7)] == [False, False, True, False, True, False, True]
    model = DeepseekV3ForCausalLM(cfg)
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["MLP", "MLP", "MoE", "MLP", "MoE", "MLP"]
    assert type(model.model.mtp[0].layer.mlp).__name__ == "MoE"  # MTP layer 6 continues the numbering
