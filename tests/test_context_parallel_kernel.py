"""Sequence-split causal attention against full causal attention on the unsplit sequence (gloo ranks)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_distributed

from dimshard.kernels.context_parallel import (
    sequence_split_attention,
    zigzag_indices,
    zigzag_inverse_permutation,
    zigzag_permutation,
)


def _inputs(batch, q_heads, kv_heads, seq_len, head_dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq_len, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=gen, dtype=dtype)
    grad = torch.randn(batch, q_heads, seq_len, head_dim, generator=gen, dtype=dtype)
    return q, k, v, grad


def _full_attention(q, k, v, grad, scale):
    """Reference: causal attention on the whole sequence, its output and the gradients of (out * grad).sum()."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), grad))


def _split_attention_on_rank(shape, scale, options):
    world_size, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, grad = _inputs(*shape)
    positions = zigzag_indices(q.shape[2], world_size, rank)
    q, k, v, grad = (x[:, :, positions].detach().clone() for x in (q, k, v, grad))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = sequence_split_attention(q, k, v, scale=scale, group=None, **options)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out.detach(), dq, dk, dv


def _gather_zigzag(per_rank, seq_len, world_size):
    """Natural-order full tensor from each rank's zigzag shard (along dim 2)."""
    return torch.cat(per_rank, dim=2).index_select(2, zigzag_inverse_permutation(seq_len, world_size))


@pytest.mark.slow
@pytest.mark.parametrize(
    "world_size, q_heads, kv_heads",
    [(2, 4, 4), (2, 4, 2), (4, 4, 1), (4, 2, 2)],
)
def test_split_attention_equals_full_causal_attention(world_size, q_heads, kv_heads):
    shape = (2, q_heads, kv_heads, 8 * world_size, 8)
    scale = 0.3
    results = run_distributed(_split_attention_on_rank, world_size, shape, scale, {}, timeout_s=90)
    reference = _full_attention(*_inputs(*shape), scale)
    for index, name in enumerate(("out", "dq", "dk", "dv")):
        ours = _gather_zigzag([r[index] for r in results], shape[3], world_size)
        torch.testing.assert_close(ours, reference[index], msg=lambda m, name=name: f"{name}: {m}")


def test_zigzag_layout():
    assert zigzag_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    perm = zigzag_permutation(16, 4)
    assert perm.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    assert torch.equal(perm[zigzag_inverse_permutation(16, 4)], torch.arange(16))


@pytest.mark.parametrize("seq_len, world_size", [(12, 4), (7, 1), (0, 2)])
def test_lengths_that_do_not_split_give_a_clear_error(seq_len, world_size):
    with pytest.raises(ValueError, match=rf"sequence length {seq_len} does not split into {2 * world_size} equal chunks"):
        zigzag_permutation(seq_len, world_size)
