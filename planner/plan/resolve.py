"""Resolve a plan: check every op's split against its annotation and derive every tensor's placement.

``resolve_placements`` checks each split (``^`` never split, a group ``(h d)`` only by its
outermost name, sizes divisible by the axis size). Where a split reduction leaves an op's output
Partial, its summands (``+`` in the annotation: a bias) are required Partial too, so they are
added once over the axis. An attention op whose split takes its sequence is placed with the
sequence-split annotation (``sequence_split.effective_annotation``).
"""

from __future__ import annotations

from ..graph.ir import ACTIVATION, Graph, Op
from ..ops.annotations import Annotation
from .placements import (
    PARTIAL,
    REPLICATE,
    Mesh,
    Partial,
    Plan,
    PlanError,
    ResolvedPlan,
    Shard,
    TensorPlacement,
)
from .sequence_split import effective_annotation


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
    ann = effective_annotation(graph, op, split, mesh)  # an attention split along the sequence (zigzag)
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
