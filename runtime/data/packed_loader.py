"""Micro-batches of packed sequences from a data spec, built ahead of the training loop.

A background thread runs this copy's ``PackedSequenceStream`` (reading, mixing, packing) and keeps
``prefetch`` micro-batches ready in a queue; ``workers`` spawned processes tokenize batches of
documents in parallel, in order (worker count never changes the tokens). The loop's ``next()``
only takes a finished micro-batch and copies it to the device (pinned memory, non-blocking).

Each queued micro-batch carries the stream state after it, so ``state_dict()`` is exactly the
state after the last micro-batch the loop took, however far the thread has read ahead.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import KW_ONLY, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .copy_batches import CopyBatches
from .packed_stream import PackedSequenceStream, labels_for, tokenize_texts
from .spec import DataSpec, load_tokenizer

STATE_KIND = "packed_stream"

_worker_tokenizer: tuple[Any, int | None, int] | None = None


def _init_worker(tokenizer_name: str, add_bos: bool) -> None:
    global _worker_tokenizer
    # One thread per worker: the workers are the parallelism, and nested thread pools oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = load_tokenizer(tokenizer_name)
    _worker_tokenizer = (tokenizer, tokenizer.bos_token_id if add_bos else None, tokenizer.eos_token_id)


def _tokenize_in_worker(texts: list[str]) -> list[np.ndarray]:
    tokenizer, bos, eos = _worker_tokenizer
    return tokenize_texts(tokenizer, texts, bos, eos)


def _pool_tokenizer(pool: Any, depth: int) -> Any:
    """A ``tokenize`` for PackedSequenceStream that keeps ``depth`` batches in flight on ``pool``."""
    def tokenize(text_batches: Iterator[list[str]]) -> Iterator[list[np.ndarray]]:
        pending: deque = deque()
        for texts in text_batches:
            pending.append(pool.submit(_tokenize_in_worker, texts))
            if len(pending) >= depth:
                yield pending.popleft().result()

    return tokenize


def collate(sequences: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack packed sequences into a micro-batch: input_ids, labels (and position_ids, document_ids)."""
    batch = {key: torch.from_numpy(np.stack([seq[key] for seq in sequences]).astype(np.int64))
             for key in sequences[0]}
    positions = batch.get("position_ids")
    batch["labels"] = torch.from_numpy(labels_for(batch["input_ids"].numpy(),
                                                  None if positions is None else positions.numpy()))
    return batch


def initial_state(num_sources: int) -> dict[str, Any]:
    """The state of a stream that has produced nothing yet."""
    return {"draws": 0, "sources": [{"epoch": 0, "position": 0} for _ in range(num_sources)], "offset": 0}


@dataclass(eq=False)
class PackedBatchLoader(CopyBatches):
    """Endless micro-batches of this copy's packed sequences; a drop-in for ``MicroBatchStream``.

    Built as ``PackedBatchLoader(spec, micro_batch_size=..., dp_size=..., copy_index=..., seed=...,
    device="cpu", sequence_length=..., workers=1, prefetch=4)``: the fields of ``CopyBatches``, with
    ``sequence_length`` required. Items are ``{"input_ids", "labels"}`` (plus ``position_ids``,
    ``document_ids`` under document masking), LongTensors [micro_batch_size, sequence_length] on
    ``device``. Every rank of a copy gets the same batches; copies read disjoint documents.
    ``state_dict()`` gathers every copy's state (a collective when torch.distributed runs: call it on
    every rank), so the saved state is the same on all ranks; ``load_state_dict`` picks this copy's.
    ``workers`` 0 tokenizes in the loader thread. Call ``close()`` when done (stops the thread and
    the workers).
    """

    spec: DataSpec
    _: KW_ONLY
    workers: int = 1  # tokenizer processes
    prefetch: int = 4  # micro-batches kept ready

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sequence_length is None:
            raise ValueError("a data spec needs a sequence length: pass --sequence_length")
        if self.workers < 0 or self.prefetch < 1:
            raise ValueError(f"workers must be >= 0 and prefetch >= 1, got {self.workers} and {self.prefetch}")
        self._state = initial_state(len(self.spec.sources))  # after the last micro-batch taken
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- state ------------------------------------------------------------------------------------
    def local_state(self) -> dict[str, Any]:
        """This copy's stream state after the last micro-batch taken."""
        return self._state

    def state_dict(self) -> dict[str, Any]:
        """``{"kind", "seed", "dp_size", "sequence_length", "copies": [state of copy c]}`` (collective).

        Without torch.distributed only this copy's entry is known; the others are None.
        """
        copies = {self.copy_index: self._state}
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.copy_index, self._state))
            copies = dict(gathered)
        return {"kind": STATE_KIND, "seed": self.seed, "dp_size": self.dp_size,
                "sequence_length": self.sequence_length, "copies": [copies.get(c) for c in range(self.dp_size)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where a saved ``state_dict()`` left off; the layout of the data must match."""
        if state.get("kind") != STATE_KIND:
            raise ValueError("the checkpoint was trained on a prepared --dataset_path, not a data spec: resume "
                             "with the same --dataset_path")
        for key, mine in (("seed", self.seed), ("dp_size", self.dp_size), ("sequence_length", self.sequence_length)):
            if int(state[key]) != mine:
                flag = {"seed": "--seed", "dp_size": "--runtime_ngpus / --plan_ngpus",
                        "sequence_length": "--sequence_length"}[key]
                raise ValueError(f"the checkpoint's data stream has {key} {state[key]} but this run has {mine}: "
                                 f"resume with the same {flag} to continue the same token stream")
        if state["copies"][self.copy_index] is None:
            raise ValueError(f"the checkpoint's data state has no entry for data-parallel copy {self.copy_index}")
        self.close()
        self._state = state["copies"][self.copy_index]

    # -- producing --------------------------------------------------------------------------------
    def _produce(self, start: dict[str, Any], out: queue.Queue, stop: threading.Event) -> None:
        pool = None
        try:
            tokenize = None
            if self.workers:
                # spawn, not fork: the parent holds torch and tokenizer threads. A worker that dies
                # breaks the pool (an error in the loop) instead of being replaced forever.
                pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_init_worker,
                                           initargs=(self.spec.tokenizer, self.spec.add_bos))
                tokenize = _pool_tokenizer(pool, depth=2 * self.workers)
            stream = PackedSequenceStream(self.spec, sequence_length=self.sequence_length,
                                          copy_index=self.copy_index, dp_size=self.dp_size, seed=self.seed,
                                          tokenize=tokenize)
            stream.load_state_dict(start)
            pin = self.device.type == "cuda"
            while not stop.is_set():
                batch = collate([next(stream) for _ in range(self.micro_batch_size)])
                if pin:
                    batch = {key: value.pin_memory() for key, value in batch.items()}
                item = (batch, stream.state_dict())
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # handed to the training loop, which raises it
            out.put((error, None))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self._state, self._queue, self._stop),
                                        name="dimshard-data", daemon=True)
        self._thread.start()

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._thread is None:
            self._start()
        batch, state = self._queue.get()
        if state is None:
            self.close()
            raise batch
        self._state = state
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def close(self) -> None:
        """Stop the loader thread and its workers; the next ``next()`` starts them again from the state."""
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:  # unblock a producer waiting on a full queue
                    self._queue.get(timeout=0.1)
                except queue.Empty:
                    pass
            self._thread.join()
        self._thread = None
        self._queue = None
