"""Multi-Token Prediction against a direct re-derivation of DeepSeek-V3 report sec. 2.2 (embedding-first
concatenation, released-weights order), and the absence of target leakage."""

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM


pytestmark = pytest.mark.usefixtures("twins")


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("depths, tied", [(1, False), (2, True)])  # 2 depths chain hidden states; tied head
def test_mtp_matches_formulas(depths, tied):
    cfg = DeepseekV3Config.from_hf("tiny", num_nextn_predict_layers=depths, tie_word_embeddings=tied,
                                   mtp_loss_weight=0.25)
    model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():  # non-unit norms so that enorm/hnorm/norm mix-ups show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    B, S = 2, 11
    ids = torch.randint(0, 256, (B, S))
    labels = ids.clone()
    labels[1, 7] = -100
    out = model(ids, labels=labels)

    # Main trunk by hand from the public pieces: hidden states before the final norm.
    emb_w = model.model.embed_tokens.weight
    head_w = emb_w if tied else model.lm_head.weight
    cos, sin = model.model.rope_tables(S, ids.device, torch.float32)
    h = emb_w[ids]
    for layer in model.model.layers:
        h = layer(h, cos, sin)
    eps = cfg.rms_norm_eps
    logits = rms(h, model.model.norm.weight, eps) @ head_w.t()
    assert_close(out.logits, logits, 1e-6, what="main logits")
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1), ignore_index=-100)
    n_main = (labels[:, 1:] != -100).sum()  # DeepSeek-V3 eq. 24: every depth is normalised by the main count

    losses = []
    for k in range(depths):
        d = k + 1
        m = model.model.mtp[k]
        # h'_i = M [RMSNorm(Emb(t_{i+d})); RMSNorm(h_i)], i = 0 .. S-d-1
        emb = emb_w[ids[:, d:]]
        x = torch.cat([rms(emb, m.enorm.weight, eps), rms(h[:, : S - d], m.hnorm.weight, eps)], -1)
        h = m.layer(x @ m.eh_proj.weight.t(), cos[: S - d], sin[: S - d])
        lg = rms(h, m.norm.weight, eps) @ head_w.t()
        # position i predicts t_{i+d+1}; the last position has no target (no padding)
        assert_close(out.mtp_logits[k], lg[:, :-1], 1e-6, what=f"depth {d} logits")
        assert out.mtp_logits[k].shape == (B, S - d - 1, 256)
        losses.append(F.cross_entropy(lg[:, :-1].reshape(-1, 256), labels[:, d + 1:].reshape(-1),
                                      ignore_index=-100, reduction="sum") / n_main)
    mtp = torch.stack(losses).mean()  # eq. 25: lambda / D * sum_k L_k = lambda * mean_k L_k
    assert_close(out.lm_loss, lm, 1e-6, what="lm_loss")
    assert_close(out.mtp_loss, mtp, 1e-6, what="mtp_loss")
    assert_close(out.loss, lm + 0.25 * mtp, 1e-6, what="loss")


def test_mtp_does_not_see_its_target():
    # Depth 1 at position i reads tokens <= i+1 and predicts token i+2: changing the last token must not
    # change any depth-1 logit, and changing token j changes only positions >= j-1.  (Equal to rounding,
    # not bitwise: a changed token can move other rows to a different expert-group size, hence GEMM blocking.)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf("tiny")).eval()
    ids = torch.randint(0, 256, (1, 10))
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % 256
    a = model(ids, labels=ids).mtp_logits[0]
    b = model(other, labels=other).mtp_logits[0]
    assert_close(b, a, 1e-5, what="last token changed")
    other = ids.clone()
    other[0, 5] = (ids[0, 5] + 1) % 256
    c = model(other, labels=other).mtp_logits[0]
    assert_close(c[:, :4], a[:, :4], 1e-5, what="positions before the change")
    assert (c[:, 4:] - a[:, 4:]).abs().amax(-1).min() > 1e-3  # each later position does see it


def test_without_mtp_modules():
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf("tiny", num_nextn_predict_layers=0))
    ids = torch.randint(0, 256, (2, 6))
    out = model(ids, labels=ids)
    assert out.mtp_loss is None and out.loss is out.lm_loss and len(model.model.mtp) == 0
