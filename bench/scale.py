"""DeepSeek-V3 671B at full scale, on paper: per-GPU memory and step time for EP x FSDP layouts on 64-512 H100s.

python -m bench.scale [--tokens-per-gpu 4096] [--seq 4096] [--global-batch-seqs 15360] [--json FILE]

In: the `671b` preset (parameters counted on a model built on the meta device, cross-checked against a
closed-form count from the config), per-token FLOPs and activation sizes derived from the config, kernel
rates and link bandwidths from the sources printed with them. Out: a table per layout and a list of every
input figure with its source. Nothing here is measured by this package on a GPU; the figures it prints are
estimates whose inputs are all on the screen, so a measured rate can replace an assumed one.

Layout model (what parallel/ builds): dense parameters FSDP-sharded over all N GPUs; routed experts split
over an `ep` mesh dimension (E/EP per rank) and FSDP-sharded over `edp` = N/EP; no pipeline or tensor
parallelism. Per micro-batch of T tokens per GPU: FSDP all-gathers each block's bf16 parameters twice
(forward, and again in backward after resharding) and reduce-scatters fp32 gradients once, overlapped with
compute; the EP all-to-all (dispatch + combine forward, their gradients backward) is not overlapped.
Micro-batch time = max(compute, FSDP traffic) + all-to-all time.
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
    "dense_bf16": Figure(800e12, "FLOP/s", "DESIGN.md: H100 SXM dense bf16 matmul ~800 TFLOP/s measured "
                         "(989 datasheet); figure from DESIGN.md, not measured in this session"),
    "copy_bw": Figure(3.0e12, "B/s", "DESIGN.md: H100 SXM device copy ~3.0 TB/s measured (3.35 datasheet); "
                      "figure from DESIGN.md, not measured in this session"),
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
    MTP modules share the embedding and head with the main model (DESIGN.md), so they add no copies."""
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


# --------------------------------------------------------------------------------------------- the model

@dataclass(frozen=True)
class Layout:
    gpus: int  # N
    ep: int  # expert-parallel degree (routed experts split E/EP per rank)

    @property
    def edp(self) -> int:  # FSDP degree of the expert weights
        return self.gpus // self.ep


def estimate(layout: Layout, c: dict, params: dict[str, int], tokens_per_gpu: int, seq: int,
             global_tokens: int, links: str) -> dict[str, Any]:
    F = {k: f.value for k, f in FIGURES.items()}
    N, EP, T, H, K = layout.gpus, layout.ep, tokens_per_gpu, c["hidden_size"], c["num_experts_per_tok"]
    E = c["n_routed_experts"]
    n_moe = c["num_hidden_layers"] - c["first_k_dense_replace"] + c["num_nextn_predict_layers"]
    n_layers = c["num_hidden_layers"] + c["num_nextn_predict_layers"]
    P = params["dense"] + params["expert"]

    # Memory per GPU. fp32 sharded master params + fp32 grads + fp32 Adam moments: 16 B/param over N GPUs
    # (every parameter is sharded N ways: dense over N, experts over EP x edp = N).
    mem = {"params_gb": 4 * P / N / GB, "grads_gb": 4 * P / N / GB, "optim_gb": 8 * P / N / GB}
    # In flight: two blocks unsharded (current + prefetched): bf16 params, bf16 grads, fp32 reduce buffer.
    expert_layer_local = params["expert"] / n_moe / EP
    dense_layer = (params["dense"] - 2 * c["vocab_size"] * H) / n_layers
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
    passes = 4 if mem["total_no_ac_gb"] > GPU_MEMORY_GB else 3
    t_compute = T * passes * (fl["dense_mm"] / F["dense_bf16"]
                              + fl["attention_core"] / (F["dense_bf16"] * F["attention_frac"])
                              + fl["expert_mm"] / (F["dense_bf16"] * F["expert_gemm_frac"]))
    t_compute += T * permute_bytes_per_token(c) * (passes / 3) / (F["copy_bw"] * F["permute_frac"])

    # EP all-to-all: every (token, expert) copy whose expert lives elsewhere is sent (no dedup), bf16 rows;
    # four exchanges per MoE layer per micro-batch (dispatch, combine, and their gradients).
    intra_peers = min(EP, GPUS_PER_NODE) - 1
    inter_peers = EP - min(EP, GPUS_PER_NODE)
    row_bytes = T * K * H * 2
    bytes_intra, bytes_inter = row_bytes * intra_peers / EP, row_bytes * inter_peers / EP
    nv, ib = (F["nvlink_deepep"], F["ib_deepep"]) if links == "deepep" else (F["nvlink_link"], F["ib_link"])
    t_a2a_layer = max(bytes_intra / nv, bytes_inter / ib)
    t_a2a = 4 * n_moe * t_a2a_layer * (passes / 3 if passes == 4 else 1)  # AC re-runs the forward exchanges

    # FSDP traffic per micro-batch: all-gather bf16 twice, reduce-scatter fp32 once; the dense mesh spans
    # nodes once N > 8, so the ring runs at the inter-node rate.
    gathered = params["dense"] * (N - 1) / N + params["expert"] / EP * (layout.edp - 1) / layout.edp
    fsdp_bw = nv if N <= GPUS_PER_NODE else ib
    t_fsdp = gathered * (2 + 2 + 4) / fsdp_bw

    t_mb = max(t_compute, t_fsdp) + t_a2a
    micro_batches = math.ceil(global_tokens / (N * T))
    step = micro_batches * t_mb + 16 * P / N * 2 / F["copy_bw"]  # + AdamW: read+write 16 B/param once
    model_flops = 3 * (fl["dense_mm"] + fl["attention_core"] + fl["expert_mm"]) * global_tokens
    return {"gpus": N, "ep": EP, "edp": layout.edp, "experts_per_gpu": E // EP, "tokens_per_gpu": T,
            **{k: round(v, 2) for k, v in mem.items()},
            "fits_ac": mem["total_ac_gb"] <= GPU_MEMORY_GB, "fits_no_ac": mem["total_no_ac_gb"] <= GPU_MEMORY_GB,
            "a2a_gb_per_layer": round(4 * (bytes_intra + bytes_inter) / GB, 3),
            "a2a_ms_per_layer": round(4 * t_a2a_layer * 1e3, 2), "compute_ms_mb": round(t_compute * 1e3, 1),
            "fsdp_ms_mb": round(t_fsdp * 1e3, 1), "a2a_ms_mb": round(t_a2a * 1e3, 1),
            "micro_batches": micro_batches, "step_s": round(step, 1),
            "tokens_per_s_per_gpu": round(global_tokens / step / N), "mfu": round(model_flops / step / N / F["dense_bf16"], 3),
            "links": links}


def layouts(gpus=(64, 128, 256, 512), eps=(8, 32, 64)) -> list[Layout]:
    return [Layout(n, ep) for n in gpus for ep in eps if ep <= n and n % ep == 0]


COLUMNS = [("gpus", "N"), ("ep", "EP"), ("edp", "eDP"), ("experts_per_gpu", "E/gpu"), ("params_gb", "params"),
           ("grads_gb", "grads"), ("optim_gb", "adam"), ("fsdp_buffers_gb", "fsdp buf"), ("act_ac_gb", "act AC"),
           ("act_no_ac_gb", "act noAC"), ("total_ac_gb", "total AC"), ("fits_ac", "fits"),
           ("a2a_ms_per_layer", "a2a ms/layer"), ("compute_ms_mb", "compute ms"), ("fsdp_ms_mb", "fsdp ms"),
           ("a2a_ms_mb", "a2a ms"), ("step_s", "step s"), ("tokens_per_s_per_gpu", "tok/s/gpu"), ("mfu", "MFU")]


def table(rows: list[dict[str, Any]]) -> str:
    head = [h for _, h in COLUMNS]
    body = [[str(r[k]) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens-per-gpu", type=int, default=4096, help="tokens per GPU per micro-batch")
    ap.add_argument("--seq", type=int, default=4096, help="sequence length (DeepSeek-V3 pre-training: 4096)")
    ap.add_argument("--global-batch-seqs", type=int, default=15360,
                    help="sequences per optimizer step (DeepSeek-V3 report: 15360 after the ramp)")
    ap.add_argument("--links", choices=("deepep", "datasheet"), default="deepep",
                    help="all-to-all bandwidths: DeepEP's achieved figures or the link datasheets")
    ap.add_argument("--json", default=None, help="also write the rows and sources as JSON")
    args = ap.parse_args(argv)
    if args.tokens_per_gpu <= 0 or args.seq <= 0 or args.global_batch_seqs <= 0:
        raise ValueError(f"sizes must be positive: tokens {args.tokens_per_gpu}, seq {args.seq}, "
                         f"batch {args.global_batch_seqs}")
    c = config_671b()
    counted = analytic_params(c)
    meta = meta_params(c)
    params = meta or counted
    rows = [estimate(lay, c, params, args.tokens_per_gpu, args.seq, args.global_batch_seqs * args.seq, args.links)
            for lay in layouts()]
    src = "meta-device model (tritonmoe.dsv3)" if meta else "closed form (tritonmoe.dsv3 not importable)"
    lines = [f"DeepSeek-V3 671b preset: {sum(params.values()) / 1e9:.2f}B parameters "
             f"({params['expert'] / 1e9:.2f}B routed-expert, {params['dense'] / 1e9:.2f}B other; from {src}; "
             f"closed form gives {sum(counted.values()) / 1e9:.2f}B)",
             f"micro-batch {args.tokens_per_gpu} tokens/GPU, seq {args.seq}, global batch {args.global_batch_seqs} "
             f"seqs; memory in GB per GPU (fp32 master + fp32 grads + fp32 Adam, all FSDP-sharded); "
             f"times per micro-batch; links: {args.links}",
             "", table(rows), "", "Input figures and sources:"]
    lines += [f"  {k}: {f.value:.4g} {f.unit} -- {f.source}" for k, f in FIGURES.items()]
    lines += [f"  GPU memory: {GPU_MEMORY_GB:.0f} GB (H100 SXM5 80GB datasheet); {GPUS_PER_NODE} GPUs per node "
              "(HGX H100)", "  activations: estimated per token from the layer data flow "
              "(bench/scale.py activation_bytes_per_token), not measured"]
    print("\n".join(lines))
    doc = {"params": params, "params_closed_form": counted, "rows": rows,
           "figures": {k: asdict(f) for k, f in FIGURES.items()}, "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return doc


if __name__ == "__main__":
    main()
