"""Quick-look sampling from a DeepSeek-V3 checkpoint, with an MLA latent KV cache and MTP speculative decoding.

    python -m tritonmoe.dsv3.generate --checkpoint PATH --prompt TEXT [--max-new-tokens N] [--temperature T]
        [--top-p P] [--seed S] [--tokenizer TOK] [--speculative-mtp] [--device cpu|cuda] [--dtype fp32|bf16]

In:  PATH, a training step folder (any world size / EP layout: DCP stores global tensors), a run folder (its
     newest complete step), a `convert hf2dcp` output, or a Hugging Face folder (config.json + safetensors). TOK,
     a tokenizer.json, its folder, or a prepared data folder (`data prepare` output: its own tokenizer copy and
     meta.json's EOS). Without --tokenizer: the prepared folder a training checkpoint was trained on, a
     tokenizer.json inside a Hugging Face folder, else byte-level (vocab_size 256 models).
Out: stdout is exactly decode(prompt_ids + new_ids) and one newline; stderr gets tokens/s, the cache's bytes per
     token and, with --speculative-mtp, the acceptance rate and the speed-up over plain decoding of the same
     number of tokens, measured right after it.

The cache (`LatentCache`) holds, per layer and position, what MLA compresses the keys and values into: the
normed latent c (kv_lora_rank values) and the rotated rope key shared by all heads (qk_rope_head_dim), not the
per-head keys and values (num_heads * (qk_head_dim + v_head_dim)): 576 against 40,960 values per token and
layer for DeepSeek-V3. Attention runs in the absorbed form of DeepSeek's inference code: with kv_b_proj split
into W_uk [nH, nope, C] and W_uv [nH, v, C] per head, q_nope . (W_uk c) = (W_uk^T q_nope) . c, so scores are
taken against c directly, the attention-weighted sum of c is formed, and only then is W_uv applied. The layers'
own modules supply every weight and the MoE / MLP blocks run as they are (in eval mode: routers count nothing),
with the model's rope tables (YaRN included), so cached logits equal the full-sequence forward to fp32
rounding. The training model stays free of cache plumbing; this module owns it.

Speculative decoding with MTP depth 1: position i of the MTP module combines the main model's hidden state h_i
with the embedding of token i+1 and predicts token i+2, so after the main model has produced token n the MTP
module drafts token n+1 from h_{n-1}; one main forward over [t_n, draft] then scores both. Greedy: the draft is
kept when it is the main model's argmax, and the token after it comes free from the same forward; otherwise the
main model's own choice replaces it and the draft's cache slot is dropped. The output is then token for token
that of plain greedy decoding. With temperature > 0 the draft is accepted with probability min(1, p/q) and a
rejection samples from norm(max(p - q, 0)) (speculative sampling), which keeps the main model's distribution.
The MTP module keeps its own latent cache for its decoder layer, fed only with accepted tokens.

Batch size 1, one device: a quick look at a model, not a serving stack.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..parallel import CheckpointError, latest_checkpoint, load_model_weights, read_train_state
from .checkpoint import INDEX_FILE, SINGLE_FILE
from .config import DeepseekV3Config
from .model import MLA, DecoderLayer, DeepseekV3ForCausalLM, MTPModule, apply_rope
from .moe import routers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------------------
# The latent cache and the absorbed attention
@dataclass
class LatentCache:
    """One MLA layer's cache for one sequence batch; positions [0, length) of the owner are valid."""
    latent_BTC: torch.Tensor  # [B, capacity, kv_lora_rank]: kv_a_layernorm(kv latent)
    rope_BTR: torch.Tensor    # [B, capacity, qk_rope_head_dim]: the shared rope key, rotated

    @classmethod
    def empty(cls, attn: MLA, batch: int, capacity: int, device, dtype) -> "LatentCache":
        return cls(torch.empty(batch, capacity, attn.kv_rank, device=device, dtype=dtype),
                   torch.empty(batch, capacity, attn.rope, device=device, dtype=dtype))

    def bytes_per_token(self) -> int:
        return (self.latent_BTC.shape[-1] + self.rope_BTR.shape[-1]) * self.latent_BTC.element_size()


def absorbed_attention(attn: MLA, x_BSH: torch.Tensor, cache: LatentCache, start: int, cos_SR: torch.Tensor,
                       sin_SR: torch.Tensor) -> torch.Tensor:
    """MLA over positions [start, start+S) of x_BSH, attending to the cached positions before them and to each
    other causally; writes their latents and rope keys into `cache`. cos/sin [S, rope/2] are the rope tables'
    rows of those positions. Shape letters: N heads, D nope dims, R rope dims, V value dims, C kv_lora_rank,
    T key positions (start + S)."""
    B, S, _ = x_BSH.shape
    N, D, R, V, C = attn.n_heads, attn.nope, attn.rope, attn.v_dim, attn.kv_rank
    end = start + S
    if hasattr(attn, "q_proj"):
        q = attn.q_proj(x_BSH)
    else:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x_BSH)))
    q_nope_BSND, q_rot_BSNR = q.view(B, S, N, D + R).split([D, R], dim=-1)
    latent_BSC, k_rot_BSR = attn.kv_a_proj_with_mqa(x_BSH).split([C, R], dim=-1)
    cache.latent_BTC[:, start:end] = attn.kv_a_layernorm(latent_BSC)
    cache.rope_BTR[:, start:end] = apply_rope(k_rot_BSR, cos_SR, sin_SR, attn.interleave)
    q_rot_BSNR = apply_rope(q_rot_BSNR, cos_SR[:, None], sin_SR[:, None], attn.interleave)
    w_uk_NDC, w_uv_NVC = attn.kv_b_proj.weight.view(N, D + V, C).split([D, V], dim=1)
    q_latent_BSNC = torch.einsum("bsnd,ndc->bsnc", q_nope_BSND, w_uk_NDC)
    latent_BTC, rope_BTR = cache.latent_BTC[:, :end], cache.rope_BTR[:, :end]
    scores_BSNT = (torch.einsum("bsnc,btc->bsnt", q_latent_BSNC, latent_BTC)
                   + torch.einsum("bsnr,btr->bsnt", q_rot_BSNR, rope_BTR)) * attn.scale
    future_ST = (torch.arange(end, device=x_BSH.device)[None, :]
                 > torch.arange(start, end, device=x_BSH.device)[:, None])
    scores_BSNT = scores_BSNT.masked_fill(future_ST[None, :, None, :], float("-inf"))
    probs_BSNT = scores_BSNT.float().softmax(dim=-1).to(x_BSH.dtype)
    out_BSNV = torch.einsum("bsnc,nvc->bsnv", torch.einsum("bsnt,btc->bsnc", probs_BSNT, latent_BTC), w_uv_NVC)
    return attn.o_proj(out_BSNV.reshape(B, S, N * V))


def cached_block(layer: DecoderLayer, x_BSH: torch.Tensor, cache: LatentCache, start: int, cos_SR, sin_SR):
    """DecoderLayer._block with the cached attention: x + attn(norm(x)), then + mlp(norm(.))."""
    h = x_BSH + absorbed_attention(layer.self_attn, layer.input_layernorm(x_BSH), cache, start, cos_SR, sin_SR)
    return h + layer.mlp(layer.post_attention_layernorm(h))


class CachedDecoder:
    """Incremental forwards of a DeepseekV3ForCausalLM (eval mode, no grad) for one batch of sequences.

    forward(ids_BS) runs the main model on the next S positions and returns (logits [B,S,V], hidden states
    before the final norm [B,S,H]); truncate(n) forgets positions >= n. draft(h_BSH, next_ids_BS) runs MTP
    depth 1 on its next S positions, position i taking h_i and the token i+1, and returns its logits [B,S,V]
    (predicting token i+2)."""

    def __init__(self, model: DeepseekV3ForCausalLM, capacity: int, batch: int = 1, mtp: bool = False):
        self.model, self.capacity = model, capacity
        emb = model.model.embed_tokens.weight
        device, dtype = emb.device, emb.dtype
        self.cos, self.sin = model.model.rope_tables(capacity, device, dtype)
        self.caches = [LatentCache.empty(layer.self_attn, batch, capacity, device, dtype)
                       for layer in model.model.layers]
        self.mtp: MTPModule | None = model.model.mtp[0] if mtp else None
        self.mtp_cache = (LatentCache.empty(self.mtp.layer.self_attn, batch, capacity, device, dtype)
                          if self.mtp is not None else None)
        self.length = self.mtp_length = 0

    def _rows(self, start: int, S: int):
        if start + S > self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions, asked for {start + S}")
        return self.cos[start:start + S], self.sin[start:start + S]

    def forward(self, ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inner = self.model.model
        cos, sin = self._rows(self.length, ids_BS.shape[1])
        h = inner.embed_tokens(ids_BS)
        for layer, cache in zip(inner.layers, self.caches):
            h = cached_block(layer, h, cache, self.length, cos, sin)
        self.length += ids_BS.shape[1]
        return self.model.head(inner.norm(h)), h

    def truncate(self, length: int) -> None:
        assert 0 <= length <= self.length, (length, self.length)
        self.length = length

    def draft(self, h_BSH: torch.Tensor, next_ids_BS: torch.Tensor) -> torch.Tensor:
        m = self.mtp
        cos, sin = self._rows(self.mtp_length, h_BSH.shape[1])
        x = m.eh_proj(torch.cat([m.enorm(self.model.model.embed_tokens(next_ids_BS)), m.hnorm(h_BSH)], dim=-1))
        h = cached_block(m.layer, x, self.mtp_cache, self.mtp_length, cos, sin)
        self.mtp_length += h_BSH.shape[1]
        return self.model.head(m.norm(h))

    def bytes_per_token(self) -> tuple[int, int]:
        """(main model's cache bytes per token, MTP module's)."""
        return (sum(c.bytes_per_token() for c in self.caches),
                self.mtp_cache.bytes_per_token() if self.mtp_cache is not None else 0)


# ------------------------------------------------------------------------------------------------------------
# Sampling
def _distribution(logits_V: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """fp32 probabilities on the CPU (the same draws whatever the device): softmax(logits / T), restricted to the
    smallest set of most likely tokens whose mass reaches top_p, renormalized."""
    p = (logits_V.float() / temperature).softmax(-1).cpu()
    if top_p < 1.0:
        sorted_p, order = p.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p  # the most likely token is always kept
        p = torch.zeros_like(p).scatter_(0, order[keep], sorted_p[keep])
        p /= p.sum()
    return p


class Sampler:
    """Greedy at temperature 0, else sampling from `_distribution` with a seeded CPU generator."""

    def __init__(self, temperature: float, top_p: float, seed: int):
        self.temperature, self.top_p = temperature, top_p
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits_V: torch.Tensor) -> torch.Tensor:
        return _distribution(logits_V, self.temperature, self.top_p)

    def draw(self, p_V: torch.Tensor) -> int:
        return int(torch.multinomial(p_V, 1, generator=self.gen))

    def choose(self, logits_V: torch.Tensor) -> int:
        return int(logits_V.argmax()) if self.greedy else self.draw(self.probs(logits_V))

    def accept(self, p_V: torch.Tensor, q_V: torch.Tensor, token: int) -> bool:
        """Speculative sampling: keep a draft drawn from q with probability min(1, p/q)."""
        return float(torch.rand((), generator=self.gen)) * float(q_V[token]) < float(p_V[token])

    def residual(self, p_V: torch.Tensor, q_V: torch.Tensor) -> int:
        """A draw from norm(max(p - q, 0)): what a rejected draft is replaced with."""
        r = (p_V - q_V).clamp_min(0)
        return self.draw(r / r.sum() if r.sum() > 0 else p_V)


@dataclass
class Generation:
    new_ids: list[int]       # generated tokens (ending with EOS when it stopped there)
    prefill_seconds: float   # the prompt's forward (MTP's too when speculative)
    decode_seconds: float    # everything after it
    main_forwards: int       # main-model forwards after the prompt's
    drafts: int = 0          # speculative: tokens drafted by the MTP module
    accepted: int = 0        # ... and kept

    @property
    def tokens_per_s(self) -> float:
        return len(self.new_ids) / max(self.decode_seconds, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(model: DeepseekV3ForCausalLM, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, speculative: bool = False) -> Generation:
    """Decode up to `max_new_tokens` tokens after `prompt_ids` (stopping after `eos_id`), with the latent cache;
    `speculative` drafts with MTP depth 1 (see the module docstring). The model is put in eval mode."""
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need --temperature >= 0 and 0 < --top-p <= 1, got {temperature} and {top_p}")
    if speculative and not len(model.model.mtp):
        raise ValueError("--speculative-mtp: the checkpoint has no MTP module (num_nextn_predict_layers 0)")
    model.eval()
    device = model.model.embed_tokens.weight.device
    sampler = Sampler(temperature, top_p, seed)
    # The verification forward of the last draft writes one position past the last token kept.
    dec = CachedDecoder(model, len(prompt_ids) + max_new_tokens + 1, mtp=speculative)
    t0 = time.perf_counter()
    logits, h = dec.forward(torch.tensor([prompt_ids], device=device))
    new = [sampler.choose(logits[0, -1])]
    if speculative:  # MTP position i pairs h_i with token i+1: the prompt's tail and the token just chosen
        draft_logits = dec.draft(h, torch.tensor([prompt_ids[1:] + new], device=device))[0, -1]
    _sync(device)
    t1 = time.perf_counter()

    def done() -> bool:
        return len(new) >= max_new_tokens or new[-1] == eos_id

    if not speculative:
        forwards = 0
        while not done():
            logits, _ = dec.forward(torch.tensor([new[-1:]], device=device))
            new.append(sampler.choose(logits[0, -1]))
            forwards += 1
        _sync(device)
        return Generation(new, t1 - t0, time.perf_counter() - t1, forwards)

    drafts = accepted = 0
    while not done():
        q = None if sampler.greedy else sampler.probs(draft_logits)
        draft = int(draft_logits.argmax()) if q is None else sampler.draw(q)
        n = dec.length  # the position of new[-1], the newest token kept
        logits, h = dec.forward(torch.tensor([[new[-1], draft]], device=device))
        drafts += 1
        if q is None:
            best = int(logits[0, 0].argmax())
            ok = best == draft
        else:
            p = sampler.probs(logits[0, 0])
            ok = sampler.accept(p, q, draft)
        if ok:  # the token after the draft comes from the same forward
            accepted += 1
            kept = [draft, sampler.choose(logits[0, 1])]
        else:
            kept = [best if q is None else sampler.residual(p, q)]
            dec.truncate(n + 1)  # the draft's slot
            h = h[:, :1]
        for t in kept:
            if not done():
                new.append(t)
        if not done():
            draft_logits = dec.draft(h, torch.tensor([kept], device=device))[0, -1]
    _sync(device)
    return Generation(new, t1 - t0, time.perf_counter() - t1, drafts, drafts, accepted)


# ------------------------------------------------------------------------------------------------------------
# Loading
@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns on every load without a process group; this tool is single-process by design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(folder, kind): kind "dcp" (a training step folder or `convert hf2dcp` output) or "hf"; a run folder
    stands for its newest complete step."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"--checkpoint {path}: no such folder")
    if not (path / ".metadata").is_file() and (step := latest_checkpoint(path)) is not None:
        path = step
    if (path / ".metadata").is_file():
        if not (path / "config.json").is_file():
            raise ValueError(f"--checkpoint {path}: a DCP checkpoint without config.json (training checkpoints and "
                             "`convert hf2dcp` output hold one)")
        return path, "dcp"
    if (path / "config.json").is_file() and ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()):
        return path, "hf"
    raise ValueError(f"--checkpoint {path}: neither a DCP checkpoint (.metadata), a run folder with a complete "
                     f"step_XXXXXXXX, nor a Hugging Face folder (config.json + {SINGLE_FILE} or {INDEX_FILE})")


def load_model(path: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[DeepseekV3ForCausalLM, Path, str]:
    """(model in eval mode, checkpoint folder, kind) from any checkpoint `resolve_checkpoint` accepts."""
    path, kind = resolve_checkpoint(path)
    device = torch.device(device)
    if kind == "hf":
        model = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype, device=device)
    else:
        cfg = DeepseekV3Config.from_hf(path / "config.json")
        # Built on the meta device and materialized uninitialized: the load overwrites every persistent tensor,
        # and the routers' token counters (not persistent) are zeroed here.
        with torch.device("meta"):
            model = DeepseekV3ForCausalLM(cfg)
        model.to_empty(device=device)
        for r in routers(model):
            r.tokens_per_expert.zero_()
        with _quiet_dcp():
            load_model_weights(model, path)
        model.to(dtype)
    return model.eval(), path, kind


# ------------------------------------------------------------------------------------------------------------
# Text <-> ids
class ByteCodec:
    """Byte-level models (vocab 256): UTF-8 bytes in, bytes out (invalid sequences shown as U+FFFD)."""
    name, vocab_size, eos_id = "byte-level", 256, None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class TokenizerCodec:
    """A `tokenizers` tokenizer: the prompt without added special tokens, BOS first when the config asks."""

    def __init__(self, path: Path, eos_id: int | None = None, bos_id: int | None = None, name: str | None = None,
                 eos_from_config: bool = True):
        from .prepare import load_tokenizer

        self.tok, info = load_tokenizer(path)
        self.vocab_size = info.vocab_size
        self.eos_id = info.eos_id if eos_from_config else eos_id
        self.bos_id = info.bos_id if eos_from_config else bos_id
        self.name = name or str(info.path)

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


def _prepared_codec(folder: Path, how: str) -> TokenizerCodec:
    from .data import read_meta
    from .prepare import tokenizer_of

    meta = read_meta(folder)
    return TokenizerCodec(tokenizer_of(folder), meta["eos_id"], meta["bos_id"], f"{folder} ({how})",
                          eos_from_config=False)


def _trained_on(path: Path) -> Path | None:
    """The prepared data folder a training checkpoint records as its --data, if it still exists."""
    try:
        with _quiet_dcp():
            data = read_train_state(path).get("data")
    except CheckpointError:  # a weights-only checkpoint (hf2dcp output) has no train state
        return None
    return Path(data) if isinstance(data, str) and (Path(data) / "meta.json").is_file() else None


def resolve_codec(tokenizer: str | None, checkpoint: Path, kind: str, model_vocab: int):
    """The codec for --tokenizer (a prepared folder, a tokenizer.json or its folder), else the one the checkpoint
    implies (module docstring); ValueError when the tokenizer's ids do not fit the model."""
    if tokenizer is not None:
        t = Path(tokenizer)
        codec = (_prepared_codec(t, "--tokenizer") if t.is_dir() and (t / "meta.json").is_file()
                 else TokenizerCodec(t))
    elif kind == "dcp" and (data := _trained_on(checkpoint)) is not None:
        codec = _prepared_codec(data, "the data this checkpoint was trained on")
    elif kind == "hf" and (checkpoint / "tokenizer.json").is_file():
        codec = TokenizerCodec(checkpoint)
    elif model_vocab == 256:
        codec = ByteCodec()
    else:
        raise ValueError(f"the model has vocab_size {model_vocab}, so it is not byte-level: pass --tokenizer "
                         "(a tokenizer.json, its folder, or the prepared data folder it was trained on)")
    if codec.vocab_size > model_vocab:
        raise ValueError(f"tokenizer {codec.name} has {codec.vocab_size} tokens but the model's vocab_size is "
                         f"{model_vocab}")
    return codec


# ------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tritonmoe.dsv3.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="training step or run folder, `convert hf2dcp` output, or "
                                                       "a Hugging Face folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json, its folder, or a prepared data folder")
    p.add_argument("--speculative-mtp", action="store_true",
                   help="draft with the MTP module, verify with the main model; also times plain decoding")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def say(line: str) -> None:
        print(f"[generate] {line}", file=sys.stderr, flush=True)

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
        model, path, kind = load_model(args.checkpoint, device, dtype)
        cfg = model.config
        codec = resolve_codec(args.tokenizer, path, kind, cfg.vocab_size)
        prompt_ids = codec.encode(args.prompt)
        if len(prompt_ids) + args.max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} after a prompt of {len(prompt_ids)} tokens "
                             f"passes max_position_embeddings {cfg.max_position_embeddings}")
        options = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        say(f"{path} ({kind}): {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"{str(dtype).removeprefix('torch.')} on {device}; tokenizer {codec.name}")
        for speculative in {False, args.speculative_mtp}:  # warm-up (first calls of each shape), not timed
            generate(model, prompt_ids[:8], 8, **options, speculative=speculative)
        out = generate(model, prompt_ids, args.max_new_tokens, **options, eos_id=codec.eos_id,
                       speculative=args.speculative_mtp)
    except (ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(codec.decode(prompt_ids + out.new_ids) + "\n")
    sys.stdout.flush()
    say(f"prompt {len(prompt_ids)} tokens in {out.prefill_seconds:.3f} s; {len(out.new_ids)} new tokens in "
        f"{out.decode_seconds:.3f} s: {out.tokens_per_s:.1f} tokens/s")
    main_bytes, mtp_bytes = CachedDecoder(model, 1, mtp=args.speculative_mtp).bytes_per_token()
    L, elem = cfg.num_hidden_layers, torch.finfo(dtype).bits // 8
    per_head = L * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * elem
    say(f"KV cache: {main_bytes:,} bytes/token ({L} layers x (kv_lora_rank {cfg.kv_lora_rank} + rope "
        f"{cfg.qk_rope_head_dim}) x {elem} B); per-head keys and values would take {per_head:,} "
        f"({per_head / main_bytes:.1f}x)" + (f"; MTP layer {mtp_bytes:,} bytes/token" if mtp_bytes else ""))
    if args.speculative_mtp:
        plain = generate(model, prompt_ids, len(out.new_ids), **options)
        same = plain.new_ids == out.new_ids
        say(f"speculative MTP: {out.accepted}/{out.drafts} drafts accepted "
            f"({100 * out.accepted / max(out.drafts, 1):.1f}%), "
            f"{(len(out.new_ids) - 1) / max(out.main_forwards, 1):.2f} tokens per main-model forward; "
            f"{out.tokens_per_s:.1f} tokens/s against {plain.tokens_per_s:.1f} plain: "
            f"{out.tokens_per_s / plain.tokens_per_s:.2f}x"
            + (f"; identical to plain greedy: {'yes' if same else 'NO'}" if args.temperature == 0 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
