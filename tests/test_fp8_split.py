"""fp8_linear split over 2 gloo ranks equals the unsplit op: scales taken over the whole tensor (or row).

Column-parallel (N split), row-parallel (K split) and token-split products, for every recipe:
outputs and both gradients, reassembled, equal the one-process fp8_linear within float32
rounding. Without the amax reduction the split op differs (the check can fail).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from dimshard.kernels.fp8.linear import fp8_linear
from dimshard.kernels.fp8.scaling import RECIPES

M_BATCH, M_SEQ, K, N = 2, 16, 64, 48


def _inputs():
    torch.manual_seed(0)
    # Columns of very different magnitude: per-shard amaxes differ, so a missing reduction shows.
    x = torch.randn(M_BATCH, M_SEQ, K) * torch.logspace(-1, 1, K)
    w = torch.randn(N, K) * torch.logspace(1, -1, N)[:, None] * 0.05
    g = torch.randn(M_BATCH, M_SEQ, N) * torch.logspace(-2, 0, M_SEQ)[:, None] * 1e-2
    return x, w, g


def _run(x, w, g, recipe, **groups):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(x, w, recipe=recipe, **groups)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def _summed(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


def _split_cases(recipe: str, reduce: bool) -> dict[str, float]:
    """Worst relative error of each split against the unsplit op, on this rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group = (dist.group.WORLD,) if reduce else ()
    x, w, g = _inputs()
    y, dx, dw = _run(x, w, g, recipe)
    n, k, s = (slice(rank * d // world, (rank + 1) * d // world) for d in (N, K, M_SEQ))
    errors = {}

    def err(got, want):
        return float((got - want).abs().max() / want.abs().max())

    # Column-parallel: weight rows (N) split, x replicated; dx is a partial sum.
    cy, cdx, cdw = _run(x, w[n], g[..., n], recipe, n_groups=group)
    errors["column"] = max(err(cy, y[..., n]), err(_summed(cdx), dx), err(cdw, dw[n]))
    # Row-parallel: K split in x and weight; y is a partial sum.
    ry, rdx, rdw = _run(x[..., k], w[:, k], g, recipe, k_groups=group)
    errors["row"] = max(err(_summed(ry), y), err(rdx, dx[..., k]), err(rdw, dw[:, k]))
    # Token split (sequence or batch): dw is a partial sum.
    ty, tdx, tdw = _run(x[:, s], w, g[:, s], recipe, token_groups=group)
    errors["tokens"] = max(err(ty, y[:, s]), err(tdx, dx[:, s]), err(_summed(tdw), dw))
    return errors


@pytest.mark.slow
def test_split_fp8_linear_equals_unsplit():
    for recipe in sorted(RECIPES):
        for errors in run_distributed(_split_cases, 2, recipe, True):
            assert max(errors.values()) < 1e-5, (recipe, errors)
    # Per-shard scales change the FP8 values: the reduction is what makes the split exact.
    unreduced = run_distributed(_split_cases, 2, "tensorwise", False)
    assert all(min(errors.values()) > 1e-4 for errors in unreduced), unreduced
