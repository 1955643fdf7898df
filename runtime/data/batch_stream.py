"""The micro-batch stream of a run, chosen by what its dataset is: a prepared folder or a data spec."""

from __future__ import annotations

from typing import Any

from .copy_batches import CopyBatches
from .packed_loader import PackedBatchLoader
from .prepared import MicroBatchStream
from .spec import DataSpec


def make_batch_stream(dataset: Any, **layout: Any) -> CopyBatches:
    """The micro-batch stream for ``dataset``: a prepared folder's Dataset or a ``DataSpec``.

    ``layout`` holds the fields of ``CopyBatches`` (``micro_batch_size``, ``dp_size``,
    ``copy_index``, ``seed``, ``device``, ``sequence_length``). A Dataset gives a
    ``MicroBatchStream``; a DataSpec gives a ``PackedBatchLoader`` (streamed, tokenized and packed
    on the fly; ``sequence_length`` required), with the loader options the spec carries in
    ``extra`` (``workers``, ``prefetch``). Call ``close()`` on the result when it has one.
    """
    if not isinstance(dataset, DataSpec):
        return MicroBatchStream(dataset, **layout)
    return PackedBatchLoader(dataset, **layout, workers=int(dataset.extra.get("workers", 1)),
                             prefetch=int(dataset.extra.get("prefetch", 4)))
