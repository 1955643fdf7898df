"""Rules of ops that make tensors rather than transform sharded ones: factories (``arange``, ``zeros``,
``new_*``) and ``diff``, every dim whole; triangular masks (``triu``, ``tril``), their last two dims whole."""

from __future__ import annotations

from ..registry import OpCall, set_rule
from .rule_text import FreshNames, frozen_dims, join_dims


def _factory(call: OpCall) -> str:
    names = FreshNames("f")
    return ", ".join(join_dims(frozen_dims(t.ndim, names)) for t in call.inputs) + " -> " + ", ".join(
        join_dims(frozen_dims(t.ndim, names)) for t in call.outputs)


def _triangular(call: OpCall) -> str:
    x = call.inputs[0]
    names = [f"d{i}" + ("^" if i >= x.ndim - 2 else "") for i in range(x.ndim)]
    return f"{join_dims(names)} -> {join_dims(names)}"


for _n in ["arange", "zeros", "ones", "full", "empty", "tensor", "as_tensor", "randn", "rand", "linspace"]:
    set_rule(f"torch.{_n}", _factory)
set_rule(["torch.Tensor.new_zeros", "torch.Tensor.new_ones", "torch.Tensor.new_full", "torch.Tensor.new_empty",
          "torch.Tensor.new_tensor"], _factory)
set_rule("torch.scalar_tensor", _factory)  # CPM-Ant's masked fill value
set_rule("torch.diff", _factory)
set_rule(["torch.Tensor.triu", "torch.triu", "torch.Tensor.tril", "torch.tril"], _triangular)
