"""The experts' token exchange (``comm.exchange_counts``, ``comm.token_all_to_all``) against the unsplit rows.

``check_token_all_to_all`` runs on every rank of tests/test_comm.py's 1-D launches (2 and 4 gloo
processes), so it adds no launch of its own.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dimshard.runtime import comm


def check_token_all_to_all() -> None:
    """Uneven rows from every rank to every rank (some counts zero), forward and backward, both code paths.

    Every rank builds the same counts and rows of every rank; the rows a rank receives must be the
    ones sent to it, source by source, and the gradient of each row it sent must be the weight its
    receiver applied to that row (the loss is sum over ranks of received * weights of that rank).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    generator = torch.Generator().manual_seed(400)
    counts = torch.randint(0, 4, (world, world), generator=generator)
    counts[0, -1] = 0  # an empty pair of ranks
    rows = [torch.randn(int(counts[i].sum()), 3, generator=generator) for i in range(world)]
    received = [torch.randn(int(counts[:, j].sum()), 3, generator=generator) for j in range(world)]  # weights

    def segment(x: torch.Tensor, sizes: list[int], index: int) -> torch.Tensor:
        return x.split(sizes)[index]

    expected = torch.cat([segment(rows[i], counts[i].tolist(), rank) for i in range(world)])
    expected_grad = torch.cat([segment(received[j], counts[:, j].tolist(), rank) for j in range(world)])
    for fallbacks in (True, False):
        comm._GLOO_FALLBACKS = fallbacks
        try:
            table = comm.exchange_counts(counts[rank], None)
            assert table == counts.tolist()
            x = rows[rank].clone().requires_grad_(True)
            y = comm.token_all_to_all(x, table, None)
            torch.testing.assert_close(y, expected, rtol=0, atol=0)
            (y * received[rank]).sum().backward()
            torch.testing.assert_close(x.grad, expected_grad, rtol=0, atol=0)
        except (AssertionError, RuntimeError) as error:
            raise AssertionError(f"token_all_to_all with _GLOO_FALLBACKS={fallbacks}") from error
        finally:
            comm._GLOO_FALLBACKS = True
    with pytest.raises(ValueError, match="rows to send"):
        comm.token_all_to_all(torch.cat([rows[rank], torch.zeros(1, 3)]), counts.tolist(), None)
