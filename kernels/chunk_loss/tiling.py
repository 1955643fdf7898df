"""How a ``chunk_linear_cross_entropy`` call is tiled: the tile sizes of its two paths and the call plan."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Auto tiling: up to 16 vocabulary blocks, none narrower than 4096 words.
_MAX_VOCAB_SPLITS = 16
_MIN_VOCAB_TILE = 4096
# Recompute path: full-vocabulary rows of logits per tile when chunk_size is None.
_RECOMPUTE_CHUNK = 1024
# Precompute path: logits bytes of one chunk when chunk_size is None. At Llama-3-8B sizes (bf16)
# that is 2560 tokens: with the weight gradient's residual (0.98 GiB) about 1.65 GiB above the
# inputs and gradients, under the 2 GB budget with some room, while the per-chunk pass over the
# [n, d] accumulator (~1.4 ms on an H100) stays about an eighth of the chunk's 3 products.
_PRECOMPUTE_LOGITS_BYTES = 640 * 2**20
_GEMM_ROWS = 256  # automatic precompute chunks are a multiple of this where they can be
# Precompute path, bf16/fp16 weights: chunk products added into the residual between two
# renormalisations of the (gradient, residual) pair. Each renormalisation reads and writes both
# [n, d] buffers (about 1 ms at Llama-3-8B sizes on an H200, against ~11 ms for a chunk's three
# products); every 4 chunks it costs a quarter of that, while the residual only ever holds 4
# chunks' share of the sum, so its bf16 roundings stay far below the single rounding of an eager
# bf16 gradient.
_RENORMALISE_EVERY = 4


def tile_sizes(num_tokens: int, vocab_size: int, chunk_size: int, vocab_splits: int | None) -> tuple[int, int]:
    """(tokens per tile, vocabulary words per tile) of the recompute path for the given arguments.

    ``vocab_splits=None`` picks as many vocabulary blocks as the tokens fill (at most 16, each
    at least 4096 words wide); a tile never exceeds ``chunk_size`` full-vocabulary rows.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if vocab_splits is None:
        vocab_splits = max(1, min(_MAX_VOCAB_SPLITS, math.ceil(num_tokens / chunk_size), vocab_size // _MIN_VOCAB_TILE))
    if vocab_splits < 1:
        raise ValueError(f"vocab_splits must be >= 1 or None, got {vocab_splits}")
    return chunk_size * vocab_splits, max(1, math.ceil(vocab_size / vocab_splits))


def precompute_tile_sizes(
    num_tokens: int, vocab_size: int, itemsize: int, chunk_size: int | None, vocab_splits: int | None
) -> tuple[int, int]:
    """(tokens per chunk, vocabulary words per block) of the precompute path.

    A chunk holds the logits of its tokens over the whole vocabulary (``itemsize`` bytes each):
    ``chunk_size`` tokens, or with None as many as fit in 640 MiB (a multiple of 256 when that
    is at least 256), never more than ``num_tokens``. The blocks only bound the fp32 temporaries
    of the elementwise passes and of mixed-dtype products: ``vocab_splits`` blocks, or with None
    up to 16 of at least 4096 words.
    """
    if chunk_size is None:
        chunk_size = max(1, _PRECOMPUTE_LOGITS_BYTES // max(1, vocab_size * itemsize))
        if chunk_size >= _GEMM_ROWS:
            chunk_size -= chunk_size % _GEMM_ROWS
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if vocab_splits is None:
        vocab_splits = max(1, min(_MAX_VOCAB_SPLITS, vocab_size // _MIN_VOCAB_TILE))
    if vocab_splits < 1:
        raise ValueError(f"vocab_splits must be >= 1 or None, got {vocab_splits}")
    return max(1, min(chunk_size, num_tokens)), max(1, math.ceil(vocab_size / vocab_splits))


@dataclass(frozen=True)
class _Plan:
    """How one call runs: recompute tiles, and precompute tiles when the forward takes the gradients."""

    recompute_tiles: tuple[int, int]
    precompute_tiles: tuple[int, int] | None
    need_hidden: bool
    need_weight: bool
    need_bias: bool = False
    logit_scale: float | None = None
    softcap: float | None = None
