"""DeepSeek-V3 model configuration: one dataclass, read from a Hugging Face ``config.json`` or a named preset.

In:  a path to ``config.json`` (or to the folder holding it), a dict with its contents, or a preset name
     (``tiny``, ``16b``, ``671b``).
Out: a validated :class:`DeepseekV3Config`; ``to_hf()`` gives the dict back in the spelling transformers 5's
     ``DeepseekV3Config`` accepts (``save_pretrained`` writes it as ``config.json``).

Rope is held in one normalized form: ``rope_theta`` plus ``rope_scaling`` (``None`` for plain rope, else a
YaRN dict with every parameter filled in), whichever of the two spellings the file used (transformers <5's
``rope_theta`` + ``rope_scaling``, or transformers 5's ``rope_parameters``).  Invalid combinations raise
``ValueError`` at construction, naming the offending values, so that a bad config fails before any weight
is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

# YaRN parameters and the defaults transformers (and DeepSeek's reference code) use when a key is absent.
_YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": None, "mscale_all_dim": None,
                  "attention_factor": None, "truncate": True}


@dataclass
class DeepseekV3Config:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432          # dense SwiGLU MLP of the first_k_dense_replace layers
    moe_intermediate_size: int = 2048       # one routed expert (and one shared-expert unit)
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # unused by MLA; kept so that to_hf round-trips
    # MLA
    q_lora_rank: int | None = 1536          # None: plain q_proj (DeepSeek-V2-Lite style)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None   # None or normalized YaRN parameters (see from_hf)
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    # MTP, norms, embeddings, init
    num_nextn_predict_layers: int = 1
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # Training (not part of the published config; to_hf writes them too so they survive a round trip)
    bias_update_rate: float = 1e-3          # aux-loss-free balancing step size (gamma in the V3 report)
    seq_aux_loss_alpha: float = 0.0         # sequence-wise balance loss weight; 0 = off (from_hf: aux_loss_alpha)
    mtp_loss_weight: float = 0.3            # lambda in loss = lm_loss + lambda * mean(mtp losses)
    activation_checkpointing: bool = False  # recompute each decoder block in backward

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_yarn(dict(self.rope_scaling), self.max_position_embeddings)
        self.validate()

    # ----------------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer `layer_idx` (MTP layers continue the numbering after the main stack) holds an MoE block."""
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    def validate(self) -> None:
        def bad(msg):
            raise ValueError(f"DeepseekV3Config: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "n_group", "topk_group",
                     "moe_layer_freq"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                bad(f"{name} must be a positive integer, got {v!r}")
        for name in ("n_routed_experts", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                bad(f"{name} must be a non-negative integer, got {v!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            bad(f"q_lora_rank must be None or a positive integer, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            bad(f"qk_rope_head_dim must be even (rope rotates pairs), got {self.qk_rope_head_dim}")
        if self.hidden_act != "silu":
            bad(f"hidden_act {self.hidden_act!r} is not supported (only 'silu': experts compute SwiGLU)")
        if self.scoring_func != "sigmoid":
            bad(f"scoring_func {self.scoring_func!r} is not supported (DeepSeek-V3 routing uses 'sigmoid')")
        if self.topk_method != "noaux_tc":
            bad(f"topk_method {self.topk_method!r} is not supported (DeepSeek-V3 routing is 'noaux_tc')")
        # NaN passes every `< 0` / `<= 0` range check below, and a NaN bias_update_rate collapses routing while the
        # loss stays finite: every float field must be a finite number first.
        for name in ("rms_norm_eps", "rope_theta", "mtp_loss_weight", "seq_aux_loss_alpha", "bias_update_rate",
                     "routed_scaling_factor", "initializer_range"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {v!r}")
        if self.rms_norm_eps <= 0:
            bad(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            bad(f"rope_theta must be > 0, got {self.rope_theta}")
        if not 0 <= self.mtp_loss_weight:
            bad(f"mtp_loss_weight must be >= 0, got {self.mtp_loss_weight}")
        if self.seq_aux_loss_alpha < 0:
            bad(f"seq_aux_loss_alpha must be >= 0, got {self.seq_aux_loss_alpha}")
        if self.bias_update_rate < 0:
            bad(f"bias_update_rate must be >= 0, got {self.bias_update_rate}")
        if self.initializer_range < 0:
            bad(f"initializer_range must be >= 0, got {self.initializer_range}")
        E = self.n_routed_experts
        if E == 0:
            return
        if E % self.n_group:
            bad(f"n_routed_experts={E} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            bad(f"topk_group={self.topk_group} > n_group={self.n_group}")
        per_group = E // self.n_group
        if self.n_group > 1 and per_group < 2:
            bad(f"group-limited routing scores each group by its top-2 experts, but n_routed_experts={E} / "
                f"n_group={self.n_group} leaves {per_group} expert per group")
        if not 1 <= self.num_experts_per_tok <= self.topk_group * per_group:
            bad(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, topk_group * experts per group"
                f" = {self.topk_group} * {per_group}]: the chosen groups hold only that many experts")

    # ----------------------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict, **overrides) -> "DeepseekV3Config":
        """Build from a preset name, a ``config.json`` path (file or folder), or its dict; `overrides` win.

        Unknown keys (``architectures``, ``torch_dtype``, ``quantization_config``, ...) are ignored.
        """
        if isinstance(source, dict):
            d = dict(source)
        elif isinstance(source, (str, os.PathLike)) and str(source) in PRESETS:
            d = dict(PRESETS[str(source)])
        elif isinstance(source, (str, os.PathLike)) and os.path.exists(source):
            path = os.path.join(source, "config.json") if os.path.isdir(source) else source
            with open(path) as f:
                d = json.load(f)
        else:
            raise ValueError(f"DeepseekV3Config.from_hf: {source!r} is neither a preset ({', '.join(PRESETS)}) "
                             f"nor an existing config.json path, nor a dict")
        d.update(overrides)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in ("deepseek_v3", "kimi_k2"):
            raise ValueError(f"DeepseekV3Config.from_hf: model_type {model_type!r} is not DeepSeek-V3")
        # transformers 5 names the MTP depth num_mtp_layers in memory; the file spells num_nextn_predict_layers.
        if "num_nextn_predict_layers" not in d and "num_mtp_layers" in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        _read_seq_aux(d)
        rope_theta, rope_scaling = _read_rope(d)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and k not in ("rope_theta", "rope_scaling")}
        for k in ("n_group", "topk_group"):  # V2-Lite style configs write null for "no grouping"
            if k in kwargs and kwargs[k] is None:
                kwargs[k] = 1
        for k in ("num_experts_per_tok", "n_shared_experts", "n_routed_experts", "first_k_dense_replace"):
            if k in kwargs and kwargs[k] is None:
                kwargs[k] = 0
        return cls(**kwargs, rope_theta=rope_theta, rope_scaling=rope_scaling)

    def to_hf(self, for_transformers: bool = True) -> dict[str, Any]:
        """The config as a ``config.json`` dict for transformers 5's ``DeepseekV3Config`` (rope in its
        ``rope_parameters`` spelling).  transformers ignores ``moe_layer_freq`` (every layer from
        ``first_k_dense_replace`` on is MoE there), so a config with another value is refused, unless
        ``for_transformers=False``: the dict is then for our own reader (``from_hf``), which keeps the value."""
        if for_transformers and self.moe_layer_freq != 1:
            raise ValueError(f"to_hf: moe_layer_freq={self.moe_layer_freq} cannot be expressed for transformers'"
                             f" DeepseekV3 (it makes every layer from first_k_dense_replace on an MoE layer)")
        d = dataclasses.asdict(self)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {k: v for k, v in self.rope_scaling.items() if v is not None and k != "type"}
            rope.update(rope_type="yarn", rope_theta=self.rope_theta)
        del d["rope_theta"], d["rope_scaling"]
        d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], rope_parameters=rope)
        # DeepSeek's own spelling of the sequence-wise loss too, so their tooling reads the same weight.
        d.update(seq_aux=True, aux_loss_alpha=self.seq_aux_loss_alpha)
        return d

    def replace(self, **changes) -> "DeepseekV3Config":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _read_seq_aux(d: dict) -> None:
    """DeepSeek's own spelling of the sequence-wise balance loss -> ``seq_aux_loss_alpha`` (in place).

    The published DeepSeek-V3 config.json (and Kimi-K2's, Moonlight's) carries ``"seq_aux": true,
    "aux_loss_alpha": 0.001``: the file asks for the sequence-wise loss at alpha 1e-3, so that is what a training
    run from it gets.  Note that the V3 report (sec. 4.2) pretrained with alpha = 1e-4; the 1e-3 in the file is the
    value DeepSeek's V2 training code used, and their released V3 modeling code is inference-only, so the file is
    the only statement we have.  Pick the report's value with ``from_hf(path, seq_aux_loss_alpha=1e-4)``.  Our own
    ``seq_aux_loss_alpha`` key (``to_hf`` writes it) and overrides win over the DeepSeek spelling.
    ``seq_aux: false`` with alpha > 0 asks for V2's batch-wise loss, which this package does not implement
    (DeepSeek-V3 balances batches with the bias instead): a warning says so and no loss is added.
    """
    if "seq_aux_loss_alpha" in d or not d.get("aux_loss_alpha"):
        return
    if d.get("seq_aux", False):
        d["seq_aux_loss_alpha"] = float(d["aux_loss_alpha"])
    else:
        warnings.warn(f"DeepseekV3Config.from_hf: aux_loss_alpha={d['aux_loss_alpha']} with seq_aux false asks for a "
                      "batch-wise auxiliary loss, which is not implemented (balancing is aux-loss-free, by the "
                      "routing bias); set seq_aux_loss_alpha for the sequence-wise loss")


def _read_rope(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, normalized YaRN dict or None) from either spelling of the rope settings."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"rope_parameters per layer type ({sorted(params)}) are not used by DeepSeek-V3")
    scaling = dict(params) if params else dict(d.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", None)
    theta = float(theta if theta is not None else d.get("rope_theta", 10000.0))
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise ValueError(f"rope type {rope_type!r} is not supported (only default rope and 'yarn')")
    return theta, scaling


def _normalize_yarn(s: dict, max_position_embeddings: int) -> dict:
    s.pop("type", None)
    s.pop("rope_type", None)
    s.setdefault("original_max_position_embeddings", max_position_embeddings)
    if s.get("factor") is None:  # transformers: derive the factor from the two context lengths
        s["factor"] = max_position_embeddings / s["original_max_position_embeddings"]
    for k, v in _YARN_DEFAULTS.items():
        if s.get(k) is None:
            s[k] = v
    if s["factor"] <= 0 or not math.isfinite(s["factor"]):
        raise ValueError(f"rope_scaling factor must be a positive number, got {s['factor']}")
    for k, v in s.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"rope_scaling {k} must be a finite number, got {v}")
    s["type"] = "yarn"
    return s


# Published shapes.  `16b` follows Moonlight-16B-A3B (DeepSeek-V3 architecture at DeepSeek-V2-Lite size: no
# q low-rank, 64 experts, 2 shared, top-6, one group); we add one MTP module since it is a training preset.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, rope_theta=10000.0, max_position_embeddings=512, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        first_k_dense_replace=1, num_nextn_predict_layers=1, rms_norm_eps=1e-6, initializer_range=0.02),
    "16b": dict(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=50000.0,
        max_position_embeddings=8192, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        n_group=1, topk_group=1, routed_scaling_factor=2.446, norm_topk_prob=True, first_k_dense_replace=1,
        num_nextn_predict_layers=1, rms_norm_eps=1e-5, initializer_range=0.02),
    "671b": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        max_position_embeddings=163840, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=3,
        num_nextn_predict_layers=1, rms_norm_eps=1e-6, initializer_range=0.02),
}
