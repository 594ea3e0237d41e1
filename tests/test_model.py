"""Whole-model parity with transformers' DeepseekV3ForCausalLM (the published modeling) on random tiny
configs, saved by transformers and loaded by our from_pretrained: logits, loss and every parameter's gradient, fp32.  Plus construction paths: meta device ->
to_empty -> init_weights, state-dict names, bf16 keeping the balancing bias in fp32."""

import pytest
import torch
import transformers

from helpers import assert_close, use_twins
from tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM


BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=3, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            max_position_embeddings=256, num_nextn_predict_layers=1)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 1.0}

CASES = {
    # V2-Lite style plain q_proj, no grouping, every layer MoE, plain rope, interleaved rope pairs
    "plain_q-ngroup1-dense0": dict(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
                                   topk_group=1, first_k_dense_replace=0, n_shared_experts=1),
    # V3 style low-rank q, grouped routing, YaRN (attention factor != 1 and softmax mscale), half-split rope
    "lora_q-ngroup2-yarn-dense1": dict(q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3, n_group=2,
                                       topk_group=1, first_k_dense_replace=1, n_shared_experts=2,
                                       rope_scaling=YARN, rope_interleave=False),
    # no shared expert, unnormalized weights, 4 groups keep 2, two dense layers, YaRN with derived factor
    "no_shared-unnorm-dense2": dict(q_lora_rank=16, n_routed_experts=12, num_experts_per_tok=4, n_group=4,
                                    topk_group=2, first_k_dense_replace=2, n_shared_experts=0,
                                    norm_topk_prob=False, routed_scaling_factor=1.7,
                                    rope_scaling={"type": "yarn", "factor": None, "mscale": 1.0,
                                                  "mscale_all_dim": 1.0, "original_max_position_embeddings": 32}),
    # tied head, prime expert count, K == experts in the chosen groups
    "tied-prime_e": dict(q_lora_rank=None, n_routed_experts=7, num_experts_per_tok=7, n_group=1, topk_group=1,
                         first_k_dense_replace=1, n_shared_experts=1, tie_word_embeddings=True),
}


def randomize_(model: torch.nn.Module) -> None:
    """Every tensor random, norms and the balancing bias included: nothing may match by init."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm weights
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)


def hf_pair(cfg: DeepseekV3Config, tmp_path):
    """transformers' model with random weights, saved by its own save_pretrained and loaded by our
    from_pretrained (the path a user takes; it must cope with what transformers writes, e.g. the 0-wide
    shared-expert MLP it keeps when n_shared_experts is 0, and the tied head)."""
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf(), attn_implementation="eager")
    ref = transformers.DeepseekV3ForCausalLM(hf_cfg)
    randomize_(ref)
    ref.save_pretrained(tmp_path)
    # transformers writes no MTP layer: MTP is ours only, initialized fresh.
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path, missing_mtp="init")
    assert ours.config.replace(seq_aux_loss_alpha=0.0) == cfg.replace(seq_aux_loss_alpha=0.0)
    return ref, ours


@pytest.mark.parametrize("kernel_path", ["twin", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_loss_and_grads_match_transformers(case, kernel_path, monkeypatch, tmp_path):
    if kernel_path == "twin":
        use_twins(monkeypatch)
    cfg = DeepseekV3Config(**BASE, **CASES[case])
    ref, ours = hf_pair(cfg, tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    labels = torch.randint(0, cfg.vocab_size, (2, 17))
    labels[0, 5] = -100  # ignored position
    r = ref(input_ids=ids, labels=labels)
    o = ours(ids, labels=labels)
    assert_close(o.logits, r.logits, 1e-5, what=f"{case} logits")
    assert_close(o.lm_loss, r.loss, 1e-5, what=f"{case} loss")
    r.loss.backward()
    o.lm_loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if name.startswith("model.mtp."):
            assert p.grad is None  # lm_loss alone never reaches the MTP modules
            continue
        ref_grad = ref_params[name].grad
        if ref_grad is None:  # transformers ties lm_head to the embedding
            continue
        assert_close(p.grad, ref_grad, 1e-5, what=f"{case} grad {name}")


def test_meta_construction_to_empty_and_init(twins):
    cfg = DeepseekV3Config.from_hf("tiny")
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    for name, b in model.named_buffers():
        assert (b == 0).all(), name  # balancing bias and token counters start at zero
    emb = model.model.embed_tokens.weight
    assert 0.015 < emb.std().item() < 0.025  # N(0, initializer_range=0.02)
    assert (model.model.norm.weight == 1).all()
    out = model(torch.randint(0, 256, (2, 12)), labels=torch.randint(0, 256, (2, 12)))
    assert torch.isfinite(out.loss)


def test_state_dict_names():
    cfg = DeepseekV3Config.from_hf("tiny")
    sd = DeepseekV3ForCausalLM(cfg).state_dict()
    expected = [
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
        "model.layers.0.mlp.gate_proj.weight",  # first_k_dense_replace=1: layer 0 dense
        "model.layers.1.self_attn.q_a_proj.weight", "model.layers.1.self_attn.q_a_layernorm.weight",
        "model.layers.1.self_attn.q_b_proj.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.1.self_attn.kv_a_layernorm.weight", "model.layers.1.self_attn.kv_b_proj.weight",
        "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.shared_experts.down_proj.weight",
        "model.mtp.0.enorm.weight", "model.mtp.0.hnorm.weight", "model.mtp.0.eh_proj.weight",
        "model.mtp.0.norm.weight", "model.mtp.0.layer.mlp.experts.gate_up_proj",
    ]
    for k in expected:
        assert k in sd, k
    assert not any("tokens_per_expert" in k or "inv_freq" in k for k in sd)
    assert sd["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    assert sd["model.mtp.0.eh_proj.weight"].shape == (64, 128)
    tied = DeepseekV3ForCausalLM(cfg.replace(tie_word_embeddings=True)).state_dict()
    assert "lm_head.weight" not in tied


def test_bias_is_buffer_and_stays_fp32_in_bf16(twins):
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf("tiny"))
    assert not any("e_score_correction_bias" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.fill_(1 + 1e-3)  # not representable in bf16
    model.to(torch.bfloat16)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias[0].item() == pytest.approx(1.001, rel=1e-7)
    out = model(torch.randint(0, 256, (1, 9)), labels=torch.randint(0, 256, (1, 9)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_input_errors(twins):
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf("tiny"))
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.randint(0, 256, (9,)))
    with pytest.raises(ValueError, match="too short"):
        model(torch.randint(0, 256, (1, 2)), labels=torch.randint(0, 256, (1, 2)))
    with pytest.raises(ValueError, match="labels shape"):
        model(torch.randint(0, 256, (1, 6)), labels=torch.randint(0, 256, (1, 5)))


@pytest.mark.parametrize("case", ["tiny", "no_q_lora"])  # both q paths; v 16 vs q/k 24 in tiny
def test_padded_v_attention_equals_unpadded(case, twins):
    # CPU pads v to the q/k head dim to take SDPA's fused path (attention_plan); logits and every gradient must
    # equal the math path's.
    from tritonmoe.dsv3.model import MLA, attention_plan

    cfg = DeepseekV3Config.from_hf("tiny", **({} if case == "tiny" else {"q_lora_rank": None}))
    assert attention_plan(torch.device("cpu"), torch.float32, 4, cfg.qk_head_dim, cfg.v_head_dim)[0]
    model = DeepseekV3ForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    results = {}
    for pad in (False, True):
        for m in model.modules():
            if isinstance(m, MLA):
                m.pad_v = pad
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids)
        out.loss.backward()
        results[pad] = out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert_close(results[True][0], results[False][0], 1e-5, what="logits")
    for name, g in results[False][1].items():
        assert_close(results[True][1][name], g, 2e-5, what=f"grad {name}")


def test_empty_batches(twins):
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf("tiny"))
    # No sequence, or no token: logits of the same empty shape, not a reshape error from inside attention.
    for shape in ((0, 12), (3, 0), (0, 0)):
        assert model(torch.zeros(shape, dtype=torch.long)).logits.shape == (*shape, 256)
    with pytest.raises(ValueError, match=r"hold no sequence to score"):
        model(torch.zeros(0, 12, dtype=torch.long), labels=torch.zeros(0, 12, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sequence length 0 too short"):
        model(torch.zeros(2, 0, dtype=torch.long), labels=torch.zeros(2, 0, dtype=torch.long))


def test_micro_batch_losses_with_the_global_denominator_add_up(twins):
    # loss_denominator = the whole batch's count of main-head targets: the losses of any cut of the batch sum to
    # the whole batch's loss (lm, each MTP depth, and their weighted total).
    cfg = DeepseekV3Config.from_hf("tiny", num_nextn_predict_layers=2).replace(mtp_loss_weight=0.3)
    model = DeepseekV3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (6, 20))
    labels = ids.clone()
    labels[2, 5:9] = -100
    whole = model(ids, labels=labels)
    n = (labels[:, 1:] != -100).sum()
    parts = [model(ids[a:b], labels=labels[a:b], loss_denominator=n) for a, b in ((0, 1), (1, 4), (4, 6))]
    for key in ("lm_loss", "mtp_loss", "loss"):
        assert_close(sum(getattr(p, key) for p in parts), getattr(whole, key), 1e-6, what=key)
