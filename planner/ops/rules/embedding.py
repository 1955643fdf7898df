"""The rule of the token embedding lookup: indices split freely, the vocabulary stays whole."""

from __future__ import annotations

from ..registry import OpCall, set_rule
from .rule_text import join_dims


def _embedding(call: OpCall) -> str:
    idx = call.inputs[0]
    names = [f"i{k}" for k in range(idx.ndim)]
    # Splitting the vocabulary would need masked lookups and a sum: keep n whole.
    return f"{join_dims(names)}, n^ d -> {join_dims(names + ['d'])}"


set_rule("torch.nn.functional.embedding", _embedding, role="embedding")
