"""Token permute / unpermute under top-k routing.  (placeholder: twins only)"""

import torch


def permute_torch(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int):
    """x [T,H], topk_idx [T,K] -> x_sorted [T*K,H] (expert asc, then token asc), group_sizes [E] int64,
    row_map [T,K] (row of x_sorted holding token t's j-th choice)."""
    T, K = topk_idx.shape
    flat = topk_idx.reshape(-1).long()
    order = torch.argsort(flat, stable=True)  # flat index t*K+j, stable: tokens stay ascending per expert
    x_sorted = x[order // K]
    group_sizes = torch.bincount(flat, minlength=num_experts)
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(T * K, device=x.device)
    return x_sorted, group_sizes, row_map.view(T, K)


def unpermute_torch(y_sorted: torch.Tensor, row_map: torch.Tensor, topk_weights=None) -> torch.Tensor:
    """y[t] = sum_j topk_weights[t,j] * y_sorted[row_map[t,j]] in fp32, returned in y_sorted.dtype."""
    T, K = row_map.shape
    g = y_sorted[row_map.reshape(-1)].float().view(T, K, -1)
    if topk_weights is not None:
        g = g * topk_weights.float().unsqueeze(-1)
    return g.sum(1).to(y_sorted.dtype)


permute = permute_torch
unpermute = unpermute_torch
