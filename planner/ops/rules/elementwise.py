"""Elementwise rules: broadcasting arithmetic and comparisons, activations, casts and copies, with their facts
(cost class, what the backward keeps, the infix form generated code writes)."""

from __future__ import annotations

from ..registry import OpCall, set_rule
from .rule_text import FreshNames, accept_zero_dim, frozen_dims, join_dims, opaque


def elementwise(call: OpCall) -> str:
    """Broadcasting elementwise op: dims aligned from the right, size-1 broadcast dims are ``1``."""
    out = call.outputs[0]
    names = [f"d{i}" for i in range(out.ndim)]
    ins = []
    for t in call.inputs:
        offset = out.ndim - t.ndim
        if offset < 0:
            return opaque(call)
        dims = []
        for i, size in enumerate(t.shape):
            j = i + offset
            dims.append("1" if size == 1 and out.shape[j] != 1 else names[j])
        ins.append(join_dims(dims))
    outs = [join_dims(names) for _ in call.outputs]
    return ", ".join(ins) + " -> " + ", ".join(outs)


def _first_elementwise(call: OpCall) -> str:
    """Elementwise in the first tensor; further tensors (``x.to(other)``) only lend dtype/device."""
    names = FreshNames("o")
    first = elementwise(OpCall(call.name, call.args, call.kwargs, call.inputs[:1], call.outputs))
    left, right = first.split("->")
    rest = [join_dims(frozen_dims(t.ndim, names)) for t in call.inputs[1:]]
    return ", ".join([left.strip()] + rest) + " -> " + right.strip()


_ELEMENTWISE = [
    "add", "sub", "mul", "div", "true_divide", "pow", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "sin", "cos",
    "tanh", "sigmoid", "reciprocal", "square", "clamp", "clip", "maximum", "minimum", "eq", "ne", "lt", "gt",
    "le", "ge", "logical_and", "logical_or", "logical_not", "bitwise_and", "bitwise_or", "bitwise_not",
    "where", "masked_fill", "float", "half", "bfloat16", "double", "int", "long", "bool", "contiguous",
    "clone", "detach", "__radd__", "__rsub__", "__rmul__", "__rtruediv__", "__rpow__", "__and__", "__or__",
    "__invert__", "__neg__", "__truediv__", "__floordiv__", "__mod__", "floor_divide", "remainder", "erf",
    "zeros_like", "ones_like", "full_like", "empty_like", "type", "requires_grad_", "__eq__", "__ne__",
    "__lt__", "__gt__", "__le__", "__ge__", "__pow__", "__rpow__", "__sub__", "__mul__", "__add__", "add_",
    "mul_", "masked_fill_", "copy_", "lerp", "addcmul",
]

_MORE_ELEMENTWISE = ["div_", "sub_", "neg_", "clamp_", "pow_", "exp_", "tanh_", "sqrt_", "rsqrt_", "sigmoid_",
                     "relu", "floor", "ceil", "round", "trunc", "sign", "log1p", "expm1", "sinh", "cosh", "atan", "log2",
                     "exp2", "fmod", "isnan", "isinf", "isfinite", "nan_to_num", "clamp_min", "clamp_max"]

# Infix forms generated code writes instead of ``torch.Tensor.__add__(a, b)``.
_OPERATORS = {
    "__add__": "+", "__sub__": "-", "__mul__": "*", "__truediv__": "/", "__pow__": "**", "__eq__": "==",
    "__ne__": "!=", "__lt__": "<", "__gt__": ">", "__le__": "<=", "__ge__": ">=", "__and__": "&", "__or__": "|",
}

# Unary and binary ops whose backward needs no saved values.
_ADDITIVE = ["torch.Tensor.add", "torch.add", "torch.Tensor.__add__", "torch.Tensor.__radd__", "torch.Tensor.add_",
             "torch.Tensor.sub", "torch.sub", "torch.Tensor.__sub__", "torch.Tensor.__rsub__", "torch.Tensor.neg",
             "torch.neg", "torch.Tensor.__neg__", "torch.Tensor.copy_"]

# Products: the backward of one operand needs the other, so a product with a constant keeps nothing.
_PRODUCTS = ["torch.Tensor.mul", "torch.mul", "torch.Tensor.__mul__", "torch.Tensor.__rmul__", "torch.Tensor.mul_",
             "torch.Tensor.div", "torch.div", "torch.Tensor.__truediv__", "torch.Tensor.__rtruediv__"]


for _n in _ELEMENTWISE + _MORE_ELEMENTWISE:
    set_rule([f"torch.Tensor.{_n}", f"torch.{_n}"], elementwise)
for _n in ["silu", "gelu", "relu", "dropout", "softplus", "leaky_relu", "elu", "mish", "hardswish", "tanh", "sigmoid",
           "logsigmoid", "relu6", "selu", "celu", "gelu_new"]:
    set_rule(f"torch.nn.functional.{_n}", elementwise)
set_rule(["torch.Tensor.to", "torch.Tensor.type_as"], _first_elementwise, cost="cast")
set_rule(["torch.Tensor.detach", "torch.Tensor.requires_grad_"], cost="view")
set_rule([f"torch.Tensor.{_n}" for _n in ("float", "type", "bfloat16", "half", "double")], cost="cast")
set_rule(["torch.Tensor.contiguous", "torch.Tensor.clone"], cost="copy")
set_rule(_ADDITIVE, saves="nothing")
set_rule(_PRODUCTS, saves="other_operand")
for _method, _symbol in _OPERATORS.items():
    set_rule(f"torch.Tensor.{_method}", operator=_symbol)
accept_zero_dim([f"torch.Tensor.{_n}" for _n in _ELEMENTWISE + _MORE_ELEMENTWISE] +
                [f"torch.{_n}" for _n in _ELEMENTWISE + _MORE_ELEMENTWISE] + ["torch.Tensor.to", "torch.Tensor.type_as"])
