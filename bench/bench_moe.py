"""MoE layer benchmark: forward + backward of one DeepSeek-V3 MoE layer on one device, four implementations
holding identical weights.

Shape letters: T tokens, H hidden, I expert intermediate, E experts, K top-k, R = T*K routed rows.
CUDA: H=7168, I=2048, K=8, one shared expert, group-limited routing (8 groups, 4 kept) as in DeepSeek-V3,
with E reduced from 256 to 64 so weights, gradients and four copies of the layer fit one GPU; T = 4096 and
16384 tokens (512 and 2048 rows per expert on average). CPU: the same structure at H=224, I=64, E=32.

Providers (every one is checked against transformers' eager layer on the first input before timing; a
provider whose output or input gradient disagrees is reported with the error and not timed):
  ours        tritonmoe.dsv3.MoE (router -> permute -> grouped_gemm x2 -> unpermute, + shared expert)
  hf_eager    transformers' DeepseekV3MoE, experts_implementation "eager" (a Python loop over experts)
  hf_grouped  transformers' DeepseekV3MoE, experts_implementation "grouped_mm"
  titan       torchtitan's recipe: torch index permutes around torch._grouped_mm (no padding of groups)
The timed step is y = layer(x); autograd.grad(y, [x, *params], dy) — everything a training step asks of
the layer. Rate: tokens/s = T / median time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import common

NAME = "moe"
PROVIDERS = ("ours", "hf_grouped", "titan", "hf_eager")
PEERS = ("hf_grouped", "titan", "hf_eager")
CASE_KEYS = ("T", "H", "I", "E", "K")
# Max error relative to the reference's largest value. fp32 paths agree to rounding; bf16 ones differ in
# where they round (grouped GEMM tiles, fp32 vs bf16 combine), ~1e-2 at these sizes.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class LayerShape:
    H: int  # hidden size
    I: int  # noqa: E741  expert intermediate size (the shared expert has the same)
    E: int  # routed experts
    K: int  # experts per token
    n_group: int  # expert groups for group-limited routing
    topk_group: int  # groups kept per token


def shape_for(device: torch.device) -> LayerShape:
    if device.type == "cuda":
        return LayerShape(H=7168, I=2048, E=64, K=8, n_group=8, topk_group=4)
    return LayerShape(H=224, I=64, E=32, K=8, n_group=8, topk_group=4)


def tokens_for(device: torch.device, quick: bool) -> tuple[int, ...]:
    if device.type == "cuda":
        return (4096,) if quick else (4096, 16384)
    return (128,) if quick else (512, 2048)


def hf_layer(s: LayerShape, implementation: str) -> nn.Module:
    """transformers' DeepseekV3MoE with one shared expert and the given experts implementation."""
    from transformers import DeepseekV3Config as HFConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = HFConfig(hidden_size=s.H, moe_intermediate_size=s.I, n_routed_experts=s.E, num_experts_per_tok=s.K,
                   n_group=s.n_group, topk_group=s.topk_group, n_shared_experts=1, routed_scaling_factor=2.5,
                   norm_topk_prob=True)
    cfg._experts_implementation = implementation  # what from_pretrained(experts_implementation=...) sets
    return DeepseekV3MoE(cfg)


class TorchGroupedMMMoE(nn.Module):
    """torchtitan's recipe for the routed experts, on transformers' router and shared expert: sort routed
    rows by expert with torch index ops, two torch._grouped_mm calls around SwiGLU, weighted index_add_
    back. Weights are copies of `src`'s, in the same layout (gate_up_proj [E,2I,H], down_proj [E,H,I])."""

    def __init__(self, src: nn.Module):
        super().__init__()
        self.gate = copy.deepcopy(src.gate)
        self.shared_experts = copy.deepcopy(src.shared_experts)
        self.gate_up_proj = nn.Parameter(src.experts.gate_up_proj.detach().clone())
        self.down_proj = nn.Parameter(src.experts.down_proj.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E, H = self.gate_up_proj.shape[0], x.shape[-1]
        x_TH = x.reshape(-1, H)
        _, topk_w_TK, topk_idx_TK = self.gate(x_TH)
        T, K = topk_idx_TK.shape
        flat_R = topk_idx_TK.reshape(-1)
        order_R = torch.argsort(flat_R, stable=True)
        tok_R = order_R // K
        offs_E = torch.cumsum(torch.bincount(flat_R, minlength=E), 0).to(torch.int32)
        x_RH = x_TH.index_select(0, tok_R)
        gate_RI, up_RI = torch._grouped_mm(x_RH, self.gate_up_proj.transpose(-2, -1), offs=offs_E).chunk(2, -1)
        y_RH = torch._grouped_mm(F.silu(gate_RI) * up_RI, self.down_proj.transpose(-2, -1), offs=offs_E)
        w_R = topk_w_TK.reshape(-1)[order_R].to(y_RH.dtype)
        y_TH = y_RH.new_zeros(T, H).index_add(0, tok_R, y_RH * w_R[:, None])
        return (y_TH + self.shared_experts(x_TH)).view(x.shape)


def build_layers(s: LayerShape, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The four layers with identical weights (random, std 0.02 like the model's init; router bias random
    and exactly representable in bf16 so a bf16 copy routes the same as the fp32 one). Built on `device`
    one at a time and cast at once, so only one fp32 copy (11 GB at the CUDA shape) exists at a time."""
    with torch.device(device):
        ref = hf_layer(s, "eager")
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_(0.0, 0.02)
            ref.gate.e_score_correction_bias.copy_((torch.randn(s.E) * 1e-2).bfloat16().float())
        ref.to(dtype)
        layers: dict[str, nn.Module] = {"hf_eager": ref}
        layers["hf_grouped"] = hf_layer(s, "grouped_mm").to(dtype)
        layers["hf_grouped"].load_state_dict(ref.state_dict())
        layers["titan"] = TorchGroupedMMMoE(ref)
        from tritonmoe.dsv3 import DeepseekV3Config, MoE

        cfg = DeepseekV3Config(hidden_size=s.H, moe_intermediate_size=s.I, n_routed_experts=s.E,
                               num_experts_per_tok=s.K, n_group=s.n_group, topk_group=s.topk_group,
                               n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True)
        ours = MoE(cfg).to(dtype)  # the router keeps its bias in fp32 whatever the dtype
        ours.load_state_dict(ref.state_dict())  # the same parameter names as transformers
        layers = {"ours": ours, **layers}
    for m in layers.values():
        m.train()
    return layers


def step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One forward + backward, returning (y, dx, *dparams) without accumulating into .grad."""
    params = [p for p in layer.parameters() if p.requires_grad]
    y = layer(x)
    return (y, *torch.autograd.grad(y, [x, *params], dy))


def run_case(T: int, s: LayerShape, device: torch.device, quick: bool) -> list[dict[str, Any]]:
    dtype = common.bench_dtype(device)
    layers = build_layers(s, device, dtype)
    n_sets = common.rotation_count(2 * T * s.H * torch.finfo(dtype).bits // 8, device)
    sets = [(torch.randn(T, s.H, device=device, dtype=dtype).requires_grad_(True),
             torch.randn(T, s.H, device=device, dtype=dtype)) for _ in range(n_sets)]
    case = {"T": T, "H": s.H, "I": s.I, "E": s.E, "K": s.K, "dtype": str(dtype).replace("torch.", "")}
    backends = {"ours": ("tritonmoe.dsv3.MoE on " + common.ours_op("grouped_gemm", device)[1]),
                "hf_eager": "transformers DeepseekV3MoE eager", "hf_grouped": "transformers DeepseekV3MoE grouped_mm",
                "titan": f"torch._grouped_mm + index ops, torch {torch.__version__}"}
    ref_y, ref_dx, *_ = step(layers["hf_eager"], *sets[0])
    tol = TOLERANCE[dtype]
    rows = []
    for name in PROVIDERS:
        extra: dict[str, Any] = {}
        t = rate = None
        layer = layers[name]
        try:
            if name == "hf_eager":  # the reference itself
                err_y = err_dx = 0.0
            else:
                y, dx, *_ = step(layer, *sets[0])
                err_y, err_dx = common.max_rel_err(y, ref_y), common.max_rel_err(dx, ref_dx)
            extra.update(max_rel_err_y=common.sig(err_y), max_rel_err_dx=common.sig(err_dx))
            if max(err_y, err_dx) > tol:
                extra["error"] = f"disagrees with hf_eager (y {err_y:.2e}, dx {err_dx:.2e} > {tol:.0e}); not timed"
            else:
                t = common.time_fn(lambda x, dy, layer=layer: step(layer, x, dy), sets, device, quick=quick)
                rate = T / (t.median_ms * 1e-3)
        except (RuntimeError, NotImplementedError) as e:
            if name == "ours":
                raise
            extra["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(common.row(NAME, case, name, backends[name], t, rate, "tokens/s", **extra))
    common.add_ratios(rows, CASE_KEYS, "ours", PEERS, None)
    # Per-peer speedups, for the targets stated against specific peers (1.3x titan, 5x hf_eager).
    by = {r["provider"]: r for r in rows}
    if by["ours"]["rate"]:
        for peer in PEERS:
            if by[peer]["rate"]:
                by["ours"][f"vs_{peer}"] = round(by["ours"]["rate"] / by[peer]["rate"], 3)
    return rows


def run(device: torch.device, quick: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    s = shape_for(device)
    rows: list[dict[str, Any]] = []
    for T in tokens_for(device, quick):
        torch.manual_seed(T)
        rows += run_case(T, s, device, quick)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, []


def table(rows: list[dict[str, Any]]) -> str:
    return common.format_table(rows, CASE_KEYS, PROVIDERS,
                               "MoE layer forward+backward (tokens/s; vs_best_peer = ours / best of hf_grouped, "
                               "titan, hf_eager)", ratio_keys=("vs_best_peer", *(f"vs_{p}" for p in PEERS)))
