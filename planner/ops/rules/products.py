"""Rules of products: linear layers, matmul and bmm, and the products that add a summand (addmm, baddbmm).

A summed dim (``k``) may be split: each rank then holds a partial sum (Partial). A tensor the product
adds to its result (a bias) is a ``+`` summand, so that split stays allowed: the plan adds the
summand on one rank of the axis (``plan/resolve.py``)."""

from __future__ import annotations

from ..registry import OpCall, TensorMeta, set_rule
from .rule_text import join_dims, opaque


def _linear(call: OpCall) -> str:
    """``linear(x, w[, bias])``: x [... k] @ w [n k].T, plus the bias [n] (a summand) when given."""
    x = call.inputs[0]
    if x.ndim < 1:
        return opaque(call)
    return "... k, n k, +n -> ... n" if len(call.inputs) == 3 else "... k, n k -> ... n"


def _matmul(call: OpCall) -> str:
    a, b = call.inputs
    out = call.outputs[0]
    if a.ndim < 2 or b.ndim < 2:
        return opaque(call)
    batch = out.ndim - 2
    names = [f"b{i}" for i in range(batch)]

    def spec(t: TensorMeta, last: list[str]) -> str:
        offset = batch - (t.ndim - 2)
        dims = []
        for i in range(t.ndim - 2):
            j = i + offset
            dims.append("1" if t.shape[i] == 1 and out.shape[j] != 1 else names[j])
        return join_dims(dims + last)

    return f"{spec(a, ['m', 'k'])}, {spec(b, ['k', 'n'])} -> {join_dims(names + ['m', 'n'])}"


def _addmm(call: OpCall) -> str:
    """``addmm(bias, x, w)`` (GPT-2's Conv1D): bias [n] or [m n] (a summand), x [m k], w [k n]."""
    bias = call.inputs[0]
    if len(call.inputs) != 3 or call.inputs[1].ndim != 2 or call.inputs[2].ndim != 2 or bias.ndim > 2:
        return opaque(call)
    bias_spec = {0: "", 1: "n", 2: "m n"}[bias.ndim]
    if bias.ndim == 2:
        bias_spec = " ".join("1" if s == 1 else n for s, n in zip(bias.shape, ["m", "n"]))
    elif bias.ndim == 1 and bias.shape[0] == 1:
        bias_spec = "1"
    return f"+{bias_spec}, m k, k n -> m n"


def _baddbmm(call: OpCall) -> str:
    """``baddbmm(input, b1, b2)``: beta * input + alpha * b1 @ b2 over batched [b m k] x [b k n]; input a summand.

    ``beta`` scales the summand on every rank, so a Partial summand still sums to ``beta * input``.
    """
    bias, a, b = (call.inputs + [None, None, None])[:3]
    if len(call.inputs) != 3 or a.ndim != 3 or b.ndim != 3 or bias.ndim > 3:
        return opaque(call)
    full = ["b", "m", "n"][3 - bias.ndim:]
    offset = 3 - bias.ndim
    bias_spec = join_dims(["1" if size == 1 and call.outputs[0].shape[offset + i] != 1 else full[i]
                      for i, size in enumerate(bias.shape)])
    return f"+{bias_spec}, b m k, b k n -> b m n"


set_rule("torch.nn.functional.linear", _linear, cost="matmul", role="projection")
set_rule(["torch.matmul", "torch.Tensor.matmul", "torch.bmm", "torch.Tensor.bmm"], _matmul, cost="matmul")
set_rule("torch.Tensor.__matmul__", _matmul, cost="matmul", operator="@")
set_rule("torch.addmm", _addmm)
set_rule(["torch.baddbmm", "torch.Tensor.baddbmm"], _baddbmm)
