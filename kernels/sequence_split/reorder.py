"""Zigzag reorders that generated code wraps around collectives on a sequence-split mesh axis.

The planner keeps every sequence-aligned tensor that is split on such an axis in the zigzag
layout of ``layout.py`` (2P chunks, rank i holds chunks i and 2P-1-i, in that order).
``runtime.comm``'s collectives move contiguous, rank-ordered shards, so the generated code turns
a full tensor into "zigzag order" (rank 0's shard, then rank 1's, ...) before a collective that
scatters it, and back into natural order after one that gathers it. All three functions are
plain PyTorch views and concatenations: autograd gives their backward (the inverse reorder, or a
zero-padded placement for the slice, as ``comm.local_slice`` does).

Generated code imports them from ``kernels/_cp_reorder.py`` (``planner/codegen/sequence_split_code.py``'s
``REORDER_MODULE``), which re-exports this module.
"""

from __future__ import annotations

import torch

from .layout import check_zigzag_length

__all__ = ["from_zigzag", "to_zigzag", "zigzag_slice"]


def _zigzag_order(world_size: int) -> list[int]:
    """Chunk indices in zigzag order: 0, 2P-1, 1, 2P-2, ..."""
    order = []
    for rank in range(world_size):
        order += [rank, 2 * world_size - 1 - rank]
    return order


def zigzag_slice(x: torch.Tensor, dim: int, world_size: int, rank: int) -> torch.Tensor:
    """This rank's zigzag shard of a full tensor: chunks ``rank`` and ``2P-1-rank`` of ``dim``, concatenated.

    ValueError (from ``check_zigzag_length``) when ``x.shape[dim]`` is not a multiple of 2P.
    """
    if world_size == 1:
        return x
    chunk = check_zigzag_length(x.shape[dim], world_size)
    head = x.narrow(dim, rank * chunk, chunk)
    tail = x.narrow(dim, (2 * world_size - 1 - rank) * chunk, chunk)
    return torch.cat([head, tail], dim)


def to_zigzag(x: torch.Tensor, dim: int, world_size: int) -> torch.Tensor:
    """Natural order -> zigzag order along ``dim``: rank r's shard is then the r-th contiguous piece."""
    if world_size == 1:
        return x
    check_zigzag_length(x.shape[dim], world_size)
    chunks = x.chunk(2 * world_size, dim)
    return torch.cat([chunks[i] for i in _zigzag_order(world_size)], dim)


def from_zigzag(x: torch.Tensor, dim: int, world_size: int) -> torch.Tensor:
    """Zigzag order -> natural order along ``dim`` (the inverse of ``to_zigzag``)."""
    if world_size == 1:
        return x
    check_zigzag_length(x.shape[dim], world_size)
    chunks = x.chunk(2 * world_size, dim)
    natural: list[torch.Tensor | None] = [None] * (2 * world_size)
    for position, index in enumerate(_zigzag_order(world_size)):
        natural[index] = chunks[position]
    return torch.cat(natural, dim)  # type: ignore[arg-type]
