"""Choosing the collectives that turn one tensor placement into another.

Per mesh axis the table of ``planner/plan/collectives.py`` applies (docs/design.md, "Placements and
the redistribution table"). On a 2-D mesh several axes may change at once; steps that shrink the
local tensor (local slice, reduce-scatter) run first and the all-gathers last, so every
collective moves as few bytes as the target placement allows, except where a tensor dim is
sharded over several axes: those nest in axis order, and a step runs only when it keeps that
nesting (``redistribution_steps``). Only a summand of a split
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


def _dim_effect(step: Step) -> tuple[int | None, int | None]:
    """(the tensor dim the step stops sharding on its axis, the dim it starts sharding), None for neither."""
    kind = step.kind
    if kind == "all_gather":
        return step.dim, None
    if kind in ("local_slice", "reduce_scatter"):
        return None, step.dim
    if kind == "all_to_all":
        return step.dim, step.dim2
    return None, None


def _blocker(step: Step, sharded_by: dict[int, list[int]]) -> int | None:
    """The tensor dim whose sharding keeps ``step`` from running now, or None when it may run.

    A dim sharded over several mesh axes is nested in axis order (``codegen.rank_code.shard_slices``:
    the lower axis outer), so a step may only gather the innermost axis of a dim and only slice one
    inner to all that shard it already; otherwise the chunk it produces is not the one the target
    placement names (or, with a local extent smaller than the axis, does not exist).
    """
    removes, adds = _dim_effect(step)
    if removes is not None and sharded_by.get(removes, [])[-1:] != [step.axis]:
        return removes
    if adds is not None:
        holders = [a for a in sharded_by.get(adds, []) if not (adds == removes and a == step.axis)]
        if holders and holders[-1] > step.axis:
            return adds
    return None


def _splits_what_moves(step: Step, pending: list[Step]) -> bool:
    """Whether ``step`` starts sharding a dim that another pending step stops sharding on its axis."""
    adds = _dim_effect(step)[1]
    return adds is not None and any(s is not step and _dim_effect(s)[0] == adds for s in pending)


def _apply(step: Step, sharded_by: dict[int, list[int]]) -> None:
    removes, adds = _dim_effect(step)
    if removes is not None:
        sharded_by[removes].remove(step.axis)
    if adds is not None:
        sharded_by.setdefault(adds, []).append(step.axis)


def redistribution_steps(src: TensorPlacement, dst: TensorPlacement) -> list[Step]:
    """The collectives, in execution order, that turn placement ``src`` into ``dst``.

    Steps that shrink the local tensor go first, then by mesh axis, as long as each keeps the
    nesting of a dim sharded over several axes (``_blocker``); a step that would break it waits for
    the steps that unblock it, and where none does (a dim's inner axis stays sharded while an outer
    one changes), the inner axis is gathered first and sliced again at the end.
    """
    pending = [s for axis, (a, b) in enumerate(zip(src, dst)) for s in _axis_steps(a, b, axis)]
    sharded_by: dict[int, list[int]] = {}
    for axis, p in enumerate(src):
        if isinstance(p, Shard):
            sharded_by.setdefault(p.dim, []).append(axis)
    steps: list[Step] = []
    later: list[Step] = []  # slices that restore a split gathered out of the way: after the rest
    while pending or later:
        if not pending:
            pending, later = later, []
        if len(steps) > 4 * len(src) + 4:  # each axis gathers and slices at most a few times
            raise PlanError(f"no ordering of the steps from {src} to {dst} keeps each dim's shards nested")
        pending.sort(key=lambda s: (COLLECTIVES_TABLE[s.kind].order, s.axis))
        free = [s for s in pending if _blocker(s, sharded_by) is None]
        # A split of a dim another pending step still moves off an axis would block that step: it waits.
        ready = next((s for s in free if not _splits_what_moves(s, pending)), free[0] if free else None)
        if ready is None:
            # Every step waits on a dim whose innermost sharding axis must be gathered first. If a
            # pending step moves that axis away (an all-to-all to another dim), it becomes a gather
            # here and a slice there; otherwise the axis keeps its shard and is sliced again last.
            dim = _blocker(pending[0], sharded_by)
            inner = sharded_by[dim][-1]
            moving = next((s for s in pending if s.axis == inner and _dim_effect(s)[0] == dim), None)
            if moving is not None:
                pending.remove(moving)
                later.append(Step("local_slice", inner, moving.dim2))
            else:
                later.append(Step("local_slice", inner, dim))
            ready = Step("all_gather", inner, dim)
        else:
            pending.remove(ready)
        _apply(ready, sharded_by)
        steps.append(ready)
    return steps


def step_bytes(step: Step, local_nbytes_before: int, axis_size: int) -> int:
    """Bytes each rank sends for a step, given the local tensor size before it (for the cost model)."""
    if axis_size == 1:
        return 0
    return COLLECTIVES_TABLE[step.kind].sent_bytes(local_nbytes_before, axis_size)
