"""DeepSeek-V3 671B at full scale, on paper: per-GPU memory and step time for EP x FSDP and PP x EP x FSDP
layouts on H100s, and a search for the best layout that fits.

python -m bench scale [--tokens-per-gpu 4096] [--seq 4096] [--global-batch-seqs 15360] [--json FILE]
python -m bench scale --gpus 512 --pp 8 --ep 32 --schedule Interleaved1F1B --pp-stages-per-rank 2

In: the `671b` preset (parameters counted on a model built on the meta device, cross-checked against a
closed-form count from the config), per-token FLOPs and activation sizes derived from the config, kernel
rates and link bandwidths from the sources printed with them. Out: a table per layout and a list of every
input figure with its source. Nothing here is measured by this package on a GPU; the figures it prints are
estimates whose inputs are all on the screen, so a measured rate can replace an assumed one.

Layout without pipeline parallelism (what parallel/ builds): dense parameters FSDP-sharded over all N GPUs;
routed experts split over an `ep` mesh dimension (L = E/EP per rank) and FSDP-sharded over `edp` = N/EP.
Per micro-batch of T tokens per GPU: FSDP all-gathers each block's bf16 parameters twice (forward, and again
in backward after resharding) and reduce-scatters fp32 gradients once, overlapped with compute; the EP
all-to-all (dispatch + combine forward, their gradients backward, the forward pair again under activation
checkpointing) is not overlapped. Micro-batch time = max(compute, FSDP traffic) + all-to-all time.

Expert placement (issue 13): FSDP2 shards dim 0 of the local expert weights [L, 2I, H] / [L, H, I] with
torch.chunk, so each edp rank holds ceil(L/edp) experts, padded (512 GPUs, EP 64: 4 experts over 8 ranks is
one padded expert each, 2x the memory and all-gather bytes of an exact 1/edp). The trainer shards dim 1
instead exactly when edp does not divide L; this model applies the same rule (`expert_shard_dim`).

Layout with pipeline parallelism (PP x dp, dp = N/PP, and PP x edp x EP for experts): the 61 decoder layers
are split over PP x v stages (v stages per rank; the first also holds the embedding, the last the head and
the MTP module); FSDP and the all-to-all stay inside each stage's dp group; activations go stage to stage
point to point. Under torch.distributed.pipelining a stage keeps its parameters unsharded and accumulates
unsharded fp32 gradients from its first micro-batch to its last (stage.py turns off resharding after
backward and gradient sync for all but the last), so FSDP gathers once and reduce-scatters once per step.
Step = micro-batches x the slowest rank's micro-batch time + the schedule's bubble (`SCHEDULES`, closed
forms from the papers, checked against torch's own schedules in tests/test_scale.py) + the FSDP traffic not
hidden under one micro-batch + the optimizer.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

GB = 1e9
GPU_MEMORY_GB = 80.0  # H100 SXM5 80GB (datasheet); ~2-3 GB go to the CUDA context and NCCL buffers
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    source: str


# Every input figure, with where it comes from. Rates we have not measured say so.
FIGURES: dict[str, Figure] = {
    "dense_bf16": Figure(800e12, "FLOP/s", "H100 SXM dense bf16 matmul ~800 TFLOP/s as measured for the project's design notes "
                         "(989 datasheet); not measured by this repository"),
    "copy_bw": Figure(3.0e12, "B/s", "H100 SXM device copy ~3.0 TB/s as measured for the project's design notes "
                      "(3.35 datasheet); not measured by this repository"),
    "expert_gemm_frac": Figure(0.85, "of dense", "issue 6 target (>=85% of dense torch.mm at >=2048 tokens "
                               "per expert); UNMEASURED assumption for our grouped GEMM"),
    "attention_frac": Figure(0.60, "of dense", "assumption (FlashAttention-class kernels reach roughly 60% of "
                             "dense-matmul rate at head dim 192); UNMEASURED"),
    "permute_frac": Figure(0.80, "of copy", "issue 6 target (>=80% of device copy); UNMEASURED assumption"),
    "nvlink_link": Figure(450e9, "B/s per direction", "NVIDIA H100 SXM datasheet: NVLink 900 GB/s per GPU "
                          "(bidirectional), i.e. 450 GB/s each way"),
    "ib_link": Figure(50e9, "B/s per direction", "InfiniBand NDR 400 Gb/s per GPU (one ConnectX-7 per GPU) "
                      "= 50 GB/s"),
    "nvlink_deepep": Figure(153e9, "B/s", "DeepEP README (deepseek-ai/DeepEP): ~153 GB/s intranode "
                            "dispatch/combine bandwidth measured on H800 NVLink"),
    "ib_deepep": Figure(50e9, "B/s", "DeepEP README: ~43-58 GB/s internode RDMA bandwidth per GPU measured "
                        "(CX7 400 Gb/s); 50 GB/s used"),
}


def config_671b() -> dict[str, Any]:
    """The preset as a plain dict: from tritonmoe.dsv3 when importable, else the published DeepSeek-V3 dims."""
    try:
        from tritonmoe.dsv3 import DeepseekV3Config

        return {k: v for k, v in asdict(DeepseekV3Config.from_hf("671b")).items()}
    except ImportError:
        return dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                    num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
                    n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3,
                    num_nextn_predict_layers=1, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------- parameters

def _attn_params(c: dict) -> int:
    H, nh = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    q = (H * c["q_lora_rank"] + c["q_lora_rank"] + c["q_lora_rank"] * nh * qk) if c["q_lora_rank"] else H * nh * qk
    kv = H * (c["kv_lora_rank"] + c["qk_rope_head_dim"]) + c["kv_lora_rank"] \
        + c["kv_lora_rank"] * nh * (c["qk_nope_head_dim"] + c["v_head_dim"])
    return q + kv + nh * c["v_head_dim"] * H


def analytic_params(c: dict) -> dict[str, int]:
    """Closed-form parameter count by kind: 'expert' (routed experts, EP-sharded) and 'dense' (the rest).
    MTP modules share the embedding and head with the main model, so they add no copies."""
    H, E, I = c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"]  # noqa: E741
    n_moe = c["num_hidden_layers"] - c["first_k_dense_replace"]
    norms = 2 * H
    dense_layer = _attn_params(c) + norms + 3 * H * c["intermediate_size"]
    moe_layer_dense = _attn_params(c) + norms + E * H + 3 * H * I * c["n_shared_experts"]  # router weight
    expert_layer = 3 * E * H * I
    mtp = c["num_nextn_predict_layers"]
    embed = c["vocab_size"] * H * (1 if c.get("tie_word_embeddings") else 2)
    dense = (c["first_k_dense_replace"] * dense_layer + n_moe * moe_layer_dense + embed + H
             + mtp * (moe_layer_dense + 2 * H + 2 * H * H + H))  # MTP: enorm, hnorm, eh_proj, norm
    return {"dense": dense, "expert": (n_moe + mtp) * expert_layer}


def meta_params(c: dict) -> dict[str, int] | None:
    """Count on a model built on the meta device (no memory), split the same way; None if dsv3 is absent."""
    try:
        import torch

        from tritonmoe.dsv3 import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError:
        return None
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**{k: v for k, v in c.items()}))
    out = {"dense": 0, "expert": 0}
    for name, p in model.named_parameters():
        out["expert" if ".experts." in name else "dense"] += p.numel()
    return out


# ---------------------------------------------------------------------------------- per-token quantities

def forward_flops_per_token(c: dict, seq: int) -> dict[str, float]:
    """Matmul FLOPs of one forward pass per token, by kind (attention core at the causal mean context)."""
    H, nh, K = c["hidden_size"], c["num_attention_heads"], c["num_experts_per_tok"]
    qk, v = c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["v_head_dim"]
    I, E = c["moe_intermediate_size"], c["n_routed_experts"]  # noqa: E741
    n_moe = c["num_hidden_layers"] - c["first_k_dense_replace"] + c["num_nextn_predict_layers"]
    n_layers = c["num_hidden_layers"] + c["num_nextn_predict_layers"]
    proj = 2 * (_attn_params(c) - H)  # every attention projection is a matmul; norms are not
    core = 2 * nh * (qk + v) * seq / 2  # QK^T and PV over half the sequence on average (causal)
    return {
        "dense_mm": n_layers * proj + c["first_k_dense_replace"] * 6 * H * c["intermediate_size"]
        + n_moe * (2 * H * E + 6 * H * I * c["n_shared_experts"])
        + (1 + c["num_nextn_predict_layers"]) * 2 * H * c["vocab_size"] + c["num_nextn_predict_layers"] * 4 * H * H,
        "attention_core": n_layers * core,
        "expert_mm": n_moe * K * 6 * H * I,
    }


def permute_bytes_per_token(c: dict) -> float:
    """Bytes moved by permute + unpermute per token over a training step (forward and backward), bf16."""
    n_moe = c["num_hidden_layers"] - c["first_k_dense_replace"] + c["num_nextn_predict_layers"]
    return n_moe * 4 * (c["num_experts_per_tok"] + 1) * c["hidden_size"] * 2


def activation_bytes_per_token(c: dict) -> dict[str, float]:
    """bf16 tensors autograd keeps per token per layer (an estimate from the data flow; fp32 router state
    counted at 4 bytes). Attention core assumed flash-style (q, k, v, out and a logsumexp)."""
    H, nh, K = c["hidden_size"], c["num_attention_heads"], c["num_experts_per_tok"]
    qk, v, I = c["qk_nope_head_dim"] + c["qk_rope_head_dim"], c["v_head_dim"], c["moe_intermediate_size"]  # noqa: E741
    attn = (2 * H  # residual input, normed input
            + 2 * (c["q_lora_rank"] or 0)  # q_a output and its norm
            + c["kv_lora_rank"] + c["qk_rope_head_dim"] + c["kv_lora_rank"]  # kv_a output, its norm
            + nh * (c["qk_nope_head_dim"] + v)  # kv_b output
            + nh * qk * 2 + nh * v + nh * v)  # q, k (roped), v, attention output
    moe = (2 * H + K * H + K * 2 * I + K * I + K * H  # norm in/out, x_sorted, gate|up, SwiGLU out, down out
           + 3 * I * c["n_shared_experts"]) * 2 + 3 * c["n_routed_experts"] * 4  # shared expert; router fp32
    dense_mlp = (2 * H + 3 * c["intermediate_size"]) * 2
    return {"attn": attn * 2, "moe_mlp": moe, "dense_mlp": dense_mlp, "layer_input": H * 2,
            "logits": c["vocab_size"] * (2 + 4)}  # bf16 logits + fp32 softmax in the loss


# ------------------------------------------------------------------------------------ expert placement

def expert_shard_dim(local_experts: int, edp: int) -> int:
    """The dim FSDP shards the local expert weights on over edp: 1 exactly when edp does not divide the local
    expert count L (the trainer's rule, issue 13), else 0. torchtitan picks dim 1 when edp > L
    (torchtitan/distributed/fsdp.py); that implies edp does not divide L, so the rules agree wherever torchtitan
    shards dim 1 and for every power-of-two layout; they differ only for edp <= L with a remainder (L=8,
    edp=3), which torchtitan pads on dim 0."""
    return 1 if local_experts % edp else 0


def expert_shard_fractions(c: dict, local_experts: int, edp: int, dim: int) -> tuple[float, float]:
    """(held, gathered) as fractions of one EP rank's L experts: what one edp rank stores as its shard and
    what an all-gather materializes, padding included. FSDP2 chunks dim 0 with torch.chunk: every rank's shard
    is padded to ceil(L/edp) experts, so held = ceil(L/edp)/L and gathered = edp*ceil(L/edp)/L (both exact
    when edp divides L). Dim 1 splits every expert: held = 1/edp, gathered = 1; FSDP2 (torch 2.13
    _fsdp_param.py) refuses an uneven split on a dim > 0, so edp must divide 2I (gate_up) and H (down)."""
    if dim == 0:
        rows = math.ceil(local_experts / edp)
        return rows / local_experts, edp * rows / local_experts
    if dim == 1:
        for name, size in (("2*moe_intermediate_size", 2 * c["moe_intermediate_size"]),
                           ("hidden_size", c["hidden_size"])):
            if size % edp:
                raise ValueError(f"expert shard dim 1: edp={edp} does not divide {name}={size} (FSDP2 splits a "
                                 "dim > 0 only evenly)")
        return 1 / edp, 1.0
    raise ValueError(f"expert shard dim {dim}: the expert weights are FSDP-sharded on dim 0 or 1")


EXPERT_SHARD = ("auto", "dim0", "dim1")


def _shard_dim(option: str, local_experts: int, edp: int) -> int:
    if option not in EXPERT_SHARD:
        raise ValueError(f"--expert-shard {option!r}: expected one of {', '.join(EXPERT_SHARD)}")
    return expert_shard_dim(local_experts, edp) if option == "auto" else int(option[-1])


def _links(links: str) -> tuple[float, float]:
    """(NVLink, InfiniBand) bandwidths per GPU for the chosen figures."""
    F = FIGURES
    if links == "deepep":
        return F["nvlink_deepep"].value, F["ib_deepep"].value
    return F["nvlink_link"].value, F["ib_link"].value


def _a2a_layer(c: dict, tokens: int, ep: int, links: str) -> tuple[float, float, float]:
    """(bytes over NVLink, bytes over IB, seconds) of one EP exchange of one MoE layer per GPU: every
    (token, expert) copy whose expert lives on another rank of the ep group is sent (no dedup), bf16 rows; the
    group is ep consecutive ranks, so it spans ep/8 nodes once ep > 8."""
    intra_peers = min(ep, GPUS_PER_NODE) - 1
    inter_peers = ep - min(ep, GPUS_PER_NODE)
    row_bytes = tokens * c["num_experts_per_tok"] * c["hidden_size"] * 2
    nv, ib = _links(links)
    b_intra, b_inter = row_bytes * intra_peers / ep, row_bytes * inter_peers / ep
    return b_intra, b_inter, max(b_intra / nv, b_inter / ib)


def _compute_time(flops: dict[str, float], permute_bytes: float, tokens: int, passes: int) -> float:
    """Seconds of matmuls (forward FLOPs per token x passes, at each kind's rate) and permute traffic."""
    F = {k: f.value for k, f in FIGURES.items()}
    t = tokens * passes * (flops["dense_mm"] / F["dense_bf16"]
                           + flops["attention_core"] / (F["dense_bf16"] * F["attention_frac"])
                           + flops["expert_mm"] / (F["dense_bf16"] * F["expert_gemm_frac"]))
    return t + tokens * permute_bytes * (passes / 3) / (F["copy_bw"] * F["permute_frac"])


def _exchanges(ac: bool) -> int:
    # Dispatch and combine forward, their gradients backward; per-block recompute runs the forward pair again.
    return 6 if ac else 4


# ------------------------------------------------------------------------------- the model without PP

@dataclass(frozen=True)
class Layout:
    gpus: int  # N
    ep: int  # expert-parallel degree (routed experts split E/EP per rank)

    @property
    def edp(self) -> int:  # FSDP degree of the expert weights
        return self.gpus // self.ep


def estimate(layout: Layout, c: dict, params: dict[str, int], tokens_per_gpu: int, seq: int,
             global_tokens: int, links: str, *, expert_shard: str = "auto") -> dict[str, Any]:
    """Per-GPU memory and step time of an EP x FSDP layout without pipeline parallelism; activation
    checkpointing (4 passes instead of 3) when the layout does not fit without it. expert_shard: "auto" (the
    trainer's rule), "dim0" or "dim1"."""
    F = {k: f.value for k, f in FIGURES.items()}
    N, EP, T = layout.gpus, layout.ep, tokens_per_gpu
    E = c["n_routed_experts"]
    n_moe = c["num_hidden_layers"] - c["first_k_dense_replace"] + c["num_nextn_predict_layers"]
    n_layers = c["num_hidden_layers"] + c["num_nextn_predict_layers"]
    L = E // EP
    dim = _shard_dim(expert_shard, L, layout.edp)
    held, gathered_frac = expert_shard_fractions(c, L, layout.edp, dim)

    # Memory per GPU. fp32 sharded master params + fp32 grads + fp32 Adam moments: 16 B/param, dense params
    # over all N GPUs, experts over EP x edp with FSDP's padding (exactly N ways when edp divides L or dim 1).
    expert_gpu = params["expert"] / EP * held
    sharded = params["dense"] / N + expert_gpu
    mem = {"params_gb": 4 * sharded / GB, "grads_gb": 4 * sharded / GB, "optim_gb": 8 * sharded / GB,
           "expert_state_gb": 16 * expert_gpu / GB}
    # In flight: two blocks unsharded (current + prefetched): bf16 params, bf16 grads, fp32 reduce buffer.
    expert_layer_local = params["expert"] / n_moe / EP * gathered_frac
    dense_layer = (params["dense"] - 2 * c["vocab_size"] * c["hidden_size"]) / n_layers
    mem["fsdp_buffers_gb"] = 2 * (dense_layer + expert_layer_local) * (2 + 2 + 4) / GB
    a = activation_bytes_per_token(c)
    n_dense = c["first_k_dense_replace"]
    per_tok_all = (n_layers * a["attn"] + n_moe * a["moe_mlp"] + n_dense * a["dense_mlp"]
                   + (1 + c["num_nextn_predict_layers"]) * a["logits"])
    mem["act_no_ac_gb"] = T * per_tok_all / GB
    # Per-block recompute: every block input kept, one block's activations live during its recompute.
    mem["act_ac_gb"] = T * (n_layers * a["layer_input"] + a["attn"] + a["moe_mlp"]
                            + (1 + c["num_nextn_predict_layers"]) * a["logits"]) / GB
    static = mem["params_gb"] + mem["grads_gb"] + mem["optim_gb"] + mem["fsdp_buffers_gb"]
    mem["total_ac_gb"] = static + mem["act_ac_gb"]
    mem["total_no_ac_gb"] = static + mem["act_no_ac_gb"]

    # Compute per micro-batch: 3 passes of matmul FLOPs (forward, two backward GEMMs), +1 forward with AC.
    fl = forward_flops_per_token(c, seq)
    ac = mem["total_no_ac_gb"] > GPU_MEMORY_GB
    passes = 4 if ac else 3
    t_compute = _compute_time(fl, permute_bytes_per_token(c), T, passes)

    bytes_intra, bytes_inter, t_a2a_layer = _a2a_layer(c, T, EP, links)
    t_a2a = _exchanges(ac) * n_moe * t_a2a_layer

    # FSDP traffic per micro-batch: all-gather bf16 twice, reduce-scatter fp32 once (each rank receives the
    # edp - 1 other padded shards); the dense mesh spans nodes once N > 8, so the ring runs at the IB rate.
    gathered = params["dense"] * (N - 1) / N + params["expert"] / EP * held * (layout.edp - 1)
    nv, ib = _links(links)
    fsdp_bw = nv if N <= GPUS_PER_NODE else ib
    t_fsdp = gathered * (2 + 2 + 4) / fsdp_bw

    t_mb = max(t_compute, t_fsdp) + t_a2a
    micro_batches = math.ceil(global_tokens / (N * T))
    step = micro_batches * t_mb + 16 * sharded * 2 / F["copy_bw"]  # + AdamW: read+write 16 B/param once
    model_flops = 3 * (fl["dense_mm"] + fl["attention_core"] + fl["expert_mm"]) * global_tokens
    return {"gpus": N, "ep": EP, "edp": layout.edp, "experts_per_gpu": L, "tokens_per_gpu": T,
            "expert_shard": f"dim{dim}", **{k: round(v, 2) for k, v in mem.items()},
            "fits_ac": mem["total_ac_gb"] <= GPU_MEMORY_GB, "fits_no_ac": mem["total_no_ac_gb"] <= GPU_MEMORY_GB,
            "a2a_gb_per_layer": round(4 * (bytes_intra + bytes_inter) / GB, 3),
            "a2a_ms_per_layer": round(4 * t_a2a_layer * 1e3, 2), "compute_ms_mb": round(t_compute * 1e3, 1),
            "fsdp_ms_mb": round(t_fsdp * 1e3, 1), "a2a_ms_mb": round(t_a2a * 1e3, 1),
            "micro_batches": micro_batches, "step_s": round(step, 1),
            "tokens_per_s_per_gpu": round(global_tokens / step / N),
            "mfu": round(model_flops / step / N / F["dense_bf16"], 3),
            "links": links}


def layouts(gpus=(64, 128, 256, 512), eps=(8, 32, 64)) -> list[Layout]:
    return [Layout(n, ep) for n in gpus for ep in eps if ep <= n and n % ep == 0]


# ---------------------------------------------------------------------------- pipeline schedules

@dataclass(frozen=True)
class Schedule:
    stages_per_rank: tuple[int, ...] | None  # the v torch accepts (None: any v >= 1)
    v_shape: bool  # rank r holds stages r and 2p-1-r; else the loop placement r, r+p, r+2p, ...
    bubble: str  # idle time of a rank per step, in one chunk's F, B (full backward), W (weight part of B)
    in_flight: str  # forward chunks whose activations rank r holds at its peak
    source: str


# Names as torch.distributed.pipelining.get_schedule_class spells them. p ranks, v stages (chunks) per rank,
# m micro-batches. The closed forms are the papers'; tests/test_scale.py checks the bubble fractions and the
# in-flight counts against torch 2.13's own schedules (their action lists run with F = W = B/2 = 1).
SCHEDULES: dict[str, Schedule] = {
    "GPipe": Schedule((1,), False, "(p-1)(F+B)", "m",
                      "Huang et al., GPipe, arXiv:1811.06965: all forwards, then all backwards"),
    "1F1B": Schedule((1,), False, "(p-1)(F+B)", "min(m, p-r)",
                     "PipeDream-Flush, Narayanan et al., arXiv:2006.09503; the first stage holds p micro-batches "
                     "(Korthikanti et al., arXiv:2205.05198 sec. 4.2.3)"),
    "Interleaved1F1B": Schedule(None, False, "(p-1)(F+B), chunks of 1/v stage", "min(vm, (v-1)q + 2(p-1-r) + 1), "
                                "q = m / max(1, m // p)",
                                "Megatron-LM interleaved schedule, Narayanan et al., arXiv:2104.04473 sec. 2.2: "
                                "bubble (p-1)/(vm) of the ideal time; rank 0 holds p + (p-1)/v stages' worth "
                                "(arXiv:2205.05198 sec. 4.2.3); warm-up count as torch 2.13 _get_warmup_ops"),
    "InterleavedZeroBubble": Schedule(None, False, "(p-1)(F+B-2W)", "min(vm, (v-1)q + (p-1-r) + 1)",
                                      "ZB-H1 / ZB1P, Qi et al., Zero Bubble Pipeline Parallelism, "
                                      "arXiv:2401.10241 sec. 2.1 (1/3 of 1F1B's bubble at F = B/2 = W, 1F1B's "
                                      "memory); bubble as the ZB1P row of deepseek-ai/DualPipe's README"),
    "ZBVZeroBubble": Schedule((2,), True, "(p-1)(F+B-2W)", "min(2m, 2p)",
                              "ZB-V, arXiv:2401.10241 sec. 6: 1F1B's peak memory (2p half-stage chunks) and no "
                              "bubble at F = B/2 = W when the optimizer step is not synchronized (their "
                              "post-validation); our step synchronizes (global grad-norm clipping), so the "
                              "p-1 chunk-forward start-up offset stays"),
    "DualPipeV": Schedule((2,), True, "(p-1)(F&B+B-3W), F&B = F+B unless overlapped", "min(2m, 2p+1)",
                          "DualPipe, DeepSeek-V3 report arXiv:2412.19437 sec. 3.2.1; DualPipeV (Sea AI Lab's "
                          "cut-in-half DualPipe) bubble (PP/2-1)(F&B+B-3W) and PP+1 chunks of activations per "
                          "device for PP = 2p stages: deepseek-ai/DualPipe README. torch runs the two halves of "
                          "an OVERLAP_F_B action back to back unless a custom function is registered"),
}


def schedule_error(name: str, pp: int, v: int, m: int) -> str | None:
    """Why torch.distributed.pipelining (2.13) would refuse this schedule, or None."""
    if name not in SCHEDULES:
        return f"schedule {name!r}: expected one of {', '.join(SCHEDULES)}"
    allowed = SCHEDULES[name].stages_per_rank
    if v < 1 or (allowed is not None and v not in allowed):
        return f"schedule {name}: {v} stages per rank (takes {allowed or 'any v >= 1'})"
    if name == "1F1B" and m < pp:
        return f"schedule 1F1B: {m} micro-batches < {pp} stages"
    if name == "DualPipeV" and m < 2 * pp:
        return f"schedule DualPipeV: {m} micro-batches < {2 * pp} stages"
    if name in ("Interleaved1F1B", "InterleavedZeroBubble") and m % max(1, m // pp):
        return f"schedule {name}: {m} micro-batches is not a multiple of its {max(1, m // pp)} rounds"
    return None


def stage_ranks(name: str, pp: int, v: int) -> list[int]:
    """The rank holding each of the pp * v stages."""
    if SCHEDULES[name].v_shape:
        return [s if s < pp else 2 * pp - 1 - s for s in range(2 * pp)]
    return [s % pp for s in range(pp * v)]


def in_flight_chunks(name: str, pp: int, v: int, m: int, rank: int) -> int:
    """Forward chunks (1/v of the rank's layers each) whose activations `rank` holds at its peak."""
    q = m // max(1, m // pp)  # torch's micro-batches per round
    return {"GPipe": m,
            "1F1B": min(m, pp - rank),
            "Interleaved1F1B": min(v * m, (v - 1) * q + 2 * (pp - 1 - rank) + 1),
            "InterleavedZeroBubble": min(v * m, (v - 1) * q + (pp - 1 - rank) + 1),
            "ZBVZeroBubble": min(2 * m, 2 * pp),
            "DualPipeV": min(2 * m, 2 * pp + 1)}[name]


def bubble_time(name: str, pp: int, f: float, b: float, w: float, fb: float | None = None) -> float:
    """Idle time per step of a rank given one chunk's forward f, full backward b, its weight part w and, for
    DualPipeV, an overlapped forward+backward pair fb (default f + b: no overlap)."""
    if name in ("GPipe", "1F1B", "Interleaved1F1B"):
        return (pp - 1) * (f + b)
    if name in ("InterleavedZeroBubble", "ZBVZeroBubble"):
        return (pp - 1) * (f + b - 2 * w)
    if name == "DualPipeV":
        return (pp - 1) * ((f + b if fb is None else fb) + b - 3 * w)
    raise ValueError(f"schedule {name!r}: expected one of {', '.join(SCHEDULES)}")


def bubble_fraction(name: str, pp: int, v: int, m: int) -> float:
    """Idle share of a step at the papers' F = B/2 = W with no communication: (p-1)/(m+p-1) for GPipe and
    1F1B, (p-1)/(vm+p-1) interleaved, (p-1)/(3vm+p-1) for the zero-bubble ones, (p-1)/(3m+p-1) DualPipeV."""
    f = 1 / v  # one chunk's forward; a rank's micro-batch (v chunks, F + B each) takes 3
    idle = bubble_time(name, pp, f, 2 * f, f)
    return idle / (3 * m + idle)


# ------------------------------------------------------------------------ pipeline: what stages hold

@dataclass(frozen=True)
class Piece:
    kind: str  # "embed", "dense", "moe", "mtp", "head", in model order
    dense_params: int  # all but routed experts: FSDP over the stage's dp group
    expert_params: int  # routed experts, all E of them (EP splits them)
    flops: dict[str, float]  # forward matmul FLOPs per token, keyed as forward_flops_per_token
    permute_bytes: float  # permute + unpermute bytes per token over a step (forward and backward)
    act: float  # bytes autograd keeps per token without activation checkpointing
    act_ac: float  # bytes kept per token with per-block recompute (the block input; the head keeps its logits)


def model_pieces(c: dict, seq: int) -> list[Piece]:
    """Embedding, decoder layers, MTP module and head, each with its own share of analytic_params,
    forward_flops_per_token, permute_bytes_per_token and activation_bytes_per_token (they sum to those)."""
    H, V, E, I = c["hidden_size"], c["vocab_size"], c["n_routed_experts"], c["moe_intermediate_size"]  # noqa: E741
    K, nh, mtp = c["num_experts_per_tok"], c["num_attention_heads"], c["num_nextn_predict_layers"]
    a = activation_bytes_per_token(c)
    attn = _attn_params(c) + 2 * H  # + the two norms
    proj = 2 * (_attn_params(c) - H)
    core = 2 * nh * (c["qk_nope_head_dim"] + c["qk_rope_head_dim"] + c["v_head_dim"]) * seq / 2

    def fl(dense_mm: float, expert_mm: float = 0.0, attention: float = core) -> dict[str, float]:
        return {"dense_mm": dense_mm, "attention_core": attention, "expert_mm": expert_mm}

    moe_dense = attn + E * H + 3 * H * I * c["n_shared_experts"]
    moe_fl = (proj + 2 * H * E + 6 * H * I * c["n_shared_experts"], K * 6 * H * I)
    perm = 4 * (K + 1) * H * 2
    dense = Piece("dense", attn + 3 * H * c["intermediate_size"], 0, fl(proj + 6 * H * c["intermediate_size"]),
                  0, a["attn"] + a["dense_mlp"], a["layer_input"])
    moe = Piece("moe", moe_dense, 3 * E * H * I, fl(*moe_fl), perm, a["attn"] + a["moe_mlp"], a["layer_input"])
    mtp_piece = Piece("mtp", moe_dense + 2 * H + 2 * H * H + H, 3 * E * H * I,
                      fl(moe_fl[0] + 4 * H * H, moe_fl[1]), perm, a["attn"] + a["moe_mlp"], a["layer_input"])
    tied = bool(c.get("tie_word_embeddings"))
    head = Piece("head", H + (0 if tied else V * H), 0, fl((1 + mtp) * 2 * H * V, attention=0.0), 0,
                 (1 + mtp) * a["logits"], (1 + mtp) * a["logits"])
    embed = Piece("embed", V * H, 0, fl(0.0, attention=0.0), 0, 0.0, 0.0)
    k = c["first_k_dense_replace"]
    return [embed] + [dense] * k + [moe] * (c["num_hidden_layers"] - k) + [mtp_piece] * mtp + [head]


SPLITS = ("balanced", "even")


def split_layers(n_layers: int, ranks: list[int], extras: list[float], layer_cost: float, how: str) -> list[int]:
    """Decoder layers per stage (contiguous, in order) for stages placed on `ranks`, stage s also carrying
    extras[s] (the embedding on the first, MTP + head on the last, in time). "even": equal counts, the spare
    layers on the middle stages. "balanced": each layer in turn goes to the rank whose load (extras +
    layer_cost per layer) would stay lowest, then to that rank's least loaded stage; the pipeline's pace is its
    slowest rank. A stage may hold no layer (what `--pp-layers` allows); layers are costed alike."""
    stages = len(ranks)
    if how == "even":
        q, r = divmod(n_layers, stages)
        middle_first = sorted(range(stages), key=lambda s: (-min(s, stages - 1 - s), s))
        extra = set(middle_first[:r])
        return [q + (s in extra) for s in range(stages)]
    if how != "balanced":
        raise ValueError(f"--pp-split {how!r}: expected one of {', '.join(SPLITS)}")
    load = {r: sum(e for e, rr in zip(extras, ranks) if rr == r) for r in sorted(set(ranks))}
    stage_load, counts = list(extras), [0] * stages
    for _ in range(n_layers):
        r = min(load, key=lambda x: (load[x], x))
        s = min((s for s in range(stages) if ranks[s] == r), key=lambda x: (stage_load[x], x))
        load[r] += layer_cost
        stage_load[s] += layer_cost
        counts[s] += 1
    return counts


# ------------------------------------------------------------------------------- the model with PP

@dataclass(frozen=True)
class PPLayout:
    gpus: int  # N
    pp: int  # pipeline ranks; each stage's dp group is N/pp consecutive GPUs
    ep: int  # expert-parallel degree inside each stage's dp group
    schedule: str = "1F1B"  # a SCHEDULES name
    stages_per_rank: int = 1  # v
    overlap_fb: bool = False  # DualPipeV: a forward chunk's all-to-all hides under another's backward

    @property
    def dp(self) -> int:
        return self.gpus // self.pp

    @property
    def edp(self) -> int:
        return self.dp // self.ep


def estimate_pp(layout: PPLayout, c: dict, tokens_per_gpu: int, seq: int, global_tokens: int, links: str, *,
                expert_shard: str = "auto", split: str = "balanced") -> dict[str, Any]:
    """Per-GPU memory (the fullest rank) and step time of a PP x dp layout, with per-block activation
    checkpointing only when the layout does not fit without it. The micro-batch is tokens_per_gpu tokens per
    dp rank; the step runs global_tokens / (dp * tokens_per_gpu) of them through the pipeline."""
    N, P, EP, v, name = layout.gpus, layout.pp, layout.ep, layout.stages_per_rank, layout.schedule
    E = c["n_routed_experts"]
    if P < 2:
        raise ValueError(f"pp={P}: a pipeline needs pp >= 2 (estimate() models pp = 1)")
    if N % P:
        raise ValueError(f"pp={P} does not divide the {N} GPUs")
    if layout.dp % EP or E % EP:
        raise ValueError(f"ep={EP} must divide the stage's dp group ({layout.dp} GPUs) and the {E} experts")
    if layout.overlap_fb and name != "DualPipeV":
        raise ValueError(f"overlapped forward/backward chunks are DualPipeV's; schedule is {name}")
    m = math.ceil(global_tokens / (layout.dp * tokens_per_gpu))
    error = schedule_error(name, P, v, m)
    if error:
        raise ValueError(error)
    L, edp = E // EP, layout.edp
    dim = _shard_dim(expert_shard, L, edp)
    held, gathered = expert_shard_fractions(c, L, edp, dim)
    pieces = model_pieces(c, seq)
    run = (layout, c, pieces, tokens_per_gpu, m, global_tokens, links, split, dim, held, gathered)
    no_ac = _pp_row(*run, ac=False)
    return no_ac if no_ac["fits"] else _pp_row(*run, ac=True)


def _pp_row(lay: PPLayout, c: dict, pieces: list[Piece], T: int, m: int, global_tokens: int, links: str,
            split: str, dim: int, held: float, gathered: float, *, ac: bool) -> dict[str, Any]:
    F = {k: f.value for k, f in FIGURES.items()}
    P, v, EP, dp, edp, name = lay.pp, lay.stages_per_rank, lay.ep, lay.dp, lay.edp, lay.schedule
    passes, ex = (4 if ac else 3), _exchanges(ac)
    t_exchange = _a2a_layer(c, T, EP, links)[2]

    def compute(pc: Piece) -> float:
        return _compute_time(pc.flops, pc.permute_bytes, T, passes)

    def a2a(pc: Piece) -> float:
        return ex * t_exchange if pc.expert_params else 0.0

    embed = pieces[0]
    decoder = [pc for pc in pieces if pc.kind in ("dense", "moe")]
    tail = [pc for pc in pieces if pc.kind in ("mtp", "head")]  # on the last stage
    assert embed.kind == "embed" and len(decoder) + len(tail) + 1 == len(pieces)
    S = P * v
    ranks = stage_ranks(name, P, v)
    extras = [0.0] * S
    extras[0] += compute(embed)
    extras[-1] += sum(compute(pc) + a2a(pc) for pc in tail)
    mean = sum(compute(pc) + a2a(pc) for pc in decoder) / len(decoder)
    counts = split_layers(len(decoder), ranks, extras, mean, split)
    stages, i = [], 0
    for s, k in enumerate(counts):
        stages.append(([embed] if s == 0 else []) + decoder[i:i + k] + (tail if s == S - 1 else []))
        i += k
    nv, ib = _links(links)
    fsdp_bw = nv if dp <= GPUS_PER_NODE else ib  # the stage's dp group: dp consecutive GPUs
    p2p_bw = nv if lay.gpus <= GPUS_PER_NODE else ib  # some stage boundary crosses nodes otherwise
    # A hop carries the hidden state and the token embeddings the MTP module reads on the last stage (an
    # assumption: the trainer could keep a second embedding copy there instead), bf16; gradients come back.
    hop_bytes = 2 * T * c["hidden_size"] * 2

    per_rank = []
    for r in range(P):
        mine = [s for s in range(S) if ranks[s] == r]
        held_pieces = [pc for s in mine for pc in stages[s]]
        C = sum(compute(pc) for pc in held_pieces)
        A = sum(a2a(pc) for pc in held_pieces)
        hops = sum((s > 0 and ranks[s - 1] != r) + (s < S - 1 and ranks[s + 1] != r) for s in mine)
        Pt = hops * 2 * hop_bytes / p2p_bw  # counted as exposed: an upper bound (torch's sends are async)
        t_mb = max(C, A + Pt) if lay.overlap_fb else C + A + Pt
        dense = sum(pc.dense_params for pc in held_pieces)
        expert = sum(pc.expert_params for pc in held_pieces) / EP  # this EP rank's experts
        sharded = dense / dp + expert * held
        # Unsharded from the first micro-batch to the last: bf16 params (the expert all-gather buffer padded
        # under dim 0) + fp32 accumulated grads.
        resident = dense * (2 + 4) + expert * (2 * gathered + 4)
        chunks = in_flight_chunks(name, P, v, m, r)
        body = [pc for pc in held_pieces if pc.kind != "head"]
        if ac:
            act = T * (chunks / v * sum(pc.act_ac for pc in body) + max((pc.act for pc in body), default=0.0))
        else:
            act = T * chunks / v * sum(pc.act for pc in body)
        # The last stage runs each micro-batch's backward right after its forward, except under GPipe.
        act += sum(T * pc.act * (m if name == "GPipe" else 1) for pc in held_pieces if pc.kind == "head")
        fsdp = (dense * (dp - 1) / dp + expert * held * (edp - 1)) * (2 + 4) / fsdp_bw
        per_rank.append({"C": C, "A": A, "P": Pt, "t_mb": t_mb, "sharded": sharded, "resident": resident,
                         "act": act, "chunks": chunks, "fsdp": fsdp, "opt": 16 * sharded * 2 / F["copy_bw"],
                         "total": 16 * sharded + resident + act})

    slow = max(per_rank, key=lambda x: x["t_mb"])
    f = (slow["C"] / passes + slow["A"] * 2 / ex + slow["P"] / 2) / v
    b = (slow["C"] * (passes - 1) / passes + slow["A"] * (ex - 2) / ex + slow["P"] / 2) / v
    w = slow["C"] / passes / v
    fb = max(slow["C"], slow["A"] + slow["P"]) / v if lay.overlap_fb else None
    bubble = bubble_time(name, P, f, b, w, fb)
    pipe = m * slow["t_mb"] + bubble
    exposed = max(max(0.0, x["fsdp"] - x["t_mb"]) for x in per_rank)  # hidden under one micro-batch
    step = pipe + exposed + max(x["opt"] for x in per_rank)
    full = max(per_rank, key=lambda x: x["total"])
    flops_tok = sum(sum(pc.flops.values()) for pc in pieces)
    return {"gpus": lay.gpus, "pp": P, "dp": dp, "ep": EP, "edp": edp, "experts_per_gpu": c["n_routed_experts"] // EP,
            "schedule": name + ("+overlap" if lay.overlap_fb else ""), "v": v, "micro_batches": m,
            "tokens_per_gpu": T, "stage_layers": counts, "split": split, "expert_shard": f"dim{dim}", "ac": ac,
            "in_flight": round(max(x["chunks"] for x in per_rank) / v, 2),
            "sharded_gb": round(16 * full["sharded"] / GB, 2),
            "resident_gb": round(full["resident"] / GB, 2), "act_gb": round(full["act"] / GB, 2),
            "total_gb": round(full["total"] / GB, 2), "fits": full["total"] <= GPU_MEMORY_GB * GB,
            "bubble": round(bubble / pipe, 3), "compute_ms_mb": round(slow["C"] * 1e3, 1),
            "a2a_ms_mb": round(slow["A"] * 1e3, 1), "p2p_ms_mb": round(slow["P"] * 1e3, 1),
            "fsdp_s_step": round(max(x["fsdp"] for x in per_rank), 2), "step_s": round(step, 1),
            "tokens_per_s_per_gpu": round(global_tokens / step / lay.gpus),
            "mfu": round(3 * flops_tok * global_tokens / step / lay.gpus / F["dense_bf16"], 3), "links": links}


# ----------------------------------------------------------------------------------------- the search

# What the search tries per pipeline degree: torchtitan's default is 2 stages per rank for the multi-stage
# schedules (torchtitan/distributed/pipeline_parallel.py); 4 is tried as well for the interleaved ones.
SEARCH_SCHEDULES = (("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2), ("Interleaved1F1B", 4),
                    ("InterleavedZeroBubble", 2), ("InterleavedZeroBubble", 4), ("ZBVZeroBubble", 2),
                    ("DualPipeV", 2))


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A pp = 1 estimate() row in estimate_pp()'s keys (activation checkpointing when it is needed)."""
    if "pp" in row:
        return row
    ac = not row["fits_no_ac"]
    return {"gpus": row["gpus"], "pp": 1, "dp": row["gpus"], "ep": row["ep"], "edp": row["edp"],
            "experts_per_gpu": row["experts_per_gpu"], "schedule": "-", "v": 1, "micro_batches": row["micro_batches"],
            "tokens_per_gpu": row["tokens_per_gpu"], "expert_shard": row["expert_shard"], "ac": ac, "in_flight": 1,
            "sharded_gb": round(row["params_gb"] + row["grads_gb"] + row["optim_gb"], 2),
            "resident_gb": row["fsdp_buffers_gb"], "act_gb": row["act_ac_gb" if ac else "act_no_ac_gb"],
            "total_gb": row["total_ac_gb" if ac else "total_no_ac_gb"], "fits": row["fits_ac"], "bubble": 0.0,
            "compute_ms_mb": row["compute_ms_mb"], "a2a_ms_mb": row["a2a_ms_mb"], "p2p_ms_mb": 0.0,
            "fsdp_s_step": round(row["fsdp_ms_mb"] * row["micro_batches"] / 1e3, 2), "step_s": row["step_s"],
            "tokens_per_s_per_gpu": row["tokens_per_s_per_gpu"], "mfu": row["mfu"], "links": row["links"]}


def search(gpus: int, c: dict, params: dict[str, int], tokens_per_gpu: int, seq: int, global_tokens: int,
           links: str, *, pps=(1, 2, 4, 8, 16, 32), eps=(8, 16, 32, 64, 128, 256),
           split: str = "balanced") -> list[dict[str, Any]]:
    """Every (pp, ep, schedule, v) torch accepts on `gpus` GPUs (pp = 1: estimate()), the ones that fit in
    GPU_MEMORY_GB first, then by tokens/s/GPU, best first."""
    rows = []
    for pp in pps:
        if gpus % pp:
            continue
        dp = gpus // pp
        for ep in eps:
            if dp % ep or c["n_routed_experts"] % ep:
                continue
            if pp == 1:
                rows.append(flat_row(estimate(Layout(gpus, ep), c, params, tokens_per_gpu, seq, global_tokens,
                                              links)))
                continue
            m = math.ceil(global_tokens / (dp * tokens_per_gpu))
            for name, v in SEARCH_SCHEDULES:
                if schedule_error(name, pp, v, m) is None:
                    rows.append(estimate_pp(PPLayout(gpus, pp, ep, name, v), c, tokens_per_gpu, seq,
                                            global_tokens, links, split=split))
    return sorted(rows, key=lambda r: (not r["fits"], -r["tokens_per_s_per_gpu"]))


# Layouts others ran, as this model's layout language expresses them.
NAMED_PP = (
    ("DeepSeek-V3 recipe: 2048 GPUs, PP16 DualPipe, EP64 (their ZeRO-1 DP modelled as FSDP per stage; "
     "DeepSeek-V3 report arXiv:2412.19437 sec. 3.2)", PPLayout(2048, 16, 64, "DualPipeV", 2, overlap_fb=True)),
    ("same, torch's DualPipeV runtime without an overlapped F&B function",
     PPLayout(2048, 16, 64, "DualPipeV", 2)),
    ("torchtitan: 512 GPUs, PP8 x EP32 x FSDP64 (issue 14), Interleaved1F1B with 2 stages per rank "
     "(torchtitan's 671B config and default)", PPLayout(512, 8, 32, "Interleaved1F1B", 2)),
)

REFERENCES = {
    "deepseek_v3_throughput": Figure(1e12 / (180e3 * 3600), "tokens/s/GPU",
                                     "DeepSeek-V3 report arXiv:2412.19437: 180K H800 GPU hours per trillion "
                                     "tokens (FP8 GEMMs, DualPipe, 2048 H800s); a comparison, not an input"),
}


# ------------------------------------------------------------------------------------------ the output

COLUMNS = [("gpus", "N"), ("ep", "EP"), ("edp", "eDP"), ("experts_per_gpu", "E/gpu"), ("expert_shard", "shard"),
           ("params_gb", "params"), ("grads_gb", "grads"), ("optim_gb", "adam"), ("fsdp_buffers_gb", "fsdp buf"),
           ("act_ac_gb", "act AC"), ("act_no_ac_gb", "act noAC"), ("total_ac_gb", "total AC"), ("fits_ac", "fits"),
           ("a2a_ms_per_layer", "a2a ms/layer"), ("compute_ms_mb", "compute ms"), ("fsdp_ms_mb", "fsdp ms"),
           ("a2a_ms_mb", "a2a ms"), ("step_s", "step s"), ("tokens_per_s_per_gpu", "tok/s/gpu"), ("mfu", "MFU")]

PLACEMENT_COLUMNS = [("gpus", "N"), ("ep", "EP"), ("edp", "eDP"), ("experts_per_gpu", "E/gpu"),
                     ("expert_shard", "shard"), ("expert_state_gb", "expert GB"), ("total_ac_gb", "total AC"),
                     ("fsdp_ms_mb", "fsdp ms"), ("step_s", "step s"), ("tokens_per_s_per_gpu", "tok/s/gpu")]

PP_COLUMNS = [("gpus", "N"), ("pp", "PP"), ("dp", "dp"), ("ep", "EP"), ("edp", "eDP"), ("schedule", "schedule"),
              ("v", "v"), ("micro_batches", "m"), ("expert_shard", "shard"), ("ac", "AC"), ("in_flight", "in flight"),
              ("sharded_gb", "sharded"), ("resident_gb", "resident"), ("act_gb", "act"), ("total_gb", "total"),
              ("fits", "fits"), ("bubble", "bubble"), ("compute_ms_mb", "compute ms"), ("a2a_ms_mb", "a2a ms"),
              ("p2p_ms_mb", "p2p ms"), ("fsdp_s_step", "fsdp s"), ("step_s", "step s"),
              ("tokens_per_s_per_gpu", "tok/s/gpu"), ("mfu", "MFU")]


def table(rows: list[dict[str, Any]], columns=COLUMNS) -> str:
    head = [h for _, h in columns]
    body = [[str(r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens-per-gpu", type=int, default=4096, help="tokens per GPU per micro-batch")
    ap.add_argument("--seq", type=int, default=4096, help="sequence length (DeepSeek-V3 pre-training: 4096)")
    ap.add_argument("--global-batch-seqs", type=int, default=15360,
                    help="sequences per optimizer step (DeepSeek-V3 report: 15360 after the ramp)")
    ap.add_argument("--links", choices=("deepep", "datasheet"), default="deepep",
                    help="all-to-all bandwidths: DeepEP's achieved figures or the link datasheets")
    ap.add_argument("--expert-shard", choices=EXPERT_SHARD, default="auto",
                    help="FSDP dim of the expert weights: auto = dim 1 exactly when eDP does not divide E/EP")
    ap.add_argument("--gpus", type=int, default=None, help="with --pp: model this one layout")
    ap.add_argument("--pp", type=int, default=None, help="pipeline degree of the one layout (>= 2)")
    ap.add_argument("--ep", type=int, default=None, help="expert-parallel degree of the one layout")
    ap.add_argument("--schedule", choices=tuple(SCHEDULES), default="1F1B", help="pipeline schedule")
    ap.add_argument("--pp-stages-per-rank", type=int, default=None,
                    help="v (default 2 for the interleaved and V schedules, else 1)")
    ap.add_argument("--dualpipe-overlap", action="store_true",
                    help="DualPipeV with forward and backward chunks overlapped (DeepSeek's DualPipe)")
    ap.add_argument("--pp-split", choices=SPLITS, default="balanced",
                    help="decoder layers per stage: balanced by time, or even counts")
    ap.add_argument("--search-gpus", default="256,512", help="GPU counts to search (pp, ep, schedule) on")
    ap.add_argument("--json", default=None, help="also write the rows and sources as JSON")
    args = ap.parse_args(argv)
    if args.tokens_per_gpu <= 0 or args.seq <= 0 or args.global_batch_seqs <= 0:
        raise ValueError(f"sizes must be positive: tokens {args.tokens_per_gpu}, seq {args.seq}, "
                         f"batch {args.global_batch_seqs}")
    one = (args.gpus, args.pp, args.ep)
    if any(x is not None for x in one) and None in one:
        raise ValueError(f"--gpus, --pp and --ep go together: got gpus {args.gpus}, pp {args.pp}, ep {args.ep}")
    try:
        search_gpus = [int(x) for x in args.search_gpus.split(",") if x]
    except ValueError:
        raise ValueError(f"--search-gpus {args.search_gpus!r}: expected comma-separated GPU counts") from None
    c = config_671b()
    counted = analytic_params(c)
    meta = meta_params(c)
    params = meta or counted
    global_tokens = args.global_batch_seqs * args.seq
    run = (args.tokens_per_gpu, args.seq, global_tokens, args.links)
    rows = [estimate(lay, c, params, *run, expert_shard=args.expert_shard) for lay in layouts()]
    src = "meta-device model (tritonmoe.dsv3)" if meta else "closed form (tritonmoe.dsv3 not importable)"
    lines = [f"DeepSeek-V3 671b preset: {sum(params.values()) / 1e9:.2f}B parameters "
             f"({params['expert'] / 1e9:.2f}B routed-expert, {params['dense'] / 1e9:.2f}B other; from {src}; "
             f"closed form gives {sum(counted.values()) / 1e9:.2f}B)",
             f"micro-batch {args.tokens_per_gpu} tokens/GPU, seq {args.seq}, global batch {args.global_batch_seqs} "
             f"seqs; memory in GB per GPU (fp32 master + fp32 grads + fp32 Adam, all FSDP-sharded); "
             f"times per micro-batch; links: {args.links}",
             "", "Without pipeline parallelism:", table(rows)]

    # Expert placement: each layout where edp does not divide E/EP, with dim 0 (padded) beside dim 1.
    placement = []
    for lay in layouts():
        if (c["n_routed_experts"] // lay.ep) % lay.edp:
            placement += [estimate(lay, c, params, *run, expert_shard=s) for s in ("dim0", "dim1")]
    if placement:
        lines += ["", "Expert placement where eDP does not divide E/EP (dim 0 pads each rank to a whole expert; "
                  "the trainer shards dim 1 there):", table(placement, PLACEMENT_COLUMNS)]

    pp_named = []
    if args.pp is not None:
        v = args.pp_stages_per_rank or (2 if SCHEDULES[args.schedule].stages_per_rank != (1,) else 1)
        pp_named.append(("--pp layout", estimate_pp(PPLayout(args.gpus, args.pp, args.ep, args.schedule, v,
                                                              args.dualpipe_overlap), c, *run,
                                                     expert_shard=args.expert_shard, split=args.pp_split)))
    pp_named += [(what, estimate_pp(lay, c, *run, expert_shard=args.expert_shard, split=args.pp_split))
                 for what, lay in NAMED_PP]
    lines += ["", f"With pipeline parallelism (memory of the fullest rank; layers split {args.pp_split}; in flight = "
              "the most micro-batches' activations a rank holds, in stages; sharded = 16 B/param of FSDP state, "
              "resident = unsharded bf16 params + fp32 grads held for the step; times per micro-batch on the "
              "slowest rank):", table([r for _, r in pp_named], PP_COLUMNS)]
    lines += [f"  {i + 1}. {what}; layers per stage {r['stage_layers']}" for i, (what, r) in enumerate(pp_named)]

    searched = {}
    for n in search_gpus:
        found = search(n, c, params, *run, split=args.pp_split)
        searched[n] = found
        fitting = [r for r in found if r["fits"]]
        lines += ["", f"Search on {n} GPUs over (pp, ep, schedule, v): {len(found)} layouts, {len(fitting)} fit; "
                  "best five that fit, then the best that does not:",
                  table(fitting[:5] + [r for r in found if not r["fits"]][:1], PP_COLUMNS)]

    lines += ["", "Input figures and sources:"]
    lines += [f"  {k}: {f.value:.4g} {f.unit} -- {f.source}" for k, f in FIGURES.items()]
    lines += [f"  GPU memory: {GPU_MEMORY_GB:.0f} GB (H100 SXM5 80GB datasheet); {GPUS_PER_NODE} GPUs per node "
              "(HGX H100)", "  activations: estimated per token from the layer data flow "
              "(bench/scale.py activation_bytes_per_token), not measured",
              "  pipeline schedules (bubble in chunk times F, B = full backward, W = its weight part; in-flight "
              "forward chunks on rank r; simplification: a rank's compute splits as F = W = B/2 without "
              "recompute, F = W = B/3 with it, the all-to-all 2 exchanges forward, the rest backward):"]
    lines += [f"    {k}: bubble {s.bubble}; in flight {s.in_flight} -- {s.source}" for k, s in SCHEDULES.items()]
    lines += [f"  reference {k}: {f.value:.4g} {f.unit} -- {f.source}" for k, f in REFERENCES.items()]
    print("\n".join(lines))
    doc = {"params": params, "params_closed_form": counted, "rows": rows, "expert_placement": placement,
           "pp_rows": [dict(r, layout=what) for what, r in pp_named],
           "search": {str(n): found for n, found in searched.items()},
           "figures": {k: asdict(f) for k, f in FIGURES.items()},
           "schedules": {k: asdict(s) for k, s in SCHEDULES.items()},
           "references": {k: asdict(f) for k, f in REFERENCES.items()}, "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return doc
