"""GPU memory of a run: the allocator setting every rank starts with, and the out-of-memory error.

- ``enable_expandable_segments``: PyTorch's caching allocator maps memory in segments that grow
  in place instead of fixed blocks, so freed memory can be reused for tensors of other sizes. A
  run sized close to the card needs it: without it a 4-layer 8B-shaped run at 128K tokens on one
  H100 stopped with 69.85 GiB allocated and 5.03 GiB reserved but unusable; with it the same run
  peaked at 73.35 GiB (issue 24). The planner's allocator margin (``planner/cost/budgets.py``) was
  measured with it on.
- ``out_of_memory_guard``: turns ``torch.cuda.OutOfMemoryError`` into ``GpuOutOfMemory``, one line
  with the plan's estimate (plan.json ``estimate``), the measured peaks and what to change. Under
  ``runtime/reliability/failures.py``'s ``failure_watchdog`` every other rank stops with that line too.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"
# torch >= 2.9 also reads the device-neutral name; a user who set either has chosen.
ALLOC_CONF_NAMES = (ALLOC_CONF, "PYTORCH_ALLOC_CONF")
EXPANDABLE_SEGMENTS = "expandable_segments:True"
GIB = 2**30


def enable_expandable_segments() -> bool:
    """Set ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` in this process's environment, unless
    the user set ``PYTORCH_CUDA_ALLOC_CONF`` or ``PYTORCH_ALLOC_CONF`` (then nothing changes).

    Call it before the first CUDA allocation: the allocator reads the variable when CUDA starts,
    and child processes inherit it. When CUDA has already started in this process the setting is
    also applied to the running allocator (new segments expand; existing ones stay). Returns
    whether this call enabled it. Safe without a GPU.
    """
    if any(name in os.environ for name in ALLOC_CONF_NAMES):
        return False
    os.environ[ALLOC_CONF] = EXPANDABLE_SEGMENTS
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        if setter is None:  # torch before 2.9
            setter = torch.cuda.memory._set_allocator_settings
        setter(EXPANDABLE_SEGMENTS)
    return True


class GpuOutOfMemory(RuntimeError):
    """CUDA ran out of memory in a training step; the message is one line saying what to change."""


def measured_peaks(device: torch.device) -> dict[str, float] | None:
    """This process's memory on ``device`` in bytes, or None off CUDA.

    ``allocated`` and ``reserved``: the peaks of PyTorch's allocator; ``total``: the card;
    ``usable``: what the allocator could hold now (what it holds plus what is free on the card).
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device)
    return {"allocated": float(torch.cuda.max_memory_allocated(device)),
            "reserved": float(torch.cuda.max_memory_reserved(device)),
            "total": float(total), "usable": float(torch.cuda.memory_reserved(device) + free)}


def _requested_bytes(error: BaseException) -> float:
    """The failed request's size from PyTorch's message ("Tried to allocate 2.00 GiB"), 0 if absent."""
    words = str(error).split()
    for i, word in enumerate(words[:-3]):
        if word == "Tried" and words[i + 1] == "to" and words[i + 2] == "allocate":
            units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
            with contextlib.suppress(ValueError, IndexError):
                return float(words[i + 3]) * units.get(words[i + 4].rstrip(".;,"), 0)
    return 0.0


def _card_budget(estimate: Mapping[str, Any], peaks: Mapping[str, float] | None) -> float | None:
    """The largest budget (bytes) this card holds by the plan's measured margins, as the planner's default
    budget computes it (planner/cost/budgets.py); None without the margins or the card's size."""
    context, overhead = estimate.get("gpu_context_bytes"), estimate.get("reserved_over_estimate")
    if peaks is None or context is None or overhead is None:
        return None
    return (peaks["total"] - context) / (1 + overhead)


def out_of_memory_message(plan: Mapping[str, Any], error: BaseException, peaks: Mapping[str, float] | None,
                          rank: int = 0, step: int | None = None) -> str:
    """One line: where CUDA ran out, the plan's estimate and budget, the measured peaks, what to change.

    ``plan`` is plan.json (its ``estimate`` entry, if any); ``peaks`` is ``measured_peaks``'s dict
    (None: not measured). The suggested ``--memory_budget_gb`` (rounded down to 0.5 GB) is the
    smaller of the estimate scaled by what the card could hold over what the run needed (its
    reserved peak plus the failed request) and the budget this card holds by the plan's margins.
    """
    where = f"rank {rank}" + (f", step {step}" if step is not None else "")
    requested = _requested_bytes(error)
    parts = [f"CUDA out of memory ({where}" + (f", tried to allocate {requested / GIB:.2f} GiB" if requested else "")
             + ")"]
    estimate = plan.get("estimate") or {}
    est, budget = estimate.get("gpu_peak_bytes"), estimate.get("gpu_budget_bytes")
    if est:
        text = f"the plan's estimate is {est / GIB:.2f} GiB per GPU"
        if budget:
            text += f" (budget {budget / 1e9:.1f} GB: {estimate.get('gpu_budget_source') or 'given'})"
        parts.append(text)
    else:
        parts.append("plan.json holds no memory estimate (compiled by an older dimshard: recompile)")
    if peaks is not None:
        parts.append(f"measured peak {peaks['allocated'] / GIB:.2f} GiB allocated, {peaks['reserved'] / GIB:.2f} GiB "
                     f"reserved, of {peaks['total'] / GIB:.2f} GiB")
    card = _card_budget(estimate, peaks)
    if card is not None and budget and budget > card:
        parts.append(f"the budget is above the {card / 1e9:.1f} GB this card holds after the plan's margins")
    suggestions = [card] if card is not None and budget and budget > card else []
    needed = (peaks["reserved"] if peaks else 0.0) + requested
    if est and peaks and needed > peaks["usable"] > 0:
        suggestions.append(est * peaks["usable"] / needed)
    advice = "recompile with a lower --memory_budget_gb"
    if suggestions:
        advice += f" (e.g. {math.floor(2 * min(suggestions) / 1e9) / 2:g}: the plan then recomputes or offloads more)"
    advice += ", or free the GPU of other processes"
    if ALLOC_CONF not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        advice += f", or set {ALLOC_CONF}={EXPANDABLE_SEGMENTS}"
    return "; ".join(parts) + ": " + advice


@contextlib.contextmanager
def out_of_memory_guard(plan: Mapping[str, Any], device: torch.device, rank: int = 0,
                        step: int | None = None) -> Iterator[None]:
    """Within this block a ``torch.cuda.OutOfMemoryError`` becomes a ``GpuOutOfMemory`` carrying
    ``out_of_memory_message`` (the original error is dropped: its multi-line text says less)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as error:
        message = out_of_memory_message(plan, error, measured_peaks(device), rank, step)
        raise GpuOutOfMemory(message) from None
