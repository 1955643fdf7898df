"""Partition plans: a device mesh, one split per op and mesh axis, and the placements a tensor can have.

A ``Plan`` is what a policy returns; ``ResolvedPlan`` holds the per-tensor placements it implies
(``resolve.resolve_placements`` derives them, checking every split against the op's annotation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Any

from ..graph.ir import numel


class PlanError(ValueError):
    """A plan that cannot be realised; the message names the op and what to change."""


@dataclass(frozen=True)
class Shard:
    """The tensor is split evenly along ``dim`` over the mesh axis."""

    dim: int

    def __repr__(self) -> str:
        return f"Shard({self.dim})"


@dataclass(frozen=True)
class Replicate:
    """Every rank of the mesh axis holds the whole tensor."""

    def __repr__(self) -> str:
        return "Replicate()"


@dataclass(frozen=True)
class Partial:
    """Every rank holds a partial sum; the true tensor is the sum over the mesh axis."""

    def __repr__(self) -> str:
        return "Partial()"


Placement = Shard | Replicate | Partial
REPLICATE = Replicate()
PARTIAL = Partial()


@dataclass(frozen=True)
class Mesh:
    """``plan_ngpus`` devices arranged row-major on named axes, e.g. ``tp=4 x sp=2``."""

    axis_names: tuple[str, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.axis_names) != len(self.shape) or not self.shape:
            raise PlanError(f"mesh axes {self.axis_names} and shape {self.shape} must have the same, non-zero length")
        if len(set(self.axis_names)) != len(self.axis_names):
            raise PlanError(f"mesh axis names {self.axis_names} must be distinct")
        if any(s < 1 for s in self.shape):
            raise PlanError(f"mesh shape {self.shape} must be positive")

    @property
    def size(self) -> int:
        return numel(self.shape)

    def coords(self, unit_rank: int) -> tuple[int, ...]:
        """The coordinate of a unit rank on every axis (row-major: the last axis varies fastest)."""
        return list(product(*[range(s) for s in self.shape]))[unit_rank]

    def groups(self, axis: int) -> list[list[int]]:
        """The unit-rank groups along one axis: ranks that differ only in that coordinate."""
        ranks = list(product(*[range(s) for s in self.shape]))
        out: dict[tuple, list[int]] = {}
        for r, c in enumerate(ranks):
            key = c[:axis] + c[axis + 1:]
            out.setdefault(key, []).append(r)
        return list(out.values())


@dataclass
class Plan:
    """A partition plan: per op index, per mesh axis, the annotation name to split (or None).

    Provenance: ``name`` is the policy that chose the plan (``compile_model`` fills in the
    registered name when a policy leaves the default); ``search`` is the search that found it,
    for ``auto`` its ``search.auto.SearchResult`` (the chosen candidate's estimate, the runner-ups
    and timings: anything with ``candidates`` that hold a ``plan``), None for a policy that does
    not search.
    """

    mesh: Mesh
    splits: dict[int, tuple[str | None, ...]] = field(default_factory=dict)
    recompute_scopes: list[str] = field(default_factory=list)
    name: str = "custom"
    # The search result holds this plan among its candidates: keep it out of == and repr. Typed
    # loosely: a plan is made before any search, which comes later in the pipeline.
    search: Any = field(default=None, compare=False, repr=False)
    # CPU offload (planner/plan/offload_plan.py): recomputed scopes whose inputs wait in host memory
    # for the backward, and whether AdamW's fp32 state lives in host memory.
    offload_scopes: list[str] = field(default_factory=list)
    offload_optimizer: bool = False

    def split_of(self, op_index: int) -> tuple[str | None, ...]:
        """The split of op ``op_index``: one annotation name or None per mesh axis (None: not split)."""
        return self.splits.get(op_index, (None,) * len(self.mesh.shape))

    @property
    def runner_ups(self) -> list:
        """The search's other candidates, best first (empty when the plan was not searched)."""
        return [] if self.search is None else [c for c in self.search.candidates if c.plan is not self]


TensorPlacement = tuple  # one Placement per mesh axis


@dataclass
class ResolvedPlan:
    """Placements implied by a plan: what each op needs and produces, and how tensors are stored."""

    plan: Plan
    op_inputs: dict[int, list[TensorPlacement]]  # op index -> placement required for each tensor input
    op_outputs: dict[int, list[TensorPlacement]]  # op index -> placement of each tensor output
    stored: dict[int, TensorPlacement]  # tensor id -> placement as produced / stored

    def local_shape(self, shape: tuple[int, ...], placement: TensorPlacement) -> tuple[int, ...]:
        """The per-rank shape of a tensor of ``shape`` under ``placement`` on this plan's mesh."""
        return local_shape(shape, placement, self.plan.mesh)


def local_shape(shape: tuple[int, ...], placement: TensorPlacement, mesh: Mesh) -> tuple[int, ...]:
    """The per-rank shape of a tensor of ``shape`` under ``placement``: each Shard(dim) divides that dim."""
    out = list(shape)
    for axis, p in enumerate(placement):
        if isinstance(p, Shard):
            out[p.dim] //= mesh.shape[axis]
    return tuple(out)
