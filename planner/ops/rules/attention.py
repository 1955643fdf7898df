"""The rule of torch's scaled_dot_product_attention (plain and grouped-query), and the fraction of scores it computes."""

from __future__ import annotations

from typing import Any

from ..registry import OpCall, TensorMeta, set_rule
from .rule_text import join_dims, opaque


def _sdpa(call: OpCall) -> str:
    q, k = call.inputs[0], call.inputs[1]
    if q.ndim != 4 or k.ndim != 4:
        return opaque(call)
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
        spec += ", " + join_dims(dims)
    return f"{spec} -> b {qh} l^ f^"


def _sdpa_density(op: Any, queries: int, keys: int) -> float:
    """A causal call computes half of the ``queries x keys`` scores."""
    return 0.5 if op.arg(5, "is_causal", False) else 1.0


# Generated code calls dimshard's drop-in, which prefers cuDNN on Hopper (523 against 319
# TFLOP/s for torch's default choice, benchmarks/RESULTS.md).
set_rule("torch.nn.functional.scaled_dot_product_attention", _sdpa, cost="attention",
         substitute="dimshard.kernels.attention.scaled_dot_product_attention", mask_density=_sdpa_density)
