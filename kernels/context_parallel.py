"""Sequence-split causal attention (context parallelism) over one process group, zigzag layout.

Each rank of the group holds its local shard of query, key and value in the zigzag layout
(`kernels/_cp_layout.py`: 2P chunks, rank i holds chunks i and 2P-1-i, concatenated), and gets
back its shard of the causal attention output over the whole sequence.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.distributed import ProcessGroup

from ._cp_layout import check_zigzag_length, zigzag_indices, zigzag_inverse_permutation, zigzag_permutation

__all__ = [
    "sequence_split_attention",
    "zigzag_indices",
    "zigzag_inverse_permutation",
    "zigzag_permutation",
]


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 2 in rank order; backward sums the gradient over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.local_len = x.shape[2]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = ctx.rank * ctx.local_len
        return grad[:, :, start : start + ctx.local_len].contiguous(), None


def sequence_split_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """Causal attention over a sequence split across `group` in the zigzag layout; this rank's output shard.

    query [b, hq, l, e], key/value [b, hk, l, e] are this rank's shards (l = L / P, positions
    `zigzag_indices(L, P, rank)`); hq must be a multiple of hk (GQA: query head h uses K/V head
    h // (hq / hk)); K/V are never repeated. `scale` defaults to 1/sqrt(e). Returns [b, hq, l, e]
    in the query's dtype, equal to this rank's rows of full causal attention on the unsplit
    sequence. Differentiable in query, key and value. `group` None is the default process group.
    """
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    batch, q_heads, local_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"sequence_split_attention: {q_heads} query heads are not a multiple of {kv_heads} K/V heads")
    seq_len = local_len * world_size
    check_zigzag_length(seq_len, world_size)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    full_key = _GatherSequence.apply(key, group)
    full_value = _GatherSequence.apply(value, group)
    key_positions = zigzag_permutation(seq_len, world_size).to(query.device)
    query_positions = zigzag_indices(seq_len, world_size, rank).to(query.device)
    allowed = key_positions[None, :] <= query_positions[:, None]

    compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    groups = q_heads // kv_heads
    q = query.to(compute_dtype).reshape(batch, kv_heads, groups, local_len, head_dim)
    scores = torch.einsum("bgrle,bgse->bgrls", q, full_key.to(compute_dtype)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bgrls,bgse->bgrle", probs, full_value.to(compute_dtype))
    return out.reshape(batch, q_heads, local_len, value.shape[-1]).to(query.dtype)
