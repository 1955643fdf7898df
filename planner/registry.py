"""Where every op's dim annotation is registered, and ``register_op`` for user functions.

A rule is either an annotation string or a function ``rule(call) -> str`` of the traced call
(its arguments with tensors replaced by ``TensorMeta`` and its output metas), for ops whose
annotation depends on arguments and shapes (view, transpose, sum over ``dim=``, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import handle_torch_function, has_torch_function

from .annotations import parse_annotation


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a traced tensor, as a rule function sees it."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class OpCall:
    """A traced call as rule functions see it: tensors are ``TensorMeta``."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """The argument given by position ``index`` or keyword ``name``."""
        if len(self.args) > index:
            return self.args[index]
        return self.kwargs.get(name, default)


Rule = "str | Callable[[OpCall], str]"

_RULES: dict[str, Any] = {}
# Registered user functions by their wrapper, so the tracer records them as single ops.
_CUSTOM_OPS: dict[Callable, str] = {}


def set_rule(names: str | list[str], rule: Any) -> None:
    """Register ``rule`` (annotation string or rule function) for op names such as ``torch.Tensor.view``."""
    if isinstance(rule, str):
        parse_annotation(rule)  # fail at registration, not at compile time
    for name in [names] if isinstance(names, str) else names:
        _RULES[name] = rule


def get_rule(name: str) -> Any | None:
    """The rule registered for an op name, or None."""
    return _RULES.get(name)


def custom_op_name(func: Callable) -> str | None:
    """The registered name of a ``register_op`` wrapper, or None for anything else."""
    return _CUSTOM_OPS.get(func)


def register_op(annotation: Any, name: str | None = None) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` one op of the graph with the given dim annotation.

    The returned function behaves exactly like ``fn`` when called normally; under the tracer it
    is recorded as a single op (nothing inside it is traced) and the generated code calls ``fn``
    by its import path. ``annotation`` is a string such as ``"b l d^, n^ d^, b l -> b l"`` (tensor
    arguments in order) or a rule function of the call.
    """

    def decorate(fn: Callable) -> Callable:
        op_name = name or f"{fn.__module__}.{fn.__qualname__}"

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tensors = tuple(a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor))
            if tensors and has_torch_function(tensors):
                return handle_torch_function(wrapper, tensors, *args, **kwargs)
            return fn(*args, **kwargs)

        wrapper.__dimshard_impl__ = fn  # type: ignore[attr-defined]
        wrapper.__dimshard_op_name__ = op_name  # type: ignore[attr-defined]
        set_rule(op_name, annotation)
        _CUSTOM_OPS[wrapper] = op_name
        return wrapper

    return decorate
