"""experts_implementation="tritonmoe" inside transformers models: same logits and gradients as "eager".

transformers' own experts code is the reference: "eager" (a per-expert loop) for whole models, and its
"batched_mm" function for the expert-parallel sentinel path, which eager does not implement.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import assert_close

transformers = pytest.importorskip("transformers")

from tritonmoe.dsv3 import hf  # noqa: E402


def _deepseek_config(**overrides):
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
              num_experts_per_tok=3, n_group=2, topk_group=2, first_k_dense_replace=1, q_lora_rank=16,
              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, tie_word_embeddings=False)
    kw.update(overrides)
    return transformers.DeepseekV3Config(**kw)


def _gpt_oss_config():
    return transformers.GptOssConfig(vocab_size=97, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                     num_local_experts=6, num_experts_per_tok=2, sliding_window=8,
                                     layer_types=["full_attention"])


def _logits_and_grads(model, impl, input_ids):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids).logits
    # A loss that weights every logit differently, so no gradient can cancel out.
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# DeepSeek-V3 (concatenated gate|up, [E,out,in] weights, no bias) and gpt-oss (interleaved gate/up through its
# own _apply_gate, transposed [E,in,out] weights, per-expert biases): the two layouts transformers declares.
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_tritonmoe_matches_eager_logits_and_grads(family):
    hf.register()
    config = _deepseek_config() if family == "deepseek_v3" else _gpt_oss_config()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # weights well above the 0.02 init so the experts move the logits; random biases
        for name, p in model.named_parameters():
            p.normal_(0, 0.1) if "bias" in name else p.normal_(0, 0.2) if p.dim() > 1 else None
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    input_ids = torch.randint(0, config.vocab_size, (2, 7))
    ref_logits, ref_grads = _logits_and_grads(model, "eager", input_ids)
    logits, grads = _logits_and_grads(model, "tritonmoe", input_ids)
    assert_close(logits, ref_logits, 1e-5, what="logits")
    assert ref_grads.keys() == grads.keys()
    expert_grads = [n for n in grads if "experts" in n]
    assert expert_grads, "the experts must receive gradients"
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], 1e-5, what=name)


def test_from_pretrained_accepts_tritonmoe(tmp_path):
    hf.register()
    model = transformers.DeepseekV3ForCausalLM(_deepseek_config())
    model.save_pretrained(tmp_path)
    loaded = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, experts_implementation="tritonmoe")
    assert loaded.config._experts_implementation == "tritonmoe"
    input_ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert_close(loaded(input_ids).logits, model(input_ids).logits, 1e-5, what="logits")


def test_expert_parallel_sentinels_match_batched_mm():
    """Under transformers' EP, slots owned by another rank carry the id num_experts and a zero weight."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    hf.register()
    experts = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Experts(_deepseek_config())
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    experts._is_expert_parallel = True
    T, K, E = 9, 3, experts.num_experts
    x_TH = torch.randn(T, 32, requires_grad=True)
    idx_TK = torch.randint(0, E, (T, K))
    idx_TK[::2, 1] = E  # every other token has one slot on another rank
    w_TK = torch.rand(T, K).masked_fill(idx_TK == E, 0.0).requires_grad_()

    def run(fn):
        for t in (x_TH, w_TK, experts.gate_up_proj, experts.down_proj):
            t.grad = None
        y = fn(experts, x_TH, idx_TK, w_TK)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        return y.detach(), [t.grad.clone() for t in (x_TH, w_TK, experts.gate_up_proj, experts.down_proj)]

    ref_y, ref_grads = run(ALL_EXPERTS_FUNCTIONS["batched_mm"])
    y, grads = run(ALL_EXPERTS_FUNCTIONS["tritonmoe"])
    assert_close(y, ref_y, 1e-5, what="y")
    for name, g, rg in zip(("x", "weights", "gate_up_proj", "down_proj"), grads, ref_grads):
        assert_close(g, rg, 1e-5, what=name)


def test_refuses_quantized_and_malformed_inputs():
    hf.register()
    experts = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Experts(_deepseek_config())
    x_TH, idx_TK, w_TK = torch.randn(4, 32), torch.randint(0, 8, (4, 2)), torch.rand(4, 2)
    with pytest.raises(ValueError, match=r"\[T,H\]"):
        hf.tritonmoe_experts_forward(experts, x_TH[None], idx_TK, w_TK)
    with pytest.raises(ValueError, match="top_k_index"):
        hf.tritonmoe_experts_forward(experts, x_TH, idx_TK, w_TK[:, :1])
    experts.down_proj.data = experts.down_proj.data.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        hf.tritonmoe_experts_forward(experts, x_TH, idx_TK, w_TK)


def test_package_works_without_transformers():
    """transformers is a test dependency only: with it unimportable, the model, checkpoint I/O and converter
    import and run, and register() says what to install."""
    code = textwrap.dedent("""
        import sys
        sys.modules["transformers"] = None  # any import of it raises ImportError
        import torch
        from tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, checkpoint, convert, hf
        model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf("tiny"))
        ids = torch.randint(0, 256, (1, 6))
        model(ids, labels=ids).loss.backward()
        try:
            hf.register()
        except ImportError as e:
            assert "pip install" in str(e), e
            print("ok")
    """)
    env = {"TRITON_INTERPRET": "0", "PATH": "/usr/bin:/bin"}  # the PyTorch twins: no interpreter needed here
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
