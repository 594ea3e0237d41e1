"""Device meshes for FSDP + expert parallelism.

In: the world size (from the initialised default process group) and the expert-parallel degree `ep`.
Out: a 1-D dense data-parallel mesh ("dp") over all ranks, for everything that is not a routed expert, and a
2-D expert mesh ("edp", "ep") over the same ranks: experts are split over the contiguous "ep" groups
(rank = edp_index * ep + ep_index) and FSDP-sharded over "edp". Both meshes exist for every layout, so the
code is the same for ep = 1 and ep = world. The device type follows the backend (gloo -> cpu, nccl -> cuda).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class Meshes:
    dense: DeviceMesh  # 1-D ("dp",) over all ranks: FSDP for attention, dense MLPs, shared experts, router
    expert: DeviceMesh  # 2-D ("edp", "ep"): routed experts Shard(0) over "ep", then FSDP over "edp"

    @property
    def ep(self) -> int:
        return self.expert["ep"].size()

    @property
    def edp(self) -> int:
        return self.expert["edp"].size()


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


def build_meshes(ep: int, num_experts: int | None = None, device_type: str | None = None) -> Meshes:
    """Build the dense and expert meshes over the default process group (which must be initialised)."""
    if not dist.is_initialized():
        raise RuntimeError("build_meshes needs an initialised default process group (torch.distributed)")
    world = dist.get_world_size()
    check_ep_degree(world, ep, num_experts)
    device_type = device_type or mesh_device_type()
    dense = init_device_mesh(device_type, (world,), mesh_dim_names=("dp",))
    expert = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("edp", "ep"))
    return Meshes(dense=dense, expert=expert)


def local_device() -> torch.device:
    """The device this rank computes on: its CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and mesh_device_type() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
