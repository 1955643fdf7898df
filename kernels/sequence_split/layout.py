"""Zigzag (head-tail) sequence layout for context parallelism, and which attention blocks each rank runs.

The sequence of length L is cut into 2P equal chunks of c = L / (2P) tokens; rank i of P holds
chunks i and 2P-1-i, concatenated in that order (so its local positions increase). Under a
causal mask this gives every rank the same attention work: the early chunk i sees few keys,
the late chunk 2P-1-i sees many, and the sum is the same for all i.

Blocks (rank i, the K/V shard of rank j, local rows 0..2c-1 = chunk i then chunk 2P-1-i):

- j == i: local queries against local keys under the ordinary top-left causal mask (the
  concatenation is increasing in global position, so the local causal mask is the true one);
- j <  i: all 2c local queries against the first half (chunk j) of j's keys, unmasked
  (chunk 2P-1-j lies after both of i's chunks);
- j >  i: the second half (chunk 2P-1-i) of the local queries against all 2c of j's keys,
  unmasked (chunk i lies before both of j's chunks).

Each block has 2c^2 unmasked score entries (the causal one 2c(2c+1)/2 with its diagonal), so a
rank's total is the same for every rank: P blocks of 2c^2 plus c on the diagonal.

With all-gathered K/V in natural order the same work is three blocks (`gathered_blocks`): the
own causal block on the local K/V, all local queries against chunks 0..i-1 (the j < i blocks
merged), and the tail queries against chunks i+1..2P-2-i (the j > i blocks merged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "KV_SEQ_DIM",
    "AttentionBlock",
    "as_blhe",
    "check_zigzag_length",
    "gathered_blocks",
    "gathered_from_natural",
    "natural_from_gathered",
    "pack_kv",
    "rank_blocks",
    "unmasked_score_entries",
    "unpack_kv",
    "zigzag_indices",
    "zigzag_inverse_permutation",
    "zigzag_permutation",
]

# K/V travel packed as one tensor [2, b, l, hk, e]: one transfer per step, and [b, l, h, e] storage
# (what the model's projections produce) viewed as [b, h, l, e] is the layout the fused kernels take.
KV_SEQ_DIM = 2


def as_blhe(x: torch.Tensor) -> torch.Tensor:
    """[b, h, l, e] view over [b, l, h, e] storage (no copy when x already is one)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def pack_kv(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Key and value [b, hk, l, e] copied into one packed [2, b, l, hk, e] tensor."""
    batch, heads, length, dim = key.shape
    kv = key.new_empty(2, batch, length, heads, dim)
    kv[0].copy_(key.transpose(1, 2))
    kv[1].copy_(value.transpose(1, 2))
    return kv


def unpack_kv(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The [b, hk, l, e] key and value views of a packed [2, b, l, hk, e] tensor."""
    return kv[0].transpose(1, 2), kv[1].transpose(1, 2)


def check_zigzag_length(seq_len: int, world_size: int) -> int:
    """The chunk length c = seq_len / (2 * world_size); ValueError if the sequence does not split evenly."""
    if world_size < 1:
        raise ValueError(f"zigzag layout: world_size must be at least 1, got {world_size}")
    chunks = 2 * world_size
    if seq_len <= 0 or seq_len % chunks:
        raise ValueError(
            f"sequence length {seq_len} does not split into {chunks} equal chunks for zigzag context "
            f"parallelism over {world_size} ranks: use a sequence length that is a multiple of {chunks} "
            f"(pad the batch), or fewer sequence-split ranks"
        )
    return seq_len // chunks


def zigzag_indices(seq_len: int, world_size: int, rank: int) -> torch.Tensor:
    """Global token positions rank `rank` holds, in local order: chunk `rank` then chunk 2P-1-`rank`.

    Returns an int64 tensor of length seq_len / world_size. ValueError if seq_len is not a
    multiple of 2 * world_size or rank is out of range.
    """
    chunk = check_zigzag_length(seq_len, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"zigzag layout: rank {rank} is outside 0..{world_size - 1}")
    head = torch.arange(rank * chunk, (rank + 1) * chunk)
    tail_start = (2 * world_size - 1 - rank) * chunk
    tail = torch.arange(tail_start, tail_start + chunk)
    return torch.cat([head, tail])


def zigzag_permutation(seq_len: int, world_size: int) -> torch.Tensor:
    """Permutation `perm` (int64, length seq_len) with `x_zigzag = x.index_select(dim, perm)`.

    Rank r's shard of the zigzag-ordered sequence is its r-th of world_size equal contiguous
    pieces, i.e. `x_zigzag.chunk(world_size, dim)[r]` holds the positions `zigzag_indices(seq_len,
    world_size, r)`. ValueError if seq_len is not a multiple of 2 * world_size.
    """
    return torch.cat([zigzag_indices(seq_len, world_size, r) for r in range(world_size)])


def zigzag_inverse_permutation(seq_len: int, world_size: int) -> torch.Tensor:
    """Inverse of `zigzag_permutation`: `x = x_zigzag.index_select(dim, inverse)` restores natural order."""
    perm = zigzag_permutation(seq_len, world_size)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(seq_len)
    return inverse


@dataclass(frozen=True)
class AttentionBlock:
    """One attention block of a rank: local query rows [q_start, q_stop) against the key rows
    [kv_start, kv_stop) of rank `source`'s K/V shard (None: of the whole sequence in natural
    order), under the top-left causal mask or none."""

    source: int | None
    q_start: int
    q_stop: int
    kv_start: int
    kv_stop: int
    causal: bool


def rank_blocks(rank: int, world_size: int, local_len: int) -> list[AttentionBlock]:
    """The blocks rank `rank` computes, one per K/V source, in ring order (own shard first).

    `local_len` is the local sequence length 2c. Source order is rank, rank-1, rank-2, ... (mod
    world_size): the order in which a ring passing K/V to the next rank delivers them.
    """
    chunk = local_len // 2
    blocks = []
    for step in range(world_size):
        source = (rank - step) % world_size
        if source == rank:
            blocks.append(AttentionBlock(source, 0, local_len, 0, local_len, True))
        elif source < rank:
            blocks.append(AttentionBlock(source, 0, local_len, 0, chunk, False))
        else:
            blocks.append(AttentionBlock(source, chunk, local_len, 0, local_len, False))
    return blocks


def unmasked_score_entries(block: AttentionBlock) -> int:
    """Score entries (query, key pairs) a block computes per head: its attention work."""
    rows, cols = block.q_stop - block.q_start, block.kv_stop - block.kv_start
    if block.causal:
        return rows * (rows + 1) // 2 if rows == cols else sum(min(r + 1, cols) for r in range(rows))
    return rows * cols


def gathered_blocks(rank: int, world_size: int, local_len: int) -> list[AttentionBlock]:
    """The blocks rank `rank` computes from all-gathered K/V: its own shard first (causal), then
    unmasked blocks whose key rows index the whole sequence in natural order. Empty blocks are left out."""
    chunk = local_len // 2
    blocks = [AttentionBlock(rank, 0, local_len, 0, local_len, True)]
    if rank > 0:
        blocks.append(AttentionBlock(None, 0, local_len, 0, rank * chunk, False))
    if rank < world_size - 1:
        blocks.append(AttentionBlock(None, chunk, local_len, (rank + 1) * chunk, (2 * world_size - 1 - rank) * chunk, False))
    return blocks


def natural_from_gathered(gathered: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """The whole sequence in natural order from every rank's zigzag shard stacked on dim 0.

    gathered [P, ..., l_local, ...] with the local sequence on dim `seq_dim + 1`; returns
    [..., P * l_local, ...] with the sequence on dim `seq_dim` (one copy).
    """
    world_size, local_len = gathered.shape[0], gathered.shape[seq_dim + 1]
    chunk = local_len // 2
    shape = list(gathered.shape[1:])
    shape[seq_dim] = world_size * local_len
    natural = gathered.new_empty(shape)
    chunks = natural.unflatten(seq_dim, (2 * world_size, chunk))
    heads = gathered.narrow(seq_dim + 1, 0, chunk).movedim(0, seq_dim)
    tails = gathered.narrow(seq_dim + 1, chunk, chunk).flip(0).movedim(0, seq_dim)
    chunks.narrow(seq_dim, 0, world_size).copy_(heads)
    chunks.narrow(seq_dim, world_size, world_size).copy_(tails)
    return natural


def gathered_from_natural(natural: torch.Tensor, world_size: int, seq_dim: int) -> torch.Tensor:
    """Inverse of `natural_from_gathered`: [..., L, ...] -> every rank's zigzag shard stacked on dim 0."""
    chunk = check_zigzag_length(natural.shape[seq_dim], world_size)
    chunks = natural.unflatten(seq_dim, (2 * world_size, chunk))
    heads = chunks.narrow(seq_dim, 0, world_size).movedim(seq_dim, 0)
    tails = chunks.narrow(seq_dim, world_size, world_size).flip(seq_dim).movedim(seq_dim, 0)
    shape = [world_size, *natural.shape]
    shape[seq_dim + 1] = 2 * chunk
    gathered = natural.new_empty(shape)
    gathered.narrow(seq_dim + 1, 0, chunk).copy_(heads)
    gathered.narrow(seq_dim + 1, chunk, chunk).copy_(tails)
    return gathered
