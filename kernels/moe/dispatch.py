"""The experts op split by expert with its tokens split on the same ranks: dispatch and combine by all-to-all.

``moe_experts`` split over the expert dim alone needs every token on every rank of the axis (an
all-gather before it) and leaves a partial sum (a reduce-scatter after it). When the tokens are
split over the same ranks, ``moe_experts_dispatched`` sends each (token, slot) pair's hidden row to
the rank that holds its expert instead, runs that rank's experts on the rows it received (the same
``moe_experts``, grouped products on CUDA, one slot per row), sends the results back, and weights
and sums them per token: the same function of the rank's tokens, with no gathered tokens and no
partial output.

Rank r of the group holds experts ``[r * e_local, (r + 1) * e_local)`` (the planner's equal split
of ``expert_ids``, ``e_local`` of them each). Counts are uneven (routing decides them): each rank
first learns what every rank sends every other (``comm.exchange_counts``), then the rows move with
those split sizes (``comm.token_all_to_all``, whose backward is the same exchange with the counts
transposed: dispatch's gradient goes back like a combine, combine's like a dispatch). The
collectives come from the caller (the runtime's ``comm`` module; kernels do not import the runtime).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .experts import moe_experts


def route_to_ranks(top_k_index: torch.Tensor, experts_per_rank: int, ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the (token, slot) pairs in the order they are sent, each rank's count of them) for ``top_k_index`` [t, k].

    Pairs are flattened row-major (pair p is token ``p // k``, slot ``p % k``) and sorted stably by
    the rank holding their expert; counts is [ranks] int64.
    """
    destination = top_k_index.reshape(-1) // experts_per_rank
    order = torch.argsort(destination, stable=True)
    return order, torch.bincount(destination, minlength=ranks)


def moe_experts_dispatched(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                           expert_ids: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                           gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None, *,
                           group: Any, comm: Any, **options: Any) -> torch.Tensor:
    """``moe_experts`` of this rank's tokens, with the experts split over ``group``: returns [t_local, d].

    ``hidden`` [t_local, d], ``top_k_index`` / ``top_k_weights`` [t_local, k]: this rank's tokens;
    ``expert_ids`` and the weights: this rank's consecutive slice of the experts, rank r's the r-th
    of equal slices. ``comm`` provides ``exchange_counts(send_counts, group)`` and
    ``token_all_to_all(x, counts, group)`` (``dimshard.runtime.comm``). ``options`` are
    ``moe_experts``' keywords. Every rank of ``group`` must call it (the exchanges are collective).
    Differentiable in hidden, the weights and top_k_weights, like ``moe_experts``.
    """
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    experts_per_rank = expert_ids.numel()
    if int(expert_ids[0]) != rank * experts_per_rank:
        raise ValueError(f"moe_experts_dispatched: rank {rank} holds experts from {int(expert_ids[0])}, not "
                         f"{rank * experts_per_rank}: the experts must be split in equal consecutive slices "
                         "in the group's rank order")
    tokens, slots = top_k_index.shape
    order, send = route_to_ranks(top_k_index, experts_per_rank, ranks)
    counts = comm.exchange_counts(send, group)
    token = order // slots
    rows = comm.token_all_to_all(hidden[token], counts, group)
    row_experts = comm.token_all_to_all(top_k_index.reshape(-1)[order], counts, group)
    # Each received row is one pair: its expert's output, unweighted (the weight stays with the token).
    results = moe_experts(rows, row_experts[:, None], rows.new_ones(rows.shape[0], 1), expert_ids, gate_up_proj,
                          down_proj, gate_up_bias, down_bias, **options)
    back = comm.token_all_to_all(results, [list(column) for column in zip(*counts)], group)
    weighted = back * top_k_weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden).index_add(0, token, weighted.to(hidden.dtype))
