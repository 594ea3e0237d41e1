"""DeepSeek-V3 model: config, MLA, DeepSeek MoE on tritonmoe kernels, MTP, checkpoints, training."""
