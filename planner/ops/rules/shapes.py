"""Rules of ops that move dims rather than compute: views and reshapes, transposes, expansion and repeats,
indexing and gathers, concatenation, splitting and padding; and the metadata queries the tracer runs
without recording."""

from __future__ import annotations

from typing import Any

from ..registry import OpCall, TensorMeta, get_rule, set_rule
from .rule_text import FreshNames, accept_zero_dim, frozen_dims, join_dims, normalize_dim, opaque


def _map_reshape(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str:
    """Annotation mapping the dims of a view/reshape: ``b l (h d) -> b l h d``."""
    names = FreshNames("v")
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
    return f"{join_dims(ins)} -> {join_dims(outs)}"


def _reshape(call: OpCall) -> str:
    return _map_reshape(call.inputs[0].shape, call.outputs[0].shape)


def _transpose(call: OpCall) -> str:
    x = call.inputs[0]
    d0 = normalize_dim(call.arg(1, "dim0"), x.ndim)
    d1 = normalize_dim(call.arg(2, "dim1"), x.ndim)
    names = [f"d{i}" for i in range(x.ndim)]
    out = list(names)
    out[d0], out[d1] = out[d1], out[d0]
    return f"{join_dims(names)} -> {join_dims(out)}"


def _permute(call: OpCall) -> str:
    x = call.inputs[0]
    dims = call.args[1:] if len(call.args) > 2 else call.arg(1, "dims")
    if isinstance(dims, int):
        dims = [dims]
    names = [f"d{i}" for i in range(x.ndim)]
    return f"{join_dims(names)} -> {join_dims([names[normalize_dim(d, x.ndim)] for d in dims])}"


def _squeeze_like(call: OpCall) -> str:
    """unsqueeze/squeeze/flatten/unflatten: a reshape between the two shapes."""
    return _map_reshape(call.inputs[0].shape, call.outputs[0].shape)


def _expand(call: OpCall) -> str:
    x, out = call.inputs[0], call.outputs[0]
    names = FreshNames("x")
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
    return f"{join_dims(ins)} -> {join_dims(outs)}"


def _is_full_slice(s: slice, size: int) -> bool:
    start_ok = s.start is None or s.start == 0 or s.start <= -size
    stop_ok = s.stop is None or s.stop >= size
    return start_ok and stop_ok and (s.step is None or s.step == 1)


def _getitem(call: OpCall) -> str:
    x = call.inputs[0]
    index = call.args[1]
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(it, (TensorMeta, list)) for it in items) or len(call.inputs) > 1:
        return opaque(call)
    consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
    names = FreshNames("g")
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
            return opaque(call)
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
            return opaque(call)
    while dim < x.ndim:
        n = names()
        ins.append(n)
        outs.append(n)
        dim += 1
    return f"{join_dims(ins)} -> {join_dims(outs)}"


def _scatter_into(call: OpCall) -> str:
    """slice_scatter / select_scatter (a write into a view, planner/graph/functionalize.py): the written
    dim stays whole in the base and the value, the other dims split together; the output is the base."""
    base, value = call.inputs[0], call.inputs[1]
    dim = normalize_dim(call.arg(2, "dim", 0), base.ndim)
    names = FreshNames("w")
    base_dims: list[str] = []
    value_dims: list[str] = []
    for d in range(base.ndim):
        if d != dim:
            name = names()
            base_dims.append(name)
            value_dims.append(name)
            continue
        base_dims.append(names() + "^")
        if value.ndim == base.ndim:  # a slice keeps the dim; a select drops it
            value_dims.append(names() + "^")
    return f"{join_dims(base_dims)}, {join_dims(value_dims)} -> {join_dims(base_dims)}"


def _cat(call: OpCall) -> str:
    first = call.inputs[0]
    if any(t.ndim != first.ndim for t in call.inputs):
        return opaque(call)  # legacy cat of an empty 1-d tensor
    d = normalize_dim(call.arg(1, "dim", 0), first.ndim)
    names = FreshNames("x")
    shared = [f"c{i}" for i in range(first.ndim)]
    ins = []
    for _t in call.inputs:
        dims = list(shared)
        dims[d] = names() + "^"
        ins.append(join_dims(dims))
    out = list(shared)
    out[d] = names() + "^"
    return ", ".join(ins) + " -> " + join_dims(out)


def _split(call: OpCall) -> str:
    x = call.inputs[0]
    d = normalize_dim(call.arg(2, "dim", 0), x.ndim)
    names = FreshNames("x")
    shared = [f"c{i}" for i in range(x.ndim)]
    ins = list(shared)
    ins[d] = names() + "^"
    outs = []
    for _t in call.outputs:
        dims = list(shared)
        dims[d] = names() + "^"
        outs.append(join_dims(dims))
    return join_dims(ins) + " -> " + ", ".join(outs)


def _stack(call: OpCall) -> str:
    first = call.inputs[0]
    d = normalize_dim(call.arg(1, "dim", 0), first.ndim + 1)
    shared = [f"c{i}" for i in range(first.ndim)]
    out = list(shared)
    out.insert(d, "s^")
    return ", ".join(join_dims(shared) for _ in call.inputs) + " -> " + join_dims(out)


def _pad(call: OpCall) -> str:
    x = call.inputs[0]
    pad = list(call.arg(1, "pad"))
    padded = {x.ndim - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    names = [f"d{i}" for i in range(x.ndim)]
    ins = [n + "^" if i in padded else n for i, n in enumerate(names)]
    outs = [f"p{i}^" if i in padded else n for i, n in enumerate(names)]
    return f"{join_dims(ins)} -> {join_dims(outs)}"


def _repeat_interleave(call: OpCall) -> str:
    """``repeat_interleave(x, r, dim)``: out[i * r + j] = x[i] along ``dim``, the dim ``(d r)`` with r created."""
    x = call.inputs[0]
    repeats, dim = call.arg(1, "repeats"), call.arg(2, "dim")
    if dim is None or not isinstance(repeats, int) or len(call.inputs) > 1 or repeats < 1:
        return opaque(call)  # flattening, or per-element repeat counts
    d = normalize_dim(dim, x.ndim)
    names = [f"d{i}" for i in range(x.ndim)]
    out = list(names)
    if repeats > 1:
        out[d] = f"({names[d]} r)"
    return f"{join_dims(names)} -> {join_dims(out)}"


def _repeat(call: OpCall) -> str:
    """``x.repeat(*sizes)``: tiled dims (and new leading ones) are created whole; untiled dims map through."""
    x = call.inputs[0]
    sizes = call.args[1:] if len(call.args) > 2 else call.arg(1, "repeats")
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    extra = len(sizes) - x.ndim
    if extra < 0:
        return opaque(call)
    names = FreshNames("x")
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
    return f"{join_dims(ins)} -> {join_dims(outs)}"


def _transpose_2d(call: OpCall) -> str:
    """``x.T`` of a 2-d tensor swaps its dims (other ranks: whole, and ``torch.t`` refuses them at run time)."""
    return "a b -> b a" if call.inputs[0].ndim == 2 else opaque(call)


def _with_shape_operand(rule: Any) -> Any:
    """``expand_as`` / ``view_as`` / ``reshape_as``: the second tensor only lends its shape (frozen, no flow)."""

    def rule_with_operand(call: OpCall) -> str:
        first = rule(OpCall(call.name, call.args, call.kwargs, call.inputs[:1], call.outputs))
        if len(call.inputs) == 1:
            return first
        left, right = first.split("->")
        rest = [join_dims(frozen_dims(t.ndim, FreshNames("w"))) for t in call.inputs[1:]]
        return ", ".join([left.strip() or "..."] + rest) + " ->" + right

    rule_with_operand.__wrapped__ = rule  # type: ignore[attr-defined]
    return rule_with_operand


def _index_select(call: OpCall) -> str:
    """``x.index_select(dim, index)``: other dims map through; the selected dim and the index stay whole."""
    x = call.inputs[0]
    if len(call.inputs) != 2 or call.inputs[1].ndim != 1:
        return opaque(call)
    d = normalize_dim(call.arg(1, "dim"), x.ndim)
    ins = [f"d{i}" + ("^" if i == d else "") for i in range(x.ndim)]
    outs = [f"d{i}" if i != d else "s^" for i in range(x.ndim)]
    return f"{join_dims(ins)}, s^ -> {join_dims(outs)}"


def _gather(call: OpCall) -> str:
    """``torch.gather(x, dim, index)``: the output has the index's shape. The gathered dim of ``x``
    stays whole and the index's (the output's) may split; another dim maps through where ``x`` and
    the index have the same size there, and stays whole where the index is shorter."""
    if len(call.inputs) != 2 or call.inputs[0].ndim != call.inputs[1].ndim:
        return opaque(call)
    x, index = call.inputs
    d = normalize_dim(call.arg(1, "dim"), x.ndim)
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
    return f"{join_dims(xs)}, {join_dims(ids)} -> {join_dims(ids)}"


def _local_output_shape(args: tuple, kwargs: dict, local_out: tuple[int, ...]) -> tuple[tuple, dict]:
    """view / reshape / expand: the shape argument becomes the local output's shape."""
    return (args[0], tuple(local_out)), kwargs


def _local_unflatten(args: tuple, kwargs: dict, local_out: tuple[int, ...]) -> tuple[tuple, dict]:
    """unflatten(dim, sizes): ``sizes`` become the local output's sizes at those dims."""
    call = OpCall("unflatten", args, kwargs, [], [])
    dim, sizes = call.arg(1, "dim"), call.arg(2, "sizes")
    in_ndim = len(local_out) - len(sizes) + 1
    start = normalize_dim(dim, in_ndim)
    local = tuple(local_out[start:start + len(sizes)])
    if len(args) > 2:
        return (*args[:2], local, *args[3:]), kwargs
    return args, {**kwargs, "sizes": local}


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


set_rule(["torch.Tensor.view", "torch.Tensor.reshape", "torch.reshape"], _reshape, cost="view",
         localize=_local_output_shape)
set_rule(["torch.Tensor.view_as", "torch.Tensor.reshape_as"], _reshape, cost="view")
set_rule(["torch.Tensor.unsqueeze", "torch.unsqueeze", "torch.Tensor.squeeze", "torch.squeeze",
          "torch.Tensor.flatten", "torch.flatten"], _squeeze_like, cost="view")
set_rule(["torch.Tensor.unflatten", "torch.unflatten"], _squeeze_like, cost="view", localize=_local_unflatten)
set_rule(["torch.Tensor.transpose", "torch.transpose"], _transpose, cost="view")
set_rule(["torch.Tensor.permute", "torch.permute"], _permute, cost="view")
# ``w.T`` of a 2-d weight (Falcon's linear layers); generated code writes it ``t(w)``.
set_rule("torch.Tensor.T.__get__", _transpose_2d, cost="view", substitute="torch.t")
set_rule("torch.Tensor.expand", _expand, cost="view", localize=_local_output_shape)
set_rule("torch.Tensor.expand_as", _expand, cost="view")
for _name in ["torch.Tensor.expand_as", "torch.Tensor.view_as", "torch.Tensor.reshape_as"]:
    set_rule(_name, _with_shape_operand(get_rule(_name)))
# Copies whose backward is a sum over the repeats: no values kept.
set_rule(["torch.repeat_interleave", "torch.Tensor.repeat_interleave"], _repeat_interleave, saves="nothing")
set_rule("torch.Tensor.repeat", _repeat, saves="nothing")
set_rule("torch.Tensor.__getitem__", _getitem, cost="view", operator="[]")
set_rule("torch.Tensor.__setitem__", opaque, mutates_first_arg=True)
set_rule(["torch.slice_scatter", "torch.select_scatter"], _scatter_into, saves="nothing")
set_rule(["torch.Tensor.index_select", "torch.index_select"], _index_select)
set_rule(["torch.Tensor.gather", "torch.gather"], _gather)  # GPT-J's rotary table lookup (eager attention)
set_rule(["torch.cat", "torch.concat", "torch.concatenate"], _cat, saves="nothing")
set_rule("torch.stack", _stack, saves="nothing")
set_rule(["torch.Tensor.split", "torch.split", "torch.Tensor.chunk", "torch.chunk"], _split, cost="view")
set_rule("torch.functional.split", get_rule("torch.split"))
set_rule("torch.nn.functional.pad", _pad, saves="nothing")
set_rule(_UNRECORDED, traced=False)
# The ``*_as`` rules above name a 0-d first input themselves.
accept_zero_dim(["torch.Tensor.expand", "torch.Tensor.unsqueeze", "torch.unsqueeze", "torch.Tensor.view",
                 "torch.Tensor.reshape", "torch.reshape", "torch.Tensor.__getitem__"])
