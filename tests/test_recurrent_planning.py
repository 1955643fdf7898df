"""The planner's sequence split of recurrent ops: the split it offers, the layout it gives them, the FLOPs and
state exchange it prices, and the identity rules of the mixers' cache split.

End to end (generated code calling the split forms, equal to Hugging Face on 2 and 4 gloo ranks) is
tests/test_recurrent_families.py's ``cp`` cases; the split forms themselves are checked against the
unsplit ops in tests/test_recurrent_sequence_split.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dimshard.kernels import recurrent
from dimshard.planner.ops.registry import OpCall, TensorMeta, get_rule, op_record

G = torch.Generator().manual_seed(0)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G)


def _flop_cases() -> list[tuple[str, list[torch.Tensor], int]]:
    """(op, inputs, chunk size): sequences that are whole multiples of the chunk, so no padding is counted."""
    b, length, h, dk, dv, chunk = 2, 32, 2, 8, 16, 16
    q, v = _randn(b, length, h, dk), _randn(b, length, h, dv)
    k = F.normalize(_randn(b, length, h, dk), dim=-1)
    g, beta = -torch.rand(b, length, h, generator=G), torch.rand(b, length, h, generator=G)
    channels, state = 8, 4
    return [
        ("gated_delta_rule", [q, k, v, g, beta], chunk),
        ("gated_linear_attention", [q, k, v, -torch.rand(b, length, h, dk, generator=G)], chunk),
        ("state_space_dual", [v, _randn(b, length, h), -torch.rand(h, generator=G), _randn(b, length, 1, dk),
                              _randn(b, length, 1, dk)], chunk),
        ("selective_scan", [_randn(b, channels, length), _randn(b, channels, length),
                            -torch.rand(channels, state, generator=G), _randn(b, state, length),
                            _randn(b, state, length)], 8),
    ]


@pytest.mark.parametrize("name, inputs, chunk", _flop_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_recurrence_flops_count_the_chunked_form(name, inputs, chunk):
    """The record's FLOPs (RecurrenceDims.flops) equal torch's count of the matrix products the op runs; the
    delta rule's unit triangular solve, which the counter does not see, is c (dk + dv) per token."""
    record = op_record(getattr(recurrent, name).__dimshard_op_name__)
    dims = record.recurrence(SimpleNamespace(kwargs={"chunk_size": chunk}), [tuple(x.shape) for x in inputs])
    with FlopCounterMode(display=False) as counter:
        getattr(recurrent, name)(*inputs, chunk_size=chunk)
    solve = dims.sequences * dims.tokens * dims.chunk * (dims.key_dim + dims.value_dim) if dims.delta else 0
    assert record.cost == "recurrent" and dims.chunk == chunk
    assert counter.get_total_flops() + solve == pytest.approx(dims.flops(), rel=1e-9)


def _call(name: str, shapes: list[tuple[int, ...]], outputs: list[tuple[int, ...]], *args, **kwargs) -> str:
    metas = [TensorMeta(s, torch.float32) for s in shapes]
    call = OpCall(name, (*metas[:1], *args) if name == "torch.tensor_split" else (metas, *args), kwargs, metas,
                  [TensorMeta(s, torch.float32) for s in outputs])
    return get_rule(name)(call)


def test_the_cache_split_at_the_sequence_end_and_a_single_cat_are_identities():
    """Training runs the mixers' cache path with an empty remainder: ``tensor_split(x, [l], dim=1)`` and
    ``cat([y], dim=1)`` keep the sequence splittable; a real cut or join keeps it whole."""
    whole = _call("torch.tensor_split", [(2, 16, 4)], [(2, 16, 4), (2, 0, 4)], [16], dim=1)
    assert whole == "c0 c1 c2 -> c0 c1 c2, c0 x0^ c2"
    assert "^" in _call("torch.tensor_split", [(2, 16, 4)], [(2, 8, 4), (2, 8, 4)], [8], dim=1).split("->")[0]
    assert _call("torch.cat", [(2, 16, 4)], [(2, 16, 4)], dim=1) == "c0 c1 c2 -> c0 c1 c2"
    assert "^" in _call("torch.cat", [(2, 16, 4), (2, 16, 4)], [(2, 32, 4)], dim=1)


class _Mixer(torch.nn.Module):
    """A short convolution, then the gated delta rule on its output: the shape of Gated DeltaNet's mixer."""

    def __init__(self, heads: int = 2, key_dim: int = 8, value_dim: int = 8) -> None:
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_dim
        width = heads * (2 * key_dim + value_dim)
        self.conv = torch.nn.Parameter(torch.randn(width, 4))
        self.gates = torch.nn.Linear(width, 2 * heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        mixed = recurrent.causal_conv1d(x.transpose(1, 2), self.conv, activation="silu").transpose(1, 2)
        q, k, v = mixed.split([self.heads * self.key_dim] * 2 + [self.heads * self.value_dim], dim=-1)
        g, beta = self.gates(x).split(self.heads, dim=-1)
        out = recurrent.gated_delta_rule(q.reshape(b, length, self.heads, self.key_dim),
                                         k.reshape(b, length, self.heads, self.key_dim),
                                         v.reshape(b, length, self.heads, self.value_dim), -F.softplus(g),
                                         beta.sigmoid(), use_qk_l2norm=True, chunk_size=4)
        return out.sum()


def _planned(length: int, ranks: int = 4):
    from dimshard.planner.graph.trace import trace
    from dimshard.planner.plan.resolve import resolve_placements
    from dimshard.planner.plan.sequence_split import extra_split_names, plan_layout
    from dimshard.planner.search.policies import PolicyContext, get_policy

    model = _Mixer()
    graph = trace(model, {"x": torch.randn(2, length, 48)})
    ops = [op for op in graph.ops if op.record.sequence_split is not None]
    assert [extra_split_names(op) for op in ops] == [["l"], ["l"]]
    resolved = resolve_placements(graph, get_policy("cp")(graph, PolicyContext(plan_ngpus=ranks)))
    return graph, resolved, ops, plan_layout(graph, resolved)


def test_cp_splits_recurrent_sequences_and_prices_a_state_exchange_independent_of_the_length():
    """Without attention the split is contiguous; the state exchanged is dk (dk + dv) fp32 values per head,
    batch and chunk whatever the length, and the convolution's k - 1 tokens per channel and chunk."""
    from dimshard.planner.cost.hardware import default_hw_profile
    from dimshard.planner.cost.op_costs import op_cost
    from dimshard.planner.cost.sequence_split_cost import recurrent_split_cost

    hw = default_hw_profile()
    exchanged = []
    for length in (32, 128):
        graph, resolved, ops, layout = _planned(length)
        assert {layout.recurrent_ops[op.index] for op in ops} == {(0, "contiguous")}
        costs = [recurrent_split_cost(graph, op, resolved.op_inputs[op.index], resolved.plan.mesh, hw, 1)
                 for op in ops]
        exchanged.append([c.exchanged_bytes for c in costs])
        assert all(c.comm_forward_s > 0 and c.comm_backward_s > 0 and c.compute_backward_s > 0 for c in costs)
        scan = ops[1]
        priced = op_cost(graph, scan, resolved.op_inputs[scan.index], resolved.op_outputs[scan.index],
                         resolved.plan.mesh, hw)  # priced as zigzag, two chunks per rank: the worst case
        zigzag = recurrent_split_cost(graph, scan, resolved.op_inputs[scan.index], resolved.plan.mesh, hw, 2)
        assert (priced.flops, priced.forward_s, priced.backward_s) == (zigzag.flops, zigzag.forward_s,
                                                                       zigzag.backward_s)
    conv_bytes, state_bytes = exchanged[0]
    assert exchanged[0] == exchanged[1]
    assert state_bytes == 2 * 2 * 8 * (8 + 8) * 4  # batch x heads x dk x (dk + dv) x fp32, one chunk per rank
    assert conv_bytes == 2 * 48 * 3 * 4  # batch x channels x (k - 1) x fp32
