"""Every rank's blocks of a P-way sequence split, computed in one process without a process group.

The same blocks, merges and accumulations as `sequence_split_attention` runs on each rank (the
same `BlockRunner` and block schedules), with the transfers replaced by reading the other ranks'
shards directly: what the block benchmark times and what tests compare on one device. The
all-gather path starts from the stacked shards (what the all-gather delivers) and pays its own
reorder into natural order per rank, as a real rank does; the reduce-scatter's sum is an add.
"""

from __future__ import annotations

import torch

from .blocks import BlockRunner, accumulator_dtype, empty_accumulators, strided_like
from .layout import (
    KV_SEQ_DIM,
    as_blhe,
    gathered_blocks,
    pack_kv,
    rank_blocks,
    unpack_kv,
    zigzag_indices,
)
from .reorder import from_zigzag

__all__ = ["SimulatedSplit"]


class SimulatedSplit:
    """The zigzag shards of one sequence for `world_size` ranks, and their attention blocks run in turn.

    query [b, hq, L, e], key/value [b, hk, L, e] and grad_out [b, hq, L, e] are the whole
    sequence in natural order; each rank's shard is copied once here, outside anything timed.
    """

    def __init__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        grad_out: torch.Tensor,
        world_size: int,
        backend: str,
        scale: float,
    ) -> None:
        self.world_size = world_size
        self.dtype = query.dtype
        self.runner = BlockRunner(backend, scale)
        seq_len = query.shape[2]
        self.q, self.kv, self.dout = [], [], []
        for rank in range(world_size):
            positions = zigzag_indices(seq_len, world_size, rank).to(query.device)
            self.q.append(as_blhe(query.index_select(2, positions)))
            self.kv.append(pack_kv(key.index_select(2, positions), value.index_select(2, positions)))
            self.dout.append(as_blhe(grad_out.index_select(2, positions)))
        self.gathered = torch.stack(self.kv)

    def forward(self, method: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each rank's (out [b, hq, l, e] in the input dtype, lse [b, hq, l]) by `method` ("ring" or "allgather")."""
        results = []
        for rank, q in enumerate(self.q):
            out, lse = empty_accumulators(q)
            if method == "ring":
                for block in rank_blocks(rank, self.world_size, q.shape[2]):
                    self.runner.forward(block, q, self.kv[block.source], out, lse)
            else:
                own, *others = gathered_blocks(rank, self.world_size, q.shape[2])
                self.runner.forward(own, q, self.kv[rank], out, lse)
                self.runner.forward_on_gathered(others, q, self.gathered, out, lse)
            results.append((out.to(self.dtype), lse))
        return results

    def backward(
        self, method: str, outputs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each rank's dq [b, hq, l, e] and packed dK/dV [2, b, l, hk, e] (accumulator dtype) from `forward`'s outputs."""
        acc_dtype = accumulator_dtype(self.dtype)
        dqs = []
        if method == "ring":
            dkvs = [torch.zeros_like(kv, dtype=acc_dtype) for kv in self.kv]
        else:
            reduced = torch.zeros_like(self.gathered, dtype=acc_dtype)
        for rank, (q, (out, lse)) in enumerate(zip(self.q, outputs)):
            saved = (q, out, lse, strided_like(self.dout[rank], out))
            dq = torch.zeros_like(q, dtype=acc_dtype)
            if method == "ring":
                for block in rank_blocks(rank, self.world_size, q.shape[2]):
                    self.runner.backward(block, saved, self.kv[block.source], dq, dkvs[block.source])
            else:
                own, *others = gathered_blocks(rank, self.world_size, q.shape[2])
                dkv_own = torch.zeros_like(self.kv[rank], dtype=acc_dtype)
                self.runner.backward(own, saved, self.kv[rank], dq, dkv_own)
                if others:
                    reduced += self.runner.backward_on_gathered(others, saved, self.gathered, dq)
                reduced[rank] += dkv_own
            dqs.append(dq)
        if method != "ring":
            dkvs = list(reduced.unbind(0))
        return dqs, dkvs

    def natural_order(self, per_rank: list[torch.Tensor], seq_dim: int = 2) -> torch.Tensor:
        """The whole sequence in natural order from every rank's shard (sequence on `seq_dim`)."""
        # The shards in rank order are the sequence in zigzag order.
        return from_zigzag(torch.cat(per_rank, dim=seq_dim), seq_dim, self.world_size)

    def gradients(
        self, dqs: list[torch.Tensor], dkvs: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dq, dk, dv over the whole sequence in natural order ([b, h, L, e]) from `backward`'s results."""
        dk, dv = unpack_kv(self.natural_order(dkvs, KV_SEQ_DIM))
        return self.natural_order(dqs), dk, dv
