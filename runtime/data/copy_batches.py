"""What every micro-batch stream of one data-parallel copy is built from, checked in one place."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False, kw_only=True)
class CopyBatches:
    """The micro-batches data-parallel copy ``copy_index`` of ``dp_size`` trains on.

    The base of ``MicroBatchStream`` (a prepared folder) and ``PackedBatchLoader`` (a data spec):
    both are endless iterators of ``{"input_ids", "labels", ...}`` LongTensors
    ``[micro_batch_size, sequence_length]`` on ``device``, in an order that follows from ``seed``,
    identical on every rank of one copy, with ``state_dict()`` / ``load_state_dict()`` to resume.
    ``device`` is a ``torch.device`` once built. Raises ValueError when ``copy_index`` is not in
    ``[0, dp_size)``.
    """

    micro_batch_size: int  # sequences per micro-batch
    dp_size: int  # data-parallel copies, each reading its own micro-batches
    copy_index: int  # this copy
    seed: int  # of the data order
    device: torch.device | str = "cpu"  # where the micro-batches are delivered
    sequence_length: int | None = None  # tokens per sequence; None: whatever a prepared folder's rows hold

    def __post_init__(self) -> None:
        if not 0 <= self.copy_index < self.dp_size:
            raise ValueError(f"copy_index {self.copy_index} must lie in [0, dp_size={self.dp_size})")
        self.device = torch.device(self.device)

    def __iter__(self) -> CopyBatches:
        return self
