"""Grouped GEMM over experts: y[rows of g] = x[rows of g] @ w[g].T.  (placeholder: twin only)"""

import torch


def grouped_gemm_torch(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of grouped_gemm: x [M,K] sorted by group, w [G,N,K], group_sizes [G] -> y [M,N]."""
    sizes = group_sizes.tolist()
    outs = [torch.mm(xg.float(), w[g].float().t()) for g, xg in enumerate(torch.split(x, sizes))]
    if not outs:
        return x.new_empty(x.shape[0], w.shape[1])
    return torch.cat(outs).to(x.dtype)


grouped_gemm = grouped_gemm_torch
