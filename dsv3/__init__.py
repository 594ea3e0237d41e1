"""DeepSeek-V3 model: config, MLA, DeepSeek MoE on tritonmoe kernels, MTP, checkpoints, training.

    cfg = DeepseekV3Config.from_hf("tiny" | "16b" | "671b" | path/to/config.json | dict)
    model = DeepseekV3ForCausalLM(cfg); out = model(input_ids, labels=input_ids)
    out.loss.backward(); optimizer.step(); update_expert_bias(model, group)
"""

from .config import PRESETS, DeepseekV3Config
from .model import CausalLMOutput, DeepseekV3ForCausalLM, DeepseekV3Model, apply_activation_checkpointing
from .moe import MLP, GroupedExperts, LocalDispatcher, MoE, Router, update_expert_bias

__all__ = ["DeepseekV3Config", "PRESETS", "DeepseekV3ForCausalLM", "DeepseekV3Model", "CausalLMOutput",
           "apply_activation_checkpointing", "MoE", "Router", "GroupedExperts", "LocalDispatcher", "MLP",
           "update_expert_bias"]
