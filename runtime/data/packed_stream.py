"""Documents of a data spec, mixed, tokenized and packed into fixed-length sequences, resumably.

One ``PackedSequenceStream`` serves one data-parallel copy. Everything follows from the seed:

- Source order. A non-streaming source is visited in a seeded permutation per epoch, the same
  permutation for every copy; copy ``c`` of ``P`` takes its positions ``c, c + P, ...``, so the
  copies read disjoint rows. A streaming source is split between copies with
  ``datasets.distributed.split_dataset_by_node`` and shuffled with a seeded buffer
  (``IterableDataset.shuffle``), reseeded per epoch with ``set_epoch``. Sources loop over epochs.
- Mixture. Draw ``i`` picks the source of the next document with the spec's probabilities, from a
  generator seeded by ``(seed, copy, i // MIX_BLOCK)``: any draw can be recomputed from its index.
- Packing. Each document becomes ``[bos] + tokens + [eos]``; documents are concatenated and cut into
  sequences of ``sequence_length`` tokens, a long document running on into the next sequences.

The state at a sequence boundary is ``{"draws", "sources": [{"epoch", "position"}], "offset"}``: the
mixture draws and source positions *before* the document being packed, and how many of its tokens
earlier sequences already hold. That is the partial sequence in a form a few integers long: on
resume the document is read and tokenized again and its first ``offset`` tokens are skipped, so
the resumed stream continues with exactly the tokens an uninterrupted one would have. A streaming
source resumes by reading (not tokenizing) its first ``position`` documents of the epoch again.

With document masking each sequence also carries ``position_ids`` (restarting at 0 at each
document and at the start of the sequence) and ``document_ids`` (0, 1, ... per document piece).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .spec import DataSpec, DataSpecError, load_tokenizer, open_source

MIX_BLOCK = 4096  # mixture draws made per generator
TOKENIZE_BATCH = 64  # documents per tokenizer call
READ_BLOCK = 256  # rows of a non-streaming source read at once
IGNORE_INDEX = -100


def tokenize_texts(tokenizer: Any, texts: list[str], bos: int | None, eos: int) -> list[np.ndarray]:
    """``[bos] + tokens + [eos]`` (bos when not None) per text, as int64 arrays; one batched call."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefix = [bos] if bos is not None else []
    return [np.asarray(prefix + ids + [eos], dtype=np.int64) for ids in encoded]


class DocumentReader:
    """The texts one copy reads from one source, in seeded order, endlessly; state ``(epoch, position)``."""

    def __init__(self, dataset: Any, *, text_column: str, streaming: bool, shuffle_buffer: int, seed: int,
                 source_index: int, copy_index: int, dp_size: int, name: str) -> None:
        self.text_column = text_column
        self.streaming = streaming
        self.seed = seed
        self.source_index = source_index
        self.copy_index = copy_index
        self.dp_size = dp_size
        self.name = name
        self.epoch = 0
        self.position = 0
        if streaming:
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=copy_index, world_size=dp_size)
            if shuffle_buffer > 0:
                dataset = dataset.shuffle(seed=seed * 1009 + source_index, buffer_size=shuffle_buffer)
        else:
            dataset = dataset.select_columns([text_column])
            if len(dataset) < dp_size:
                raise DataSpecError(f"data source {name} has {len(dataset)} rows, fewer than the {dp_size} "
                                    f"data-parallel copies; add data or use fewer copies")
        self.dataset = dataset
        self._iterator: Iterator[Any] | None = None
        self._rows: np.ndarray | None = None
        self._block_index: tuple[int, int] | None = None  # (epoch, block) of the texts in _block
        self._block: list[Any] = []

    def state(self) -> dict[str, int]:
        """Where the next text comes from."""
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        """Continue at ``state`` (a value of ``state()``)."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iterator = None
        self._rows = None

    def _epoch_rows(self) -> np.ndarray:
        if self._rows is None:
            generator = np.random.default_rng([self.seed, 7919, self.source_index, self.epoch])
            self._rows = generator.permutation(len(self.dataset))[self.copy_index::self.dp_size]
        return self._rows

    def _raw(self) -> Any:
        """The row at (epoch, position), or None at the end of the epoch."""
        if not self.streaming:
            rows = self._epoch_rows()
            if self.position >= len(rows):
                return None
            block, within = divmod(self.position, READ_BLOCK)
            if self._block_index != (self.epoch, block):
                # One Arrow take per block of rows: row-by-row reads cost more than tokenizing them.
                indices = rows[block * READ_BLOCK:(block + 1) * READ_BLOCK].tolist()
                self._block = self.dataset[indices][self.text_column]
                self._block_index = (self.epoch, block)
            return {self.text_column: self._block[within]}
        if self._iterator is None:
            self.dataset.set_epoch(self.epoch)
            self._iterator = itertools.islice(iter(self.dataset), self.position, None)
        return next(self._iterator, None)

    def next_text(self) -> str:
        """The next non-empty text (empty ones are passed over); advances the state."""
        wraps = 0
        while True:
            row = self._raw()
            if row is None:
                wraps += 1
                if self.position == 0 or wraps > 1:  # an epoch without rows, or a whole one without text
                    raise DataSpecError(f"data source {self.name} has no text for data-parallel copy "
                                        f"{self.copy_index} of {self.dp_size} (column {self.text_column!r}); "
                                        f"add data or use fewer copies")
                self.epoch, self.position = self.epoch + 1, 0
                self._iterator, self._rows = None, None
                continue
            self.position += 1
            text = row.get(self.text_column)
            if isinstance(text, str) and text:
                return text


class Mixture:
    """Which source each document comes from: draw ``i`` is a function of (seed, copy, i)."""

    def __init__(self, probabilities: list[float], seed: int, copy_index: int) -> None:
        self.probabilities = np.asarray(probabilities, dtype=np.float64)
        self.seed = seed
        self.copy_index = copy_index
        self.draws = 0
        self._block_index = -1
        self._block: np.ndarray | None = None

    def next_source(self) -> int:
        """The source index of draw ``self.draws``; advances the draw count."""
        block_index, within = divmod(self.draws, MIX_BLOCK)
        if block_index != self._block_index:
            generator = np.random.default_rng([self.seed, 104729, self.copy_index, block_index])
            self._block = generator.choice(len(self.probabilities), size=MIX_BLOCK, p=self.probabilities)
            self._block_index = block_index
        self.draws += 1
        return int(self._block[within])


class PackedSequenceStream:
    """Endless packed sequences of one data-parallel copy (see the module docstring).

    ``next()`` returns ``{"input_ids": int64 [L]}`` plus ``position_ids`` and ``document_ids``
    ([L] int64) under document masking. ``state_dict()`` / ``load_state_dict()`` work at sequence
    boundaries. ``tokenize`` (texts -> token arrays) defaults to the spec's tokenizer in this
    process; a loader passes one that runs in worker processes.
    """

    def __init__(self, spec: DataSpec, *, sequence_length: int, copy_index: int, dp_size: int, seed: int,
                 datasets: list[Any] | None = None,
                 tokenize: Callable[[Iterator[list[str]]], Iterator[list[np.ndarray]]] | None = None,
                 lookahead: int = TOKENIZE_BATCH) -> None:
        if sequence_length < 2:
            raise ValueError(f"sequence_length must be >= 2, got {sequence_length}")
        self.spec = spec
        self.sequence_length = sequence_length
        self.lookahead = lookahead
        datasets = datasets or [open_source(source, spec.streaming, spec.cache_dir) for source in spec.sources]
        self.readers = [
            DocumentReader(dataset, text_column=source.text_column, streaming=spec.streaming,
                           shuffle_buffer=spec.shuffle_buffer, seed=seed, source_index=index,
                           copy_index=copy_index, dp_size=dp_size, name=source.name)
            for index, (source, dataset) in enumerate(zip(spec.sources, datasets))
        ]
        self.mixture = Mixture([source.probability for source in spec.sources], seed, copy_index)
        self._tokenize = tokenize or self._local_tokenizer()
        self._offset = 0  # tokens of the current document already in earlier sequences
        self._current: tuple[np.ndarray, dict] | None = None  # (tokens, state before it)
        self._ready: deque[tuple[np.ndarray, dict]] = deque()
        self._batches: Iterator[list] | None = None
        self._states: deque[dict] = deque()  # state before each text read but not yet tokenized

    def _local_tokenizer(self) -> Callable[[Iterator[list[str]]], Iterator[list[np.ndarray]]]:
        tokenizer = load_tokenizer(self.spec.tokenizer)
        bos = tokenizer.bos_token_id if self.spec.add_bos else None

        def tokenize(text_batches: Iterator[list[str]]) -> Iterator[list[np.ndarray]]:
            for texts in text_batches:
                yield tokenize_texts(tokenizer, texts, bos, tokenizer.eos_token_id)

        return tokenize

    def _position(self) -> dict[str, Any]:
        return {"draws": self.mixture.draws, "sources": [reader.state() for reader in self.readers]}

    def _text_batches(self, states: deque) -> Iterator[list[str]]:
        """Texts in mixture order, ``lookahead`` at a time; the state before each goes to ``states``."""
        while True:
            texts = []
            for _ in range(self.lookahead):
                states.append(self._position())
                texts.append(self.readers[self.mixture.next_source()].next_text())
            yield texts

    def _next_document(self) -> tuple[np.ndarray, dict]:
        if not self._ready:
            if self._batches is None:
                self._states = deque()
                self._batches = iter(self._tokenize(self._text_batches(self._states)))
            for tokens in next(self._batches):
                self._ready.append((tokens, self._states.popleft()))
        return self._ready.popleft()

    def state_dict(self) -> dict[str, Any]:
        """The state at the current sequence boundary (JSON-able; see the module docstring)."""
        if self._current is not None:
            return {**self._current[1], "offset": self._offset}
        if self._ready:
            return {**self._ready[0][1], "offset": 0}
        if self._batches is not None and self._states:  # texts read ahead but not tokenized yet
            return {**self._states[0], "offset": 0}
        return {**self._position(), "offset": 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a value of ``state_dict()`` from a stream of the same spec and seed)."""
        if len(state["sources"]) != len(self.readers):
            raise ValueError(f"the saved data state has {len(state['sources'])} sources but the spec has "
                             f"{len(self.readers)}; resume with the same --data_sources")
        self.close()
        self.mixture.draws = int(state["draws"])
        for reader, reader_state in zip(self.readers, state["sources"]):
            reader.restore(reader_state)
        self._current, self._ready, self._batches = None, deque(), None
        self._offset = 0
        skip = int(state["offset"])
        if skip:
            self._current = self._next_document()
            self._offset = skip

    def close(self) -> None:
        """Stop the tokenizer pipeline (a generator) if one is running."""
        if self._batches is not None and hasattr(self._batches, "close"):
            self._batches.close()
        self._batches = None

    def __iter__(self) -> PackedSequenceStream:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        length = self.sequence_length
        pieces: list[np.ndarray] = []
        filled = 0
        while filled < length:
            if self._current is None:
                self._current = self._next_document()
                self._offset = 0
            tokens = self._current[0]
            take = min(length - filled, len(tokens) - self._offset)
            pieces.append(tokens[self._offset:self._offset + take])
            self._offset += take
            filled += take
            if self._offset == len(tokens):
                self._current = None
        sequence = {"input_ids": np.concatenate(pieces)}
        if self.spec.document_masking:
            sequence["position_ids"] = np.concatenate([np.arange(len(piece)) for piece in pieces])
            sequence["document_ids"] = np.repeat(np.arange(len(pieces)), [len(piece) for piece in pieces])
        return sequence


def labels_for(input_ids: np.ndarray, position_ids: np.ndarray | None) -> np.ndarray:
    """Unshifted labels: the inputs, with the first token of every document ignored under masking.

    The loss predicts ``labels[i + 1]`` from token ``i``; ignoring each document's first token means
    no token is ever trained to predict the next document.
    """
    labels = input_ids.copy()
    if position_ids is not None:
        labels[position_ids == 0] = IGNORE_INDEX
    return labels
