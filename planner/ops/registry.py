"""One record per op: everything the planner knows about an op, and ``register_op`` for user functions.

An ``OpRecord`` holds, under the op's name (``torch.nn.functional.linear``, ``torch.Tensor.view``,
or a registered function's import path):

- ``rule``: the dim annotation, a string or a function ``rule(call) -> str`` of the traced call
  (its arguments with tensors replaced by ``TensorMeta`` and its output metas), for ops whose
  annotation depends on arguments and shapes (view, transpose, sum over ``dim=``, ...);
- ``cost``: its cost class (``COST_CLASSES``), which formula the cost model prices it with;
- ``saves``: what its backward keeps (``SAVES``); None means the cost class's default;
- how generated code writes a local call: ``operator`` (``a + b``, or ``"[]"`` for indexing),
  ``substitute`` (the import path of a function called instead, same signature and values) and
  ``localize`` (rewrites arguments that carry global sizes, such as view's shape, for the local
  shard);
- ``traced``: False for calls the tracer runs without recording (metadata queries);
- ``mutates_first_arg``: the call writes its first argument and returns nothing (``x[i] = v``);
- ``mask_density(op, queries, keys)``: for attention, the fraction of the scores a call
  computes (0.5 when causal; None: all);
- ``role``: what policies may look for (``ROLES``), e.g. ``"token_loss"``;
- ``grads_in_place``: the keyword argument (SwiGLU's ``"inplace_grads"``) with which the op writes
  its input gradients into its inputs' storage; codegen passes it True, and the cost model drops
  those gradients from the op's working set, where ``op_costs.grads_written_in_place`` allows;
- ``recurrence(call_op, input_shapes)``: for the ``recurrent`` cost class, the chunked recurrence a call
  runs on the given (local) input shapes, a ``RecurrenceDims`` (its FLOPs and state size);
- ``sequence_split``: the import path of the same op with its sequence (the annotation name ``l``)
  split across a process group, same arguments plus the keywords ``group`` and ``layout``
  (``"contiguous"`` or ``"zigzag"``); the planner may then split ``l`` although the annotation
  freezes it (``planner/plan/sequence_split.py``).

``set_rule(names, rule, **facts)`` registers or amends records (facts not given keep their
current value); ``register_op(annotation, **facts)`` makes a user function one op. The built-in
records are registered in ``planner/ops/rules/``; docs/design.md describes how to add an op.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import handle_torch_function, has_torch_function, resolve_name

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

# Cost classes and the formula of each (planner/cost/op_costs.py).
COST_CLASSES = {
    "memory": "memory bound: bytes read and written over the copy bandwidth (the default)",
    "view": "free: a view or metadata change, no kernel",
    "cast": "free within one dtype, else memory bound",
    "copy": "memory bound even within one dtype (contiguous, clone)",
    "matmul": "2*m*n*k FLOPs at the matmul rate, or its bytes when longer (linear, matmul, bmm)",
    "attention": "2*b*h*l*s*(e+f) FLOPs times mask_density at the attention rate; inputs (query, key, value) first",
    "linear_cross_entropy": "a projection (hidden, weight, labels, ...) with the gradients taken in the forward",
    "grouped_matmul": "routed experts (hidden, top-k ids, top-k weights, expert ids, weights...): 2*t*k*(local "
                      "experts/experts)*weight elements FLOPs at the matmul rate (docs/design.md, \"Mixture of experts\")",
    "recurrent": "a chunked linear recurrence (the record's ``recurrence``): RecurrenceDims.flops at the matmul "
                 "rate, or its bytes when longer (docs/design.md, \"Recurrent layers\")",
}
# What an op keeps for backward (planner/cost/op_costs.py ``saved_inputs`` and ``saves_output``).
SAVES = {
    "inputs": "its activation and input-tensor arguments",
    "nothing": "no values, only shapes and dtypes (views, casts, additions, concatenations, means, sums)",
    "other_operand": "each operand only when the other needs a gradient (products and quotients)",
    "non_differentiable": "only its arguments that need no gradient (rotary's position tables)",
    "inputs_and_output": "its activation inputs and its output (attention)",
}
_DEFAULT_SAVES = {"view": "nothing", "cast": "nothing", "copy": "nothing", "attention": "inputs_and_output"}
ROLES = {
    "token_loss": "a per-token loss of (hidden, weight, labels): policies split its sequence dim",
    "projection": "a linear layer x @ weight.T: policies seed tensor parallelism on it",
    "embedding": "the token embedding lookup: policies seed sequence and batch splits on it",
    "experts": "a mixture-of-experts layer's routed experts (kernels/moe): policies split its expert dim e",
}


@dataclass(frozen=True)
class RecurrenceDims:
    """The chunked linear recurrence a recurrent op runs (cost class ``recurrent``): ``sequences`` independent
    recurrences (batch x heads, or batch x channels for Mamba's scan) of ``tokens`` tokens, each with a
    state of ``key_dim`` x ``value_dim``, cut into chunks of ``chunk`` tokens; ``delta``: the delta rule's
    corrections (kernels/recurrent/chunked.py)."""

    sequences: int
    tokens: int
    key_dim: int
    value_dim: int
    chunk: int
    delta: bool = False

    def flops(self, value_dim: int | None = None) -> float:
        """Forward FLOPs of the chunked form (``value_dim`` overrides the state's columns).

        Per recurrence and token, with c = min(chunk, tokens), dk = key_dim, dv = value_dim: the
        chunk's scores q k^T (2 c dk) and their product with the values (2 c dv), the state read
        q S and update k^T v (4 dk dv); the delta rule adds k k^T (2 c dk), the unit triangular solve
        for both right-hand sides, beta v and beta k (c (dk + dv)), and W_k S (2 dk dv):
        ``2 c (dk + dv) + 4 dk dv`` (linear attention, SSD, selective scan) or
        ``c (5 dk + 3 dv) + 6 dk dv`` (delta rule), times sequences x tokens.
        """
        dk, dv, c = self.key_dim, self.value_dim if value_dim is None else value_dim, min(self.chunk, self.tokens)
        per_token = c * (5 * dk + 3 * dv) + 6 * dk * dv if self.delta else 2 * c * (dk + dv) + 4 * dk * dv
        return float(self.sequences) * self.tokens * per_token


@dataclass(frozen=True)
class OpRecord:
    """Everything the planner knows about one op (see the module docstring for each field)."""

    name: str
    rule: str | Callable[[OpCall], str] | None = None
    cost: str = "memory"
    saves: str | None = None
    operator: str | None = None
    substitute: str | None = None
    localize: Callable[[tuple, dict, tuple[int, ...]], tuple[tuple, dict]] | None = None
    traced: bool = True
    mutates_first_arg: bool = False
    mask_density: Callable[[Any, int, int], float] | None = None
    role: str | None = None
    grads_in_place: str | None = None
    recurrence: Callable[[Any, list[tuple[int, ...]]], RecurrenceDims] | None = None
    sequence_split: str | None = None

    @property
    def saved(self) -> str:
        """What the backward keeps: ``saves``, or the default of the cost class."""
        return self.saves or _DEFAULT_SAVES.get(self.cost, "inputs")

    @property
    def method(self) -> str | None:
        """The method name of a ``torch.Tensor.*`` op written ``x.view(...)`` in generated code, else None."""
        attr = self.name[len("torch.Tensor."):] if self.name.startswith("torch.Tensor.") else None
        return attr if attr is not None and not attr.startswith("__") else None

    @property
    def dunder(self) -> str | None:
        """The special method of a ``torch.Tensor.__*__`` op (``__radd__``), written ``torch.Tensor.__radd__(x, y)``."""
        attr = self.name[len("torch.Tensor."):] if self.name.startswith("torch.Tensor.") else None
        return attr if attr is not None and attr.startswith("__") else None


_FACTS = {f.name for f in dataclasses.fields(OpRecord)} - {"name", "rule"}
_RECORDS: dict[str, OpRecord] = {}
# Registered user functions by their wrapper, so the tracer records them as single ops.
_CUSTOM_OPS: dict[Callable, str] = {}
# Tensor properties whose getter only reads metadata (``x.shape``): run, never recorded.
_METADATA_PROPERTIES = {"shape", "dtype", "device", "is_cuda", "is_meta", "requires_grad", "ndim", "layout",
                        "is_leaf", "grad_fn", "names", "is_sparse", "is_quantized", "is_nested"}
_KEEP = object()


def _check_facts(names: list[str], facts: dict[str, Any]) -> None:
    unknown = sorted(set(facts) - _FACTS)
    if unknown:
        raise TypeError(f"unknown op facts {unknown} for {names[0]}; the facts are {sorted(_FACTS)}")
    checks = (("cost", COST_CLASSES), ("saves", SAVES), ("role", ROLES))
    for key, allowed in checks:
        value = facts.get(key)
        if value is not None and value not in allowed:
            raise ValueError(f"op {names[0]}: {key}={value!r} is not one of {sorted(allowed)}")


def set_rule(names: str | list[str], rule: Any = _KEEP, **facts: Any) -> None:
    """Register or amend the records of op names such as ``torch.Tensor.view``.

    ``rule`` is an annotation string or a rule function; ``facts`` are ``OpRecord`` fields
    (``cost``, ``saves``, ``operator``, ``substitute``, ``localize``, ``traced``,
    ``mutates_first_arg``, ``mask_density``, ``role``, ``grads_in_place``, ``recurrence``,
    ``sequence_split``). What is not given keeps
    its current value (a new record starts from the defaults). Raises AnnotationError for a malformed annotation
    string and ValueError/TypeError for an unknown fact or value, at registration time.
    """
    names = [names] if isinstance(names, str) else list(names)
    if isinstance(rule, str):
        parse_annotation(rule)  # fail at registration, not at compile time
    _check_facts(names, facts)
    if rule is not _KEEP:
        facts["rule"] = rule
    for name in names:
        _RECORDS[name] = dataclasses.replace(_RECORDS.get(name) or OpRecord(name), **facts)


def op_record(name: str) -> OpRecord:
    """The record of an op name; an unregistered name gets a record of defaults with no rule."""
    record = _RECORDS.get(name)
    return record if record is not None else OpRecord(name)


def registered_ops() -> dict[str, OpRecord]:
    """Every registered record by name (a copy), the built-in ones and those of ``register_op``."""
    return dict(_RECORDS)


def get_rule(name: str) -> Any | None:
    """The rule registered for an op name, or None."""
    record = _RECORDS.get(name)
    return record.rule if record is not None else None


def is_recorded(name: str) -> bool:
    """Whether the tracer records a call of this name (metadata queries are only run)."""
    if name.endswith(".__get__"):
        return name.rsplit(".", 2)[-2] not in _METADATA_PROPERTIES
    return op_record(name).traced


def custom_op_name(func: Callable) -> str | None:
    """The registered name of a ``register_op`` wrapper, or None for anything else."""
    return _CUSTOM_OPS.get(func)


def op_name(func: Callable) -> str:
    """A stable, readable name for a traced callable (``torch.nn.functional.linear``): its record's key."""
    custom = custom_op_name(func)
    if custom is not None:
        return custom
    name = resolve_name(func)
    if name is None:
        qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        module = getattr(func, "__module__", None) or "torch"
        name = f"{module}.{qual}"
    if name.startswith("torch._C.TensorBase."):
        name = "torch.Tensor." + name[len("torch._C.TensorBase."):]
    return name


def reachable_as(name: str, target: Any) -> bool:
    """Whether ``name`` (``torch.…``) resolves to ``target``, so generated code may call it by that name."""
    obj: Any = torch
    parts = name.split(".")
    if parts[0] != "torch":
        return False
    for part in parts[1:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return obj is target or getattr(obj, "__name__", None) == getattr(target, "__name__", "")


def register_op(annotation: Any, name: str | None = None, **facts: Any) -> Callable[[Callable], Callable]:
    """Decorator: make ``fn`` one op of the graph with the given dim annotation and facts.

    The returned function behaves exactly like ``fn`` when called normally; under the tracer it
    is recorded as a single op (nothing inside it is traced) and the generated code calls ``fn``
    by its import path. ``annotation`` is a string such as ``"b l d^, n^ d^, b l -> b l"`` (tensor
    arguments in order) or a rule function of the call; ``facts`` are ``OpRecord`` fields, e.g.
    ``cost="attention"`` or ``role="token_loss"`` (see ``set_rule``).
    """

    def decorate(fn: Callable) -> Callable:
        op = name or f"{fn.__module__}.{fn.__qualname__}"

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tensors = tuple(a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor))
            if tensors and has_torch_function(tensors):
                return handle_torch_function(wrapper, tensors, *args, **kwargs)
            return fn(*args, **kwargs)

        wrapper.__dimshard_impl__ = fn  # type: ignore[attr-defined]
        wrapper.__dimshard_op_name__ = op  # type: ignore[attr-defined]
        # A re-registration (module reloaded) starts from defaults: facts of the old function do not carry over.
        _RECORDS.pop(op, None)
        set_rule(op, annotation, **facts)
        _CUSTOM_OPS[wrapper] = op
        return wrapper

    return decorate
