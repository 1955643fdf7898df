"""Dim-annotation rules for the torch ops that Hugging Face decoder models call.

String rules cover fixed signatures; rule functions build the annotation from the call's
arguments and shapes. Conventions: a reduction over a dim is a partial sum only for sum-like
ops (``sum``, ``linear``, ``matmul``); other reductions (``mean``, ``softmax``, ``max``) mark the
reduced dim ``^`` so it is never split. A tensor a product adds to its result (the bias of
``linear``, ``addmm``, ``baddbmm``) is a ``+`` summand, so the product's sum may still be split:
the plan adds the summand on one rank of the axis (planner/plan.py).
"""

from __future__ import annotations

from typing import Any

from .registry import OpCall, TensorMeta, get_rule, set_rule


class _Names:
    """Fresh dim names ``a0, a1, ...`` with a prefix per role."""

    def __init__(self, prefix: str = "d") -> None:
        self.prefix = prefix
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count - 1}"


def _fmt(dims: list[str]) -> str:
    return " ".join(dims)


def _frozen(n: int, names: _Names) -> list[str]:
    return [names() + "^" for _ in range(n)]


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _opaque(call: OpCall) -> str:
    """Every dim of every tensor frozen: the op runs whole (replicated) on every rank."""
    names = _Names("z")
    ins = [_fmt(_frozen(t.ndim, names)) for t in call.inputs]
    outs = [_fmt(_frozen(t.ndim, names)) for t in call.outputs]
    return ", ".join(ins) + " -> " + ", ".join(outs)


def _elementwise(call: OpCall) -> str:
    """Broadcasting elementwise op: dims aligned from the right, size-1 broadcast dims are ``1``."""
    out = call.outputs[0]
    names = [f"d{i}" for i in range(out.ndim)]
    ins = []
    for t in call.inputs:
        offset = out.ndim - t.ndim
        if offset < 0:
            return _opaque(call)
        dims = []
        for i, size in enumerate(t.shape):
            j = i + offset
            dims.append("1" if size == 1 and out.shape[j] != 1 else names[j])
        ins.append(_fmt(dims))
    outs = [_fmt(names) for _ in call.outputs]
    return ", ".join(ins) + " -> " + ", ".join(outs)


def _first_elementwise(call: OpCall) -> str:
    """Elementwise in the first tensor; further tensors (``x.to(other)``) only lend dtype/device."""
    names = _Names("o")
    first = _elementwise(OpCall(call.name, call.args, call.kwargs, call.inputs[:1], call.outputs))
    left, right = first.split("->")
    rest = [_fmt(_frozen(t.ndim, names)) for t in call.inputs[1:]]
    return ", ".join([left.strip()] + rest) + " -> " + right.strip()


def _dims_arg(call: OpCall, index: int, name: str, ndim: int) -> list[int] | None:
    dim = call.arg(index, name)
    if dim is None:
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(_norm_dim(d, ndim) for d in dims)


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
        out_specs = [_fmt(outs)] * len(call.outputs)  # max/min with dim return (values, indices)
        extra = [_fmt(_frozen(t.ndim, _Names("x"))) for t in call.inputs[1:]]
        return ", ".join([_fmt(ins)] + extra) + " -> " + ", ".join(out_specs)

    return rule


def _along_dim(dim_index: int = 1) -> Any:
    """Ops that work along one dim and keep the shape (softmax, cumsum): that dim is never split."""

    def rule(call: OpCall) -> str:
        x = call.inputs[0]
        d = _norm_dim(call.arg(dim_index, "dim", -1), x.ndim)
        names = [f"d{i}" + ("^" if i == d else "") for i in range(x.ndim)]
        return _fmt(names) + " -> " + _fmt(names)

    return rule


def _linear(call: OpCall) -> str:
    """``linear(x, w[, bias])``: x [... k] @ w [n k].T, plus the bias [n] (a summand) when given."""
    x = call.inputs[0]
    if x.ndim < 1:
        return _opaque(call)
    return "... k, n k, +n -> ... n" if len(call.inputs) == 3 else "... k, n k -> ... n"


def _matmul(call: OpCall) -> str:
    a, b = call.inputs
    out = call.outputs[0]
    if a.ndim < 2 or b.ndim < 2:
        return _opaque(call)
    batch = out.ndim - 2
    names = [f"b{i}" for i in range(batch)]

    def spec(t: TensorMeta, last: list[str]) -> str:
        offset = batch - (t.ndim - 2)
        dims = []
        for i in range(t.ndim - 2):
            j = i + offset
            dims.append("1" if t.shape[i] == 1 and out.shape[j] != 1 else names[j])
        return _fmt(dims + last)

    return f"{spec(a, ['m', 'k'])}, {spec(b, ['k', 'n'])} -> {_fmt(names + ['m', 'n'])}"


def _map_reshape(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str:
    """Annotation mapping the dims of a view/reshape: ``b l (h d) -> b l h d``."""
    names = _Names("v")
    ins: list[str] = []
    outs: list[str] = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        if i < len(in_shape) and in_shape[i] == 1:
            ins.append("1")
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1:
            outs.append("1")
            j += 1
            continue
        if i >= len(in_shape) or j >= len(out_shape):
            raise ValueError(f"cannot map reshape {list(in_shape)} -> {list(out_shape)}")
        gi, gj = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= in_shape[i]
            else:
                j += 1
                gj.append(j)
                pj *= out_shape[j]
        i += 1
        j += 1
        if len(gi) == 1 and len(gj) == 1:
            n = names()
            ins.append(n)
            outs.append(n)
        elif len(gi) == 1:
            group = [names() for _ in gj]
            ins.append("(" + " ".join(group) + ")")
            outs.extend(group)
        elif len(gj) == 1:
            group = [names() for _ in gi]
            outs.append("(" + " ".join(group) + ")")
            ins.extend(group)
        else:
            ins.extend(names() + "^" for _ in gi)
            outs.extend(names() + "^" for _ in gj)
    return f"{_fmt(ins)} -> {_fmt(outs)}"


def _reshape(call: OpCall) -> str:
    return _map_reshape(call.inputs[0].shape, call.outputs[0].shape)


def _transpose(call: OpCall) -> str:
    x = call.inputs[0]
    d0 = _norm_dim(call.arg(1, "dim0"), x.ndim)
    d1 = _norm_dim(call.arg(2, "dim1"), x.ndim)
    names = [f"d{i}" for i in range(x.ndim)]
    out = list(names)
    out[d0], out[d1] = out[d1], out[d0]
    return f"{_fmt(names)} -> {_fmt(out)}"


def _permute(call: OpCall) -> str:
    x = call.inputs[0]
    dims = call.args[1:] if len(call.args) > 2 else call.arg(1, "dims")
    if isinstance(dims, int):
        dims = [dims]
    names = [f"d{i}" for i in range(x.ndim)]
    return f"{_fmt(names)} -> {_fmt([names[_norm_dim(d, x.ndim)] for d in dims])}"


def _squeeze_like(call: OpCall) -> str:
    """unsqueeze/squeeze/flatten/unflatten: a reshape between the two shapes."""
    return _map_reshape(call.inputs[0].shape, call.outputs[0].shape)


def _expand(call: OpCall) -> str:
    x, out = call.inputs[0], call.outputs[0]
    names = _Names("x")
    offset = out.ndim - x.ndim
    outs = [names() + "^" for _ in range(offset)]
    ins = []
    for i, size in enumerate(x.shape):
        if size == 1 and out.shape[i + offset] != 1:
            ins.append("1")
            outs.append(names() + "^")
        else:
            n = names()
            ins.append(n)
            outs.append(n)
    return f"{_fmt(ins)} -> {_fmt(outs)}"


def _is_full_slice(s: slice, size: int) -> bool:
    start_ok = s.start is None or s.start == 0 or s.start <= -size
    stop_ok = s.stop is None or s.stop >= size
    return start_ok and stop_ok and (s.step is None or s.step == 1)


def _getitem(call: OpCall) -> str:
    x = call.inputs[0]
    index = call.args[1]
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(it, (TensorMeta, list)) for it in items) or len(call.inputs) > 1:
        return _opaque(call)
    consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
    names = _Names("g")
    ins: list[str] = []
    outs: list[str] = []
    dim = 0
    for it in items:
        if it is Ellipsis:
            for _ in range(x.ndim - consuming):
                n = names()
                ins.append(n)
                outs.append(n)
                dim += 1
        elif it is None:
            outs.append("1")
        elif isinstance(it, bool):
            return _opaque(call)
        elif isinstance(it, int):
            ins.append(names() + "^")
            dim += 1
        elif isinstance(it, slice):
            if _is_full_slice(it, x.shape[dim]):
                n = names()
                ins.append(n)
                outs.append(n)
            else:
                ins.append(names() + "^")
                outs.append(names() + "^")
            dim += 1
        else:
            return _opaque(call)
    while dim < x.ndim:
        n = names()
        ins.append(n)
        outs.append(n)
        dim += 1
    return f"{_fmt(ins)} -> {_fmt(outs)}"


def _cat(call: OpCall) -> str:
    first = call.inputs[0]
    if any(t.ndim != first.ndim for t in call.inputs):
        return _opaque(call)  # legacy cat of an empty 1-d tensor
    d = _norm_dim(call.arg(1, "dim", 0), first.ndim)
    names = _Names("x")
    shared = [f"c{i}" for i in range(first.ndim)]
    ins = []
    for _t in call.inputs:
        dims = list(shared)
        dims[d] = names() + "^"
        ins.append(_fmt(dims))
    out = list(shared)
    out[d] = names() + "^"
    return ", ".join(ins) + " -> " + _fmt(out)


def _split(call: OpCall) -> str:
    x = call.inputs[0]
    d = _norm_dim(call.arg(2, "dim", 0), x.ndim)
    names = _Names("x")
    shared = [f"c{i}" for i in range(x.ndim)]
    ins = list(shared)
    ins[d] = names() + "^"
    outs = []
    for _t in call.outputs:
        dims = list(shared)
        dims[d] = names() + "^"
        outs.append(_fmt(dims))
    return _fmt(ins) + " -> " + ", ".join(outs)


def _stack(call: OpCall) -> str:
    first = call.inputs[0]
    d = _norm_dim(call.arg(1, "dim", 0), first.ndim + 1)
    shared = [f"c{i}" for i in range(first.ndim)]
    out = list(shared)
    out.insert(d, "s^")
    return ", ".join(_fmt(shared) for _ in call.inputs) + " -> " + _fmt(out)


def _pad(call: OpCall) -> str:
    x = call.inputs[0]
    pad = list(call.arg(1, "pad"))
    padded = {x.ndim - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    names = [f"d{i}" for i in range(x.ndim)]
    ins = [n + "^" if i in padded else n for i, n in enumerate(names)]
    outs = [f"p{i}^" if i in padded else n for i, n in enumerate(names)]
    return f"{_fmt(ins)} -> {_fmt(outs)}"


def _embedding(call: OpCall) -> str:
    idx = call.inputs[0]
    names = [f"i{k}" for k in range(idx.ndim)]
    # Splitting the vocabulary would need masked lookups and a sum: keep n whole.
    return f"{_fmt(names)}, n^ d -> {_fmt(names + ['d'])}"


def _cross_entropy(call: OpCall) -> str:
    x = call.inputs[0]
    reduction = call.arg(6, "reduction", "mean")
    extra = [f"s{i}" for i in range(x.ndim - 2)] if x.ndim > 1 else []
    if x.ndim == 1:
        return _opaque(call)
    n = "n^" if reduction == "mean" else "n"  # a mean over split tokens is not a sum of the parts
    inp = _fmt([n, "c^"] + extra)
    tgt = _fmt([n] + extra)
    weight = [_fmt(["c^"])] if len(call.inputs) > 2 else []
    out = _fmt([n] + extra) if reduction == "none" else ""
    return ", ".join([inp, tgt] + weight) + " -> " + out


def _sdpa(call: OpCall) -> str:
    q, k = call.inputs[0], call.inputs[1]
    if q.ndim != 4 or k.ndim != 4:
        return _opaque(call)
    heads_q, heads_kv = q.shape[1], k.shape[1]
    if heads_q == heads_kv:
        qh, kh = "h", "h"
    else:
        # Grouped-query attention: query heads are (kv group, repeat); splitting g keeps groups whole.
        qh, kh = "(h r^)", "h"
    spec = f"b {qh} l^ e^, b {kh} s^ e^, b {kh} s^ f^"
    mask = call.arg(3, "attn_mask")
    if isinstance(mask, TensorMeta):
        dims = []
        for i, size in enumerate(mask.shape[-4:] if mask.ndim >= 4 else mask.shape):
            full = ["b", qh, "l^", "s^"][4 - mask.ndim + i] if mask.ndim < 4 else ["b", qh, "l^", "s^"][i]
            dims.append("1" if size == 1 else full.replace("(h r^)", "m^"))
        spec += ", " + _fmt(dims)
    return f"{spec} -> b {qh} l^ f^"


def _factory(call: OpCall) -> str:
    names = _Names("f")
    return ", ".join(_fmt(_frozen(t.ndim, names)) for t in call.inputs) + " -> " + ", ".join(
        _fmt(_frozen(t.ndim, names)) for t in call.outputs)


def _triangular(call: OpCall) -> str:
    x = call.inputs[0]
    names = [f"d{i}" + ("^" if i >= x.ndim - 2 else "") for i in range(x.ndim)]
    return f"{_fmt(names)} -> {_fmt(names)}"


def _sdpa_density(op: Any, queries: int, keys: int) -> float:
    """A causal call computes half of the ``queries x keys`` scores."""
    return 0.5 if op.arg(5, "is_causal", False) else 1.0


def _local_output_shape(args: tuple, kwargs: dict, local_out: tuple[int, ...]) -> tuple[tuple, dict]:
    """view / reshape / expand: the shape argument becomes the local output's shape."""
    return (args[0], tuple(local_out)), kwargs


def _local_unflatten(args: tuple, kwargs: dict, local_out: tuple[int, ...]) -> tuple[tuple, dict]:
    """unflatten(dim, sizes): ``sizes`` become the local output's sizes at those dims."""
    call = OpCall("unflatten", args, kwargs, [], [])
    dim, sizes = call.arg(1, "dim"), call.arg(2, "sizes")
    in_ndim = len(local_out) - len(sizes) + 1
    start = _norm_dim(dim, in_ndim)
    local = tuple(local_out[start:start + len(sizes)])
    if len(args) > 2:
        return (*args[:2], local, *args[3:]), kwargs
    return args, {**kwargs, "sizes": local}


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


def _register_defaults() -> None:
    for n in _ELEMENTWISE:
        set_rule([f"torch.Tensor.{n}", f"torch.{n}"], _elementwise)
    for n in ["silu", "gelu", "relu", "dropout", "softplus", "leaky_relu", "elu", "mish", "hardswish"]:
        set_rule(f"torch.nn.functional.{n}", _elementwise)
    set_rule(["torch.Tensor.to", "torch.Tensor.type_as"], _first_elementwise, cost="cast")
    set_rule("torch.nn.functional.linear", _linear, cost="matmul", role="projection")
    set_rule(["torch.matmul", "torch.Tensor.matmul", "torch.bmm", "torch.Tensor.bmm"], _matmul, cost="matmul")
    set_rule("torch.Tensor.__matmul__", _matmul, cost="matmul", operator="@")
    set_rule(["torch.Tensor.view", "torch.Tensor.reshape", "torch.reshape"], _reshape, cost="view",
             localize=_local_output_shape)
    set_rule(["torch.Tensor.view_as", "torch.Tensor.reshape_as"], _reshape, cost="view")
    set_rule(["torch.Tensor.unsqueeze", "torch.unsqueeze", "torch.Tensor.squeeze", "torch.squeeze",
              "torch.Tensor.flatten", "torch.flatten"], _squeeze_like, cost="view")
    set_rule(["torch.Tensor.unflatten", "torch.unflatten"], _squeeze_like, cost="view", localize=_local_unflatten)
    set_rule(["torch.Tensor.transpose", "torch.transpose"], _transpose, cost="view")
    set_rule(["torch.Tensor.permute", "torch.permute"], _permute, cost="view")
    set_rule("torch.Tensor.expand", _expand, cost="view", localize=_local_output_shape)
    set_rule("torch.Tensor.expand_as", _expand, cost="view")
    set_rule("torch.Tensor.__getitem__", _getitem, cost="view", operator="[]")
    set_rule("torch.Tensor.__setitem__", _opaque, mutates_first_arg=True)
    set_rule(["torch.cat", "torch.concat", "torch.concatenate"], _cat, saves="nothing")
    set_rule("torch.stack", _stack, saves="nothing")
    set_rule(["torch.Tensor.split", "torch.split", "torch.Tensor.chunk", "torch.chunk"], _split, cost="view")
    set_rule(["torch.Tensor.sum", "torch.sum"], _reduction(sum_like=True), saves="nothing")
    for n in ["mean", "amax", "amin", "all", "any", "prod", "logsumexp", "norm", "var", "std"]:
        set_rule([f"torch.Tensor.{n}", f"torch.{n}"], _reduction(sum_like=False))
    set_rule(["torch.Tensor.mean", "torch.mean"], saves="nothing")
    set_rule(["torch.Tensor.max", "torch.max", "torch.Tensor.min", "torch.min"], _reduction(sum_like=False))
    for n in ["softmax", "log_softmax", "cumsum", "cumprod"]:
        set_rule([f"torch.Tensor.{n}", f"torch.{n}", f"torch.nn.functional.{n}"], _along_dim())
    set_rule("torch.diff", _factory)
    set_rule(["torch.Tensor.triu", "torch.triu", "torch.Tensor.tril", "torch.tril"], _triangular)
    set_rule("torch.nn.functional.pad", _pad, saves="nothing")
    set_rule("torch.nn.functional.embedding", _embedding, role="embedding")
    set_rule("torch.nn.functional.cross_entropy", _cross_entropy)
    # Generated code calls dimshard's drop-in, which prefers cuDNN on Hopper (523 against 319
    # TFLOP/s for torch's default choice, benchmarks/RESULTS.md).
    set_rule("torch.nn.functional.scaled_dot_product_attention", _sdpa, cost="attention",
             substitute="dimshard.kernels.attention.scaled_dot_product_attention", mask_density=_sdpa_density)
    for n in ["arange", "zeros", "ones", "full", "empty", "tensor", "as_tensor", "randn", "rand", "linspace"]:
        set_rule(f"torch.{n}", _factory)
    set_rule(["torch.Tensor.new_zeros", "torch.Tensor.new_ones", "torch.Tensor.new_full", "torch.Tensor.new_empty",
              "torch.Tensor.new_tensor"], _factory)

    _register_elementwise_facts()


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
# Calls that only read metadata or control autograd state: run, never recorded.
_UNRECORDED = [
    "torch.Tensor.size", "torch.Tensor.dim", "torch.Tensor.numel", "torch.Tensor.__len__",
    "torch.Tensor.__bool__", "torch.Tensor.item", "torch.Tensor.tolist", "torch.Tensor.is_floating_point",
    "torch.Tensor.is_contiguous", "torch.Tensor.stride", "torch.Tensor.data_ptr", "torch.Tensor.element_size",
    "torch.Tensor.__format__", "torch.Tensor.__repr__", "torch.Tensor.get_device", "torch.Tensor.__index__",
    "torch.Tensor.__int__", "torch.Tensor.__float__", "torch.Tensor.__hash__", "torch.Tensor.is_complex",
    "torch.is_floating_point", "torch.is_tensor", "torch.numel", "torch.is_complex",
    "torch.is_autocast_enabled", "torch.get_autocast_dtype", "torch.Tensor.untyped_storage",
]


def _register_elementwise_facts() -> None:
    """Cost classes, saved values and operator forms of the ops ``_ELEMENTWISE`` registers."""
    set_rule(["torch.Tensor.detach", "torch.Tensor.requires_grad_"], cost="view")
    set_rule([f"torch.Tensor.{n}" for n in ("float", "type", "bfloat16", "half", "double")], cost="cast")
    set_rule(["torch.Tensor.contiguous", "torch.Tensor.clone"], cost="copy")
    set_rule(_ADDITIVE, saves="nothing")
    set_rule(_PRODUCTS, saves="other_operand")
    for method, symbol in _OPERATORS.items():
        set_rule(f"torch.Tensor.{method}", operator=symbol)
    set_rule(_UNRECORDED, traced=False)


_register_defaults()


# ============================================================================================
# Model breadth: ops of further decoder families (LayerNorm models, Gemma's scalar embedding
# scale, interleaved and partial rotary, GPT-2's Conv1D). Each rule has a case in
# tests/test_op_rules.py; the families are exercised end to end by tests/test_model_breadth.py.
# ============================================================================================


def _zero_dim_safe(rule: Any) -> Any:
    """``rule`` for calls whose only tensor input is 0-d too (Gemma's ``normalizer.to(dtype)``).

    A 0-d tensor is an empty spec, and an annotation whose left side is empty names no inputs;
    ``...`` (bound to no dims) names the one 0-d input instead.
    """

    def rule_with_scalars(call: OpCall) -> str:
        text = rule(call)
        left, right = text.split("->")
        if len(call.inputs) == 1 and not left.strip():
            return "... ->" + right
        return text

    rule_with_scalars.__wrapped__ = rule  # type: ignore[attr-defined]
    return rule_with_scalars


def _layer_norm(call: OpCall) -> str:
    """layer_norm / rms_norm over the trailing ``normalized_shape`` dims; weight and bias (if any) have those dims."""
    x = call.inputs[0]
    shape = call.arg(1, "normalized_shape")
    k = 1 if isinstance(shape, int) else len(shape)
    lead = [f"d{i}" for i in range(x.ndim - k)]
    normed = [f"n{i}^" for i in range(k)]
    params = [_fmt(normed)] * (len(call.inputs) - 1)
    return ", ".join([_fmt(lead + normed)] + params) + " -> " + _fmt(lead + normed)


def _repeat_interleave(call: OpCall) -> str:
    """``repeat_interleave(x, r, dim)``: out[i * r + j] = x[i] along ``dim``, the dim ``(d r)`` with r created."""
    x = call.inputs[0]
    repeats, dim = call.arg(1, "repeats"), call.arg(2, "dim")
    if dim is None or not isinstance(repeats, int) or len(call.inputs) > 1 or repeats < 1:
        return _opaque(call)  # flattening, or per-element repeat counts
    d = _norm_dim(dim, x.ndim)
    names = [f"d{i}" for i in range(x.ndim)]
    out = list(names)
    if repeats > 1:
        out[d] = f"({names[d]} r)"
    return f"{_fmt(names)} -> {_fmt(out)}"


def _repeat(call: OpCall) -> str:
    """``x.repeat(*sizes)``: tiled dims (and new leading ones) are created whole; untiled dims map through."""
    x = call.inputs[0]
    sizes = call.args[1:] if len(call.args) > 2 else call.arg(1, "repeats")
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    extra = len(sizes) - x.ndim
    if extra < 0:
        return _opaque(call)
    names = _Names("x")
    ins: list[str] = []
    outs = [names() + "^" for _ in range(extra)]
    for i in range(x.ndim):
        n = names()
        if sizes[extra + i] == 1:
            ins.append(n)
            outs.append(n)
        else:
            ins.append(n + "^")
            outs.append(names() + "^")
    return f"{_fmt(ins)} -> {_fmt(outs)}"


def _addmm(call: OpCall) -> str:
    """``addmm(bias, x, w)`` (GPT-2's Conv1D): bias [n] or [m n] (a summand), x [m k], w [k n]."""
    bias = call.inputs[0]
    if len(call.inputs) != 3 or call.inputs[1].ndim != 2 or call.inputs[2].ndim != 2 or bias.ndim > 2:
        return _opaque(call)
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
        return _opaque(call)
    full = ["b", "m", "n"][3 - bias.ndim:]
    offset = 3 - bias.ndim
    bias_spec = _fmt(["1" if size == 1 and call.outputs[0].shape[offset + i] != 1 else full[i]
                      for i, size in enumerate(bias.shape)])
    return f"+{bias_spec}, b m k, b k n -> b m n"


def _transpose_2d(call: OpCall) -> str:
    """``x.T`` of a 2-d tensor swaps its dims (other ranks: whole, and ``torch.t`` refuses them at run time)."""
    return "a b -> b a" if call.inputs[0].ndim == 2 else _opaque(call)


def _with_shape_operand(rule: Any) -> Any:
    """``expand_as`` / ``view_as`` / ``reshape_as``: the second tensor only lends its shape (frozen, no flow)."""

    def rule_with_operand(call: OpCall) -> str:
        first = rule(OpCall(call.name, call.args, call.kwargs, call.inputs[:1], call.outputs))
        if len(call.inputs) == 1:
            return first
        left, right = first.split("->")
        rest = [_fmt(_frozen(t.ndim, _Names("w"))) for t in call.inputs[1:]]
        return ", ".join([left.strip() or "..."] + rest) + " ->" + right

    rule_with_operand.__wrapped__ = rule  # type: ignore[attr-defined]
    return rule_with_operand


def _binary_or_reduction(reduction: Any) -> Any:
    """``torch.max(a, b)`` / ``torch.min(a, b)`` of two tensors is elementwise; with a dim it is a reduction."""

    def rule(call: OpCall) -> str:
        return _elementwise(call) if len(call.inputs) > 1 else reduction(call)

    rule.__wrapped__ = reduction  # type: ignore[attr-defined]
    return rule


def _index_select(call: OpCall) -> str:
    """``x.index_select(dim, index)``: other dims map through; the selected dim and the index stay whole."""
    x = call.inputs[0]
    if len(call.inputs) != 2 or call.inputs[1].ndim != 1:
        return _opaque(call)
    d = _norm_dim(call.arg(1, "dim"), x.ndim)
    ins = [f"d{i}" + ("^" if i == d else "") for i in range(x.ndim)]
    outs = [f"d{i}" if i != d else "s^" for i in range(x.ndim)]
    return f"{_fmt(ins)}, s^ -> {_fmt(outs)}"


def _gather(call: OpCall) -> str:
    """``torch.gather(x, dim, index)``: the output has the index's shape. The gathered dim of ``x``
    stays whole and the index's (the output's) may split; another dim maps through where ``x`` and
    the index have the same size there, and stays whole where the index is shorter."""
    if len(call.inputs) != 2 or call.inputs[0].ndim != call.inputs[1].ndim:
        return _opaque(call)
    x, index = call.inputs
    d = _norm_dim(call.arg(1, "dim"), x.ndim)
    xs, ids = [], []
    for i in range(x.ndim):
        if i == d:
            xs.append("s^")
            ids.append("g")
        elif x.shape[i] == index.shape[i]:
            xs.append(f"d{i}")
            ids.append(f"d{i}")
        else:
            xs.append(f"x{i}^")
            ids.append(f"i{i}^")
    return f"{_fmt(xs)}, {_fmt(ids)} -> {_fmt(ids)}"


_MORE_ELEMENTWISE = ["div_", "sub_", "neg_", "clamp_", "pow_", "exp_", "tanh_", "sqrt_", "rsqrt_", "sigmoid_",
                     "relu", "floor", "ceil", "round", "trunc", "sign", "log1p", "expm1", "sinh", "cosh", "atan", "log2",
                     "exp2", "fmod", "isnan", "isinf", "isfinite", "nan_to_num", "clamp_min", "clamp_max"]


def _register_breadth_rules() -> None:
    for name in ["torch.nn.functional.layer_norm", "torch.layer_norm", "torch.nn.functional.rms_norm",
                 "torch.rms_norm"]:
        set_rule(name, _layer_norm)
    # Copies whose backward is a sum over the repeats: no values kept.
    set_rule(["torch.repeat_interleave", "torch.Tensor.repeat_interleave"], _repeat_interleave, saves="nothing")
    set_rule("torch.Tensor.repeat", _repeat, saves="nothing")
    set_rule("torch.addmm", _addmm)
    set_rule(["torch.baddbmm", "torch.Tensor.baddbmm"], _baddbmm)
    # ``w.T`` of a 2-d weight (Falcon's linear layers); generated code writes it ``t(w)``.
    set_rule("torch.Tensor.T.__get__", _transpose_2d, cost="view", substitute="torch.t")
    set_rule("torch.functional.split", get_rule("torch.split"))
    set_rule("torch.scalar_tensor", _factory)  # CPM-Ant's masked fill value
    set_rule(["torch.Tensor.index_select", "torch.index_select"], _index_select)
    set_rule(["torch.Tensor.gather", "torch.gather"], _gather)  # GPT-J's rotary table lookup (eager attention)
    for name in ["torch.Tensor.expand_as", "torch.Tensor.view_as", "torch.Tensor.reshape_as"]:
        set_rule(name, _with_shape_operand(get_rule(name)))
    for name in ["torch.max", "torch.Tensor.max", "torch.min", "torch.Tensor.min"]:
        set_rule(name, _binary_or_reduction(get_rule(name)))
    for n in _MORE_ELEMENTWISE:
        set_rule([f"torch.Tensor.{n}", f"torch.{n}"], _elementwise)
    for n in ["tanh", "sigmoid", "logsigmoid", "relu6", "selu", "celu", "gelu_new"]:
        set_rule(f"torch.nn.functional.{n}", _elementwise)
    # Every rule function that can meet a single 0-d input (casts and arithmetic on Gemma's scalar
    # normalizer, factories of a 0-d tensor) learns to name it.
    zero_dim_ops = ([f"torch.Tensor.{n}" for n in _ELEMENTWISE + _MORE_ELEMENTWISE] +
                    [f"torch.{n}" for n in _ELEMENTWISE + _MORE_ELEMENTWISE] +
                    ["torch.Tensor.to", "torch.Tensor.type_as", "torch.Tensor.expand", "torch.Tensor.expand_as",
                     "torch.Tensor.unsqueeze", "torch.unsqueeze", "torch.Tensor.view", "torch.Tensor.reshape",
                     "torch.reshape", "torch.Tensor.__getitem__", "torch.Tensor.view_as", "torch.Tensor.reshape_as"])
    for name in zero_dim_ops:
        rule = get_rule(name)
        if callable(rule) and not hasattr(rule, "__wrapped__"):
            set_rule(name, _zero_dim_safe(rule))


_register_breadth_rules()
