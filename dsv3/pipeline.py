"""Pipeline parallelism for DeepseekV3ForCausalLM on torch.distributed.pipelining: stage splitting balanced by
FLOPs, the stage modules, and the losses of the last stage.

In: the model's config, the pipeline degree pp, the stages per rank v (1, or 2 for the interleaved and V-shaped
schedules), an optional explicit split (decoder layers per stage). Out: for this rank, its stage modules
(``StageModule``: the same module tree as the whole model, pruned to the stage, so every state-dict name is the
whole model's and checkpoints stay layout-free) wrapped in torch's ``PipelineStage``, and one of torch's schedules.

Stage s of n = pp * v holds a contiguous run of decoder layers; the first also the embedding, the last the final
norm, the head and the MTP modules. The split minimizes the largest stage's training FLOPs per token (flops.py;
the head and MTP count with the last stage), or follows --pp-layers; a stage may hold no decoder layer. Stages go
to ranks in loop order (stage s on pp rank s % pp; Interleaved1F1B, InterleavedZeroBubble) or V order (rank r holds
stages r and 2pp-1-r; ZBVZeroBubble, DualPipeV), which puts the first and the last stage on one rank.

What flows between stages: the hidden states [mb, S, H] (point to point); the micro-batch's token ids reach every
stage as a keyword argument (each rank has its dp share), so the last stage can look up the embeddings MTP needs
without receiving them. The last stage returns (logits, MTP logits...) and ``loss_fn`` turns them into the
micro-batch's share of the step's loss with the step's global denominators (train.py's docstring, eq. 24-25).

The embedding MTP shares with the main model: the last stage holds its own copy (the same name, so one entry in a
checkpoint). Both copies start equal and get the same summed gradient every step (``sync_shared_embedding``): a
local add when the first and last stage are on one rank (V schedules; no communication, as in DeepSeek's
DualPipe), else one all-reduce per step between the two ranks of each dp index. The gradient norm counts the
first stage's copy only.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .config import DeepseekV3Config
from .flops import _layer_matmul_params
from .model import DeepseekV3ForCausalLM, DeepseekV3Model, causal_lm_losses

SCHEDULES = ("1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
# Schedules that split each backward into an input-gradient and a weight-gradient pass; torch refuses them for
# compiled stages.
SPLIT_BACKWARD = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


def default_stages_per_rank(schedule: str) -> int:
    return 1 if schedule == "1F1B" else 2


def default_microbatches(schedule: str, pp: int, stages_per_rank: int) -> int:
    """pp micro-batches per step, or one per stage for DualPipeV (which needs at least that many)."""
    return pp * stages_per_rank if schedule == "DualPipeV" else pp


def check_pipeline_options(schedule: str, stages_per_rank: int, pp: int, microbatches: int, cfg: DeepseekV3Config,
                           layers: list[int] | None) -> None:
    """ValueError naming the option for a pipeline layout torch's schedules cannot run."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--pp-schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if schedule == "1F1B" and stages_per_rank != 1:
        raise ValueError(f"--pp-stages-per-rank {stages_per_rank}: 1F1B runs one stage per rank")
    if schedule in V_SCHEDULES and stages_per_rank != 2:
        raise ValueError(f"--pp-stages-per-rank {stages_per_rank}: {schedule} is V-shaped and runs 2 stages per rank")
    if schedule != "1F1B" and stages_per_rank < 2:
        raise ValueError(f"--pp-stages-per-rank {stages_per_rank}: {schedule} needs at least 2 stages per rank")
    if microbatches < 1:
        raise ValueError(f"--pp-microbatches must be >= 1, got {microbatches}")
    if schedule.startswith("Interleaved") and microbatches % pp:
        raise ValueError(f"--pp-microbatches {microbatches}: {schedule} needs a multiple of --pp {pp}")
    if schedule == "DualPipeV" and microbatches < pp * stages_per_rank:
        raise ValueError(f"--pp-microbatches {microbatches}: DualPipeV needs at least as many micro-batches as "
                         f"stages ({pp * stages_per_rank})")
    if layers is not None:
        n = pp * stages_per_rank
        if len(layers) != n or any(c < 0 for c in layers) or sum(layers) != cfg.num_hidden_layers:
            raise ValueError(f"--pp-layers {','.join(map(str, layers))}: need {n} non-negative counts (one per stage) "
                             f"summing to num_hidden_layers={cfg.num_hidden_layers}")


def _layer_cost(cfg: DeepseekV3Config, layer: int, seq_len: int) -> float:
    attention = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len + 1)
    return 2.0 * _layer_matmul_params(cfg, layer) + attention


def split_layers(cfg: DeepseekV3Config, n_stages: int, seq_len: int, counts: list[int] | None = None
                 ) -> list[list[int]]:
    """The decoder layers of each of `n_stages` stages: `counts` per stage if given, else the contiguous split
    whose most expensive stage (the last carrying the head and MTP) costs least, by FLOPs per token."""
    L = cfg.num_hidden_layers
    if counts is None:
        cost = [_layer_cost(cfg, i, seq_len) for i in range(L)]
        H, V = cfg.hidden_size, cfg.vocab_size
        tail = 2.0 * H * V + sum(4.0 * H * H + _layer_cost(cfg, L + k, seq_len) + 2.0 * H * V
                                 for k in range(cfg.num_nextn_predict_layers))
        prefix = [0.0]
        for c in cost:
            prefix.append(prefix[-1] + c)
        # best[s][i]: the least possible largest stage cost when stages s.. hold layers i..L-1.
        best = [[math.inf] * (L + 1) for _ in range(n_stages + 1)]
        cut = [[L] * (L + 1) for _ in range(n_stages + 1)]
        best[n_stages][L] = 0.0
        for s in range(n_stages - 1, -1, -1):
            for i in range(L, -1, -1):
                last = s == n_stages - 1
                for j in ([L] if last else range(i, L + 1)):
                    value = max(prefix[j] - prefix[i] + (tail if last else 0.0), best[s + 1][j])
                    if value < best[s][i]:
                        best[s][i], cut[s][i] = value, j
        counts, i = [], 0
        for s in range(n_stages):
            counts.append(cut[s][i] - i)
            i = cut[s][i]
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The stage indices pipeline rank `pp_rank` holds (torch's loop or V mapping)."""
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank)]


class StageModule(nn.Module):
    """One pipeline stage of DeepseekV3ForCausalLM: the whole model's module tree with only this stage's parts
    (decoder layers in a ModuleDict keyed by their layer index), so names, init rules and checkpoint keys are the
    whole model's. forward(x, ids=...) -> the hidden states, or on the last stage (logits, MTP logits...)."""

    # The same attributes as DeepseekV3ForCausalLM where the stage has them, so its methods apply as they are.
    head = DeepseekV3ForCausalLM.head
    outputs = DeepseekV3ForCausalLM.outputs
    init_rule = DeepseekV3ForCausalLM.init_rule

    def __init__(self, cfg: DeepseekV3Config, layers: list[int], first: bool, last: bool):
        super().__init__()
        self.config, self.first, self.last = cfg, first, last
        needs_embedding = first or (last and (cfg.num_nextn_predict_layers > 0 or cfg.tie_word_embeddings))
        with torch.device("meta"):  # allocated after parallelization, like the whole model (to_empty)
            model = DeepseekV3Model(cfg)
            self.lm_head = (nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
                            if last and not cfg.tie_word_embeddings else None)
        model.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        if not needs_embedding:
            model.embed_tokens = None
        if not last:
            model.norm = None
            model.mtp = nn.ModuleList()
        self.model = model
        # The last stage's copy of the embedding is a replica of the first stage's (sync_shared_embedding).
        self.shared_embedding = last and not first and needs_embedding

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        h = self.model.embed_tokens(x) if self.first else x
        cos, sin = self.model.rope_tables(ids.shape[1], h.device, h.dtype)
        for layer in self.model.layers.values():
            h = layer(h, cos, sin)
        if not self.last:
            return h
        emb = self.model.embed_tokens(ids) if len(self.model.mtp) else None
        logits, mtp_logits = self.outputs(h, emb, cos, sin)
        return (logits, *mtp_logits)


class StageLoss:
    """The last stage's loss_fn: the micro-batch's share of the step's objective (lm + lambda * mtp, divided by
    the step's global target count), and the detached parts summed over the step's micro-batches."""

    def __init__(self):
        self.denominator: torch.Tensor | None = None
        self.mtp_weight = 0.0
        self.sums: torch.Tensor | None = None  # objective, lm, mtp
        self.evaluating = False  # validation: the summed main-head cross-entropy alone

    def __call__(self, output, target: torch.Tensor) -> torch.Tensor:
        logits, *mtp_logits = output if isinstance(output, tuple) else (output,)
        if self.evaluating:
            lm, _ = causal_lm_losses(logits, [], target, 1.0)
            self.sums += torch.stack([lm.detach().double(), (target[:, 1:] != -100).sum().double(),
                                      self.sums.new_zeros(())])
            return lm
        lm, mtp = causal_lm_losses(logits, mtp_logits, target, self.denominator)
        mtp = mtp if mtp is not None else lm.new_zeros(())
        objective = lm + self.mtp_weight * mtp
        self.sums += torch.stack([objective.detach().double(), lm.detach().double(), mtp.detach().double()])
        return objective


class Pipeline:
    """This rank's part of the pipeline: its stage modules, torch's stage objects and schedule, the loss."""

    def __init__(self, modules: list[StageModule], ids: list[int], n_stages: int, schedule: str, microbatches: int,
                 pp_group, device: torch.device, micro_batch: int, seq_len: int, dtype: torch.dtype,
                 embedding_group=None):
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

        self.modules, self.ids, self.n_stages, self.schedule_name = modules, ids, n_stages, schedule
        self.pp_group, self.pp, self.microbatches = pp_group, dist.get_world_size(pp_group), microbatches
        self.hidden, self.dtype = modules[0].config.hidden_size, dtype
        self.loss = StageLoss()
        # Static stage metadata (what goes in and out of every stage, as meta tensors): without it torch infers it
        # by running a real forward and backward on the first step, which would count tokens, routing loss and
        # losses one more time.
        cfg = modules[0].config
        hidden = torch.empty(micro_batch, seq_len, cfg.hidden_size, dtype=dtype, device="meta", requires_grad=True)
        tokens = torch.empty(micro_batch, seq_len, dtype=torch.int64, device="meta")
        logits = [torch.empty(micro_batch, seq_len - d, cfg.vocab_size, dtype=dtype, device="meta",
                              requires_grad=True) for d in range(cfg.num_nextn_predict_layers + 1)]
        self.stages = [PipelineStage(m, i, n_stages, device, group=pp_group,
                                     input_args=tokens if m.first else hidden,
                                     output_args=tuple(logits) if m.last else hidden)
                       for m, i in zip(modules, ids)]
        cls = get_schedule_class(schedule)
        stages = self.stages[0] if issubclass(cls, PipelineScheduleSingle) else self.stages
        self.schedule = cls(stages, n_microbatches=microbatches, loss_fn=self.loss, scale_grads=False)
        self.has_first, self.has_last = 0 in ids, n_stages - 1 in ids
        self.embedding_group = embedding_group  # the pair (first-stage rank, last-stage rank) of this dp index


    def step(self, rows: torch.Tensor, n_main: torch.Tensor, mtp_weight: float, sums: torch.Tensor) -> None:
        """Forward and backward of every micro-batch through the pipeline; adds this rank's detached loss parts
        (nonzero on the last stage only) to `sums` = [objective, lm, mtp, seq-aux]."""
        self.loss.denominator, self.loss.mtp_weight, self.loss.evaluating = n_main, mtp_weight, False
        self.loss.sums = sums.new_zeros(3)
        self.schedule.step(*((rows,) if self.has_first else ()), target=rows if self.has_last else None, ids=rows)
        sums[:3] += self.loss.sums
        self.sync_shared_embedding()

    @torch.no_grad()
    def evaluate(self, rows: torch.Tensor) -> torch.Tensor:
        """[summed main-head cross-entropy, targets] of `rows` on this rank (the last stage's; zeros elsewhere).

        Forward only, stage after stage, one micro-batch at a time, with plain point-to-point sends of the hidden
        states between ranks (torch's schedule.eval() fails for the V-shaped schedules in torch 2.13: their local
        hand-off between a rank's two stages assumes a backward)."""
        self.loss.evaluating, self.loss.sums = True, torch.zeros(3, dtype=torch.float64, device=rows.device)
        ranks = dist.get_process_group_ranks(self.pp_group)
        me = dist.get_rank()
        mine = dict(zip(self.ids, self.modules))
        for mb in rows.chunk(self.microbatches):
            x = mb
            for s in range(self.n_stages):
                owner = ranks[_rank_of_stage(s, self.pp, self.schedule_name)]
                if owner != me:
                    continue
                prev = ranks[_rank_of_stage(s - 1, self.pp, self.schedule_name)] if s else me
                if prev != me:
                    x = torch.empty(*mb.shape, self.hidden, dtype=self.dtype, device=mb.device)
                    dist.recv(x, src=prev, group=self.pp_group)
                out = mine[s](x, ids=mb)
                if s == self.n_stages - 1:
                    self.loss(out, mb)
                    continue
                nxt = ranks[_rank_of_stage(s + 1, self.pp, self.schedule_name)]
                if nxt != me:
                    dist.send(out.contiguous(), dst=nxt, group=self.pp_group)
                x = out
        self.loss.evaluating = False
        return self.loss.sums[:2]

    def embeddings(self) -> tuple[nn.Parameter | None, nn.Parameter | None]:
        """(the first stage's embedding weight, the last stage's replica) held on this rank."""
        first = next((m.model.embed_tokens.weight for m in self.modules if m.first), None)
        replica = next((m.model.embed_tokens.weight for m in self.modules if m.shared_embedding), None)
        return first, replica

    @torch.no_grad()
    def sync_shared_embedding(self) -> None:
        """Give the first stage's embedding and the last stage's replica their summed gradient."""
        first, replica = self.embeddings()
        if first is not None and replica is not None:  # V schedules: both on this rank
            total = _local(first.grad) + _local(replica.grad)
            _local(first.grad).copy_(total)
            _local(replica.grad).copy_(total)
        elif self.embedding_group is not None and (first is not None or replica is not None):
            dist.all_reduce(_local((first if first is not None else replica).grad), group=self.embedding_group)

    def norm_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(every parameter of this rank's stages but the embedding replica, [the replica]): the norm counts the
        first stage's copy only (their gradients are equal), clipping scales both."""
        _, replica = self.embeddings()
        return ([p for m in self.modules for p in m.parameters() if p is not replica],
                [replica] if replica is not None else [])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def embedding_groups(pp: int, dp: int, n_stages: int, schedule: str):
    """The process group of this rank's (first-stage rank, last-stage rank) pair, or None when both stages are on
    one rank or this rank holds neither. Collective: every rank creates every pair's group, in the same order."""
    first_pp, last_pp = 0, _rank_of_stage(n_stages - 1, pp, schedule)
    me = dist.get_rank()
    mine = None
    if first_pp == last_pp:
        return None
    for d in range(dp):
        ranks = [first_pp * dp + d, last_pp * dp + d]
        group = dist.new_group(ranks)
        if me in ranks:
            mine = group
    return mine


def _rank_of_stage(stage: int, pp: int, schedule: str) -> int:
    if schedule in V_SCHEDULES:
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp
