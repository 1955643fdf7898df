"""A prepared token folder (``datasets.save_to_disk``) and its deterministic, resumable micro-batch stream.

Sample order: epoch ``e`` visits the dataset in the order ``epoch_permutation(n, seed, e)``.
The stream is cut into rounds of ``dp_size * micro_batch_size`` sequences; in each round copy
``c`` takes the ``c``-th micro-batch (so copy ``c`` takes every ``dp_size``-th micro-batch).
A final partial round of an epoch is dropped. The state is ``(epoch, position)`` with
``position`` counted in sequences, so it does not depend on the layout: a run resumed under
another dp_size (same global batch) continues with the same sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .copy_batches import CopyBatches


def load_token_dataset(path: str, sequence_length: int | None = None) -> Any:
    """Open a ``datasets.save_to_disk`` folder holding an ``input_ids`` column of equal-length rows.

    Returns the ``datasets.Dataset`` (formatted as torch tensors). ``sequence_length``, when
    given, must equal the rows' length (checked on the first row here and on every batch later).
    Raises FileNotFoundError / ValueError saying what to do when the path is missing, holds a
    DatasetDict, lacks ``input_ids`` or has the wrong sequence length.
    """
    import datasets  # optional dependency (dimshard[data]); only data loading needs it

    if not Path(path).exists():
        raise FileNotFoundError(
            f"dataset path {path} does not exist: create it with examples/llama3_128k/bookcorpus.py "
            "--save_path <dir>, or pass the folder written there with --dataset_path"
        )
    try:
        dataset = datasets.load_from_disk(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"{path} is not a dataset saved by datasets.save_to_disk ({error}); create it with "
            "examples/llama3_128k/bookcorpus.py"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{path} holds a DatasetDict with splits {list(dataset)}; point --dataset_path at "
                         f"one split's folder (e.g. {path}/train)")
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"dataset {path} has no input_ids column (columns: {dataset.column_names}); "
                         "tokenize it with examples/llama3_128k/bookcorpus.py")
    if len(dataset) == 0:
        raise ValueError(f"dataset {path} is empty")
    dataset = dataset.with_format("torch", columns=["input_ids"])
    length = len(dataset[0]["input_ids"])
    if sequence_length is not None and length != sequence_length:
        raise ValueError(
            f"dataset {path} holds sequences of {length} tokens but the compiled model expects "
            f"{sequence_length}: recompile with --sequence_length {length}, or re-run bookcorpus.py with "
            f"--sequence_length {sequence_length}"
        )
    return dataset


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order (LongTensor of dataset indices) in which epoch ``epoch`` visits the samples."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


@dataclass(eq=False)
class MicroBatchStream(CopyBatches):
    """Endless iterator of micro-batches of a prepared folder for one copy (see the module docstring).

    Built as ``MicroBatchStream(dataset, micro_batch_size=..., dp_size=..., copy_index=...,
    seed=..., device="cpu", sequence_length=None)`` (the fields of ``CopyBatches``). Each item is
    ``{"input_ids": LongTensor[micro_batch_size, sequence_length], "labels": the same tensor}`` on
    ``device`` (labels unshifted, Hugging Face convention). All ranks of one copy receive identical
    batches. ``state_dict()`` after ``k`` items equals that of every other rank.
    """

    dataset: Any

    def __post_init__(self) -> None:
        super().__post_init__()
        self.round_size = self.micro_batch_size * self.dp_size
        if len(self.dataset) < self.round_size:
            raise ValueError(
                f"the dataset has {len(self.dataset)} sequences, fewer than one round of micro_batch_size "
                f"{self.micro_batch_size} x {self.dp_size} data-parallel copies; use a larger dataset or smaller "
                "batch"
            )
        self.epoch = 0
        self.position = 0
        self._order = epoch_permutation(len(self.dataset), self.seed, 0)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position", "seed"}``: where the next round starts (position in sequences)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state; the seed must match the one this stream was built with."""
        if "epoch" not in state:
            raise ValueError("the checkpoint was trained on a data spec (--data_sources), not a prepared folder: "
                             "resume with the same --data_sources flags")
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"the checkpoint's data order used seed {state['seed']} but this run uses "
                             f"{self.seed}; pass --seed {state['seed']} to resume the same order")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = epoch_permutation(len(self.dataset), self.seed, self.epoch)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position + self.round_size > len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = epoch_permutation(len(self.dataset), self.seed, self.epoch)
        start = self.position + self.copy_index * self.micro_batch_size
        indices = self._order[start:start + self.micro_batch_size].tolist()
        self.position += self.round_size
        rows = self.dataset[indices]["input_ids"]
        input_ids = rows if isinstance(rows, torch.Tensor) else torch.stack([torch.as_tensor(r) for r in rows])
        if input_ids.dim() != 2:
            raise ValueError(f"dataset rows at indices {indices} do not all have the same length")
        if self.sequence_length is not None and input_ids.shape[1] != self.sequence_length:
            raise ValueError(f"dataset rows at indices {indices} have {input_ids.shape[1]} tokens, the compiled "
                             f"model expects {self.sequence_length}; re-tokenize or recompile")
        input_ids = input_ids.to(device=self.device, dtype=torch.long, non_blocking=True)
        return {"input_ids": input_ids, "labels": input_ids}

