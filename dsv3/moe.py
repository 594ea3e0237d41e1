"""DeepSeek-V3 MoE block on tritonmoe kernels: router, dispatch seam, grouped experts, shared experts, and
aux-loss-free load balancing.

Shape letters: T tokens (batch * sequence flattened), H hidden, E routed experts (global), L experts held
by this rank (L == E without expert parallelism), K experts per token, I expert intermediate size,
R routed rows (T*K locally; whatever the all-to-all delivers under EP), B sequences, S sequence length.

    x[...,H] -> x_TH -> Router (fp32)                          -> topk_idx_TK int64, topk_w_TK fp32
             -> dispatcher.dispatch(x_TH, topk_idx_TK, topk_w_TK) -> x_in, group_sizes_L, src_rows, meta
             -> experts(x_in, group_sizes_L, src_rows)           -> y_RH   (gate/up GEMM -> SwiGLU -> down GEMM)
             -> dispatcher.combine(y_RH, meta)                   -> y_TH   (weighted sum of each token's K rows)
             -> + shared_experts(x_TH)                           -> y[...,H]

The dispatcher moves rows and never calls the experts; the experts have one signature and one return type.
Locally (LocalDispatcher) x_in is x_TH itself and src_rows says which token each expert-ordered row reads, so
the gate/up GEMM gathers its rows and the [R, H] expert-ordered copy is never made. tritonmoe.parallel swaps
``MoE.dispatcher`` for its all-to-all dispatcher (x_in: the rows received, src_rows: their regroup by local
expert) and shards ``experts.gate_up_proj``/``down_proj`` over experts; GroupedExperts reads its local slice
through ``.to_local()``.  Nothing here reads a process group except ``update_expert_bias``, which takes one as
an argument.

Aux-loss-free balancing (DeepSeek-V3 report, sec. 2.1.2): every Router counts the tokens it sends to each
expert during training forwards, into a non-persistent int64 buffer; ``update_expert_bias`` (once per
optimizer step) all-reduces all layers' counts in ONE collective and moves each expert's
``e_score_correction_bias`` (a persistent fp32 buffer, never a parameter) by ``rate * sign(mean - count)``.
Forwards under ``no_grad``, in eval mode, or re-run by activation checkpointing during backward are not
counted, so each token is counted once per training forward.  Reentrant checkpointing
(``use_reentrant=True``) runs the first forward under ``no_grad`` and so is never counted: use the
non-reentrant kind (``apply_activation_checkpointing``, torch's recommended default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..kernels import Fp8WeightCache, SourceRows, grouped_gemm, grouped_linear_fp8, route, swiglu
from ..kernels.grouped_gemm import gather_grouped_gemm_unchecked  # rows trusted by construction (route's)
from ..kernels.permute import unpermute_unchecked
from .config import DeepseekV3Config
from .init import InitRule, build_then_init, init_weights_


@torch.library.custom_op("tritonmoe::record_routing", mutates_args=("counts", "aux_total"))
def _record_routing(counts: torch.Tensor, topk_idx_TK: torch.Tensor, aux_total: torch.Tensor,
                    aux: torch.Tensor | None) -> None:
    """counts[e] += tokens routed to expert e (scatter-add, not bincount: no device sync) and aux_total += aux (the
    sequence-wise loss, for logging), unless the autograd engine is running a backward pass: a forward executed
    then is a recomputation (activation checkpointing, reentrant or not), which must not count a second time.
    An op of its own so that the check runs when the forward runs, also inside a torch.compile'd block (traced,
    the check would be frozen at trace time)."""
    if torch._C._current_graph_task_id() == -1:
        flat = topk_idx_TK.reshape(-1)
        counts.index_add_(0, flat, torch.ones_like(flat))
        if aux is not None:
            aux_total.add_(aux)


@_record_routing.register_fake
def _(counts, topk_idx_TK, aux_total, aux):
    return None


def _local(w: torch.Tensor) -> torch.Tensor:
    """The rank-local part of an expert weight: a DTensor sharded over experts under EP, else the tensor."""
    return w.to_local() if hasattr(w, "to_local") else w


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on `x` whose backward also feeds d(aux)/d(aux) = 1 into `aux`, so that an auxiliary loss
    computed inside a module reaches the gradients without the caller collecting it (as DeepSeek's and
    ScatterMoE's training code do)."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x):
        return grad_x, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_x.device)


class MLP(nn.Module):
    """SwiGLU MLP, down(silu(gate(x)) * up(x)): the dense layers' MLP and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid, group-limited top-K routing with a selection-only bias (DeepSeek-V3 'noaux_tc').

    forward(x_TH, num_seqs=1) -> (topk_idx_TK int64, topk_w_TK fp32).  The whole router runs in fp32
    whatever the model dtype: routing decisions flip on small score differences.
    """

    def __init__(self, cfg: DeepseekV3Config):
        super().__init__()
        E = cfg.n_routed_experts
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.bias_update_rate, self.seq_aux_loss_alpha = cfg.bias_update_rate, cfg.seq_aux_loss_alpha
        self.std = cfg.initializer_range
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.int64), persistent=False)
        # The sequence-wise loss summed over training forwards since the trainer last read it (collect_aux_loss).
        self.register_buffer("aux_loss_total", torch.zeros((), dtype=torch.float32), persistent=False)
        self.last_aux_loss: torch.Tensor | None = None  # detached value of the last sequence-wise loss
        self.seq_aux_denominator: int | None = None  # sequences the loss averages over (None: this forward's)

    def init_rule(self, name: str) -> InitRule:
        """weight N(0, initializer_range); the balancing bias and the token counters 0."""
        return InitRule("normal", self.std) if name == "weight" else InitRule("zeros")

    # The tensors that stay fp32 whatever the model's dtype (checkpoint loading and conversion read this too):
    # routing decisions flip on small score differences (a bf16 router weight changed the expert set of 1.8% of
    # tokens, see parallel/fsdp.py), and the bias's updates (1e-3) are below bf16 resolution near 1.
    keeps_fp32 = ("weight", "e_score_correction_bias")

    def _apply(self, fn, recurse=True):
        # model.to(bf16) must not round what keeps_fp32 names, nor the logged loss total (many small terms).
        # .data for a parameter: the tensor it holds now (torch swaps the parameter's data, not the parameter).
        kept = {name: getattr(self, name).data for name in (*self.keeps_fp32, "aux_loss_total")}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            moved = getattr(self, name)
            if moved.dtype != torch.float32 and before.dtype == torch.float32:
                value = before.detach().to(device=moved.device, dtype=torch.float32)
                if isinstance(moved, nn.Parameter):
                    moved.data = value
                else:
                    self._buffers[name] = value
        return self

    def forward(self, x_TH: torch.Tensor, num_seqs: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        T, E, G = x_TH.shape[0], self.num_experts, self.n_group
        scores_TE = F.linear(x_TH.float(), self.weight.float()).sigmoid()
        choice_TE = scores_TE + self.e_score_correction_bias
        if self.topk_group < G:  # with every group kept the mask is a no-op
            # Keep the topk_group groups whose two best biased scores sum highest; mask the rest out.
            group_score_TG = choice_TE.view(T, G, E // G).topk(2, dim=-1).values.sum(-1)
            keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_score_TG.topk(self.topk_group, dim=-1, sorted=False).indices, True)
            choice_TE = choice_TE.masked_fill(~keep_TG.repeat_interleave(E // G, dim=1), float("-inf"))
        topk_idx_TK = choice_TE.topk(self.top_k, dim=-1, sorted=False).indices
        topk_w_TK = scores_TE.gather(1, topk_idx_TK)  # weights from the unbiased scores
        if self.norm_topk_prob:
            topk_w_TK = topk_w_TK / (topk_w_TK.sum(-1, keepdim=True) + 1e-20)
        topk_w_TK = topk_w_TK * self.routed_scaling_factor

        self.last_aux_loss = None
        if not (self.training and torch.is_grad_enabled()):
            return topk_idx_TK, topk_w_TK
        aux = None
        if self.seq_aux_loss_alpha > 0:
            # sequence_balance_loss is the mean over this batch's sequences; a trainer that cuts a step into
            # micro-batches sets seq_aux_denominator to the step's sequence count, so the parts add up.
            scale = 1.0 if self.seq_aux_denominator is None else num_seqs / self.seq_aux_denominator
            aux = self.seq_aux_loss_alpha * scale * sequence_balance_loss(scores_TE, topk_idx_TK, num_seqs)
            self.last_aux_loss = aux.detach()
            topk_w_TK = AddAuxiliaryLoss.apply(topk_w_TK, aux)
        _record_routing(self.tokens_per_expert, topk_idx_TK.detach(), self.aux_loss_total,
                        None if aux is None else aux.detach().float())
        return topk_idx_TK, topk_w_TK


def sequence_balance_loss(scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """DeepSeek-V3 report eq. 17-20, without alpha: mean over sequences of sum_i f_i * P_i, where
    f_i = E / (K * S) * (tokens of the sequence routed to i) and P_i = mean over the sequence of the
    scores normalized over all experts.  Gradient flows through P only (f counts discrete choices)."""
    T, E = scores_TE.shape
    K = topk_idx_TK.shape[1]
    if T % num_seqs:
        raise ValueError(f"sequence_balance_loss: {T} tokens do not split into {num_seqs} sequences")
    S = T // num_seqs
    with torch.no_grad():
        hits_BE = torch.zeros(num_seqs, E, device=scores_TE.device, dtype=torch.float32)
        seq_of_row = torch.arange(T, device=scores_TE.device).div(S, rounding_mode="floor")
        hits_BE.index_put_((seq_of_row.repeat_interleave(K), topk_idx_TK.reshape(-1)),
                           torch.ones(T * K, device=scores_TE.device), accumulate=True)
        f_BE = hits_BE * (E / (K * S))
    p_BE = (scores_TE / scores_TE.sum(-1, keepdim=True)).view(num_seqs, S, E).mean(1)
    return (f_BE * p_BE).sum(-1).mean()


class GroupedExperts(nn.Module):
    """E SwiGLU experts as two stacked weights (transformers 5 layout): gate_up_proj [E,2I,H] with the gate
    rows first, down_proj [E,H,I].

    forward(x_in, group_sizes_L, src_rows=None) -> y_RH: the experts' rows grouped by local expert, group l
    holding group_sizes_L[l] rows. Without src_rows, row r is x_in[r]; with it (kernels.SourceRows), row r is
    x_in[src_rows.index[r]], read by the gate/up GEMM in its operand loads, so no gathered copy is written or
    kept for the backward. Called through __call__, so FSDP's hooks gather the weights first.

    fp8=True runs both GEMMs, forward and backward, in FP8 E4M3 with DeepSeek-V3's fine-grained scales
    (kernels.grouped_linear_fp8: 1x128 activation tiles, 128x128 weight blocks, fp32 accumulation promoted every
    128): the master weights stay as they are, the activations saved for the backward are kept in FP8. The
    weights are quantized after FSDP's all-gather, once per training step when `fp8_cache` (a
    kernels.Fp8WeightCache the trainer scopes to each step) is set, else at every call."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, std: float = 0.02,
                 fp8: bool = False):
        super().__init__()
        self.num_experts, self.intermediate_size, self.std = num_experts, intermediate_size, std
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.fp8 = fp8
        self.fp8_cache: Fp8WeightCache | None = None

    def init_rule(self, name: str) -> InitRule:
        return InitRule("normal", self.std)

    def forward(self, x_in: torch.Tensor, group_sizes_L: torch.Tensor,
                src_rows: SourceRows | None = None) -> torch.Tensor:
        w13_L2IH = _local(self.gate_up_proj)
        if self.fp8:
            h_R2I = grouped_linear_fp8(x_in, w13_L2IH, group_sizes_L, *(() if src_rows is None else
                                                                        (src_rows.index, src_rows.inverse)),
                                       weight_cache=self.fp8_cache)
            return grouped_linear_fp8(swiglu(h_R2I), _local(self.down_proj), group_sizes_L,
                                      weight_cache=self.fp8_cache)
        if src_rows is None:
            h_R2I = grouped_gemm(x_in, w13_L2IH, group_sizes_L)  # one GEMM for gate and up together
        else:
            h_R2I = gather_grouped_gemm_unchecked(x_in, w13_L2IH, group_sizes_L, src_rows)
        # silu(gate) * up, keeping only h_R2I for the backward, then the down projection.
        return grouped_gemm(swiglu(h_R2I), _local(self.down_proj), group_sizes_L)


@dataclass(frozen=True)
class LocalRouting:
    """What LocalDispatcher.combine needs to undo its dispatch."""
    row_map_TK: torch.Tensor  # [T, K] int64: row of y_RH holding token t's j-th choice (route's inverse map)
    topk_w_TK: torch.Tensor   # [T, K] routing weights of the combine


class LocalDispatcher:
    """Single-rank dispatch: every expert is local, nothing moves. dispatch does permute's index work only (the
    rows stay in x_TH; src_rows tells the gate/up GEMM where to read them), combine is the weighted unpermute.
    Stateless; tritonmoe.parallel replaces it with its all-to-all dispatcher."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor):
        group_sizes_E, src_rows = route(topk_idx_TK, self.num_experts)
        return x_TH, group_sizes_E, src_rows, LocalRouting(src_rows.inverse, topk_w_TK)

    def combine(self, y_RH: torch.Tensor, meta: LocalRouting) -> torch.Tensor:
        return unpermute_unchecked(y_RH, meta.row_map_TK, meta.topk_w_TK)  # route built the map: no re-check

    def __repr__(self):
        return f"LocalDispatcher(num_experts={self.num_experts})"


class MoE(nn.Module):
    """The drop-in DeepSeek-V3 MoE layer: y = moe(x), x [B,S,H] or [T,H], y.shape == x.shape."""

    def __init__(self, cfg: DeepseekV3Config, fp8: bool = False):
        super().__init__()
        if cfg.n_routed_experts < 1:
            raise ValueError(f"MoE: n_routed_experts must be >= 1, got {cfg.n_routed_experts}")
        self.num_experts, self.hidden_size = cfg.n_routed_experts, cfg.hidden_size
        self.std = cfg.initializer_range
        # Built standalone (the drop-in layer), the layer initializes itself once; inside a model the model does.
        with build_then_init(self, cfg.initializer_range):
            self.gate = Router(cfg)
            self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                                          cfg.initializer_range, fp8=fp8)
            self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                                   if cfg.n_shared_experts else None)
        self.dispatcher = LocalDispatcher(cfg.n_routed_experts)

    def init_weights(self) -> None:
        """Fill every tensor of the layer by its owner's rule from the global RNG (after to_empty)."""
        init_weights_(self, self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE: last dim {x.shape[-1]} != hidden_size {self.hidden_size}")
        x_TH = x.reshape(-1, self.hidden_size)
        topk_idx_TK, topk_w_TK = self.gate(x_TH, num_seqs=x.shape[0] if x.dim() == 3 else 1)
        x_in, group_sizes_L, src_rows, meta = self.dispatcher.dispatch(x_TH, topk_idx_TK, topk_w_TK)
        y_RH = self.experts(x_in, group_sizes_L, src_rows)
        y_TH = self.dispatcher.combine(y_RH, meta)
        if self.shared_experts is not None:
            y_TH = y_TH + self.shared_experts(x_TH)
        return y_TH.view(x.shape)


def routers(model: nn.Module) -> list[Router]:
    """Every Router in `model`, in module order (MTP layers included)."""
    return [m for m in model.modules() if isinstance(m, Router)]


@torch.no_grad()
def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sequence-wise balance loss of every training forward since the last call (all routers of `model`,
    recomputations not counted), as one fp32 scalar; resets the routers' totals. None without routers."""
    rs = routers(model)
    if not rs:
        return None
    total = torch.stack([r.aux_loss_total for r in rs]).sum()
    for r in rs:
        r.aux_loss_total.zero_()
    return total


def enable_fp8(model: nn.Module, cache: Fp8WeightCache | None = None) -> int:
    """Run every routed-expert GEMM of `model` in FP8 (GroupedExperts.fp8), sharing `cache`; returns how many
    expert modules were switched."""
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    for m in experts:
        m.fp8, m.fp8_cache = True, cache
    return len(experts)


def set_seq_aux_denominator(model: nn.Module, num_seqs: int | None) -> None:
    """Normalise every router's sequence-wise balance loss by `num_seqs` sequences (a training step's global batch)
    instead of each forward's own count (None restores that)."""
    for r in routers(model):
        r.seq_aux_denominator = num_seqs


@torch.no_grad()
def update_expert_bias(model: nn.Module, group=None, rate: float | None = None) -> torch.Tensor | None:
    """Aux-loss-free balancing step; call once per optimizer step, on every rank.

    Sums every Router's token counts over `group` (one all-reduce of all layers' counts concatenated, when
    torch.distributed is initialized), then per layer ``bias += rate * sign(mean(count) - count)`` and zeroes
    the counts.  `rate` defaults to each router's ``bias_update_rate`` from the config.  Returns the summed
    counts [num_moe_layers, E] (int64) for logging, or None when the model has no MoE layer.
    """
    rs = routers(model)
    if not rs:
        return None
    counts = torch.cat([r.tokens_per_expert for r in rs])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, group=group)
    out = []
    for r, c in zip(rs, counts.split([r.num_experts for r in rs])):
        c_f = c.double()
        step = r.bias_update_rate if rate is None else rate
        r.e_score_correction_bias.add_((c_f.mean() - c_f).sign().float() * step)
        r.tokens_per_expert.zero_()
        out.append(c)
    return torch.stack(out)


__all__ = ["MoE", "Router", "GroupedExperts", "LocalDispatcher", "LocalRouting", "MLP", "AddAuxiliaryLoss",
           "sequence_balance_loss", "update_expert_bias", "routers", "set_seq_aux_denominator", "enable_fp8", "collect_aux_loss"]
