"""Choosing the collectives that turn one tensor placement into another.

Per mesh axis the table of docs/design.md, "Placements and redistribution", applies. On a 2-D mesh several axes may change at once;
steps that shrink the local tensor (local slice, reduce-scatter) run first and the all-gathers
last, so every collective moves as few bytes as the target placement allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import Partial, PlanError, Replicate, Shard, TensorPlacement

# Lower runs earlier: shrink first, grow last.
_ORDER = {"local_slice": 0, "reduce_scatter": 1, "all_to_all": 2, "all_reduce": 3, "all_gather": 4}


@dataclass(frozen=True)
class Step:
    """One collective on one mesh axis. ``dim``/``dim2`` are tensor dims where the kind needs them."""

    kind: str  # all_gather | all_reduce | reduce_scatter | all_to_all | local_slice
    axis: int
    dim: int | None = None  # gather / scatter / slice dim; for all_to_all the source shard dim
    dim2: int | None = None  # all_to_all: the target shard dim


def _axis_step(src: object, dst: object, axis: int) -> Step | None:
    if src == dst:
        return None
    if isinstance(dst, Partial):
        raise PlanError(f"no consumer may require a Partial tensor (axis {axis}: {src} -> {dst})")
    if isinstance(src, Shard) and isinstance(dst, Replicate):
        return Step("all_gather", axis, src.dim)
    if isinstance(src, Partial) and isinstance(dst, Replicate):
        return Step("all_reduce", axis)
    if isinstance(src, Partial) and isinstance(dst, Shard):
        return Step("reduce_scatter", axis, dst.dim)
    if isinstance(src, Shard) and isinstance(dst, Shard):
        return Step("all_to_all", axis, src.dim, dst.dim)
    if isinstance(src, Replicate) and isinstance(dst, Shard):
        return Step("local_slice", axis, dst.dim)
    raise PlanError(f"no redistribution from {src} to {dst}")


def redistribution_steps(src: TensorPlacement, dst: TensorPlacement) -> list[Step]:
    """The collectives, in execution order, that turn placement ``src`` into ``dst``."""
    steps = [s for axis, (a, b) in enumerate(zip(src, dst)) if (s := _axis_step(a, b, axis)) is not None]
    return sorted(steps, key=lambda s: (_ORDER[s.kind], s.axis))


def step_bytes(step: Step, local_nbytes_before: int, axis_size: int) -> int:
    """Bytes each rank sends for a step, given the local tensor size before it (for the cost model)."""
    n = axis_size
    if step.kind == "local_slice" or n == 1:
        return 0
    if step.kind == "all_gather":
        return local_nbytes_before * (n - 1)
    if step.kind == "reduce_scatter":
        return local_nbytes_before * (n - 1) // n
    if step.kind == "all_reduce":
        return 2 * local_nbytes_before * (n - 1) // n
    return local_nbytes_before * (n - 1) // n  # all_to_all
