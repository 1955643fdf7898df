"""Asynchronous K/V movement for sequence-split attention: ring passes, all-gather, reduce-scatter.

Every transfer is started, then waited on only when its result is needed, so the attention block
computed in between overlaps it (on NCCL the transfer runs on the communicator's stream, and
`wait` makes the compute stream wait for it). Works on NCCL (CUDA tensors) and gloo (CPU tensors).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

__all__ = ["Pending", "ring_pass", "start_all_gather", "start_reduce_scatter"]

# torch renamed the single-tensor collectives (all_gather_into_tensor -> all_gather_single); the
# old names still work on the torch versions we support but warn on the newer ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Pending:
    """A started transfer; `wait()` returns its result tensor once the transfer is complete."""

    def __init__(self, works: list[dist.Work], result: torch.Tensor, sent: torch.Tensor | None = None) -> None:
        self._works = works
        self._result = result
        # A tensor being sent must stay alive until its send completes.
        self._sent = sent

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        self._sent = None
        return self._result


def _global_rank(group: ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def ring_pass(tensor: torch.Tensor, group: ProcessGroup | None) -> Pending:
    """Send `tensor` to the next rank of the group and receive the previous rank's (same shape, dtype)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor, _global_rank(group, (rank + 1) % size), group),
        dist.P2POp(dist.irecv, received, _global_rank(group, (rank - 1) % size), group),
    ]
    return Pending(dist.batch_isend_irecv(ops), received, sent=tensor)


# gloo's single-tensor all-gather and reduce-scatter vary across torch releases, so CPU tensors
# take list all-gather and all-reduce. Tests set this to False to run the NCCL code path on gloo
# (which has the single-tensor calls on the torch versions we test).
_GLOO_FALLBACKS = True


def _uses_gloo(tensor: torch.Tensor, group: ProcessGroup | None) -> bool:
    return _GLOO_FALLBACKS and (tensor.device.type == "cpu" or dist.get_backend(group) == "gloo")


def start_all_gather(tensor: torch.Tensor, group: ProcessGroup | None) -> Pending:
    """All-gather `tensor` from every rank; the result is [P, *tensor.shape] in group-rank order."""
    size = dist.get_world_size(group)
    tensor = tensor.contiguous()
    gathered = torch.empty((size, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
    if _uses_gloo(tensor, group):
        work = dist.all_gather(list(gathered.unbind(0)), tensor, group=group, async_op=True)
    else:
        # The concatenated output form (not the stacked one): the form every backend takes.
        work = _all_gather_single(gathered.flatten(0, 1), tensor, group=group, async_op=True)
    return Pending([work], gathered)


def start_reduce_scatter(stacked: torch.Tensor, group: ProcessGroup | None) -> Pending:
    """Sum `stacked` [P, ...] over the group and keep this rank's slice `[rank]` (shape stacked.shape[1:])."""
    rank = dist.get_rank(group)
    stacked = stacked.contiguous()
    if _uses_gloo(stacked, group):
        # All-reduce and keep this rank's slice (CPU only, where the extra traffic does not matter).
        work = dist.all_reduce(stacked, group=group, async_op=True)
        return Pending([work], stacked[rank])
    mine = torch.empty(stacked.shape[1:], dtype=stacked.dtype, device=stacked.device)
    work = _reduce_scatter_single(mine, stacked.flatten(0, 1), group=group, async_op=True)
    return Pending([work], mine)
