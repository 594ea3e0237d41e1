"""All-to-all with uneven splits, differentiable.

In: x_RH whose rows are laid out as contiguous chunks, chunk j (input_splits[j] rows) going to rank j of
`group`. Out: the rows received, chunk j (output_splits[j] rows) coming from rank j, in rank order.
The backward is the same exchange in reverse (gradient rows go back to where their forward rows came from),
so the split lists swap roles. Split sizes are host-side Python ints: the caller pays the one
device-to-host copy for them (see expert_parallel.py), this module adds none.
"""

import torch
import torch.distributed as dist


def _exchange(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=output_splits, input_split_sizes=input_splits,
                           group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _exchange(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        return _exchange(grad_out, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None) -> torch.Tensor:
    """Send chunk j of x (input_splits[j] rows) to rank j; return the chunks received, in rank order."""
    n = dist.get_world_size(group)
    if len(output_splits) != n or len(input_splits) != n:
        raise ValueError(f"split lists must have one entry per rank ({n}): got {len(input_splits)} input, "
                         f"{len(output_splits)} output")
    if sum(input_splits) != x.shape[0]:
        raise ValueError(f"input_splits sum to {sum(input_splits)} but x has {x.shape[0]} rows")
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)
