"""FSDP2 wrapping for a model with (optionally expert-parallel) MoE layers, and gradient-norm clipping that is
correct when parameters live on different meshes.

In: a built model (after `apply_expert_parallel` when ep > 1) and the meshes from `build_meshes`.
Units, innermost first: each MoE layer's routed experts over the expert mesh's "edp" dimension (their
DTensor "ep" sharding stays as it is, so they end up 2-D sharded; over experts when the local experts split
evenly over edp, else over dim 1 so that no rank holds padding, see expert_shard_placement), then each decoder block (MTP blocks
included) over the dense mesh, then the root (embeddings, final norm, head, MTP projections) over the dense
mesh. This is the composition that FSDP1 could not express without patching PyTorch (pytorch/pytorch#149396):
separate meshes, unpatched `fully_shard`. Under a low-precision param_dtype each MoE layer's router
(`moe.gate`) is one more unit over the dense mesh that keeps its weight in fp32: the router computes in fp32
(dsv3.moe.Router), and rounding its weight to bf16 first changes top-k choices (measured on random N(0,1)
tokens with the initial weights: 1.8% of tokens get another expert set at H=7168, E=256, K=8).

Gradient scale of experts: a local expert's gradient already sums the contributions of the tokens of all
ep ranks (they came through the all-to-all); FSDP's reduce-scatter over "edp" then sums over the edp
groups, so the sum covers every rank once and must be divided by the world size, not by edp (FSDP's
default). Dense parameters get FSDP's default average over the dense mesh (= the world).

Activation checkpointing composes when it sits inside a block's forward (dsv3's DecoderLayer does this with
non-reentrant torch.utils.checkpoint): FSDP's hooks wrap the block's call, the recomputation runs while the
block's parameters are unsharded for backward.
"""

import functools
import math
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from .expert_parallel import find_moe_layers


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, by duck typing: modules with both a `self_attn` and an `mlp` child (decoder
    layers, including the one inside each DeepSeek-V3 MTP module). The MTP module itself is not a unit:
    the model applies its final `norm` outside the module's forward, when a block unit would already have
    resharded it; its few small weights stay with the root. Without such modules: the entries of the
    model's ModuleLists, outermost only."""
    blocks = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]
    if blocks:
        return blocks
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside or not isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            continue
        for child in m.children():
            blocks.append(child)
            inside.update(id(d) for d in child.modules())
    return blocks


def local_expert_count(experts: nn.Module) -> int:
    """Experts this rank's EP shard holds (L = E / ep; E without expert parallelism)."""
    w = experts.gate_up_proj
    return (w.to_local() if isinstance(w, DTensor) else w).shape[0]


def expert_shard_placement(experts: nn.Module, edp: int):
    """FSDP's placement for the routed experts over an edp group of `edp` ranks: None (FSDP's default, Shard(0)
    over experts) when the L local experts split evenly over edp, else a placement function giving Shard(1).
    Shard(0) with L % edp != 0 makes FSDP2 pad dim 0 so that a rank holds whole experts: at 512 GPUs with EP 64
    (L = 4) and edp 8, each rank would hold 1 padded expert where 4/8 is its share, doubling expert memory and
    all-gather traffic. Shard(1) (the intermediate dim of gate_up_proj [L, 2I, H], the hidden dim of down_proj
    [L, H, I]) gives each rank exactly 1/edp of every local expert instead (torchtitan does the same). FSDP2 shards
    dims other than 0 only evenly, so Shard(1) needs edp to divide 2I and H (DeepSeek-V3: any edp dividing 1024);
    otherwise the padded Shard(0) stays, with a warning, rather than a failure inside fully_shard."""
    if local_expert_count(experts) % edp == 0:
        return None
    uneven = [f"{name} dim 1 = {p.shape[1]}" for name, p in experts.named_parameters(recurse=False)
              if p.shape[1] % edp]
    if uneven:
        warnings.warn(f"expert FSDP over edp={edp}: {local_expert_count(experts)} local experts do not split evenly "
                      f"and {', '.join(uneven)} is not divisible by {edp} either; sharding over experts with FSDP's "
                      "padding (more expert memory than an even split)")
        return None
    return lambda param: Shard(1)


def apply_fsdp(model: nn.Module, dense_mesh: DeviceMesh, expert_mesh: DeviceMesh | None = None, *,
               param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = True, blocks: list[nn.Module] | None = None,
               reduce: str = "mean") -> nn.Module:
    """fully_shard experts over expert_mesh["edp"], every block (default `find_blocks(model)`) and then
    the root over dense_mesh.

    param_dtype=torch.bfloat16 gives bf16 compute with fp32 master weights and fp32 gradient reduction
    (the GPU setting), routers excepted (their weights stay fp32, see the module docstring); None keeps the
    parameters' dtype. reduce="mean" (default) gives data-parallel gradients as the mean of the ranks' (each
    rank's loss a mean over its own share); reduce="sum" sums them (each rank's loss already divided by the
    global batch's count, as the trainer's are). Returns the model (now an FSDP module).
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"apply_fsdp: reduce must be 'mean' or 'sum', got {reduce!r}")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    world = dense_mesh.size()
    low_precision = param_dtype is not None and param_dtype != torch.float32
    keep = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce_dtype)
    edp_mesh = None if expert_mesh is None else expert_mesh["edp"] if expert_mesh.ndim > 1 else expert_mesh
    units = []  # (FSDP unit, its mesh)
    for _, moe in find_moe_layers(model):
        gate = getattr(moe, "gate", None)
        if low_precision and isinstance(gate, nn.Module) and any(True for _ in gate.parameters()):
            fully_shard(gate, mesh=dense_mesh, mp_policy=keep, reshard_after_forward=reshard_after_forward)
            units.append((gate, dense_mesh))
        if edp_mesh is not None:
            fully_shard(moe.experts, mesh=edp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                        shard_placement_fn=expert_shard_placement(moe.experts, edp_mesh.size()))
            # Under "mean", a sum over every rank divided by the world (see the module docstring).
            units.append((moe.experts, edp_mesh, float(world)))
    for block in (find_blocks(model) if blocks is None else blocks):
        fully_shard(block, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        units.append((block, dense_mesh))
    fully_shard(model, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    units.append((model, dense_mesh))
    for unit, mesh, *mean_factor in units:
        if reduce == "sum":
            _divide_gradients(unit, 1.0, mesh)
        elif mean_factor:
            _divide_gradients(unit, mean_factor[0], mesh)
    return model


def _divide_gradients(unit: nn.Module, factor: float, mesh: DeviceMesh) -> None:
    """Have FSDP divide `unit`'s own reduced gradients by `factor` (instead of averaging over its mesh)."""
    unit.set_gradient_divide_factor(factor)
    if mesh.size() > 1 and dist.get_backend(mesh.get_group()) != "nccl":
        # A custom factor uses NCCL's PREMUL_SUM; gloo has none: sum, then scale separately. Not with a mesh of
        # one: FSDP (torch 2.13) then skips the collective and divides by the factor itself, and forcing sum would
        # divide a second time (measured: losses off by 4e-5 rel). A factor of 1 is safe either way.
        unit.set_force_sum_reduction_for_comms(True)


def _replication(t: torch.Tensor) -> int:
    """How many ranks hold each element of t's local shard (1 for a fully sharded DTensor)."""
    if isinstance(t, DTensor):
        return functools.reduce(lambda n, i: n * t.device_mesh.size(i),
                                [i for i, p in enumerate(t.placements) if isinstance(p, Replicate)], 1)
    return dist.get_world_size() if dist.is_initialized() else 1


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, group=None, replicas=()) -> torch.Tensor:
    """Clip gradients by their global L2 norm over all ranks and meshes; returns the norm before clipping.

    Each rank sums the squares of its local gradient shards, divided by how many ranks hold the same
    elements (1 under FSDP, the world for a plain replicated tensor), and one all-reduce over `group`
    (default: the world) adds dense and expert contributions together. Computed in fp32, without a host
    sync. max_norm=inf only measures the norm (the gradients are left as they are). `replicas`: parameters that
    copy others in `parameters` (a pipeline's embedding replica, whose gradient equals its original's): scaled
    with the rest, not counted in the norm a second time.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    scaled = grads + [p.grad for p in replicas if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        total_sq += local.float().pow(2).sum() / _replication(g)
    if dist.is_initialized():
        dist.all_reduce(total_sq, group=group)
    norm = total_sq.sqrt()
    if math.isinf(max_norm):
        return norm
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in scaled:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(scale.to(g.dtype))
    return norm
