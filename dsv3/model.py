"""DeepSeek-V3 for causal-LM training: MLA attention, dense and MoE decoder blocks, Multi-Token Prediction.

In:  input_ids [B,S] int64 (and optionally labels [B,S], aligned with input_ids like transformers': the
     model shifts them itself, -100 = ignored).
Out: CausalLMOutput with .logits [B,S,V]; with labels also .lm_loss (next-token cross-entropy), .mtp_loss
     (mean over MTP depths, each normalised by the main head's target count: report eq. 24-25),
     .loss = lm_loss + mtp_loss_weight * mtp_loss.

Numerics follow transformers 5's DeepseekV3ForCausalLM (the published model) op for op where it matters:
RMSNorm in fp32, rope tables in fp32 cast to the activation dtype, YaRN frequencies and its mscale on the
softmax scale, fp32 router.  What transformers lacks for training is added here: MTP modules and their
loss, the counting that feeds aux-loss-free balancing (dsv3.moe), activation checkpointing per block.
State-dict names equal transformers' in-memory names plus ``model.mtp.{k}.*`` (see PLAN/DESIGN), so a
transformers state dict loads directly.  Nothing here reads a process group: parallelism is applied to a
built model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import DeepseekV3Config
from .init import InitRule, build_then_init, default_rule, init_weights_, rule_for
from .moe import MLP, MoE, routers


@dataclass
class CausalLMOutput:
    logits: torch.Tensor                      # [B,S,V] main-model logits
    loss: torch.Tensor | None = None          # lm_loss + mtp_loss_weight * mtp_loss (labels given)
    lm_loss: torch.Tensor | None = None       # next-token cross-entropy
    mtp_loss: torch.Tensor | None = None      # mean over depths of sum(CE) / N_main (None without MTP modules)
    mtp_logits: list[torch.Tensor] | None = None  # depth d+1 logits [B,S-d-1,V], predicting token i+d+2
    aux_loss: torch.Tensor | None = None      # sum of the sequence-wise balance losses (already in grads)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_rule(self, name: str) -> InitRule:
        return InitRule("ones")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32, scale in the input dtype: transformers' order, which bf16 parity depends on.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ---------------------------------------------------------------------------------------------- rope
def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(cfg: DeepseekV3Config) -> tuple[torch.Tensor, float]:
    """(inv_freq [qk_rope_head_dim/2] fp32 on CPU, cos/sin multiplier).  YaRN (arXiv 2309.00071) blends
    interpolated and extrapolated frequencies with a linear ramp over the rotary dims whose wavelength
    lies between beta_fast and beta_slow rotations of the original context."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    if cfg.rope_scaling is None:
        return 1.0 / pos_freqs, 1.0
    s = cfg.rope_scaling
    factor, orig = s["factor"], s["original_max_position_embeddings"]

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s["beta_fast"]), correction_dim(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    attention_factor = s["attention_factor"]
    if attention_factor is None:
        if s["mscale"] and s["mscale_all_dim"]:
            attention_factor = _yarn_mscale(factor, s["mscale"]) / _yarn_mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = _yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def softmax_scale(cfg: DeepseekV3Config) -> float:
    scale = cfg.qk_head_dim ** -0.5
    if cfg.rope_scaling is not None and cfg.rope_scaling["mscale_all_dim"]:
        scale *= _yarn_mscale(cfg.rope_scaling["factor"], cfg.rope_scaling["mscale_all_dim"]) ** 2
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate pairs of x [...,S,D] by cos/sin [S,D/2].  Pairs are (2j, 2j+1) when `interleave` (DeepSeek's
    released layout) else (j, j+D/2); either way the result holds first members then second members, which
    leaves q.k unchanged because q and k get the same layout."""
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------------------------------------- blocks
def attention_plan(device: torch.device, dtype: torch.dtype, n_heads: int, qk_dim: int, v_dim: int
                   ) -> tuple[bool, str]:
    """(pad v to the q/k head dim, the SDPA backend expected) for MLA on `device`.

    MLA's q/k head dim differs from its v head dim (24 vs 16 in `tiny`, 192 vs 128 in DeepSeek-V3), and torch's
    fused SDPA kernels on CPU (and flash attention on CUDA) need one head dim: unpadded, CPU falls back to the
    math path, which was 77-88% of a tiny step at seq 1024. Zero-padding v takes the fused path (the padded
    output columns are zero and sliced off; gradients equal to 1.2e-6). Measured here (2-core EPYC, tiny dims,
    fwd+bwd): padded / unpadded = 1.1-1.6x faster at seq 32-192 (0.85x once at 128, within noise), 1.6-2x at 256,
    2.9x at 512, 4x at 1024; so CPU always pads. CUDA: cuDNN attention takes the two dims as they are (no padded
    bytes), else flash with v padded, else memory-efficient attention, else the math path."""
    if v_dim == qk_dim:
        return False, "sdpa (equal head dims)"
    if device.type != "cuda":
        return True, f"sdpa flash ({device.type}), v padded {v_dim}->{qk_dim}"
    try:
        from torch.backends import cuda as tbc

        def params(v):
            q = torch.empty(1, n_heads, 128, qk_dim, device=device, dtype=dtype)
            return tbc.SDPAParams(q, q, torch.empty(1, n_heads, 128, v, device=device, dtype=dtype), None, 0.0,
                                  True, False)

        if tbc.cudnn_sdp_enabled() and tbc.can_use_cudnn_attention(params(v_dim)):
            return False, "sdpa cudnn (native head dims)"
        if tbc.flash_sdp_enabled() and tbc.can_use_flash_attention(params(qk_dim)):
            return True, f"sdpa flash, v padded {v_dim}->{qk_dim}"
        if tbc.mem_efficient_sdp_enabled() and tbc.can_use_efficient_attention(params(v_dim)):
            return False, "sdpa memory-efficient (native head dims)"
    except (AttributeError, TypeError, RuntimeError):  # torch versions differ in the SDPAParams signature
        return True, f"sdpa (backend not probed), v padded {v_dim}->{qk_dim}"
    return False, "sdpa math (no fused backend takes these dims)"


class MLA(nn.Module):
    """Multi-head Latent Attention.  q = q_b(norm(q_a(x))) (or q_proj(x)); one latent c = kv_a(x) holds the
    compressed kv (normed, expanded per head by kv_b into k_nope and v) and a single rope key shared by
    all heads.  Causal SDPA over [nope | rope] heads; v is zero-padded to the q/k head dim where that takes a
    fused kernel (``attention_plan``, decided on the first forward per device and dtype; ``pad_v`` overrides)."""

    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        H, nH = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.nope, self.rope = nH, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.kv_rank, self.interleave = cfg.v_head_dim, cfg.kv_lora_rank, cfg.rope_interleave
        self.scale = softmax_scale(cfg)
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, nH * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nH * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nH * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(nH * self.v_dim, H, bias=cfg.attention_bias)
        self.pad_v: bool | None = None  # None: attention_plan decides on the first forward

    def forward(self, x_BSH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        qk = self.nope + self.rope
        if self.pad_v is None:
            self.pad_v = attention_plan(x_BSH.device, x_BSH.dtype, self.n_heads, qk, self.v_dim)[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BSH)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSH)))
        q = q.view(B, S, self.n_heads, qk).transpose(1, 2)               # [B,nH,S,nope+rope]
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        kv_latent, k_rot = self.kv_a_proj_with_mqa(x_BSH).split([self.kv_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_latent))
        kv = kv.view(B, S, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q_rot = apply_rope(q_rot, cos, sin, self.interleave)
        k_rot = apply_rope(k_rot.view(B, 1, S, self.rope), cos, sin, self.interleave)
        q = torch.cat([q_nope, q_rot], dim=-1)
        k = torch.cat([k_nope, k_rot.expand(B, self.n_heads, S, self.rope)], dim=-1)
        if self.pad_v:
            o = F.scaled_dot_product_attention(q, k, F.pad(v, (0, qk - self.v_dim)), is_causal=True,
                                               scale=self.scale)[..., : self.v_dim]
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)); mlp is a dense SwiGLU or the MoE.
    With `activation_checkpointing` set, its activations are recomputed in backward (non-reentrant);
    the MoE router does not count tokens a second time when that happens."""

    def __init__(self, cfg: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.activation_checkpointing = cfg.activation_checkpointing
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def _block(self, x, cos, sin):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._block, x, cos, sin, use_reentrant=False)
        return self._block(x, cos, sin)


class MTPModule(nn.Module):
    """One Multi-Token Prediction depth (DeepSeek-V3 report sec. 2.2).  Position i combines the previous
    depth's hidden state h_i with the embedding of the token d positions ahead:
    eh_proj(cat(enorm(emb), hnorm(h))) (embedding first, as in the released weights), then one decoder
    block.  forward returns the block's output (pre-norm: the next depth's input); `norm` is applied before
    the shared output head by the caller."""

    def __init__(self, cfg: DeepseekV3Config, layer_idx: int):
        super().__init__()
        H = cfg.hidden_size
        self.enorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(H, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.layer = DecoderLayer(cfg, layer_idx)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)

    def forward(self, emb_BLH, h_BLH, cos, sin) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb_BLH), self.hnorm(h_BLH)], dim=-1))
        return self.layer(x, cos, sin)


class DeepseekV3Model(nn.Module):
    """Embedding, decoder stack, final norm, MTP modules.  forward(input_ids) -> (hidden states BEFORE the
    final norm, which MTP depth 1 consumes; the token embeddings, which MTP reuses shifted instead of
    looking the table up again; the rope tables cos, sin [S, rope/2], which MTP reuses too)."""

    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        # Given its weight, nn.Embedding skips its own normal_ init: the init walker fills it, and on the meta
        # device that normal_ alone imported torch._dynamo (~0.4-1 s of every launch).
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_nextn_predict_layers))
        # Plain attributes, not buffers: meta-device construction and to_empty leave them intact.
        self._rope = rope_inv_freq(cfg)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}

    def rope_tables(self, S: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [S, qk_rope_head_dim/2], computed in fp32 and cast to the activations' dtype (as
        transformers does; under FSDP mixed precision that is the compute dtype, not the stored one)."""
        inv_freq, attention_factor = self._rope
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = inv_freq.to(device)
        freqs = torch.arange(S, device=device).float()[:, None] * self._inv_freq_on[device][None]
        return (freqs.cos() * attention_factor).to(dtype), (freqs.sin() * attention_factor).to(dtype)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        emb = self.embed_tokens(input_ids)
        cos, sin = self.rope_tables(input_ids.shape[1], emb.device, emb.dtype)
        h = emb
        for layer in self.layers:
            h = layer(h, cos, sin)
        return h, emb, cos, sin


class DeepseekV3ForCausalLM(nn.Module):
    """The trainable model: DeepseekV3Model + output head (tied to the embedding when configured), losses.
    Build on the meta device for large shapes, then ``to_empty`` and ``init_weights``; parallelism
    (tritonmoe.parallel) is applied to the built model."""

    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        if not isinstance(cfg, DeepseekV3Config):
            raise ValueError(f"DeepseekV3ForCausalLM expects a DeepseekV3Config, got {type(cfg).__name__}")
        self.config = cfg
        with build_then_init(self, cfg.initializer_range):  # every value drawn once, none on the meta device
            self.model = DeepseekV3Model(cfg)
            self.lm_head = (None if cfg.tie_word_embeddings else
                            nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))

    # --------------------------------------------------------------------------------------------- init
    def init_rule(self, name: str) -> InitRule:
        """How parameter or buffer `name` of the whole model (a dotted name, as named_parameters /
        named_buffers / state_dict call it) starts: its owner's rule (dsv3/init.py). The sharded init of a
        parallelized meta-built model asks this by name (tritonmoe.parallel.init_sharded_)."""
        owner, _, leaf = name.rpartition(".")
        if not owner:  # the root holds no tensor of its own; never recurse into this method
            return default_rule(self, leaf, self.config.initializer_range)
        return rule_for(self.get_submodule(owner), leaf, self.config.initializer_range)

    def init_weights(self) -> None:
        """Fill every tensor by its owner's rule from the global RNG (transformers' init: Linear, Embedding,
        router and expert weights N(0, initializer_range), norms 1, balancing bias and counters 0). Use after
        ``to_empty`` when the model was built on the meta device (a sharded model: tritonmoe.parallel.init_sharded_)."""
        init_weights_(self, self.config.initializer_range)

    # ------------------------------------------------------------------------------------------ forward
    def head(self, h_normed: torch.Tensor) -> torch.Tensor:
        """The output head shared by the main model and every MTP depth."""
        if self.lm_head is None:
            return F.linear(h_normed, self.model.embed_tokens.weight)
        return self.lm_head(h_normed)  # the module, so that hooks (e.g. FSDP units) on it run

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                loss_denominator: torch.Tensor | float | None = None) -> CausalLMOutput:
        """`labels` [B,S] are aligned with `input_ids` (often the same tensor); position i is scored on
        labels[i+1] by the main head and on labels[i+d+1] by MTP depth d.  Label -100 is ignored.

        Losses (DeepSeek-V3 report eq. 24-25): with N the number of valid main-head targets, lm_loss = (sum of the
        main head's cross-entropies) / N, each depth's L_k = (sum of its cross-entropies) / N, mtp_loss = mean_k L_k
        and loss = lm_loss + mtp_loss_weight * mtp_loss = lm_loss + lambda / D * sum_k L_k. N is this batch's count
        unless `loss_denominator` gives it: a trainer that cuts a step's global batch into micro-batches passes the
        step's global N, so that the micro-batches' losses add up to the step's loss whatever the cut."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
            D = len(self.model.mtp)
            if S < D + 2:
                raise ValueError(f"sequence length {S} too short: {D} MTP depths need at least {D + 2} tokens")
            if B == 0:
                raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} hold no sequence to score")
        h, emb, cos, sin = self.model(input_ids)
        logits, mtp_logits = self.outputs(h, emb, cos, sin, with_mtp=labels is not None)
        if labels is None:
            return CausalLMOutput(logits=logits)
        lm_loss, mtp_loss = causal_lm_losses(logits, mtp_logits, labels, loss_denominator)
        out = CausalLMOutput(logits=logits, lm_loss=lm_loss, loss=lm_loss)
        if mtp_loss is not None:
            out.mtp_loss = mtp_loss
            out.mtp_logits = [lg[:, :-1] for lg in mtp_logits]
            out.loss = lm_loss + self.config.mtp_loss_weight * mtp_loss
        aux = [r.last_aux_loss for r in routers(self) if r.last_aux_loss is not None]
        if aux:
            out.aux_loss = torch.stack(aux).sum()
        return out

    def outputs(self, h: torch.Tensor, emb: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                with_mtp: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(main logits [B,S,V], MTP depth d's logits [B,S-d,V] for d = 1..D) from the decoder stack's hidden
        states h (before the final norm) and the token embeddings emb. A pipeline's last stage calls this too."""
        S = h.shape[1]
        logits = self.head(self.model.norm(h))
        mtp_logits = []
        for k, mtp in enumerate(self.model.mtp if with_mtp else ()):
            d = k + 1  # depth d sees tokens up to i+d and predicts token i+d+1; S-d positions remain
            h = mtp(emb[:, d:], h[:, : S - d], cos[: S - d], sin[: S - d])
            mtp_logits.append(self.head(mtp.norm(h)))
        return logits, mtp_logits

    # ------------------------------------------------------------------------------ HF checkpoint I/O
    @classmethod
    def from_pretrained(cls, hf_dir, dtype=None, device=None, **options) -> "DeepseekV3ForCausalLM":
        """Load a Hugging Face safetensors checkpoint (published per-expert layout). `options` are those of
        dsv3.checkpoint.from_pretrained (missing_mtp, ignore_mtp_copies)."""
        from .checkpoint import from_pretrained
        return from_pretrained(cls, hf_dir, dtype=dtype, device=device, **options)

    def save_pretrained(self, out_dir) -> None:
        """Write the Hugging Face layout (config.json + safetensors) that transformers loads."""
        from .checkpoint import save_pretrained
        save_pretrained(self, out_dir)


def causal_lm_losses(logits: torch.Tensor, mtp_logits: list[torch.Tensor], labels: torch.Tensor,
                     loss_denominator: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(lm_loss, mtp_loss or None) as DeepseekV3ForCausalLM.forward defines them (report eq. 24-25): summed
    cross-entropies of the main head and of each MTP depth d (mtp_logits[d-1] scores labels[i+d+1]), each divided
    by N = the valid main-head targets (or `loss_denominator`); mtp_loss is the mean over depths."""
    N = (labels[:, 1:] != -100).sum() if loss_denominator is None else loss_denominator
    lm_loss = _shifted_ce_sum(logits, labels, 1) / N
    if not mtp_logits:
        return lm_loss, None
    return lm_loss, torch.stack([_shifted_ce_sum(lg, labels, d + 1) / N
                                 for d, lg in enumerate(mtp_logits, start=1)]).mean()


def _shifted_ce_sum(logits_BLV: torch.Tensor, labels_BS: torch.Tensor, shift: int) -> torch.Tensor:
    """Summed cross-entropy of logits position i against labels[i+shift] (label -100 ignored); logits positions
    without a target drop. Computed in fp32."""
    L = labels_BS.shape[1] - shift
    lg = logits_BLV[:, :L]
    return F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), labels_BS[:, shift:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def apply_activation_checkpointing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Recompute every decoder block (MTP blocks included) in backward; returns `model`."""
    for m in model.modules():
        if isinstance(m, DecoderLayer):
            m.activation_checkpointing = enabled
    return model


__all__ = ["DeepseekV3ForCausalLM", "DeepseekV3Model", "DecoderLayer", "MLA", "MTPModule", "RMSNorm",
           "CausalLMOutput", "apply_activation_checkpointing", "causal_lm_losses", "rope_inv_freq", "softmax_scale",
           "apply_rope"]
