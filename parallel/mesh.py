"""Device meshes for FSDP + expert parallelism, and pipeline parallelism around them.

In: the world size (from the initialised default process group), the expert-parallel degree `ep` and the
pipeline degree `pp` (default 1). Out: with pp stages, rank = pp_index * dp + dp_index (dp = world / pp ranks per
stage, contiguous); inside each stage a 1-D dense data-parallel mesh ("dp") over the stage's ranks, for everything
that is not a routed expert, and a 2-D expert mesh ("edp", "ep") over the same ranks: experts are split over the
contiguous "ep" groups (dp_index = edp_index * ep + ep_index) and FSDP-sharded over "edp"; and a 1-D "pp" mesh
through the ranks of equal dp_index, which the pipeline's point-to-point sends use. Every mesh exists for every
layout, so the code is the same for ep = 1, ep = dp and pp = 1. The device type follows the backend (gloo -> cpu,
nccl -> cuda).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class Meshes:
    dense: DeviceMesh  # 1-D ("dp",) over this stage's ranks: FSDP for attention, dense MLPs, shared experts, router
    expert: DeviceMesh  # 2-D ("edp", "ep") over the same ranks: routed experts Shard(0) over "ep", FSDP over "edp"
    pipeline: DeviceMesh | None = None  # 1-D ("pp",): this rank's pipeline (ranks of equal dp index); None: pp 1

    @property
    def ep(self) -> int:
        return self.expert["ep"].size()

    @property
    def edp(self) -> int:
        return self.expert["edp"].size()

    @property
    def pp(self) -> int:
        return 1 if self.pipeline is None else self.pipeline.size()


def check_ep_degree(world_size: int, ep: int, num_experts: int | None = None) -> None:
    """ValueError unless ep >= 1 divides both the world size and the number of routed experts."""
    if ep < 1:
        raise ValueError(f"expert-parallel degree ep={ep} must be >= 1")
    if world_size % ep:
        raise ValueError(f"expert-parallel degree ep={ep} does not divide the world size {world_size}")
    if num_experts is not None and num_experts % ep:
        raise ValueError(f"expert-parallel degree ep={ep} does not divide n_routed_experts={num_experts}")


def mesh_device_type() -> str:
    """The device type the default process group's backend communicates on."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def build_meshes(ep: int, num_experts: int | None = None, device_type: str | None = None, pp: int = 1) -> Meshes:
    """Build the dense, expert (and, for pp > 1, pipeline) meshes over the default process group (which must be
    initialised)."""
    if not dist.is_initialized():
        raise RuntimeError("build_meshes needs an initialised default process group (torch.distributed)")
    world = dist.get_world_size()
    if pp < 1 or world % pp:
        raise ValueError(f"pipeline degree pp={pp} must be >= 1 and divide the world size {world}")
    dp = world // pp
    check_ep_degree(dp, ep, num_experts)
    device_type = device_type or mesh_device_type()
    if pp == 1:
        dense = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
        expert = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("edp", "ep"))
        return Meshes(dense=dense, expert=expert)
    mesh = init_device_mesh(device_type, (pp, dp // ep, ep), mesh_dim_names=("pp", "edp", "ep"))
    return Meshes(dense=mesh["edp", "ep"]._flatten("dp"), expert=mesh["edp", "ep"], pipeline=mesh["pp"])


def local_device() -> torch.device:
    """The device this rank computes on: its CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and mesh_device_type() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
