"""Parallelism for a built model: meshes, all-to-all expert dispatch, FSDP2 wrapping, DCP checkpoints.

Order of application to a model built without any process group:
    meshes = build_meshes(ep, num_experts)                  # dense ("dp",) + expert ("edp", "ep") meshes
    apply_expert_parallel(model, meshes.expert)             # when ep > 1: experts -> DTensor Shard(0) over ep
    apply_fsdp(model, meshes.dense, meshes.expert, param_dtype=torch.bfloat16)   # bf16 on GPUs
For a model built on the meta device (the only way at 16B/671B): the same steps, then
    model.to_empty(device=...); init_sharded_(model, seed)  # or load_model_weights(model, dcp_dir)
which fills only each rank's shards, with the same global values for every world size and EP degree.
Checkpoints: save_checkpoint / load_checkpoint / read_train_state / latest_checkpoint for training state, and
load_model_weights(model, dcp_dir) for weights only (e.g. a checkpoint written by `convert hf2dcp`).
Pipeline stages (build_meshes(pp=...) gives each stage its own dense and expert meshes) are cut and scheduled
in dsv3/pipeline.py on torch.distributed.pipelining; EP and FSDP stay inside a stage.
parallel never imports dsv3: MoE layers are found by duck typing (`.dispatcher` + `.experts.gate_up_proj`).
"""

from .all_to_all import all_to_all
from .checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, load_model_weights,
                         read_train_state, save_checkpoint)
from .expert_parallel import ExpertParallelDispatcher, apply_expert_parallel, find_moe_layers
from .fsdp import apply_fsdp, clip_grad_norm_, find_blocks
from .init import init_sharded_
from .mesh import Meshes, build_meshes, check_ep_degree, local_device

__all__ = [
    "CheckpointError",
    "ExpertParallelDispatcher",
    "Meshes",
    "all_to_all",
    "apply_expert_parallel",
    "apply_fsdp",
    "build_meshes",
    "check_ep_degree",
    "clip_grad_norm_",
    "find_blocks",
    "find_moe_layers",
    "init_sharded_",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "local_device",
    "read_train_state",
    "save_checkpoint",
]
