"""What every family of rules writes with: fresh dim names, annotation text, the opaque rule, the 0-d wrapper."""

from __future__ import annotations

from typing import Any

from ..registry import OpCall, get_rule, set_rule


class FreshNames:
    """Fresh dim names ``a0, a1, ...`` with a prefix per role."""

    def __init__(self, prefix: str = "d") -> None:
        self.prefix = prefix
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count - 1}"


def join_dims(dims: list[str]) -> str:
    """One tensor's spec: its dims separated by spaces."""
    return " ".join(dims)


def frozen_dims(n: int, names: FreshNames) -> list[str]:
    """``n`` fresh dims marked ``^`` (never split)."""
    return [names() + "^" for _ in range(n)]


def normalize_dim(d: int, ndim: int) -> int:
    """A dim index counted from the front (``-1`` of a 3-d tensor is ``2``)."""
    return d + ndim if d < 0 else d


def opaque(call: OpCall) -> str:
    """Every dim of every tensor frozen: the op runs whole (replicated) on every rank."""
    names = FreshNames("z")
    ins = [join_dims(frozen_dims(t.ndim, names)) for t in call.inputs]
    outs = [join_dims(frozen_dims(t.ndim, names)) for t in call.outputs]
    return ", ".join(ins) + " -> " + ", ".join(outs)


def zero_dim_safe(rule: Any) -> Any:
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


def accept_zero_dim(names: list[str]) -> None:
    """Wrap the rule functions registered for ``names`` with ``zero_dim_safe``: calls on a single 0-d
    tensor (casts and arithmetic on Gemma's scalar normalizer) name it. Rules already wrapped stay as they are."""
    for name in names:
        rule = get_rule(name)
        if callable(rule) and not hasattr(rule, "__wrapped__"):
            set_rule(name, zero_dim_safe(rule))
