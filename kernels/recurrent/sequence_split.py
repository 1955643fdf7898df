"""Recurrent layers over a sequence split across the ranks of a process group: states pass rank to rank.

Each rank holds equal chunks of the sequence: one contiguous piece (``contiguous``), or the zigzag
layout of sequence-split softmax attention (``zigzag``: chunks i and 2P-1-i), so a hybrid's softmax
and recurrent layers share one layout; a linear recurrence costs the same per token everywhere, so
either is balanced. For the chunked
recurrence (``chunked.py``) the state after a rank's piece is affine in the state before it,
``S_out = M S_in + S_own``, and so are its outputs, ``o = o_own + Q S_in``: value channels are
independent, so one local run with the values widened by dk zero channels and the initial state
``[0 | I]`` gives ``o_own`` and ``Q`` (outputs), ``S_own`` and ``M`` (final state) at once. One
all-gather of every rank's ``[M | S_own]`` (dk x (dk + dv) per head, independent of the sequence
length) lets each rank fold its predecessors' transitions into its incoming state and add ``Q S_in``
to its outputs; autograd runs the gather's backward (a reduce-scatter of the state gradients).

The same holds per chunk: a rank runs all its chunks in one local call (stacked along the batch) and
the fold runs over the chunks in sequence order. A causal convolution needs the k - 1 inputs before
each chunk: the previous chunk's last k - 1 tokens (the halo), gathered the same way; the first chunk
uses zeros (or the given initial state).
docs/design.md, "Recurrent layers", describes the form.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .chunked import Recurrence, chunked_recurrence
from .conv import causal_conv1d_reference
from .delta_rule import gated_delta_rule_reference
from .linear_attention import gated_linear_attention_reference
from .selective_scan import selective_scan_reference
from .ssd import state_space_dual_reference


def _all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return pieces


def chunk_ids(rank: int, ranks: int, layout: str) -> list[int]:
    """The global indices of the sequence chunks a rank holds, in its local order.

    ``contiguous``: P chunks, rank i holds chunk i. ``zigzag`` (the layout of sequence-split softmax
    attention, ``kernels/sequence_split/layout.py``): 2P chunks, rank i holds chunks i and 2P-1-i.
    """
    if layout == "contiguous":
        return [rank]
    if layout == "zigzag":
        return [rank, 2 * ranks - 1 - rank]
    raise ValueError(f"layout must be 'contiguous' or 'zigzag', got {layout!r}")


def _by_chunk(pieces: list[torch.Tensor], layout: str) -> dict[int, torch.Tensor]:
    """Every rank's per-chunk pieces ([n, ...] each) keyed by global chunk index."""
    ranks = len(pieces)
    return {cid: piece[j] for r, piece in enumerate(pieces) for j, cid in enumerate(chunk_ids(r, ranks, layout))}


def _fold(pieces: list[torch.Tensor], incoming: torch.Tensor, rank: int, layout: str,
          value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the state before each of ``rank``'s chunks [n, ...], the state after the last chunk) from every rank's
    per-chunk ``[S_own | M]``, folded in sequence order."""
    chunks = _by_chunk(pieces, layout)
    before = {}
    for cid in range(len(chunks)):
        before[cid] = incoming
        incoming = chunks[cid][..., value_dim:] @ incoming + chunks[cid][..., :value_dim]
    mine = chunk_ids(rank, len(pieces), layout)
    return torch.stack([before[cid] for cid in mine]), incoming


class _StatesAround(torch.autograd.Function):
    """The state before each of this rank's chunks and the final state, from every rank's per-chunk
    ``[S_own | M]`` (one all-gather).

    Every rank's outputs depend on its incoming states, so every rank runs the backward: it
    recomputes the fold for the gradients of each rank's pieces and all-reduces them (gloo has no
    reduce-scatter; a piece is dk x (dk + dv) per head and chunk, independent of the sequence length).
    """

    @staticmethod
    def forward(ctx: Any, own: torch.Tensor, incoming: torch.Tensor, group: dist.ProcessGroup | None,
                layout: str, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        pieces = _all_gather(own, group)
        ctx.group, ctx.layout, ctx.value_dim, ctx.rank = group, layout, value_dim, dist.get_rank(group)
        ctx.save_for_backward(incoming, *pieces)
        return _fold(pieces, incoming, ctx.rank, layout, value_dim)

    @staticmethod
    def backward(ctx: Any, grad_before: torch.Tensor, grad_final: torch.Tensor) -> tuple[Any, ...]:
        incoming, *pieces = (t.detach().requires_grad_(True) for t in ctx.saved_tensors)
        with torch.enable_grad():
            before, final = _fold(pieces, incoming, ctx.rank, ctx.layout, ctx.value_dim)
            grads = torch.autograd.grad([before, final], [incoming, *pieces], [grad_before, grad_final],
                                        allow_unused=True)
        stacked = torch.stack([torch.zeros_like(p) if g is None else g for p, g in zip(pieces, grads[1:])])
        dist.all_reduce(stacked, group=ctx.group)
        return stacked[ctx.rank], grads[0], None, None, None


def _halos(tails: list[torch.Tensor], rank: int, layout: str, halo: int) -> torch.Tensor:
    """The ``halo`` inputs just before each of ``rank``'s chunks [n, b, d, halo], from every rank's per-chunk
    tails [n, b, d, t] (t = min(halo, chunk length)): the tails of all earlier chunks in sequence order,
    zeros before the first token."""
    chunks = _by_chunk(tails, layout)
    first = chunks[0]
    stream = torch.cat([first.new_zeros(*first.shape[:-1], halo)] + [chunks[c] for c in range(len(chunks))], -1)
    width = first.shape[-1]  # a chunk shorter than the halo is its own tail: the stream is the whole sequence
    return torch.stack([stream[..., halo + cid * width - halo: halo + cid * width]
                        for cid in chunk_ids(rank, len(tails), layout)])


class _HalosBefore(torch.autograd.Function):
    """For each of this rank's chunks, the ``halo`` inputs just before it in the sequence (zeros before the
    first token), from every rank's chunk tails (one all-gather). A chunk shorter than the halo reaches
    back over several chunks. The backward recomputes the cut for every rank's tails and all-reduces
    their gradients (a tail is ``halo`` tokens per chunk, independent of the sequence length)."""

    @staticmethod
    def forward(ctx: Any, tails: torch.Tensor, group: dist.ProcessGroup | None, layout: str,
                halo: int) -> torch.Tensor:
        pieces = _all_gather(tails, group)
        ctx.group, ctx.layout, ctx.halo, ctx.rank = group, layout, halo, dist.get_rank(group)
        ctx.save_for_backward(*pieces)
        return _halos(pieces, ctx.rank, layout, halo)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        pieces = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        with torch.enable_grad():
            grads = torch.autograd.grad(_halos(pieces, ctx.rank, ctx.layout, ctx.halo), pieces, grad)
        stacked = torch.stack(grads)
        dist.all_reduce(stacked, group=ctx.group)
        return stacked[ctx.rank], None, None, None


def _parts(x: torch.Tensor | None, count: int, dim: int) -> torch.Tensor | None:
    """A rank's local tensor cut into its ``count`` chunks along ``dim``, stacked along the batch dim."""
    return None if x is None else torch.cat(x.chunk(count, dim), dim=0)


def split_recurrence(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gates: torch.Tensor | None,
                     beta: torch.Tensor | None, group: dist.ProcessGroup | None,
                     initial_state: torch.Tensor | None = None, chunk_size: int = 64,
                     layout: str = "contiguous") -> tuple[torch.Tensor, torch.Tensor]:
    """``chunked_recurrence`` of the whole sequence, each rank passing the chunks ``layout`` gives it
    ([b, h, l/P, *] inputs, its chunks concatenated in its local order; ``chunk_ids``).

    Returns this rank's outputs [b, h, l/P, dv] (local order) and the state after the whole sequence
    [b, h, dk, dv] (the same on every rank). ``initial_state`` is the state before the sequence (zeros if None).
    """
    batch, heads, _, key_dim = key.shape
    value_dim = value.shape[-1]
    count = len(chunk_ids(dist.get_rank(group), dist.get_world_size(group), layout))
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    widened = torch.cat([value.to(dtype), value.new_zeros(*value.shape[:-1], key_dim, dtype=dtype)], dim=-1)
    eye = torch.eye(key_dim, dtype=dtype, device=key.device).expand(count * batch, heads, key_dim, key_dim)
    start = torch.cat([key.new_zeros(count * batch, heads, key_dim, value_dim, dtype=dtype), eye], dim=-1)
    out, final = chunked_recurrence(_parts(query, count, 2), _parts(key, count, 2), _parts(widened, count, 2),
                                    _parts(gates, count, 2), _parts(beta, count, 2), start, chunk_size)
    incoming = (initial_state.to(dtype) if initial_state is not None
                else key.new_zeros(batch, heads, key_dim, value_dim, dtype=dtype))
    own = final.unflatten(0, (count, batch))
    before, after_all = _StatesAround.apply(own, incoming, group, layout, value_dim)
    out = out.unflatten(0, (count, batch))
    result = out[..., :value_dim] + out[..., value_dim:] @ before  # [n, b, h, c, dv]
    return torch.cat(result.unbind(0), dim=2), after_all


def split_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        initial_state: torch.Tensor | None = None, *, activation: str | None = None,
                        group: dist.ProcessGroup | None = None, layout: str = "contiguous") -> torch.Tensor:
    """``causal_conv1d`` of the whole sequence, each rank passing the chunks ``layout`` gives it, x [b, d, l/P].

    The k - 1 inputs before each chunk come from the chunks before it, on the ranks that hold them
    (the halo; a chunk shorter than k - 1 tokens reaches back over several); the sequence's first
    token is preceded by ``initial_state`` [b, d, k - 1] or zeros. Returns this rank's outputs
    [b, d, l/P] in its local order.
    """
    halo = weight.shape[-1] - 1
    if halo == 0:
        return causal_conv1d_reference(x, weight, bias, None, activation)
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    count = len(chunk_ids(rank, ranks, layout))
    parts = x.chunk(count, dim=-1)
    tails = torch.stack([p[..., max(0, p.shape[-1] - halo):] for p in parts])
    before = _HalosBefore.apply(tails, group, layout, halo)
    if initial_state is not None:  # the first chunk's halo reaches back into the state before the sequence
        offsets = [cid * parts[0].shape[-1] for cid in chunk_ids(rank, ranks, layout)]
        start = torch.cat([initial_state.to(before.dtype), before.new_zeros(*before.shape[1:-1], max(offsets))], -1)
        before = before + torch.stack([start[..., o:o + halo] for o in offsets])
    out = causal_conv1d_reference(torch.cat(parts, dim=0), weight, bias, torch.cat(before.unbind(0), dim=0),
                                  activation)
    return torch.cat(out.chunk(count, dim=0), dim=-1)


def _passing_states(group: dist.ProcessGroup | None, layout: str) -> Recurrence:
    """``split_recurrence`` over ``group`` in the signature of ``chunked_recurrence``."""
    def recurrence(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gates: torch.Tensor | None,
                   beta: torch.Tensor | None, initial_state: torch.Tensor | None,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return split_recurrence(query, key, value, gates, beta, group, initial_state, chunk_size, layout)
    return recurrence


def _with_state(result: tuple[torch.Tensor, torch.Tensor], output_final_state: bool) -> Any:
    return result if output_final_state else result[0]


def split_gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor | None,
                           beta: torch.Tensor, initial_state: torch.Tensor | None = None, *, scale: float | None = None,
                           use_qk_l2norm: bool = False, chunk_size: int = 64, output_final_state: bool = False,
                           group: dist.ProcessGroup | None = None, layout: str = "contiguous") -> Any:
    """``gated_delta_rule`` (same arguments) with the sequence (dim 1) split over ``group`` in ``layout``:
    this rank's output and, with ``output_final_state``, the state after the whole sequence (every rank)."""
    return _with_state(gated_delta_rule_reference(query, key, value, g, beta, initial_state, scale, use_qk_l2norm,
                                                  chunk_size, recurrence=_passing_states(group, layout)),
                       output_final_state)


def split_gated_linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 g: torch.Tensor | None = None, initial_state: torch.Tensor | None = None, *,
                                 scale: float | None = None, chunk_size: int = 64, output_final_state: bool = False,
                                 group: dist.ProcessGroup | None = None, layout: str = "contiguous") -> Any:
    """``gated_linear_attention`` (same arguments) with the sequence (dim 1) split over ``group`` in ``layout``:
    this rank's output and, with ``output_final_state``, the state after the whole sequence (every rank)."""
    return _with_state(gated_linear_attention_reference(query, key, value, g, initial_state, scale, chunk_size,
                                                        recurrence=_passing_states(group, layout)), output_final_state)


def split_state_space_dual(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                           D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                           initial_state: torch.Tensor | None = None, *, chunk_size: int = 64,
                           dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, float("inf")),
                           output_final_state: bool = False, group: dist.ProcessGroup | None = None,
                           layout: str = "contiguous") -> Any:
    """``state_space_dual`` (same arguments) with the sequence (dim 1) split over ``group`` in ``layout``:
    this rank's y and, with ``output_final_state``, the state after the whole sequence (every rank)."""
    return _with_state(state_space_dual_reference(x, dt, A, B, C, D, dt_bias, initial_state, chunk_size, dt_softplus,
                                                  dt_limit, recurrence=_passing_states(group, layout)),
                       output_final_state)


def split_selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                         delta_bias: torch.Tensor | None = None, initial_state: torch.Tensor | None = None, *,
                         delta_softplus: bool = False, chunk_size: int = 16, output_final_state: bool = False,
                         group: dist.ProcessGroup | None = None, layout: str = "contiguous") -> Any:
    """``selective_scan`` (same arguments) with the sequence (the last dim) split over ``group`` in ``layout``:
    this rank's y and, with ``output_final_state``, the state after the whole sequence (every rank)."""
    return _with_state(selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                                chunk_size, recurrence=_passing_states(group, layout)),
                       output_final_state)
