"""Partition plans: a device mesh, one split per op and mesh axis, and the tensor placements they imply.

A ``Plan`` is what a policy returns. ``resolve_placements`` turns it into per-tensor placements,
checking every split against the op's annotation (``^`` never split, a group ``(h d)`` only by
its outermost name, sizes divisible by the axis size). Where a split reduction leaves an op's
output Partial, its summands (``+`` in the annotation: a bias) are required Partial too, so
they are added once over the axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import TYPE_CHECKING

from .annotations import Annotation
from .graph import ACTIVATION, Graph, Op

if TYPE_CHECKING:
    from .search import SearchResult


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
        n = 1
        for s in self.shape:
            n *= s
        return n

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
    for ``auto`` its ``SearchResult`` (the chosen candidate's estimate, the runner-ups and
    timings), None for a policy that does not search.
    """

    mesh: Mesh
    splits: dict[int, tuple[str | None, ...]] = field(default_factory=dict)
    recompute_scopes: list[str] = field(default_factory=list)
    name: str = "custom"
    # The search result holds this plan among its candidates: keep it out of == and repr.
    search: SearchResult | None = field(default=None, compare=False, repr=False)
    # CPU offload (planner/offload_plan.py): recomputed scopes whose inputs wait in host memory
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
        out = list(shape)
        for axis, p in enumerate(placement):
            if isinstance(p, Shard):
                out[p.dim] //= self.plan.mesh.shape[axis]
        return tuple(out)


def _dim_of(ann_specs: tuple, index: int, name: str) -> tuple[int, bool] | None:
    """Where ``name`` sits in tensor ``index``: (dim, is_outermost_of_its_group), or None."""
    spec = ann_specs[index]
    for d, dim in enumerate(spec.dims):
        if name in dim.names:
            return d, dim.names[0] == name
    return None


def _name_size(ann: Annotation, shapes: list[tuple[int, ...]], name: str) -> int | None:
    for spec, shape in zip(list(ann.inputs) + list(ann.outputs), shapes):
        for dim, size in zip(spec.dims, shape):
            if dim.names == (name,):
                return size
    return None


def op_placements(graph: Graph, op: Op, split: tuple[str | None, ...], mesh: Mesh) -> tuple[list, list]:
    """Input and output placements for ``op`` under ``split`` (one name or None per mesh axis)."""
    if op.annotation is None:
        raise PlanError(f"op {op.index} {op.name} has no annotation; trace with annotate=True")
    from .sequence_split import effective_annotation  # an attention split along the sequence (zigzag)

    ann = effective_annotation(graph, op, split, mesh)
    in_ids, out_ids = op.input_ids(), op.output_ids()
    shapes = [graph.tensors[t].shape for t in in_ids + out_ids]
    ins: list[list] = [[] for _ in in_ids]
    outs: list[list] = [[] for _ in out_ids]
    used = [n for n in split if n is not None]
    if len(set(used)) != len(used):
        raise PlanError(f"op {op.index} {op.name} @ {op.scope}: the same dim '{used[0]}' is split on two mesh axes")
    for axis, name in enumerate(split):
        size = mesh.shape[axis]
        if name is None or size == 1:
            for p in ins:
                p.append(REPLICATE)
            for p in outs:
                p.append(REPLICATE)
            continue
        if name in ann.frozen or name not in ann.input_names:
            raise PlanError(
                f"op {op.index} {op.name} @ {op.scope}: dim '{name}' of annotation '{ann}' may not be split "
                f"(it is marked ^ or not an input dim); splittable: {ann.splittable() or 'none'}"
            )
        n_size = _name_size(ann, shapes, name)
        for i, tid in enumerate(in_ids + out_ids):
            where = _dim_of(tuple(ann.inputs) + tuple(ann.outputs), i, name)
            if where is not None:
                dim, outer = where
                if not outer:
                    raise PlanError(
                        f"op {op.index} {op.name} @ {op.scope}: '{name}' is an inner name of a grouped dim in "
                        f"'{ann}'; only the outermost name of a group can be split"
                    )
                full = graph.tensors[tid].shape[dim]
                if full % size or (n_size is not None and n_size % size):
                    raise PlanError(
                        f"op {op.index} {op.name} @ {op.scope}: cannot split dim '{name}' (size "
                        f"{n_size if n_size is not None else full}) evenly over mesh axis "
                        f"'{mesh.axis_names[axis]}' of size {size}; uneven splits are not supported — "
                        "choose sizes divisible by the axis size or another split"
                    )
        for i in range(len(in_ids)):
            where = _dim_of(ann.inputs, i, name)
            if where:
                ins[i].append(Shard(where[0]))
            elif ann.inputs[i].summand and name in ann.reductions:
                # Every rank's output is a partial sum; a summand added whole on each rank would be
                # counted axis-size times, so it enters as a Partial too (one rank holds it).
                ins[i].append(PARTIAL)
            else:
                ins[i].append(REPLICATE)
        for i in range(len(out_ids)):
            where = _dim_of(ann.outputs, i, name)
            if where:
                outs[i].append(Shard(where[0]))
            else:
                # Absent from every output, the name is summed over: partial sums. Absent from this
                # output only, this output never depended on it: every rank computes all of it.
                outs[i].append(PARTIAL if name in ann.reductions else REPLICATE)
    for p in ins + outs:
        dims = [x.dim for x in p if isinstance(x, Shard)]
        if len(set(dims)) != len(dims):
            raise PlanError(f"op {op.index} {op.name} @ {op.scope}: two mesh axes split the same tensor dim")
    return [tuple(p) for p in ins], [tuple(p) for p in outs]


def stored_placement(wanted: TensorPlacement) -> TensorPlacement:
    """How a parameter whose first reader wants ``wanted`` is stored: as wanted, but whole where
    that is Partial (a summand of a split reduction); the reader's redistribution makes it Partial.
    """
    return tuple(REPLICATE if isinstance(p, Partial) else p for p in wanted)


def resolve_placements(graph: Graph, plan: Plan) -> ResolvedPlan:
    """Check a plan against every op's annotation and derive all placements.

    Sources (inputs, buffers, constants) are stored replicated; a parameter is stored the way its
    first consumer needs it (``stored_placement``), so the common single-consumer case needs no
    communication.
    """
    if plan.mesh.size < 1:
        raise PlanError("empty mesh")
    naxes = len(plan.mesh.shape)
    op_inputs: dict[int, list] = {}
    op_outputs: dict[int, list] = {}
    stored: dict[int, TensorPlacement] = {}
    replicated = (REPLICATE,) * naxes
    for op in graph.ops:
        split = plan.split_of(op.index)
        if len(split) != naxes:
            raise PlanError(f"op {op.index}: split {split} does not name one dim (or None) per mesh axis")
        ins, outs = op_placements(graph, op, split, plan.mesh)
        op_inputs[op.index] = ins
        op_outputs[op.index] = outs
        for tid, p in zip(op.input_ids(), ins):
            t = graph.tensors[tid]
            if tid not in stored:
                if t.kind == "parameter":
                    stored[tid] = stored_placement(p)
                elif t.kind != ACTIVATION:
                    stored[tid] = replicated
        for tid, p in zip(op.output_ids(), outs):
            stored[tid] = p
    for tid in graph.tensors:
        stored.setdefault(tid, replicated)
    return ResolvedPlan(plan, op_inputs, op_outputs, stored)
