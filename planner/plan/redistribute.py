"""Choosing the collectives that turn one tensor placement into another.

Per mesh axis the table of ``planner/plan/collectives.py`` applies (docs/design.md, "Placements and
the redistribution table"). On a 2-D mesh several axes may change at once; steps that shrink the
local tensor (local slice, reduce-scatter) run first and the all-gathers last, so every
collective moves as few bytes as the target placement allows. Only a summand of a split
reduction (``+`` in an annotation) is wanted Partial: from Replicate by the table's entry, from
Shard by an all-gather first.
"""

from __future__ import annotations

from dataclasses import dataclass

from .collectives import COLLECTIVES_TABLE, collective_for
from .placements import REPLICATE, Partial, PlanError, Shard, TensorPlacement


@dataclass(frozen=True)
class Step:
    """One collective on one mesh axis. ``dim``/``dim2`` are tensor dims where the kind needs them."""

    kind: str  # a key of collectives.COLLECTIVES_TABLE
    axis: int
    dim: int | None = None  # gather / scatter / slice dim; for all_to_all the source shard dim
    dim2: int | None = None  # all_to_all: the target shard dim


def _axis_steps(src: object, dst: object, axis: int) -> list[Step]:
    if src == dst:
        return []
    if isinstance(dst, Partial) and isinstance(src, Shard):
        # A sharded summand (rare: biases are parameters, stored whole) is gathered, then made Partial.
        return _axis_steps(src, REPLICATE, axis) + _axis_steps(REPLICATE, dst, axis)
    collective = collective_for(src, dst)
    if collective is None:
        raise PlanError(f"no redistribution from {src} to {dst}")
    dims = [(src if which == "source" else dst).dim for which in collective.dims]
    return [Step(collective.kind, axis, *dims)]


def redistribution_steps(src: TensorPlacement, dst: TensorPlacement) -> list[Step]:
    """The collectives, in execution order, that turn placement ``src`` into ``dst``."""
    steps = [s for axis, (a, b) in enumerate(zip(src, dst)) for s in _axis_steps(a, b, axis)]
    return sorted(steps, key=lambda s: (COLLECTIVES_TABLE[s.kind].order, s.axis))


def step_bytes(step: Step, local_nbytes_before: int, axis_size: int) -> int:
    """Bytes each rank sends for a step, given the local tensor size before it (for the cost model)."""
    if axis_size == 1:
        return 0
    return COLLECTIVES_TABLE[step.kind].sent_bytes(local_nbytes_before, axis_size)
