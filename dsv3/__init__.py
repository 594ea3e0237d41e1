"""DeepSeek-V3 model: config, MLA, DeepSeek MoE on tritonmoe kernels, MTP, checkpoints, training."""

from .config import PRESETS, DeepseekV3Config
from .moe import MLP, GroupedExperts, LocalDispatcher, MoE, Router, update_expert_bias

__all__ = ["DeepseekV3Config", "PRESETS", "MoE", "Router", "GroupedExperts", "LocalDispatcher", "MLP",
           "update_expert_bias"]
