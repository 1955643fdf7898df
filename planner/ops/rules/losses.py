"""The rule of torch's cross-entropy: tokens split when the reduction is a sum (or none), classes stay whole."""

from __future__ import annotations

from ..registry import OpCall, set_rule
from .rule_text import join_dims, opaque


def _cross_entropy(call: OpCall) -> str:
    x = call.inputs[0]
    reduction = call.arg(6, "reduction", "mean")
    extra = [f"s{i}" for i in range(x.ndim - 2)] if x.ndim > 1 else []
    if x.ndim == 1:
        return opaque(call)
    n = "n^" if reduction == "mean" else "n"  # a mean over split tokens is not a sum of the parts
    inp = join_dims([n, "c^"] + extra)
    tgt = join_dims([n] + extra)
    weight = [join_dims(["c^"])] if len(call.inputs) > 2 else []
    out = join_dims([n] + extra) if reduction == "none" else ""
    return ", ".join([inp, tgt] + weight) + " -> " + out


set_rule("torch.nn.functional.cross_entropy", _cross_entropy)
