"""The MoE block: parity with transformers' DeepseekV3MoE (forward and every gradient), routing rules on
hand-built scores, the dispatch seam, and the sequence-wise balance loss reaching the gradients."""

import pytest
import torch
import transformers
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from helpers import assert_close, use_twins
from tritonmoe.dsv3 import DeepseekV3Config, MoE
from tritonmoe.dsv3.init import init_weights_
from tritonmoe.dsv3.moe import LocalDispatcher, Router, sequence_balance_loss

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, first_k_dense_replace=0, num_nextn_predict_layers=0)


def make_cfg(**kw) -> DeepseekV3Config:
    return DeepseekV3Config(**{**TINY, **kw})


def hf_moe(cfg: DeepseekV3Config) -> DeepseekV3MoE:
    """transformers' block with every tensor random (bias included), so nothing passes by init luck."""
    ref = DeepseekV3MoE(transformers.DeepseekV3Config(**cfg.to_hf()))
    ref.config._experts_implementation = "eager"
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
        ref.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return ref


def ours_from(ref: DeepseekV3MoE, cfg: DeepseekV3Config) -> MoE:
    moe = MoE(cfg)
    # transformers keeps a zero-width shared MLP when n_shared_experts == 0; we hold None.
    state = {k: v for k, v in ref.state_dict().items() if v.numel() > 0}
    moe.load_state_dict(state, strict=True)
    return moe


@pytest.mark.parametrize("kernel_path", ["twin", "triton"])
@pytest.mark.parametrize("kw, shape", [
    (dict(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1), (2, 7, 32)),  # no grouping
    (dict(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2), (2, 7, 32)),  # grouped
    (dict(n_routed_experts=12, num_experts_per_tok=2, n_group=3, topk_group=1,  # one group: K from 4
          norm_topk_prob=False, n_shared_experts=2), (13, 32)),  # [T,H] input, 2 shared experts
    (dict(n_routed_experts=6, num_experts_per_tok=6, n_group=1, topk_group=1,  # K == E
          n_shared_experts=0, routed_scaling_factor=1.0), (3, 5, 32)),
    (dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=4), (1, 3, 32)),  # all groups
])
def test_moe_matches_transformers(kw, shape, kernel_path, monkeypatch):
    if kernel_path == "twin":
        use_twins(monkeypatch)
    cfg = make_cfg(**kw)
    ref = hf_moe(cfg)
    moe = ours_from(ref, cfg)
    x = torch.randn(shape) * 2
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x_ref), moe(x_ours)
    assert y.shape == x.shape
    assert_close(y, y_ref, 1e-5, what="moe forward")
    g = torch.randn_like(y)
    (y_ref * g).sum().backward()
    (y * g).sum().backward()
    assert_close(x_ours.grad, x_ref.grad, 1e-5, what="grad x")
    ref_params = dict(ref.named_parameters())
    for name, p in moe.named_parameters():
        assert_close(p.grad, ref_params[name].grad, 1e-5, what=f"grad {name}")


def test_router_group_limited_on_hand_built_scores():
    # 2 groups of 3 experts. Biased scores per group: A = [0.9, 0.1, 0.1] (top-2 sum 1.0),
    # B = [0.6, 0.6, 0.01] (top-2 sum 1.2).  topk_group=1 keeps group B even though expert 0 is the single
    # best: K=2 must pick experts 3 and 4.
    cfg = make_cfg(hidden_size=6, n_routed_experts=6, num_experts_per_tok=2, n_group=2, topk_group=1,
                   norm_topk_prob=True, routed_scaling_factor=2.0)
    r = Router(cfg)
    target = torch.tensor([[0.9, 0.1, 0.1, 0.6, 0.6, 0.01]])
    with torch.no_grad():
        r.weight.copy_(torch.eye(6))
        r.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.05, -0.05, 0.0]))
    x = torch.logit(target - r.e_score_correction_bias)  # sigmoid(x) + bias == target
    idx, w = r(x)
    assert sorted(idx[0].tolist()) == [3, 4]
    # Weights come from the unbiased scores, normalized over the chosen experts, times the scale.
    s = torch.sigmoid(x[0, [3, 4]])
    got = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert got[3] == pytest.approx(2.0 * (s[0] / s.sum()).item(), rel=1e-6)
    assert got[4] == pytest.approx(2.0 * (s[1] / s.sum()).item(), rel=1e-6)
    assert w.dtype == torch.float32 and idx.dtype == torch.int64


def test_bias_steers_selection_only():
    cfg = make_cfg(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, norm_topk_prob=False,
                   routed_scaling_factor=1.0)
    r = init_weights_(Router(cfg), cfg.initializer_range)  # building blocks only allocate
    x = torch.randn(20, 32)
    with torch.no_grad():
        r.e_score_correction_bias[5] = 10.0  # forces expert 5 into every token's top-2
    idx, w = r(x)
    assert (idx == 5).any(-1).all()
    scores = torch.sigmoid(x @ r.weight.t())
    assert_close(w, scores.gather(1, idx), 1e-6, what="weights are unbiased scores")


class RecordingDispatcher:
    """Stands in for the EP dispatcher: the MoE must route all of its expert work through the seam, and the
    experts get rows the dispatcher moved itself (no src_rows). Written independently of permute/unpermute."""

    def __init__(self, num_experts):
        self.num_experts, self.calls = num_experts, []

    def dispatch(self, x_TH, topk_idx_TK, topk_w_TK):
        self.calls.append(("dispatch", x_TH.shape, topk_idx_TK.shape, topk_w_TK.dtype))
        per_expert = [(topk_idx_TK == e).nonzero(as_tuple=True) for e in range(self.num_experts)]
        x_in = torch.cat([x_TH[tok] for tok, _ in per_expert])
        sizes = torch.tensor([len(tok) for tok, _ in per_expert])
        return x_in, sizes, None, (per_expert, topk_w_TK, x_TH.shape)

    def combine(self, y_RH, meta):
        per_expert, topk_w_TK, shape = meta
        self.calls.append(("combine", y_RH.shape))
        y, start = torch.zeros(shape), 0
        for tok, slot in per_expert:
            y = y.index_add(0, tok, y_RH[start:start + len(tok)] * topk_w_TK[tok, slot, None])
            start += len(tok)
        return y


def test_dispatch_seam(twins):
    cfg = make_cfg(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)
    moe = MoE(cfg)
    assert isinstance(moe.dispatcher, LocalDispatcher) and moe.num_experts == 8
    x = torch.randn(3, 4, 32)
    y_local = moe(x)
    moe.dispatcher = rec = RecordingDispatcher(8)
    y_seam = moe(x)
    assert rec.calls == [("dispatch", (12, 32), (12, 2), torch.float32), ("combine", (24, 32))]
    assert_close(y_seam, y_local, 1e-5, what="seam")


def test_shape_check():
    with pytest.raises(ValueError, match="hidden_size"):
        MoE(make_cfg())(torch.randn(4, 31))


def test_sequence_balance_loss_reaches_gradients(twins):
    alpha = 0.05
    cfg = make_cfg(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=2)
    with_aux = MoE(cfg.replace(seq_aux_loss_alpha=alpha)).train()
    plain = MoE(cfg).train()
    plain.load_state_dict(with_aux.state_dict())
    B, S = 3, 5
    x = torch.randn(B, S, 32)
    g = torch.randn(B, S, 32)
    (with_aux(x) * g).sum().backward()

    # Re-derive L_bal from the report's formulas (eq. 17-20) with plain loops.
    y = plain(x)
    s = torch.sigmoid(x.reshape(-1, 32) @ plain.gate.weight.t()).view(B, S, 8)
    idx, _ = plain.gate(x.reshape(-1, 32))
    idx = idx.view(B, S, 2)
    total = 0.0
    for b in range(B):
        f = torch.zeros(8)
        for t in range(S):
            for e in idx[b, t].tolist():
                f[e] += 8 / (2 * S)
        p = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
        total = total + (f * p).sum()
    l_bal = total / B
    assert with_aux.gate.last_aux_loss.item() == pytest.approx(alpha * l_bal.item(), rel=1e-5)
    ((y * g).sum() + alpha * l_bal).backward()
    assert_close(with_aux.gate.weight.grad, plain.gate.weight.grad, 1e-5, what="gate grad with aux loss")
    assert_close(with_aux.experts.gate_up_proj.grad, plain.experts.gate_up_proj.grad, 1e-5)
    assert sequence_balance_loss(s.view(-1, 8), idx.view(-1, 2), B).item() == pytest.approx(l_bal.item(), 1e-5)


def test_local_experts_keep_neither_x_sorted_nor_silu():
    # The layer's expert path keeps for its backward: x [T, H] (shared with the router and shared experts),
    # gate_up [R, 2I], SwiGLU's output [R, I] (the down GEMM's input) and y_sorted [R, H] (for the routing
    # weights' gradient). The unfused recipe also keeps x_sorted [R, H] and silu(gate) [R, I].
    # H = 32, I = 12: no two of the shapes below coincide.
    cfg = make_cfg(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=0,
                   moe_intermediate_size=12)
    moe = MoE(cfg).train()
    x = torch.randn(2, 8, cfg.hidden_size, requires_grad=True)
    T, K, H, I = 16, 2, cfg.hidden_size, cfg.moe_intermediate_size
    R = T * K

    def saved(fn):
        """{storage: bytes} autograd keeps for the backward (views of one storage counted once)."""
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return kept

    from tritonmoe.kernels import grouped_gemm, permute, unpermute

    def unfused():
        x_TH = x.view(T, H)
        idx, w = moe.gate(x_TH, num_seqs=2)
        xs, sizes, rm = permute(x_TH, idx, cfg.n_routed_experts)
        gate, up = grouped_gemm(xs, moe.experts.gate_up_proj, sizes).chunk(2, dim=-1)
        h = grouped_gemm(torch.nn.functional.silu(gate) * up, moe.experts.down_proj, sizes)
        return unpermute(h, rm, w)

    ours, ref = saved(lambda: moe(x)), saved(unfused)
    shapes = lambda kept: [shape for _, shape in kept.values()]  # noqa: E731
    assert (R, H) in shapes(ref) and (R, H) in shapes(ours)  # y_sorted in both; x_sorted only in ref
    assert (R, 2 * I) in shapes(ours)

    def row_activations(kept):  # [R, H], [R, I], [R, 2I] storages; small index and weight tensors differ too
        return sum(n for n, shape in kept.values() if len(shape) == 2 and shape[0] == R and shape[1] >= I)

    assert row_activations(ref) - row_activations(ours) == (R * H + R * I) * 4, (shapes(ref), shapes(ours))
