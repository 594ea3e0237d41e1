"""Aux-loss-free load balancing: what is counted (training forwards only, once under activation
recomputation), update_expert_bias arithmetic, and identical biases across real gloo processes."""

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM, MoE, apply_activation_checkpointing
from tritonmoe.dsv3.moe import routers, update_expert_bias


pytestmark = pytest.mark.usefixtures("twins")


def tiny_model(**kw) -> DeepseekV3ForCausalLM:
    return DeepseekV3ForCausalLM(DeepseekV3Config.from_hf("tiny", **kw))


def counts(model) -> torch.Tensor:
    return torch.stack([r.tokens_per_expert.clone() for r in routers(model)])


def test_counts_training_forward_only():
    model = tiny_model()
    B, S, K = 2, 9, 2
    ids = torch.randint(0, 256, (B, S))
    assert len(routers(model)) == 3  # layers 1, 2 and the MTP layer
    model.eval()
    model(ids, labels=ids).loss.backward()
    assert counts(model).sum() == 0  # eval mode: not counted
    model.train()
    with torch.no_grad():
        model(ids, labels=ids)
    assert counts(model).sum() == 0  # no_grad: not counted
    model(ids, labels=ids).loss.backward()
    c = counts(model)
    # every token picks K experts in each main layer; MTP depth 1 sees S-1 positions
    assert c.sum(1).tolist() == [B * S * K, B * S * K, B * (S - 1) * K]
    # and they are the router's own choices for that input
    x = model.model.embed_tokens(ids)
    cos, sin = model.model.rope_tables(S, ids.device, x.dtype)
    layer0, layer1 = model.model.layers[0], model.model.layers[1]
    with torch.no_grad():
        h = layer0(x, cos, sin)
        h = h + layer1.self_attn(layer1.input_layernorm(h), cos, sin)
        idx, _ = layer1.mlp.gate(layer1.post_attention_layernorm(h).reshape(-1, 64))
    assert torch.equal(c[0], torch.bincount(idx.flatten(), minlength=8))


@pytest.mark.parametrize("outside_wrapper", [False, True])  # our flag, and a plain torch checkpoint around blocks
def test_counts_not_doubled_under_recomputation(outside_wrapper):
    # The sequence-wise balance loss is on too: its gradient must not be added twice either.
    ids = torch.randint(0, 256, (2, 9))
    plain = tiny_model(seq_aux_loss_alpha=0.01)
    ckpt = tiny_model(seq_aux_loss_alpha=0.01)
    ckpt.load_state_dict(plain.state_dict())
    plain(ids, labels=ids).loss.backward()
    if outside_wrapper:
        for layer in ckpt.model.layers:
            fwd = layer.forward
            layer.forward = lambda x, c, s, fwd=fwd: torch.utils.checkpoint.checkpoint(fwd, x, c, s,
                                                                                       use_reentrant=False)
    else:
        apply_activation_checkpointing(ckpt)
    out = ckpt(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    before_backward = counts(ckpt)
    out.loss.backward()
    assert torch.equal(counts(ckpt), before_backward)  # recomputation in backward counted nothing
    assert torch.equal(counts(ckpt), counts(plain))
    for (n, p), q in zip(ckpt.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_update_expert_bias_arithmetic():
    cfg = DeepseekV3Config.from_hf("tiny", bias_update_rate=0.01)
    layers = torch.nn.ModuleList([MoE(cfg), MoE(cfg)])
    r0, r1 = layers[0].gate, layers[1].gate
    start0, start1 = torch.randn(8) * 0.1, torch.randn(8) * 0.1
    with torch.no_grad():
        r0.e_score_correction_bias.copy_(start0)
        r1.e_score_correction_bias.copy_(start1)
        r0.tokens_per_expert.copy_(torch.tensor([5, 3, 4, 4, 0, 8, 4, 4]))  # mean 4: ties stay put
        r1.tokens_per_expert.copy_(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]))  # mean 4.5
    got = update_expert_bias(layers)
    assert got.tolist() == [[5, 3, 4, 4, 0, 8, 4, 4], [1, 2, 3, 4, 5, 6, 7, 8]]
    step0 = torch.tensor([-1, 1, 0, 0, 1, -1, 0, 0]) * 0.01
    step1 = torch.tensor([1, 1, 1, 1, -1, -1, -1, -1]) * 0.01
    torch.testing.assert_close(r0.e_score_correction_bias, start0 + step0, rtol=0, atol=1e-7)
    torch.testing.assert_close(r1.e_score_correction_bias, start1 + step1, rtol=0, atol=1e-7)
    assert counts(layers).sum() == 0
    update_expert_bias(layers, rate=0.5)  # zero counts: every expert at the mean, nothing moves
    torch.testing.assert_close(r1.e_score_correction_bias, start1 + step1, rtol=0, atol=1e-7)
    assert update_expert_bias(torch.nn.Linear(2, 2)) is None


def test_bias_is_not_trained_but_is_saved():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ids = torch.randint(0, 256, (2, 9))
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert all((r.e_score_correction_bias == 0).all() for r in routers(model))
    update_expert_bias(model)
    assert any((r.e_score_correction_bias != 0).any() for r in routers(model))
    sd = model.state_dict()
    fresh = tiny_model()
    fresh.load_state_dict(sd)
    for a, b in zip(routers(model), routers(fresh)):
        assert torch.equal(a.e_score_correction_bias, b.e_score_correction_bias)


# ------------------------------------------------------------------------------------ multi-process
def _bias_update_on_rank() -> dict:
    rank = dist.get_rank()
    torch.manual_seed(0)  # same weights on every rank
    model = tiny_model()
    torch.manual_seed(100 + rank)  # different data per rank
    ids = torch.randint(0, 256, (2, 8 + 3 * rank))
    model(ids, labels=ids).loss.backward()
    local = counts(model)
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        summed = update_expert_bias(model)
    finally:
        dist.all_reduce = real
    bias = torch.stack([r.e_score_correction_bias for r in routers(model)])
    return {"local": local, "summed": summed, "bias": bias, "calls": len(calls)}


def test_identical_bias_across_gloo_processes():
    res = run_distributed(_bias_update_on_rank, 2)
    total = sum(r["local"] for r in res)
    assert not all(torch.equal(res[0]["local"], r["local"]) for r in res[1:])  # ranks saw different tokens
    expected = (total.double().mean(1, keepdim=True) - total.double()).sign().float() * 1e-3
    for r in res:
        assert r["calls"] == 1  # one collective for all layers
        assert torch.equal(r["summed"], total)
        assert torch.equal(r["bias"], res[0]["bias"])
        torch.testing.assert_close(r["bias"], expected, rtol=0, atol=0)
