"""Recurrent layers with the sequence split over 2 and 4 gloo ranks (kernels/recurrent/sequence_split.py) equal
the unsplit op: outputs, final states and every input's gradient, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed

from dimshard.kernels.recurrent.chunked import chunked_recurrence
from dimshard.kernels.recurrent.conv import causal_conv1d_reference

CASES = [("none", False), ("head", True), ("channel", False), ("channel", True)]
LAYOUTS = ["contiguous", "zigzag"]


def _local(x: torch.Tensor, rank: int, ranks: int, layout: str, dim: int) -> torch.Tensor:
    """A rank's chunks of a full tensor along ``dim``, concatenated in its local order."""
    from dimshard.kernels.recurrent.sequence_split import chunk_ids

    ids = chunk_ids(rank, ranks, layout)
    chunks = x.chunk(ranks * len(ids), dim)
    return torch.cat([chunks[i] for i in ids], dim)


def _assemble(pieces: list[torch.Tensor], layout: str, dim: int) -> torch.Tensor:
    """The full tensor along ``dim`` from every rank's local pieces."""
    from dimshard.kernels.recurrent.sequence_split import chunk_ids

    ranks = len(pieces)
    chunks = {}
    for rank, piece in enumerate(pieces):
        ids = chunk_ids(rank, ranks, layout)
        chunks.update(zip(ids, piece.chunk(len(ids), dim)))
    return torch.cat([chunks[i] for i in sorted(chunks)], dim)


def _inputs(gate: str, delta: bool) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    b, h, length, dk, dv = 2, 2, 24, 3, 4
    q, v = torch.randn(b, h, length, dk, generator=g, dtype=torch.float64), torch.randn(b, h, length, dv, generator=g,
                                                                                          dtype=torch.float64)
    k = F.normalize(torch.randn(b, h, length, dk, generator=g, dtype=torch.float64), dim=-1)
    shape = {"none": None, "head": (b, h, length), "channel": (b, h, length, dk)}[gate]
    gates = None if shape is None else -torch.rand(*shape, generator=g, dtype=torch.float64)
    beta = torch.rand(b, h, length, generator=g, dtype=torch.float64) if delta else None
    start = torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64)
    return [q, k, v, gates, beta, start]


def _loss(out: torch.Tensor, state: torch.Tensor, with_state: bool) -> torch.Tensor:
    return out.sin().sum() + (state.cos().sum() if with_state else 0.0)


def _rank_recurrences(layout: str) -> list[dict]:
    """Every case on this rank's piece, with and without the final state in the loss (training ignores it)."""
    import torch.distributed as dist

    from dimshard.kernels.recurrent.sequence_split import split_recurrence

    rank, ranks = dist.get_rank(), dist.get_world_size()
    results = []
    for (gate, delta), with_state in [(case, w) for case in CASES for w in (True, False)]:
        full = _inputs(gate, delta)
        pieces = [None if x is None else (_local(x, rank, ranks, layout, 2) if i < 5 else x) for i, x in enumerate(full)]
        leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in pieces]
        out, state = split_recurrence(*leaves[:5], None, leaves[5], chunk_size=2, layout=layout)
        _loss(out, state, with_state and rank == 0).backward()  # the final state's term counted once
        results.append({"out": out.detach(), "state": state.detach(),
                        "grads": [None if x is None else x.grad for x in leaves]})
    return results


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ranks", [2, 4])
def test_state_passing_equals_the_unsplit_recurrence(ranks, layout):
    runs = run_distributed(_rank_recurrences, ranks, layout)
    for index, ((gate, delta), with_state) in enumerate([(c, w) for c in CASES for w in (True, False)]):
        full = _inputs(gate, delta)
        leaves = [None if x is None else x.clone().requires_grad_(True) for x in full]
        out, state = chunked_recurrence(*leaves[:5], leaves[5], chunk_size=4)
        _loss(out, state, with_state).backward()
        results = [run[index] for run in runs]
        torch.testing.assert_close(_assemble([r["out"] for r in results], layout, 2), out.detach())
        for r in results:
            torch.testing.assert_close(r["state"], state.detach())
        for i, leaf in enumerate(leaves):
            if leaf is None:
                continue
            if i < 5:  # sequence-long inputs: each rank holds its piece's gradient
                torch.testing.assert_close(_assemble([r["grads"][i] for r in results], layout, 2), leaf.grad)
            else:  # the initial state: its gradient is the sum over ranks
                torch.testing.assert_close(sum(r["grads"][i] for r in results), leaf.grad)


def _rank_conv(activation: str | None, layout: str) -> list[dict]:
    import torch.distributed as dist

    from dimshard.kernels.recurrent.sequence_split import split_causal_conv1d

    rank, ranks = dist.get_rank(), dist.get_world_size()
    results = []
    for length in CONV_LENGTHS:
        x, w, bias, start = _conv_inputs(length)
        piece = _local(x, rank, ranks, layout, 2).clone().requires_grad_(True)
        w, bias, start = w.requires_grad_(True), bias.requires_grad_(True), start.requires_grad_(True)
        out = split_causal_conv1d(piece, w, bias, start, activation=activation, layout=layout)
        out.sin().sum().backward()
        results.append({"out": out.detach(), "dx": piece.grad, "dw": w.grad, "db": bias.grad, "dstart": start.grad})
    return results


# 24 tokens: chunks of 3 at 2P = 8, the kernel's k - 1; 8 tokens: chunks of 1 at 2P = 8, so a halo reaches
# back over three chunks (and into the initial state).
CONV_LENGTHS = (24, 8)


def _conv_inputs(length: int) -> tuple[torch.Tensor, ...]:
    """x [2, 3, length], weight [3, 4], bias, initial state."""
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64)
                 for shape in ((2, 3, length), (3, 4), (3,), (2, 3, 3)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ranks", [2, 4])
def test_convolution_halo_equals_the_unsplit_convolution(ranks, layout):
    runs = run_distributed(_rank_conv, ranks, "silu", layout)
    for index, length in enumerate(CONV_LENGTHS):
        x, w, bias, start = (t.requires_grad_(True) for t in _conv_inputs(length))
        out = causal_conv1d_reference(x, w, bias, start, activation="silu")
        out.sin().sum().backward()
        results = [run[index] for run in runs]
        torch.testing.assert_close(_assemble([r["out"] for r in results], layout, 2), out.detach())
        torch.testing.assert_close(_assemble([r["dx"] for r in results], layout, 2), x.grad)
        for name, leaf in (("dw", w), ("db", bias), ("dstart", start)):
            torch.testing.assert_close(sum(r[name] for r in results), leaf.grad)


def _op_cases() -> dict[str, tuple[list[torch.Tensor], list[int | None], dict]]:
    """op -> (inputs, each input's sequence dim or None, keywords), float64, 24 tokens."""
    g = torch.Generator().manual_seed(2)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def r(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    return {
        "gated_delta_rule": ([t(2, 24, 2, 4), t(2, 24, 2, 4), t(2, 24, 4, 3), -r(2, 24, 4), r(2, 24, 4)],
                             [1, 1, 1, 1, 1], {"use_qk_l2norm": True, "chunk_size": 2}),
        "gated_linear_attention": ([t(2, 24, 2, 4), t(2, 24, 2, 4), t(2, 24, 2, 3), -r(2, 24, 2, 4)],
                                   [1, 1, 1, 1], {"chunk_size": 2}),
        "state_space_dual": ([t(2, 24, 4, 3), t(2, 24, 4), -r(4) - 0.1, t(2, 24, 2, 5), t(2, 24, 2, 5), t(4), t(4)],
                             [1, 1, None, 1, 1, None, None], {"chunk_size": 2, "dt_softplus": True}),
        "selective_scan": ([t(2, 3, 24), t(2, 3, 24), -r(3, 4) - 0.1, t(2, 4, 24), t(2, 4, 24), t(3), t(2, 3, 24),
                            t(3)], [2, 2, None, 2, 2, None, 2, None], {"delta_softplus": True, "chunk_size": 2}),
    }


def _rank_ops(layout: str) -> dict[str, dict]:
    import torch.distributed as dist

    from dimshard.kernels.recurrent import sequence_split

    rank, ranks = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, (inputs, seq_dims, keywords) in _op_cases().items():
        leaves = [(x if d is None else _local(x, rank, ranks, layout, d)).clone().requires_grad_(True)
                  for x, d in zip(inputs, seq_dims)]
        out = getattr(sequence_split, f"split_{name}")(*leaves, layout=layout, **keywords)
        out.sin().sum().backward()
        results[name] = {"out": out.detach(), "grads": [x.grad for x in leaves]}
    return results


@pytest.mark.parametrize("ranks", [2, 4])
def test_split_ops_equal_the_unsplit_ops(ranks):
    """Each op's sequence-split form (zigzag layout) against the op itself: outputs and every input's gradient."""
    from dimshard.kernels import recurrent

    runs = run_distributed(_rank_ops, ranks, "zigzag")
    for name, (inputs, seq_dims, keywords) in _op_cases().items():
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        out = getattr(recurrent, name)(*leaves, **keywords)
        out.sin().sum().backward()
        out_dim = 2 if name == "selective_scan" else 1
        torch.testing.assert_close(_assemble([run[name]["out"] for run in runs], "zigzag", out_dim), out.detach())
        for i, (leaf, dim) in enumerate(zip(leaves, seq_dims)):
            pieces = [run[name]["grads"][i] for run in runs]
            got = sum(pieces) if dim is None else _assemble(pieces, "zigzag", dim)
            torch.testing.assert_close(got, leaf.grad, msg=f"{name}: gradient of input {i}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_ops_run_on_one_gpu_rank(layout):
    """On CUDA over NCCL (one rank holding every chunk): each split form, the convolution's included, equals
    the op's chunked reference in float32, outputs and every input's gradient."""
    import torch.distributed as dist

    from dimshard.kernels.recurrent import sequence_split
    from dimshard.kernels.recurrent.conv import causal_conv1d_reference

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cases = {name: (inputs, keywords) for name, (inputs, _, keywords) in _op_cases().items()}
        cases["causal_conv1d"] = (list(_conv_inputs(8)), {"activation": "silu"})
        references = {"causal_conv1d": causal_conv1d_reference}
        for name, (inputs, keywords) in cases.items():
            reference = references.get(name) or (lambda *a, name=name, **k: getattr(
                sequence_split, f"{name}_reference")(*a, **k)[0])
            runs = []
            for fn in (getattr(sequence_split, f"split_{name}"), reference):
                leaves = [x.float().cuda().requires_grad_(True) for x in inputs]
                extra = {"layout": layout, "group": None} if fn.__name__.startswith("split_") else {}
                out = fn(*leaves, **keywords, **extra)
                out.sin().sum().backward()
                runs.append([out.detach()] + [x.grad for x in leaves])
            for got, want in zip(*runs):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
    finally:
        dist.destroy_process_group()
