"""Writes through views become functional ops of the graph, so later reads see them.

Hugging Face code fills tensors through views (``key_states[..., :n].copy_(k_nope)``,
``freqs[..., idx] = other``) and then reads the base. A graph op records values, not storage, so
the tracer rewrites such a write as new versions: the written view's new value, then, up the chain
of views to the storage's root, each parent with that region replaced (``torch.slice_scatter``,
``torch.select_scatter``, or the inverse of a reshape/transpose/permute). The root's newest version
is what any later read of the root gets, and a view made before the write is made again from that
version when it is next read (view replay). Generated code then holds no aliasing: every write
is an out-of-place op with its own dim rule.

Followed views: ``__getitem__`` with ints, slices and ``...``; the reshapes (``view``, ``reshape``,
``flatten``, ``unflatten``, ``unsqueeze``, ``squeeze`` and their ``_as`` forms); ``transpose``,
``permute`` and ``.T``; and calls that return their own input (``contiguous`` of a contiguous
tensor). The output of any other view (``split``, ``narrow``, ``expand``) starts a storage of its
own, as before. An in-place op on a whole tensor (not a view) stays in place in generated code:
its result is already the tensor's new version.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ..ops.registry import get_rule
from .ir import Op, TensorRef

SETITEM = "torch.Tensor.__setitem__"
_GETITEM = "torch.Tensor.__getitem__"
# Views that keep every element: the inverse of a write through them is a reshape of the new value.
_RESHAPES = {f"{p}.{n}" for p in ("torch.Tensor", "torch") for n in ("view", "reshape", "flatten", "unflatten",
                                                                        "unsqueeze", "squeeze")}
_RESHAPES |= {"torch.Tensor.view_as", "torch.Tensor.reshape_as"}
_TRANSPOSES = {"torch.Tensor.transpose", "torch.transpose", "torch.Tensor.T.__get__"}
_PERMUTES = {"torch.Tensor.permute", "torch.permute"}
FOLLOWED_VIEWS = {_GETITEM} | _RESHAPES | _TRANSPOSES | _PERMUTES
# In-place dunders; other in-place methods end in one underscore.
_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__iand__", "__ior__"}
_NOT_WRITES = {"requires_grad_", "retain_grad", "share_memory_"}


def is_write(name: str, mutates_first_arg: bool, returned_first_arg: bool) -> bool:
    """Whether a call writes its first argument: a ``mutates_first_arg`` op, or an in-place
    method (``copy_``, ``add_``, ``__iadd__``) that returned that argument."""
    if mutates_first_arg:
        return True
    last = name.rsplit(".", 1)[-1]
    in_place = last in _INPLACE_DUNDERS or (last.endswith("_") and not last.startswith("__"))
    return returned_first_arg and in_place and last not in _NOT_WRITES


def basic_index_items(index: Any, ndim: int) -> list[int | slice] | None:
    """``index`` as one int or slice per dim of an ``ndim``-d tensor (``...`` and missing dims become
    full slices), or None when it holds anything else (None, tensors, lists, bools, negative steps)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(it is Ellipsis for it in items):
        at = items.index(Ellipsis)
        fill = ndim - (len(items) - 1)
        if fill < 0 or Ellipsis in items[at + 1:]:
            return None
        items = items[:at] + [slice(None)] * fill + items[at + 1:]
    for it in items:
        if isinstance(it, bool) or not isinstance(it, int | slice):
            return None
        if isinstance(it, slice) and (it.step is not None and (not isinstance(it.step, int) or it.step <= 0)):
            return None
        if isinstance(it, slice) and not all(v is None or isinstance(v, int) for v in (it.start, it.stop)):
            return None
    if len(items) > ndim:
        return None
    return items + [slice(None)] * (ndim - len(items))


def _whole(item: int | slice, size: int) -> bool:
    return isinstance(item, slice) and item.indices(size) == (0, size, 1)


class ViewFunctionalizer:
    """The tracer's record of which graph tensors are views of which, and of each storage's newest version.

    ``emit(target, args, kwargs) -> tensor id`` records one op (tensors as ``TensorRef``) and
    returns its output's id; ``lookup(python tensor) -> tensor id`` is the tracer's current id
    of a tensor the model holds; ``shape_of(tensor id) -> (shape, dtype)``.
    """

    def __init__(self, emit: Callable[..., int], lookup: Callable[[torch.Tensor], int],
                 shape_of: Callable[[int], tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.emit = emit
        self.lookup = lookup
        self.shape_of = shape_of
        self.storage: dict[int, int] = {}  # tensor id -> id of its storage's first root version
        self.newest: dict[int, int] = {}  # storage id -> its root's newest version
        self.view_of: dict[int, tuple[int, Op]] = {}  # view id -> (parent id, the op that made it)
        self.made_from: dict[int, int] = {}  # view id -> root version it was made from
        self.remade: dict[tuple[int, int], int] = {}  # (stale view, root version) -> its replay

    # --- reads ---------------------------------------------------------------------------------
    def current(self, tid: int) -> int:
        """The id a read of ``tid`` must use: the root's newest version, or the view made again from it."""
        storage = self.storage.get(tid)
        if storage is None:
            return tid
        newest = self.newest[storage]
        if tid not in self.view_of:
            return newest
        if self.made_from[tid] == newest:
            return tid
        key = (tid, newest)
        if key not in self.remade:
            parent, op = self.view_of[tid]
            fresh_parent = self.current(parent)
            fresh = self.emit(op.target, (TensorRef(fresh_parent), *op.args[1:]), dict(op.kwargs))
            self.add_view(fresh, fresh_parent, op)
            self.remade[key] = fresh
        return self.remade[key]

    def add_view(self, tid: int, parent: int, op: Op) -> None:
        """Note that ``tid`` was made from ``parent`` by ``op``, one of ``FOLLOWED_VIEWS`` or a call
        that returned its input; ``parent`` must be current."""
        if op.name == _GETITEM and basic_index_items(op.args[1], len(self.shape_of(parent)[0])) is None:
            return
        storage = self.storage.setdefault(parent, parent)
        self.newest.setdefault(storage, parent)
        self.storage[tid] = storage
        self.view_of[tid] = (parent, op)
        self.made_from[tid] = self.newest[storage]

    def replaced(self, old: int, new: int) -> None:
        """An in-place op on the whole tensor ``old`` (not a view) recorded its result as ``new``."""
        if old in self.view_of:
            return  # a write into a view with no out-of-place form: the base is not followed
        storage = self.storage.setdefault(old, old)
        self.newest[storage] = new
        self.storage[new] = storage

    # --- writes --------------------------------------------------------------------------------
    def write(self, name: str, args: tuple, kwargs: dict) -> bool:
        """Record the write ``name(*args, **kwargs)`` into ``args[0]`` as functional ops; False when
        it is not a write this class rewrites (the tracer then records it as called)."""
        target = self.lookup(args[0])
        shape, dtype = self.shape_of(target)
        if name == SETITEM:
            items = basic_index_items(args[1], len(shape))
            if items is None:
                return False
            region = tuple(torch.empty(shape, device="meta")[tuple(items)].shape)
            value = self.value_as(args[2], region, dtype, lambda: self.emit(
                torch.Tensor.__getitem__, (TensorRef(target), tuple(items)), {}))
            if value is None:
                return False
            self.propagate(target, self.scatter(target, value, items))
            return True
        if target not in self.view_of:
            return False
        value = self.new_value(name, target, args, kwargs)
        if value is None:
            return False
        self.propagate(target, value)
        return True

    def new_value(self, name: str, target: int, args: tuple, kwargs: dict) -> int | None:
        """The value ``target`` holds after the in-place op ``name``, recorded out of place."""
        shape, dtype = self.shape_of(target)
        method = name.rsplit(".", 1)[-1]
        if method == "copy_":
            return self.value_as(args[1], shape, dtype, lambda: target)
        if method == "fill_":
            return self.value_as(args[1], shape, dtype, lambda: target)
        if method == "zero_":
            return self.value_as(0, shape, dtype, lambda: target)
        out_of_place = method[:-1] if not method.startswith("__") else "__" + method[3:]
        func = getattr(torch.Tensor, out_of_place, None)
        if func is None or get_rule(f"torch.Tensor.{out_of_place}") is None:
            return None
        refs = tree_map(lambda x: TensorRef(self.lookup(x)) if isinstance(x, torch.Tensor) else x,
                        (args[1:], kwargs))
        value = self.emit(func, (TensorRef(target), *refs[0]), refs[1])
        return self.cast(value, dtype)

    def value_as(self, value: Any, shape: tuple[int, ...], dtype: torch.dtype,
                 region: Callable[[], int]) -> int | None:
        """``value`` (a tensor or a number) broadcast to ``shape`` in ``dtype``, as a graph tensor."""
        if isinstance(value, torch.Tensor):
            tid = self.cast(self.lookup(value), dtype)
            if self.shape_of(tid)[0] != tuple(shape):
                tid = self.emit(torch.Tensor.expand, (TensorRef(tid), tuple(shape)), {})
            return tid
        if isinstance(value, numbers.Number):
            number = value.item() if hasattr(value, "item") else value  # a numpy scalar as a Python number
            return self.emit(torch.full_like, (TensorRef(region()), number), {"dtype": dtype})
        return None

    def cast(self, tid: int, dtype: torch.dtype) -> int:
        """``tid`` in ``dtype`` (itself when it has that dtype already, else a recorded ``to``)."""
        if self.shape_of(tid)[1] == dtype:
            return tid
        return self.emit(torch.Tensor.to, (TensorRef(tid), dtype), {})

    def scatter(self, base: int, value: int, items: list[int | slice]) -> int:
        """``base`` with its region ``base[items]`` replaced by ``value`` (one int or slice per dim)."""
        shape = self.shape_of(base)[0]
        written = [d for d, it in enumerate(items) if not _whole(it, shape[d])]
        if not written:
            return value
        dim = written[0]
        item = items[dim]
        if len(written) > 1:
            # Write the inner dims into the outer dim's region first, then that region into base.
            region = self.emit(torch.Tensor.__getitem__, (TensorRef(base), (*[slice(None)] * dim, item)), {})
            inner = items[:dim] + ([slice(None)] if isinstance(item, slice) else []) + items[dim + 1:]
            value = self.scatter(region, value, inner)
        if isinstance(item, int):
            return self.emit(torch.select_scatter, (TensorRef(base), TensorRef(value)),
                             {"dim": dim, "index": item % shape[dim]})
        start, stop, step = item.indices(shape[dim])
        return self.emit(torch.slice_scatter, (TensorRef(base), TensorRef(value)),
                         {"dim": dim, "start": start, "end": stop, "step": step})

    def propagate(self, view: int, value: int) -> None:
        """``view`` now holds ``value``: give each parent up to the root a new version."""
        while view in self.view_of:
            parent, op = self.view_of[view]
            value = self.unview(parent, value, op)
            view = parent
        storage = self.storage.setdefault(view, view)
        self.newest[storage] = value
        self.storage[value] = storage

    def unview(self, parent: int, value: int, op: Op) -> int:
        """The new version of ``parent`` whose view ``op`` now holds ``value``."""
        shape = self.shape_of(parent)[0]
        if op.name == _GETITEM:
            return self.scatter(parent, value, basic_index_items(op.args[1], len(shape)))
        if op.name in _RESHAPES:
            return self.emit(torch.Tensor.reshape, (TensorRef(value), tuple(shape)), {})
        if op.name in _TRANSPOSES:
            dims = (0, 1) if op.name.endswith(".T.__get__") else (op.arg(1, "dim0"), op.arg(2, "dim1"))
            return self.emit(torch.Tensor.transpose, (TensorRef(value), *dims), {})
        if op.name in _PERMUTES:
            order = op.args[1] if len(op.args) == 2 and isinstance(op.args[1], tuple | list) else op.args[1:]
            if not order:
                order = op.kwargs["dims"]
            order = [d % len(shape) for d in order]
            inverse = [order.index(d) for d in range(len(order))]
            return self.emit(torch.Tensor.permute, (TensorRef(value), tuple(inverse)), {})
        return value  # a call that returned its input: the same values
