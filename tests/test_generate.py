"""`python -m tritonmoe.dsv3.generate`: the MLA latent cache in absorbed form against the full-sequence forward
(every position, past YaRN's original context), MTP speculative decoding against plain greedy decoding (token
for token, whichever drafts are accepted), speculative sampling's distribution, and the CLI on each checkpoint
kind (a world-2 EP-2 training step, `convert dcp2hf` and `hf2dcp` outputs of it)."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from helpers import assert_close
from tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
from tritonmoe.dsv3 import generate as gen
from tritonmoe.dsv3.generate import CachedDecoder, Sampler, generate
from tritonmoe.kernels import force_twins


@pytest.fixture(autouse=True)
def _twins():
    # Decoding logic is under test, not the kernels (tests/test_moe.py holds them to the twins): interpreted
    # Triton costs ~0.1-1 s per grouped-GEMM launch, and decoding launches a few per token.
    with force_twins():
        yield


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.707}
CONFIGS = {
    "tiny": {},  # the preset the default training command trains: q low-rank, interleaved rope, dense + MoE
    # plain q_proj, half-split rope, projection biases, YaRN whose original context (16) the sequence passes
    "yarn": dict(q_lora_rank=None, rope_interleave=False, attention_bias=True, max_position_embeddings=64,
                 rope_scaling=YARN),
}


def _model(name: str) -> DeepseekV3ForCausalLM:
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_hf("tiny", **CONFIGS[name])).eval()
    with torch.no_grad():  # larger weights and non-unit norms: sharp attention, norm mix-ups show
        for p in model.parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.dim() == 1 else 3 * p)
        for name_, b in model.named_buffers():
            if name_.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("name, S", [("tiny", 40), ("yarn", 48)])
def test_cached_logits_equal_full_forward(name, S):
    model = _model(name)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, S))
    with torch.no_grad():
        ref = model(ids).logits
        h, emb, cos, sin = model.model(ids)
        mtp = model.model.mtp[0]
        mtp_ref = model.head(mtp.norm(mtp(emb[:, 1:], h[:, :S - 1], cos[:S - 1], sin[:S - 1])))

    dec = CachedDecoder(model, S, mtp=True)
    # The cache holds the latent and the shared rope key, not per-head keys and values.
    assert dec.caches[0].latent_BTC.shape == (1, S, cfg.kv_lora_rank)
    assert dec.caches[0].rope_BTR.shape == (1, S, cfg.qk_rope_head_dim)
    assert dec.bytes_per_token() == (cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4,
                                     (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4)
    logits, hidden, pos = [], [], 0
    with torch.inference_mode():
        # A prefill, single tokens, two-token steps (the verification's shape), and a slot written with a wrong
        # token then dropped (a rejected draft).
        for n in (5, 1, 1, 2, 3, 1, 2) + (1,) * S:
            n = min(n, S - pos)
            if n == 0:
                break
            if pos == 12:
                dec.forward(ids[:, pos:pos + 2] + 1)
                dec.truncate(pos)
            lg, hh = dec.forward(ids[:, pos:pos + n])
            logits.append(lg)
            hidden.append(hh)
            pos += n
        H = torch.cat(hidden, 1)
        drafts, pos = [], 0
        for n in (7, 1, 2) + (1,) * S:
            n = min(n, S - 1 - pos)
            if n == 0:
                break
            drafts.append(dec.draft(H[:, pos:pos + n], ids[:, pos + 1:pos + 1 + n]))
            pos += n
    assert_close(torch.cat(logits, 1), ref, 1e-5, what="main logits, every position")
    assert_close(H, h, 1e-5, what="hidden states")
    assert_close(torch.cat(drafts, 1), mtp_ref, 1e-5, what="MTP depth-1 logits, every position")


def _oracle_drafts(monkeypatch, reference: list[int], keep):
    """Replace MTP's drafts: the true next-next token of `reference` (prompt + plain greedy output) where
    keep(position) holds, another token elsewhere; the real MTP forward still runs (its cache bookkeeping)."""
    real = CachedDecoder.draft

    def draft(self, h_BSH, next_ids_BS):
        logits = real(self, h_BSH, next_ids_BS)
        target = self.mtp_length + 1  # the last MTP position (mtp_length - 1) predicts token position + 2
        true = reference[target] if target < len(reference) else 0
        choice = true if keep(target) else (true + 1) % logits.shape[-1]
        return torch.full_like(logits, -10.0).index_fill_(-1, torch.tensor([choice]), 10.0)

    monkeypatch.setattr(CachedDecoder, "draft", draft)


@pytest.mark.parametrize("drafts, max_new", [
    ("mtp", 40),         # the model's own MTP module (random: mostly rejected)
    ("always", 41),      # every draft right: two tokens per forward; an odd count cuts the last pair
    ("never", 20),       # every draft wrong: the cache slot of each draft is dropped
    ("alternate", 33),   # both kinds interleaved
])
def test_speculative_greedy_equals_plain_greedy(monkeypatch, drafts, max_new):
    model = _model("tiny")
    prompt = torch.randint(0, 256, (7,)).tolist()
    plain = generate(model, prompt, max_new)
    assert len(plain.new_ids) == max_new and plain.main_forwards == max_new - 1
    if drafts != "mtp":
        keep = {"always": lambda t: True, "never": lambda t: False, "alternate": lambda t: t % 3 != 0}[drafts]
        _oracle_drafts(monkeypatch, prompt + plain.new_ids, keep)
    spec = generate(model, prompt, max_new, speculative=True)
    assert spec.new_ids == plain.new_ids
    if drafts == "always":
        assert spec.accepted == spec.drafts == max_new // 2 and spec.main_forwards == max_new // 2
    if drafts == "never":
        assert spec.accepted == 0 and spec.drafts == max_new - 1
    if drafts == "alternate":
        assert 0 < spec.accepted < spec.drafts
    # Stopping at EOS: the same prefix, ending with the EOS token.
    eos = plain.new_ids[max_new // 2]
    first = plain.new_ids.index(eos)
    stopped = generate(model, prompt, max_new, eos_id=eos, speculative=True)
    assert stopped.new_ids == plain.new_ids[:first + 1]


def test_speculative_sampling_keeps_the_distribution():
    """Draft d ~ q, kept with probability min(1, p(d)/q(d)), else a draw from norm(max(p - q, 0)): the result
    is distributed as p (Leviathan et al. 2023, Theorem 1), whatever q is."""
    g = torch.Generator().manual_seed(1)
    p = torch.rand(6, generator=g).pow(3)
    p /= p.sum()
    q = torch.rand(6, generator=g)
    q[2] = 0  # a token the draft never proposes
    q /= q.sum()
    sampler = Sampler(1.0, 1.0, seed=0)
    n = 40_000
    counts = torch.zeros(6)
    for _ in range(n):
        d = sampler.draw(q)
        counts[d if sampler.accept(p, q, d) else sampler.residual(p, q)] += 1
    sigma = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() < 5 * sigma + 1e-4).all(), (counts / n, p)


def test_top_p_and_seeded_sampling():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    p = torch.softmax(logits, 0)
    top = gen._distribution(logits, 1.0, 0.8)  # p = .64 .24 .09 .03 .01: the first two reach 0.8
    assert torch.allclose(top, torch.cat([p[:2] / p[:2].sum(), torch.zeros(3)]))
    assert torch.allclose(gen._distribution(logits, 0.5, 1.0), torch.softmax(2 * logits, 0))
    assert torch.equal(gen._distribution(logits, 1.0, 1e-6), torch.tensor([1.0, 0, 0, 0, 0]))
    model = _model("tiny")
    prompt = [5, 6, 7]
    runs = [generate(model, prompt, 12, temperature=1.0, top_p=0.9, seed=s, speculative=sp).new_ids
            for s, sp in ((3, False), (3, False), (4, False), (3, True), (3, True))]
    assert runs[0] == runs[1] and runs[0] != runs[2] and runs[3] == runs[4]
    with pytest.raises(ValueError, match="--temperature >= 0 and 0 < --top-p <= 1"):
        generate(model, prompt, 4, top_p=0)


# ------------------------------------------------------------------------------------------------------------
def _train_ep2(root: str) -> str:
    from tritonmoe.dsv3.train import main

    text = Path(root) / "text.txt"
    if not text.exists():
        import textwrap
        text.write_bytes(Path(textwrap.__file__).read_bytes())
    return main(["--steps", "1", "--ep", "2", "--batch-size", "4", "--seq-len", "32", "--val-every", "0",
                 "--data", str(text), "--out", str(Path(root) / "run"), "--log-every", "100"])["last_checkpoint"]


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = gen.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_on_every_checkpoint_kind(tmp_path):
    from tritonmoe.dsv3.convert import dcp2hf, hf2dcp

    (step,) = {r for r in run_distributed(_train_ep2, 2, str(tmp_path))}  # world 2, experts split over 2 ranks
    dcp2hf(step, tmp_path / "hf", log=lambda s: None)
    hf2dcp(tmp_path / "hf", tmp_path / "dcp", dtype=torch.float32, log=lambda s: None)
    prompt = "def add(a, b):\n    "
    model, _, _ = gen.load_model(step)
    ids = list(prompt.encode())
    expected = bytes(ids + generate(model, ids, 16).new_ids).decode("utf-8", errors="replace") + "\n"
    for path in (step, tmp_path / "run", tmp_path / "hf", tmp_path / "dcp"):
        code, out, err = _cli(["--checkpoint", str(path), "--prompt", prompt, "--max-new-tokens", "16",
                               "--speculative-mtp"])
        assert code == 0 and out == expected, err
        assert "tokenizer byte-level" in err and "tokens/s" in err
        assert "KV cache: 480 bytes/token (3 layers x (kv_lora_rank 32 + rope 8) x 4 B)" in err
        assert "drafts accepted" in err and "identical to plain greedy: yes" in err
    code, out, err = _cli(["--checkpoint", str(step), "--prompt", prompt, "--max-new-tokens", "8",
                           "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"])
    assert code == 0 and out.startswith(prompt) and "identical" not in err


def test_cli_errors(tmp_path):
    code, out, err = _cli(["--checkpoint", str(tmp_path / "absent"), "--prompt", "x"])
    assert code == 2 and out == "" and "error: --checkpoint" in err and "no such folder" in err
    cfg = DeepseekV3Config.from_hf("tiny", vocab_size=300, num_nextn_predict_layers=0)
    DeepseekV3ForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    code, _, err = _cli(["--checkpoint", str(tmp_path / "hf"), "--prompt", "x"])
    assert code == 2 and "vocab_size 300, so it is not byte-level: pass --tokenizer" in err
    big = DeepseekV3Config.from_hf("tiny", num_nextn_predict_layers=0)
    DeepseekV3ForCausalLM(big).save_pretrained(tmp_path / "nomtp")
    code, _, err = _cli(["--checkpoint", str(tmp_path / "nomtp"), "--prompt", "x", "--speculative-mtp"])
    assert code == 2 and "has no MTP module" in err
    code, _, err = _cli(["--checkpoint", str(tmp_path / "nomtp"), "--prompt", "x", "--max-new-tokens", "600"])
    assert code == 2 and "passes max_position_embeddings 512" in err
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    code, _, err = _cli(["--checkpoint", str(tmp_path / "nomtp"), "--prompt", "x", "--tokenizer",
                         str(tmp_path / "tok")])
    assert code == 2 and "not a `tokenizers` tokenizer.json" in err
