"""The tritonmoe entry of transformers' experts registry: run the experts of any transformers MoE model on our
kernels with ``experts_implementation="tritonmoe"`` (this module is that registry entry, not HF checkpoint I/O,
which lives in dsv3/checkpoint.py, hf_mapping.py and safetensors_io.py).

transformers 5 routes every experts module decorated with ``@use_experts_implementation`` through a registry
(``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``); the model's own router has already picked the
experts, and the registered function is called as a method of the experts module::

    fn(experts_module, hidden_states[T,H], top_k_index[T,K], top_k_weights[T,K]) -> [T,H] in hidden_states.dtype

Weights are read from the module itself (``gate_up_proj`` [E,2I,H] or ``up_proj`` [E,I,H], ``down_proj`` [E,H,I];
[E,in,out] when the class declares ``is_transposed``), together with the flags the decorator sets: ``has_gate``,
``has_bias`` (``*_proj_bias`` [E,out]), ``has_post_expert_norm``, ``is_concatenated`` and
``_is_expert_parallel`` (EP marks tokens routed to another rank with the sentinel id ``num_experts`` and a zero
weight). What flows here: the gate|up GEMM -> the activation -> grouped_gemm(down) -> weighted unpermute.
Experts with a concatenated gate|up SwiGLU (transformers' default ``_apply_gate`` over SiLU: DeepSeek-V3, Qwen-MoE,
Mixtral-style models) take the fused path of our own layer: the gate|up GEMM gathers token rows itself (no
[T*K, H] expert-ordered copy) and SwiGLU is our op. Others (interleaved gate/up, gpt-oss's clamped gate, other
activations, EP's sentinel slots) permute first and apply the module's own ``_apply_gate`` / ``act_fn``. Every step
is differentiable, so training through transformers runs backward on the kernels too.

Shape letters: T tokens, H hidden, E experts on this rank, K experts per token, I expert intermediate,
R = T*K routed rows, N output features of a projection.

transformers is optional for the package: it is imported only inside ``register()``.
"""

import torch

from ..kernels import grouped_gemm, permute, route, swiglu, unpermute
from ..kernels.grouped_gemm import gather_grouped_gemm_unchecked  # rows trusted by construction (route's)

try:
    from transformers.integrations.moe import _default_apply_gate
except ImportError:  # transformers is optional for the package: without it nothing calls this module's function
    _default_apply_gate = None

IMPLEMENTATION_NAME = "tritonmoe"


def _project(x: torch.Tensor, w: torch.Tensor, bias_EN: torch.Tensor | None, group_sizes_E: torch.Tensor,
             transposed: bool, src_rows=None) -> torch.Tensor:
    """One grouped linear layer over expert-sorted rows (x_RH, or token rows x_TH read through src_rows); w is
    [E,N,in] (nn.Linear layout) or [E,in,N]."""
    w_ENH = w.transpose(1, 2) if transposed else w
    if src_rows is None:
        y_RN = grouped_gemm(x, w_ENH, group_sizes_E)
    else:
        y_RN = gather_grouped_gemm_unchecked(x, w_ENH, group_sizes_E, src_rows)
    if bias_EN is not None:
        # Row r belongs to expert e for the group_sizes_E[e] consecutive rows of that expert.
        bias_RN = torch.repeat_interleave(bias_EN, group_sizes_E, dim=0, output_size=y_RN.shape[0])
        y_RN = y_RN + bias_RN.to(y_RN.dtype)
    return y_RN


def _is_silu_swiglu(module: torch.nn.Module) -> bool:
    """Whether the module's gate is silu(gate) * up over the concatenated halves of gate_up: transformers' default
    ``_apply_gate`` (not overridden by the class) with a SiLU activation."""
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return (silu and getattr(module, "is_concatenated", True) and _default_apply_gate is not None
            and getattr(type(module), "_apply_gate", None) is _default_apply_gate)


def tritonmoe_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    """The registered experts function; ``self`` is the transformers experts module."""
    if hidden_states.dim() != 2:
        raise ValueError(f"tritonmoe experts expect hidden_states [T,H], got shape {tuple(hidden_states.shape)}")
    if top_k_index.shape != top_k_weights.shape or top_k_index.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"tritonmoe experts: top_k_index {tuple(top_k_index.shape)} and top_k_weights "
                         f"{tuple(top_k_weights.shape)} must both be [T,K] with T = {hidden_states.shape[0]}")
    num_experts = self.num_experts
    expert_parallel = getattr(self, "_is_expert_parallel", False)
    transposed = getattr(self, "is_transposed", False)
    has_gate = getattr(self, "has_gate", True)
    has_bias = getattr(self, "has_bias", False)

    for name in ("gate_up_proj" if has_gate else "up_proj", "down_proj"):
        dtype = getattr(self, name).dtype
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"tritonmoe experts run {name} in fp32/bf16/fp16, got {dtype}; quantized experts "
                             "need transformers' own FP8 experts implementations")

    x_TH = hidden_states
    if has_gate and not expert_parallel and _is_silu_swiglu(self):
        # Our own layer's path: route (index work only) -> gate|up GEMM gathering token rows -> SwiGLU -> down.
        group_sizes_E, src_rows = route(top_k_index, num_experts)
        h_RN = _project(x_TH, self.gate_up_proj, self.gate_up_proj_bias if has_bias else None, group_sizes_E,
                        transposed, src_rows)
        y_RH = _project(swiglu(h_RN), self.down_proj, self.down_proj_bias if has_bias else None, group_sizes_E,
                        transposed)
        if getattr(self, "has_post_expert_norm", False):
            y_RH = self.post_expert_norm(y_RH)
        return unpermute(y_RH, src_rows.inverse, top_k_weights).to(hidden_states.dtype)
    # Under transformers' EP the sentinel id num_experts marks a slot owned by another rank; one extra group
    # collects those rows at the tail of the sorted order, where they are cut off before the GEMMs.
    num_groups = num_experts + 1 if expert_parallel else num_experts
    x_sorted_RH, group_sizes_G, row_map_TK = permute(x_TH, top_k_index, num_groups)
    group_sizes_E = group_sizes_G[:num_experts]
    num_rows = x_sorted_RH.shape[0]
    if expert_parallel:
        num_rows = int(group_sizes_E.sum())
        x_sorted_RH = x_sorted_RH[:num_rows]

    if has_gate:
        w_in, b_in = self.gate_up_proj, (self.gate_up_proj_bias if has_bias else None)
    else:
        w_in, b_in = self.up_proj, (self.up_proj_bias if has_bias else None)
    h_RN = _project(x_sorted_RH, w_in, b_in, group_sizes_E, transposed)
    h_RI = self._apply_gate(h_RN) if has_gate else self.act_fn(h_RN)
    y_RH = _project(h_RI, self.down_proj, self.down_proj_bias if has_bias else None, group_sizes_E, transposed)
    if getattr(self, "has_post_expert_norm", False):
        y_RH = self.post_expert_norm(y_RH)
    if expert_parallel:
        # Sentinel rows contribute zero (their routing weight is zero too; zeros also keep NaN out).
        y_RH = torch.cat([y_RH, y_RH.new_zeros(x_TH.shape[0] * top_k_index.shape[1] - num_rows, y_RH.shape[1])])
    return unpermute(y_RH, row_map_TK, top_k_weights).to(hidden_states.dtype)


def register() -> None:
    """Make ``experts_implementation="tritonmoe"`` available to every transformers model (idempotent).

    Registered on the class-wide mapping of transformers' ``ExpertsInterface``, so models constructed before or
    after this call, and every copy of the interface, see it. Raises ImportError when transformers (>= 5, the
    version that has the experts registry) is not installed.
    """
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as e:
        raise ImportError("tritonmoe.dsv3.hf.register() needs transformers >= 5 (its experts registry lives in "
                          "transformers.integrations.moe); install it with `pip install 'transformers>=5'`") from e
    ExpertsInterface.register(IMPLEMENTATION_NAME, tritonmoe_experts_forward)
