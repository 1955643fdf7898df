"""Rules of reductions and of ops along one dim: sums, means and extrema, softmax and cumulative ops, norms.

A reduced dim is a partial sum only for a sum; other reductions (``mean``, ``max``, ``softmax``, a
norm's statistics) mark it ``^`` so it is never split."""

from __future__ import annotations

from typing import Any

from ..registry import OpCall, get_rule, set_rule
from .elementwise import elementwise
from .rule_text import FreshNames, frozen_dims, join_dims, normalize_dim


def _dims_arg(call: OpCall, index: int, name: str, ndim: int) -> list[int] | None:
    dim = call.arg(index, name)
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(normalize_dim(d, ndim) for d in dims)


def _reduction(sum_like: bool, dim_index: int = 1, keepdim_index: int = 2) -> Any:
    def rule(call: OpCall) -> str:
        x = call.inputs[0]
        dims = _dims_arg(call, dim_index, "dim", x.ndim)
        if dims is None:
            dims = list(range(x.ndim))
        keepdim = bool(call.arg(keepdim_index, "keepdim", False))
        names = [f"d{i}" for i in range(x.ndim)]
        ins = [n + ("" if (sum_like or i not in dims) else "^") for i, n in enumerate(names)]
        outs = []
        for i, n in enumerate(names):
            if i in dims:
                if keepdim:
                    outs.append("1")
            else:
                outs.append(n)
        out_specs = [join_dims(outs)] * len(call.outputs)  # max/min with dim return (values, indices)
        extra = [join_dims(frozen_dims(t.ndim, FreshNames("x"))) for t in call.inputs[1:]]
        return ", ".join([join_dims(ins)] + extra) + " -> " + ", ".join(out_specs)

    return rule


def _along_dim(dim_index: int = 1) -> Any:
    """Ops that work along one dim and keep the shape (softmax, cumsum): that dim is never split."""

    def rule(call: OpCall) -> str:
        x = call.inputs[0]
        d = normalize_dim(call.arg(dim_index, "dim", -1), x.ndim)
        names = [f"d{i}" + ("^" if i == d else "") for i in range(x.ndim)]
        return join_dims(names) + " -> " + join_dims(names)

    return rule


def _layer_norm(call: OpCall) -> str:
    """layer_norm / rms_norm over the trailing ``normalized_shape`` dims; weight and bias (if any) have those dims."""
    x = call.inputs[0]
    shape = call.arg(1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    lead = [f"d{i}" for i in range(x.ndim - k)]
    normed = [f"n{i}^" for i in range(k)]
    params = [join_dims(normed)] * (len(call.inputs) - 1)
    return ", ".join([join_dims(lead + normed)] + params) + " -> " + join_dims(lead + normed)


def _binary_or_reduction(reduction: Any) -> Any:
    """``torch.max(a, b)`` / ``torch.min(a, b)`` of two tensors is elementwise; with a dim it is a reduction."""

    def rule(call: OpCall) -> str:
        return elementwise(call) if len(call.inputs) > 1 else reduction(call)

    rule.__wrapped__ = reduction  # type: ignore[attr-defined]
    return rule


set_rule(["torch.Tensor.sum", "torch.sum"], _reduction(sum_like=True), saves="nothing")
for _n in ["mean", "amax", "amin", "all", "any", "prod", "logsumexp", "norm", "var", "std"]:
    set_rule([f"torch.Tensor.{_n}", f"torch.{_n}"], _reduction(sum_like=False))
set_rule(["torch.Tensor.mean", "torch.mean"], saves="nothing")
set_rule(["torch.Tensor.max", "torch.max", "torch.Tensor.min", "torch.min"], _reduction(sum_like=False))
for _name in ["torch.max", "torch.Tensor.max", "torch.min", "torch.Tensor.min"]:
    set_rule(_name, _binary_or_reduction(get_rule(_name)))
for _n in ["softmax", "log_softmax", "cumsum", "cumprod"]:
    set_rule([f"torch.Tensor.{_n}", f"torch.{_n}", f"torch.nn.functional.{_n}"], _along_dim())
set_rule(["torch.nn.functional.layer_norm", "torch.layer_norm", "torch.nn.functional.rms_norm", "torch.rms_norm"],
         _layer_norm)
