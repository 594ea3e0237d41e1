"""Initialization of a parallelized model built on the meta device: each rank fills only its own shards, and the
values are the same global tensors for every world size and EP degree.

In: a model whose parameters are plain tensors or DTensors (expert parallelism, FSDP2) already materialized by
`model.to_empty(device=...)`, a seed, and the model's init rule (`rule(name)` -> an object with
`fill_(tensor, generator)`; dsv3's `DeepseekV3ForCausalLM.init_rule`). parallel never imports dsv3: the rule
comes from the model, routed experts are found by duck typing (`find_moe_layers`).
Out: every parameter and buffer set in place, nothing left on the meta device.

Values depend only on (seed, name, global position), never on the layout, and each rank draws only what
its shards cover (plus at most a block at each end of a contiguous run of rows):
- a routed-expert weight [E, ...] is drawn per expert e from a generator seeded by (seed, name, e), for the
  experts this rank's shard covers only: no rank ever builds a full expert stack (at 671B one layer's
  stack is 256 x 44M parameters); experts FSDP-sharded on dim 1 (fewer local experts than edp ranks) are
  drawn whole, one at a time, and each rank keeps its columns;
- every other parameter (dense: attention, embeddings, norms, router, shared experts) and every buffer is
  cut into blocks of `rows_per_block(shape)` dim-0 rows (about BLOCK_ELEMENTS elements; the block size is a
  function of the global shape only), block b drawn from a generator seeded by (seed, name, b); a rank draws
  only the blocks overlapping its rows. At 671B a rank of 256 thus draws ~1/256 of the ~17B dense values
  instead of all of them, and the transient memory is one block (256 KiB in fp32; one row where a row is
  larger), not the largest dense tensor (the 129280 x 7168 embedding: 3.7 GB in fp32);
- 0-dim tensors are drawn whole from a generator seeded by (seed, name).
The generators are on the parameters' device, so values agree between layouts on the same device type (CPU
and CUDA streams differ).
"""

import hashlib
import itertools
import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from .expert_parallel import find_moe_layers


# Elements per init block of a dense tensor. A constant: the blocks, hence the values, depend on the global
# shape only. Changing it changes every initial dense weight (not their distribution).
BLOCK_ELEMENTS = 1 << 16


def _generator(device: torch.device, seed: int, name: str, index: int | None = None,
               block: int | None = None) -> torch.Generator:
    """A generator seeded by (seed, name[, expert index][, row block]) through a stable hash (Python's hash()
    is salted per process, so ranks would disagree)."""
    key = f"{seed}/{name}" if index is None else f"{seed}/{name}/{index}"
    if block is not None:
        key += f"/rows{block}"
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1)
    return g


def rows_per_block(shape: torch.Size | tuple[int, ...]) -> int:
    """Dim-0 rows per init block of a dense tensor of global `shape`: about BLOCK_ELEMENTS elements, at least
    one row."""
    return max(1, BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))


def _runs(rows: list[int]) -> list[tuple[int, int, int]]:
    """(local offset, first global row, length) of each maximal run of consecutive global rows."""
    runs = []
    for i, r in enumerate(rows):
        if runs and runs[-1][1] + runs[-1][2] == r:
            runs[-1][2] += 1
        else:
            runs.append([i, r, 1])
    return [tuple(run) for run in runs]


def _fill_dense_(local: torch.Tensor, shape: torch.Size, rows: list[int], fill, seed: int, name: str) -> None:
    """local[i] = global row rows[i] of the tensor whose row block b is fill.fill_ from (seed, name, b); draws
    only the blocks that overlap `rows` (each once when the runs are in ascending order, as shards are)."""
    if len(shape) == 0:
        local.copy_(fill.fill_(torch.empty((), dtype=local.dtype, device=local.device),
                               generator=_generator(local.device, seed, name)))
        return
    per = rows_per_block(shape)
    drawn_b, drawn = None, None
    for offset, first, n in _runs(rows):
        for b in range(first // per, (first + n - 1) // per + 1):
            if b != drawn_b:
                size = min(per, shape[0] - b * per)
                drawn_b, drawn = b, fill.fill_(torch.empty((size, *shape[1:]), dtype=local.dtype,
                                                           device=local.device),
                                               generator=_generator(local.device, seed, name, block=b))
            lo, hi = max(first, b * per), min(first + n, (b + 1) * per)
            local[offset + lo - first:offset + hi - first].copy_(drawn[lo - b * per:hi - b * per])


def local_indices(p: torch.Tensor, dim: int = 0) -> list[int]:
    """The global indices along `dim` of the slices this rank holds of `p`, in local order.

    For a DTensor with Shard placements on any dims (EP's Shard(0) over "ep", FSDP2's Shard(0) / _StridedShard(0)
    over "edp" or the dense mesh, FSDP2's Shard(1) over "edp" for experts that do not split evenly; uneven or
    empty shards included): the local part of an index vector laid along `dim` and distributed with the
    placements that shard `dim` (the others replicate it), each rank keeping its own chunk (src_data_rank=None:
    no communication). A plain tensor holds every index.
    """
    if not isinstance(p, DTensor):
        return list(range(p.shape[dim]))
    # Shard and FSDP2's _StridedShard (not a Shard subclass in torch 2.13) both carry the dim they split.
    placements = [pl if getattr(pl, "dim", None) == dim else Replicate() for pl in p.placements]
    index = torch.arange(p.shape[dim], device=p.device_mesh.device_type).view(*([1] * dim), -1)
    return distribute_tensor(index, p.device_mesh, placements, src_data_rank=None).to_local().reshape(-1).tolist()


def local_rows(p: torch.Tensor) -> list[int]:
    """local_indices along dim 0, for a tensor sharded on dim 0 only (every dense parameter and buffer)."""
    if isinstance(p, DTensor) and any(getattr(pl, "dim", 0) != 0 for pl in p.placements):
        raise ValueError(f"local_rows: only dim-0 sharding is supported, got placements {p.placements}")
    return local_indices(p, 0)


@torch.no_grad()
def init_sharded_(model: nn.Module, seed: int, rule=None) -> nn.Module:
    """Fill every parameter's local shard and every buffer of `model` by `rule` (default `model.init_rule`),
    as described in the module docstring. Collective-free; call on every rank after `to_empty`."""
    rule = rule if rule is not None else getattr(model, "init_rule", None)
    if rule is None:
        raise ValueError(f"init_sharded_: {type(model).__name__} has no init_rule(name); pass rule=")
    experts = {id(p) for _, moe in find_moe_layers(model) for p in moe.experts.parameters(recurse=False)}
    for name, p in itertools.chain(model.named_parameters(), model.named_buffers()):
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.is_meta:
            raise ValueError(f"init_sharded_: {name} is on the meta device; call model.to_empty(device=...) first")
        fill = rule(name)
        if id(p) in experts:
            # Whole experts drawn one at a time; a rank sharding them on dim 1 keeps its columns of each.
            cols = local_indices(p, 1)
            keep = None if len(cols) == p.shape[1] else torch.tensor(cols, device=local.device)
            for i, e in enumerate(local_indices(p, 0)):
                row = fill.fill_(torch.empty(p.shape[1:], dtype=local.dtype, device=local.device),
                                 generator=_generator(local.device, seed, name, e))
                local[i].copy_(row if keep is None else row.index_select(0, keep))
            continue
        _fill_dense_(local, p.shape, local_rows(p) if p.ndim else [], fill, seed, name)
    return model
