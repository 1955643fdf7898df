"""Rules of torch ops that only the recurrent families' mixers call (Mamba, Mamba2 and their hybrids).

dimshard's recurrent ops carry their own records (``kernels/recurrent/``); what is left here are
the plain torch calls around them. Mamba's and Qwen3-Next's scan wrappers cut the sequence in two
with ``torch.tensor_split`` (the part scanned at once, and a remainder they would step through
token by token when a cache asks for intermediate states) and join the outputs with ``torch.cat``.
In training the remainder is empty: the split point is the sequence's end, so the first piece is
the input itself and the cat joins one tensor. Those two calls are annotated as the identity
they are, so a sequence split (``planner/plan/sequence_split.py``) passes through them (each rank
cuts its own shard at the global end: all of it, and an empty rest); any other call is annotated
like ``torch.split`` and ``torch.cat``, which keep the cut dim whole.
"""

from __future__ import annotations

from collections.abc import Callable

from ..registry import OpCall, get_rule, set_rule
from . import shapes  # noqa: F401  (registers torch.split's and torch.cat's rules first)
from .rule_text import join_dims, normalize_dim


def _empty_remainder_split(split_rule: Callable[[OpCall], str]) -> Callable[[OpCall], str]:
    """``torch.tensor_split``'s rule: identity and an empty rest when it cuts at the dim's end, else ``split_rule``."""

    def rule(call: OpCall) -> str:
        x = call.inputs[0]
        d = normalize_dim(call.arg(2, "dim", 0), x.ndim)
        indices = call.arg(1, "indices_or_sections")
        if isinstance(indices, list | tuple) and len(indices) == 1 and isinstance(indices[0], int) \
                and indices[0] >= x.shape[d] and len(call.outputs) == 2:
            whole = [f"c{i}" for i in range(x.ndim)]
            rest = list(whole)
            rest[d] = "x0^"  # size 0, on every rank
            return f"{join_dims(whole)} -> {join_dims(whole)}, {join_dims(rest)}"
        return split_rule(call)

    return rule


def _single_tensor_cat(cat_rule: Callable[[OpCall], str]) -> Callable[[OpCall], str]:
    """``torch.cat``'s rule: the identity for one tensor (nothing to join), else ``cat_rule``."""

    def rule(call: OpCall) -> str:
        if len(call.inputs) == 1 and call.outputs and call.outputs[0].shape == call.inputs[0].shape:
            whole = join_dims([f"c{i}" for i in range(call.inputs[0].ndim)])
            return f"{whole} -> {whole}"
        return cat_rule(call)

    return rule


set_rule("torch.tensor_split", _empty_remainder_split(get_rule("torch.split")), cost="view")
set_rule(["torch.cat", "torch.concat", "torch.concatenate"], _single_tensor_cat(get_rule("torch.cat")))
