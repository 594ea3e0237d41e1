"""Expert parallelism: the routed experts of every MoE layer split over the ranks of an "ep" group.

Shape letters: T tokens on this rank, H hidden, E global experts, L = E / ep local experts, K top-k,
R = T*K rows this rank sends, R' rows this rank receives, ep the expert-parallel degree.

`apply_expert_parallel(model, mesh)` finds MoE layers by duck typing (a module with `.dispatcher` and
`.experts.gate_up_proj`; parallel never imports dsv3), turns the expert weights into DTensors `Shard(0)` over
the "ep" mesh (rank j of the group owns experts [j*L, (j+1)*L)) and installs an `ExpertParallelDispatcher`
in the MoE's dispatch seam (dispatch -> experts -> combine; the dispatcher never calls the experts). Per rank:

    dispatch:  x_TH --permute--> x_sorted_RH (global expert order = destination-rank order), sizes_E
                    --all-to-all of sizes_E (E ints)--> recv_sizes_SL   [source rank, local expert]
                    --ONE device-to-host copy of the 2*ep split sizes (the only sync)--
                    --all-to-all of rows--> x_recv (source-major: chunk (s, l) for s, then l)
               returns x_recv, sizes_L, src_rows (the local-expert-major order (l, s) as a row index), meta
    experts:   the gate/up GEMM reads x_recv through src_rows: the regroup is a gather in its operand loads, and
               the [R', H] expert-major copy is never written (R' = 131,072 rows at DeepSeek-V3's T=16K, K=8:
               1.75 GiB written and read once less per layer forward in bf16; autograd keeps x_recv instead of the
               copy, the same bytes)
    combine:   y_LR --one regroup copy back to source-major--> y_recv --all-to-all back--> y_sorted_RH
               --unpermute(topk_w)--> y_TH

Every step is differentiable (the all-to-all's backward is the reverse exchange; the gather GEMM's input
gradient sums back through the inverse index), so gradients reach the input, the router weights (through
topk_w) and the local experts.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..kernels import SourceRows, permute
from ..kernels.permute import unpermute_unchecked  # the row map is permute's own, trusted by construction
from .all_to_all import all_to_all
from .mesh import Meshes


def _chunk_gather_index(sizes_AB: torch.Tensor, total: int) -> torch.Tensor:
    """Index that reorders rows stored as chunks in (a, b) order into (b, a) order.

    sizes_AB[a, b] is the row count of chunk (a, b); rows are stored chunk after chunk with a major. Returns
    idx [total] with out = rows[idx] holding the same chunks with b major (rows inside a chunk keep their
    order). Built with one repeat_interleave (output size known on the host, so no sync), no chunk loop.
    """
    src_start_AB = (torch.cumsum(sizes_AB.flatten(), 0) - sizes_AB.flatten()).view_as(sizes_AB)
    sizes_BA = sizes_AB.t().flatten()
    dst_start_BA = torch.cumsum(sizes_BA, 0) - sizes_BA
    # Output position p in chunk (b, a) reads source position src_start[a, b] + (p - dst_start[b, a]).
    shift_BA = src_start_AB.t().flatten() - dst_start_BA
    shift_R = torch.repeat_interleave(shift_BA, sizes_BA, output_size=total)
    return shift_R + torch.arange(total, device=sizes_AB.device)


@dataclass(frozen=True)
class DispatchSplits:
    send: list[int]  # rows this rank sends to each ep rank (host ints; the all-to-all needs them)
    recv: list[int]  # rows this rank receives from each ep rank
    recv_sizes_SL: torch.Tensor  # [ep, L] rows received from source rank s for local expert l (device)


@dataclass(frozen=True)
class ExpertParallelRouting:
    """What ExpertParallelDispatcher.combine needs to undo its dispatch."""
    splits: DispatchSplits               # the row counts of the forward exchange, reused backwards
    to_source_major_R: torch.Tensor      # [R'] int64: expert-major row of each received (source-major) row
    row_map_TK: torch.Tensor             # [T, K] int64: row of x_sorted_RH holding token t's j-th choice
    topk_w_TK: torch.Tensor              # [T, K] routing weights of the combine


class ExpertParallelDispatcher:
    """MoE dispatch seam for experts sharded over an "ep" process group; see the module docstring."""

    def __init__(self, ep_mesh: DeviceMesh, num_experts: int):
        if ep_mesh.ndim != 1:
            raise ValueError(f"ExpertParallelDispatcher needs a 1-D ep mesh, got {ep_mesh.ndim}-D")
        self.ep_mesh = ep_mesh
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        self.num_experts = num_experts  # global E

    def exchange_sizes(self, sizes_E: torch.Tensor) -> DispatchSplits:
        """All-to-all of per-expert counts, then the one host copy of the split sizes."""
        ep, L = self.ep, sizes_E.numel() // self.ep
        recv_sizes_E = torch.empty_like(sizes_E)
        # Equal splits of L counts: rank j receives, from every rank, the counts for its own L experts.
        dist.all_to_all_single(recv_sizes_E, sizes_E.contiguous(), group=self.group)
        recv_sizes_SL = recv_sizes_E.view(ep, L)
        both = torch.cat([sizes_E.view(ep, L).sum(1), recv_sizes_SL.sum(1)]).tolist()
        return DispatchSplits(send=both[:ep], recv=both[ep:], recv_sizes_SL=recv_sizes_SL)

    def dispatch(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor):
        x_sorted_RH, sizes_E, row_map_TK = permute(x_TH, topk_idx_TK, self.num_experts)
        splits = self.exchange_sizes(sizes_E)
        n_recv = sum(splits.recv)
        x_recv_RH = all_to_all(x_sorted_RH, splits.recv, splits.send, self.group)
        to_expert_major = _chunk_gather_index(splits.recv_sizes_SL, n_recv)
        to_source_major = _chunk_gather_index(splits.recv_sizes_SL.t(), n_recv)
        # A bijection: the C = 1 case of a gather, whose inverse sums dX back (one row each).
        src_rows = SourceRows(to_expert_major, to_source_major[:, None])
        meta = ExpertParallelRouting(splits, to_source_major, row_map_TK, topk_w_TK)
        return x_recv_RH, splits.recv_sizes_SL.sum(0), src_rows, meta

    def combine(self, y_LRH: torch.Tensor, meta: ExpertParallelRouting) -> torch.Tensor:
        # The all-to-all sends contiguous per-rank chunks, so the rows go back to source-major order first: one
        # copy (a scatter epilogue in the down GEMM would remove it).
        y_recv_RH = y_LRH[meta.to_source_major_R]
        y_sorted_RH = all_to_all(y_recv_RH, meta.splits.send, meta.splits.recv, self.group)
        return unpermute_unchecked(y_sorted_RH, meta.row_map_TK, meta.topk_w_TK)  # permute's own map

    def __repr__(self):
        return f"ExpertParallelDispatcher(ep={self.ep}, num_experts={self.num_experts})"


def find_moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """MoE layers by duck typing: modules with a dispatch seam and stacked expert weights."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "dispatcher") and hasattr(getattr(m, "experts", None), "gate_up_proj")]


def _ep_mesh(mesh) -> DeviceMesh:
    if isinstance(mesh, Meshes):
        return mesh.expert["ep"]
    if mesh.ndim == 1:
        return mesh
    if mesh.mesh_dim_names is None or "ep" not in mesh.mesh_dim_names:
        raise ValueError(f"expert mesh needs an 'ep' dimension, got names {mesh.mesh_dim_names}")
    return mesh["ep"]


def apply_expert_parallel(model: nn.Module, mesh) -> nn.Module:
    """Shard every MoE layer's experts over the "ep" mesh and install the EP dispatcher, in place.

    `mesh` is the 2-D ("edp", "ep") expert mesh, a 1-D ep mesh, or the `Meshes` from `build_meshes`.
    Rank j of the ep group keeps experts [j*E/ep, (j+1)*E/ep). On a built model, of the weights rank 0 holds
    (distribute_tensor scatters from rank 0, so every rank ends up with the same global experts). On a model
    built on the meta device there is nothing to scatter: each rank takes its own meta slice, without
    communication, and fills it after `to_empty` (parallel.init_sharded_ or a checkpoint load).
    """
    ep_mesh = _ep_mesh(mesh)
    ep = ep_mesh.size()
    layers = find_moe_layers(model)
    if not layers:
        raise ValueError("apply_expert_parallel found no MoE layer (module with .dispatcher and "
                         ".experts.gate_up_proj)")
    for _, moe in layers:
        experts = moe.experts
        for pname, p in list(experts.named_parameters(recurse=False)):
            if isinstance(p, DTensor):
                raise ValueError(f"expert parameter {pname} is already a DTensor; apply expert parallelism "
                                 "once, before FSDP")
            if p.shape[0] % ep:
                raise ValueError(f"expert-parallel degree ep={ep} does not divide the {p.shape[0]} experts "
                                 f"of parameter {pname}")
            # src_data_rank=None: every rank cuts its own chunk, no scatter (a meta tensor has nothing to send)
            sharded = distribute_tensor(p.detach(), ep_mesh, [Shard(0)], src_data_rank=None if p.is_meta else 0)
            experts.register_parameter(pname, nn.Parameter(sharded, requires_grad=p.requires_grad))
        moe.dispatcher = ExpertParallelDispatcher(ep_mesh, experts.gate_up_proj.shape[0])
    return model
