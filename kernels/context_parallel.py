"""Sequence-split causal attention (context parallelism) over one process group, zigzag layout.

Each rank of the group holds its shard of query, key and value in the zigzag layout
(`kernels/sequence_split/layout.py`: the sequence in 2P chunks, rank i holds chunks i and 2P-1-i,
concatenated) and gets back its shard of causal attention over the whole sequence. The work is
split into blocks (`rank_blocks`, `gathered_blocks`), each computed by a fused kernel that also
returns its log-sum-exp (`kernels/sequence_split/blocks.py`: cuDNN, flash, or plain PyTorch on
CPU), and merged through the log-sum-exp; the backward runs each block's fused backward against
the merged output and log-sum-exp. Two ways to bring K/V to the queries:

- "ring": K/V shards travel around the ring (P-1 passes), each pass overlapped with the
  previous block's compute; the backward passes K/V again and the fp32 dK/dV accumulators one
  step behind them (P passes), so they arrive back at their owner complete. Never holds more
  than two K/V shards.
- "allgather": one all-gather of K/V, overlapped with the rank's own causal block, then two
  large blocks on the gathered sequence; the backward gathers again and reduce-scatters dK/dV.
  Holds the whole sequence's K/V (and fp32 dK/dV in the backward) for the duration of the op.

Both move the same bytes. "ring" is the default: its transfers hide behind compute within a node
and across nodes, and it holds the least memory; "allgather" runs 1% less compute at P=8 (3 blocks
per rank instead of P) but exposes its final reduce-scatter, and across nodes its gather too.
Measured on one H200 (benchmarks/context_parallel_blocks.py, 128K tokens, Llama-3-8B heads,
bf16): every block of an 8-way split, forward and backward, takes 1.045x (ring) and 1.035x
(allgather) one monolithic cuDNN causal call. docs/context_parallel.md ("Cost") has
the arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.distributed import ProcessGroup

from .sequence_split.blocks import BlockRunner, choose_backend, empty_accumulators, strided_like
from .sequence_split.comm import ring_pass, start_all_gather, start_reduce_scatter
from .sequence_split.layout import (
    as_blhe,
    check_zigzag_length,
    gathered_blocks,
    pack_kv,
    rank_blocks,
    unpack_kv,
    zigzag_indices,
    zigzag_inverse_permutation,
    zigzag_permutation,
)

__all__ = [
    "METHODS",
    "check_zigzag_length",
    "sequence_split_attention",
    "zigzag_indices",
    "zigzag_inverse_permutation",
    "zigzag_permutation",
]

METHODS = ("ring", "allgather")
Tensor = torch.Tensor
# What the backward reads of the forward, per rank: (q, out, lse, dout) in the fused kernels' layout.
Saved = tuple[Tensor, Tensor, Tensor, Tensor]


def _ring_forward(
    blocks: BlockRunner, q: Tensor, kv: Tensor, out: Tensor, lse: Tensor, group: ProcessGroup | None, rank: int,
    size: int,
) -> None:
    current = kv
    for step, block in enumerate(rank_blocks(rank, size, q.shape[2])):
        incoming = ring_pass(current, group) if step < size - 1 else None
        blocks.forward(block, q, current, out, lse)
        if incoming is not None:
            current = incoming.wait()


def _ring_backward(
    blocks: BlockRunner, saved: Saved, kv: Tensor, dq: Tensor, group: ProcessGroup | None, rank: int, size: int
) -> Tensor:
    current, dkv_incoming = kv, None
    for step, block in enumerate(rank_blocks(rank, size, dq.shape[2])):
        kv_incoming = ring_pass(current, group) if step < size - 1 else None
        # The accumulator for this K/V block arrives from the rank that used it one step earlier.
        dkv = torch.zeros_like(kv, dtype=dq.dtype) if dkv_incoming is None else dkv_incoming.wait()
        blocks.backward(block, saved, current, dq, dkv)
        if size > 1:
            dkv_incoming = ring_pass(dkv, group)
        if kv_incoming is not None:
            current = kv_incoming.wait()
    # After P passes each accumulator is back at the rank that owns its K/V.
    return dkv if dkv_incoming is None else dkv_incoming.wait()


def _gather_forward(
    blocks: BlockRunner, q: Tensor, kv: Tensor, out: Tensor, lse: Tensor, group: ProcessGroup | None, rank: int,
    size: int,
) -> None:
    own, *others = gathered_blocks(rank, size, q.shape[2])
    gathering = start_all_gather(kv, group) if size > 1 else None
    blocks.forward(own, q, kv, out, lse)
    if gathering is not None:
        blocks.forward_on_gathered(others, q, gathering.wait(), out, lse)


def _gather_backward(
    blocks: BlockRunner, saved: Saved, kv: Tensor, dq: Tensor, group: ProcessGroup | None, rank: int, size: int
) -> Tensor:
    own, *others = gathered_blocks(rank, size, dq.shape[2])
    gathering = start_all_gather(kv, group) if size > 1 else None
    dkv_own = torch.zeros_like(kv, dtype=dq.dtype)
    blocks.backward(own, saved, kv, dq, dkv_own)
    if gathering is None:
        return dkv_own
    stacked = blocks.backward_on_gathered(others, saved, gathering.wait(), dq)
    stacked[rank] += dkv_own
    return start_reduce_scatter(stacked, group).wait()


class _SequenceSplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
        group: ProcessGroup | None,
        method: str,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        q, kv = as_blhe(query), pack_kv(key, value)
        out, lse = empty_accumulators(q)
        blocks = BlockRunner(backend, scale)
        run = _ring_forward if method == "ring" else _gather_forward
        run(blocks, q, kv, out, lse, group, rank, size)
        out = out.to(query.dtype)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.setup = (scale, group, method, backend, rank, size, key.dtype, value.dtype)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_out: Tensor | None, grad_lse: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None, None]:
        q, kv, out, lse = ctx.saved_tensors
        scale, group, method, backend, rank, size, key_dtype, value_dtype = ctx.setup
        if grad_out is None:  # only the (non-differentiable) lse was used
            return None, None, None, None, None, None, None
        # The fused backward ops read dout in the layout of out.
        dout = strided_like(grad_out.to(out.dtype), out)
        dq = torch.zeros_like(q, dtype=lse.dtype)
        run = _ring_backward if method == "ring" else _gather_backward
        dkv = run(BlockRunner(backend, scale), (q, out, lse, dout), kv, dq, group, rank, size)
        dk, dv = unpack_kv(dkv)
        return dq.to(q.dtype), dk.to(key_dtype), dv.to(value_dtype), None, None, None, None


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, method: str, size: int) -> None:
    name = "sequence_split_attention"
    if method not in METHODS:
        raise ValueError(f"{name}: unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"{name}: query, key and value must be [batch, heads, local_len, head_dim], got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[2:] != query.shape[2:]:
        raise ValueError(
            f"{name}: key and value must be [batch, kv_heads, local_len, head_dim] like the query "
            f"{tuple(query.shape)}, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{name}: {query.shape[1]} query heads are not a multiple of {key.shape[1]} K/V heads")
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(f"{name}: query, key and value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})")
    if size > 1:
        check_zigzag_length(query.shape[2] * size, size)


def sequence_split_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None = None,
    group: ProcessGroup | None = None,
    method: str = "ring",
    backend: str | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over a sequence split across `group` in the zigzag layout; this rank's output shard.

    query [b, hq, l, e], key/value [b, hk, l, e] are this rank's shards (l = L / P local
    positions `zigzag_indices(L, P, rank)`); hq must be a multiple of hk (GQA: query head h uses
    K/V head h // (hq / hk)); K/V are never repeated. `scale` defaults to 1/sqrt(e). `method` is
    "ring" or "allgather" (same result; see the module docstring); `backend` forces "cudnn",
    "flash" or "math" for the blocks (default: the fastest that works here). Returns out
    [b, hq, l, e] in the query's dtype, equal to this rank's rows of causal attention over the
    whole unsplit sequence, and with `return_lse` also its log-sum-exp [b, hq, l] (fp32, float64
    for float64 inputs; natural log of the sum of exp(scale * q.k) over visible keys; not
    differentiable). Differentiable in query, key and value; their gradients come back as the
    same zigzag shards. `group` None is the default process group; a group of one rank is plain
    causal attention. ValueError if L = l * P does not split into 2P equal chunks.
    """
    size = dist.get_world_size(group)
    _check_inputs(query, key, value, method, size)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    backend = choose_backend(query, key, backend)
    out, lse = _SequenceSplitAttention.apply(query, key, value, scale, group, method, backend)
    return (out, lse) if return_lse else out
