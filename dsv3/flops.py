"""Model FLOPs per trained token, and the device peak, for MFU (model FLOPs utilization).

Per token, forward: 2 FLOPs per multiply-add of every matmul weight the token passes through, plus attention's
QK^T and PV, which over a causal sequence of S tokens see (S + 1) / 2 positions on average:
    attention = 2 * n_heads * (qk_head_dim + v_head_dim) * (S + 1) / 2   per decoder layer (MTP blocks included)
Matmul weights a token uses, per decoder layer: MLA's projections (q_proj or q_a + q_b, kv_a, kv_b, o_proj) and
either the dense SwiGLU MLP (3 * H * intermediate) or the MoE: the router (H * E), the shared experts and its top-K
routed experts (3 * H * moe_intermediate each); then the output head (H * V), and per MTP depth eh_proj (2H * H),
one decoder layer and the head again. Training counts forward + backward = 3x forward (the backward's two GEMMs
per forward GEMM); activation checkpointing's recomputation is not counted (MFU, not hardware utilization).
Embedding lookups, norms and the softmax are left out (they are not matmuls).
"""

from __future__ import annotations

import torch

from .config import DeepseekV3Config


def _layer_matmul_params(cfg: DeepseekV3Config, layer_idx: int) -> int:
    H, nH = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_head_dim
    q = H * nH * qk if cfg.q_lora_rank is None else H * cfg.q_lora_rank + cfg.q_lora_rank * nH * qk
    attn = (q + H * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            + cfg.kv_lora_rank * nH * (cfg.qk_nope_head_dim + cfg.v_head_dim) + nH * cfg.v_head_dim * H)
    if cfg.is_moe_layer(layer_idx):
        experts = (cfg.n_shared_experts + cfg.num_experts_per_tok) * 3 * H * cfg.moe_intermediate_size
        mlp = H * cfg.n_routed_experts + experts
    else:
        mlp = 3 * H * cfg.intermediate_size
    return attn + mlp


def flops_per_token(cfg: DeepseekV3Config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) at sequence length `seq_len`; see the module docstring."""
    H, V, L, D = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    attention = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len + 1)
    matmul = sum(_layer_matmul_params(cfg, i) for i in range(L)) + H * V
    matmul += sum(2 * H * H + _layer_matmul_params(cfg, L + k) + H * V for k in range(D))
    return 3.0 * (2.0 * matmul + (L + D) * attention)


def peak_flops(device: torch.device, peak_tflops: float | None, table: dict[str, float]) -> float | None:
    """The device's peak FLOP/s: --peak-tflops, else the entry of `table` whose name the CUDA device's name
    contains (the longest match), else None (CPUs and unknown GPUs report no MFU)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [k for k in table if k in name]
    return table[max(matches, key=len)] * 1e12 if matches else None
