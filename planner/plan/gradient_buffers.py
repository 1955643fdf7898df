"""Which gradient buffers may keep the parameter dtype, and what the plan tells the runtime about it.

The runtime accumulates gradients in fp32 buffers (``runtime/optimizer/grad_reducer.py``). A buffer into
which nothing is ever summed (one micro-batch per optimizer step, and a shard with one holder in
the whole world, so no reduction) would only hold the widened autograd gradient: keeping it in the
parameter's dtype is exact and saves 2 bytes per bf16 element (docs/design.md, "Gradient
buffers"). Whether a step has one micro-batch is a policy option, ``grad_accumulation_steps``
(default 1); plan.json's ``gradients.param_dtype_single_holder`` records the choice; a run of such
a plan with gradient accumulation keeps fp32 buffers and warns (``runtime/optimizer/grad_reducer.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .placements import PlanError


def grad_accumulation_steps(extra: Mapping[str, Any] | None) -> int:
    """The ``grad_accumulation_steps`` policy option (micro-batches per optimizer step), default 1.

    Raises PlanError when it is not a positive integer.
    """
    value = (extra or {}).get("grad_accumulation_steps", 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"policy option grad_accumulation_steps must be a positive integer, got {value!r}")
    return value


def keeps_param_dtype(accumulation: int) -> bool:
    """Whether single-holder gradient buffers keep the parameter dtype: only with one micro-batch per step."""
    return accumulation == 1


def grad_buffer_bytes(numel: int, dtype: torch.dtype, reducing_ranks: int, accumulation: int = 1) -> float:
    """Bytes of the gradient buffer of a local shard of ``numel`` elements reduced over ``reducing_ranks`` ranks."""
    if reducing_ranks == 1 and keeps_param_dtype(accumulation) and dtype.is_floating_point:
        return float(numel * dtype.itemsize)
    return numel * 4.0


def plan_entry(accumulation: int) -> dict[str, bool]:
    """plan.json's ``gradients`` entry for a plan compiled for ``accumulation`` micro-batches per step."""
    return {"param_dtype_single_holder": keeps_param_dtype(accumulation)}
