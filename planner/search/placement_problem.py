"""The placement problem of one mesh as a factor graph, minimised by ``solver.minimize``.

One variable per op of the prologue, of layer 0 (standing for every identical layer) and of the
epilogue; its domain is the op's valid splits. Factors hold, per op, its seconds, kept outputs
and parameter state, and per stored tensor the collectives that bring it to the placements its
readers want and the copies kept for backward (see ``search/auto.py``'s docstring).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from ..cost import op_costs
from ..cost.hardware import HardwareProfile
from ..graph.ir import PARAMETER, Graph, Op, dtype_bytes
from ..graph.layers import LayerStructure
from ..plan.placements import REPLICATE, Mesh, Plan, PlanError
from ..plan.resolve import op_placements, stored_placement
from ..plan.sequence_split import extra_split_names, sequence_split_axis
from .solver import elimination_order, minimize

# A factor over more table entries than this is split into pairwise factors (slightly inexact).
MAX_GROUP_ENTRIES = 2_000_000


@dataclass
class _Var:
    op: Op
    cls: str  # prologue | layer | epilogue
    splits: list[tuple]
    ins: list[list]
    outs: list[list]


@dataclass
class _Group:
    """A stored tensor and the readers of one weight class: one factor."""

    tid: int
    source: tuple  # ("out", var, pos) | ("in", var, pos) | ("fixed",)
    cls: str
    readers: list[tuple[int, int, bool]] = field(default_factory=list)  # (var, input position, keeps it)


@dataclass
class _Factor:
    """A factor's variables, weight class and weight-free component tables (combined per solve)."""

    scope: tuple[int, ...]
    cls: str
    parts: dict[str, np.ndarray]


@dataclass(frozen=True)
class Weights:
    layers: int
    recomputed: int
    lam: float

    def of(self, cls: str) -> tuple[float, float, float]:
        """(forward+backward multiplier, extra forward multiplier, memory multiplier) of a weight class."""
        big, k = self.layers, self.recomputed
        if cls == "layer":
            return big, k, big - k
        if cls == "layer_in_first":
            return 1, min(k, 1), 0
        if cls == "layer_in_rest":
            return big - 1, max(k - 1, 0), big - k
        return 1, 0, 1


class PlacementProblem:
    """Variables, domains and factor ingredients for one mesh; ``solve(weights)`` returns a Plan."""

    def __init__(self, graph: Graph, structure: LayerStructure | None, mesh: Mesh, hw: HardwareProfile,
                 dp_size: int, zero: bool, accumulation: int = 1) -> None:
        self.graph, self.structure, self.mesh, self.hw = graph, structure, mesh, hw
        self.dp_size, self.zero, self.accumulation = dp_size, zero, accumulation
        self.vars: list[_Var] = []
        self.var_of: dict[int, int] = {}
        for op in graph.ops:
            where = structure.locate(op.index) if structure else None
            if where is not None and where[0] > 0:
                continue
            cls = "layer" if where is not None else ("prologue" if structure is None or op.index < structure.starts[0]
                                                     else "epilogue")
            self.var_of[op.index] = len(self.vars)
            self.vars.append(self._domain(op, cls))
        self.inputs_of = [v.op.input_ids() for v in self.vars]
        self.param_owner: dict[int, list[int]] = {}  # var -> positions of the parameters it stores
        self.groups = self._groups()
        self._cost_cache: dict[tuple, tuple[float, float]] = {}
        self._op_costs = [[op_costs.op_cost(graph, v.op, v.ins[s], v.outs[s], mesh, hw)
                           for s in range(len(v.splits))] for v in self.vars]
        self.factors = [self._unary_tables(v) for v in range(len(self.vars))]
        for g in self.groups:
            self.factors += [f for f in self._group_tables(g) if any(t.any() for t in f.parts.values())]
        self.order: tuple[list[int], float] | None = None

    def offers_sequence_split(self) -> bool:
        """Whether some op's domain holds a split of an attention's sequence (``sequence_split.extra_split_names``)."""
        return any(sequence_split_axis(v.op, split, self.mesh) is not None for v in self.vars for split in v.splits)

    # --- construction ---------------------------------------------------------------------
    def _domain(self, op: Op, cls: str) -> _Var:
        if op.annotation is None:
            raise PlanError(f"op {op.index} {op.name} has no annotation; trace with annotate=True")
        names = op.annotation.splittable() + extra_split_names(op)  # + an attention's sequence
        per_axis = [[None] + (names if size > 1 else []) for size in self.mesh.shape]
        var = _Var(op, cls, [], [], [])
        for split in itertools.product(*per_axis):
            try:
                ins, outs = op_placements(self.graph, op, split, self.mesh)
            except PlanError:
                continue
            var.splits.append(split)
            var.ins.append(ins)
            var.outs.append(outs)
        return var

    def _rep_var(self, op_index: int) -> int:
        """The variable standing for an op (a later layer's op maps to layer 0's at its position)."""
        where = self.structure.locate(op_index) if self.structure else None
        if where is not None:
            return self.var_of[self.structure.starts[0] + where[1]]
        return self.var_of[op_index]

    def _groups(self) -> list[_Group]:
        graph, st = self.graph, self.structure
        consumers = graph.consumers()
        groups: dict[tuple, _Group] = {}

        def add(tid: int, source: tuple, cls: str, var: int, pos: int, keeps: bool) -> None:
            g = groups.setdefault((source, cls), _Group(tid, source, cls))
            g.readers.append((var, pos, keeps))

        self.param_owner = {}
        for v, var in enumerate(self.vars):
            op = var.op
            keeps = set(op_costs.saved_inputs(graph, op))
            for pos, tid in enumerate(self.inputs_of[v]):
                t = graph.tensors[tid]
                cls = var.cls
                if t.kind == PARAMETER:
                    first = consumers[tid][0]
                    owner = self._rep_var(first)
                    owner_pos = graph.ops[first].input_ids().index(tid)
                    if owner == v and owner_pos == pos:
                        self.param_owner.setdefault(v, []).append(pos)
                    add(tid, ("in", owner, owner_pos), cls, v, pos, pos in keeps)
                elif t.producer is None:
                    add(tid, ("fixed", tid), cls, v, pos, pos in keeps)
                elif st is not None and var.cls == "layer" and tid == st.inputs[0]:
                    emb = self.var_of[t.producer]
                    add(tid, ("out", emb, graph.ops[t.producer].output_ids().index(tid)), "layer_in_first", v, pos,
                        False)
                    last_op = graph.tensors[st.outputs[0]].producer
                    add(st.outputs[0], ("out", self.var_of[last_op], graph.ops[last_op].output_ids().index(st.outputs[0])),
                        "layer_in_rest", v, pos, pos in keeps)
                else:
                    producer = self._rep_var(t.producer)
                    add(tid, ("out", producer, graph.ops[t.producer].output_ids().index(tid)), cls, v, pos,
                        pos in keeps)
        return list(groups.values())

    # --- factors ------------------------------------------------------------------------------
    def _placement(self, source: tuple, s: int) -> tuple:
        kind = source[0]
        if kind == "out":
            return self.vars[source[1]].outs[s][source[2]]
        return stored_placement(self.vars[source[1]].ins[s][source[2]])  # a parameter, as resolve_placements stores it

    def _redistribution(self, tid: int, src: tuple, dst: tuple) -> tuple[float, float]:
        t = self.graph.tensors[tid]
        key = (t.shape, t.dtype, t.requires_grad, src, dst)
        if key not in self._cost_cache:
            cc = op_costs.redistribution_cost(t.shape, dtype_bytes(t.dtype), src, dst, self.mesh, self.hw,
                                              t.requires_grad)
            self._cost_cache[key] = (cc.forward_s + cc.backward_s, cc.forward_s)
        return self._cost_cache[key]

    def _tensor_bytes(self, tid: int, placement: tuple) -> float:
        return op_costs.local_bytes(self.graph.tensors[tid], placement, self.mesh)

    def _group_tables(self, g: _Group) -> list[_Factor]:
        """Weight-free tables of one tensor group: collective seconds (forward+backward, forward) and kept bytes."""
        src_var = g.source[1] if g.source[0] != "fixed" else None
        scope = tuple(sorted({r[0] for r in g.readers} | ({src_var} if src_var is not None else set())))
        sizes = [len(self.vars[v].splits) for v in scope]
        if len(g.readers) > 1 and int(np.prod(sizes, dtype=np.float64)) > MAX_GROUP_ENTRIES:
            # Too many readers to tabulate jointly: one factor per reader (a shared copy is then counted per reader).
            return [f for r in g.readers for f in self._group_tables(_Group(g.tid, g.source, g.cls, [r]))]
        places: dict[tuple, int] = {}

        def index_array(v: int, placement_of) -> np.ndarray:
            arr = np.array([places.setdefault(tuple(placement_of(s)), len(places))
                            for s in range(len(self.vars[v].splits))])
            shape = [1] * len(scope)
            shape[scope.index(v)] = len(arr)
            return arr.reshape(shape)

        if src_var is None:
            src = np.array(places.setdefault((REPLICATE,) * len(self.mesh.shape), 0)).reshape([1] * len(scope))
        else:
            src = index_array(src_var, lambda s: self._placement(g.source, s))
        dsts = [(index_array(v, lambda s, v=v, pos=pos: self.vars[v].ins[s][pos]), keeps) for v, pos, keeps in g.readers]
        plist = sorted(places, key=places.get)
        sources = np.unique(src).tolist()
        targets = np.unique(np.concatenate([arr.ravel() for arr, _ in dsts])).tolist()
        both = np.zeros((len(plist), len(plist)))
        forward = np.zeros((len(plist), len(plist)))
        for a, b in itertools.product(sources, targets):
            if a != b:
                both[a, b], forward[a, b] = self._redistribution(g.tid, plist[a], plist[b])
        shape = tuple(sizes)
        t_both, t_forward, t_kept = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        for d in targets:
            used = np.zeros(shape, dtype=bool)
            kept = np.zeros(shape, dtype=bool)
            for arr, keeps in dsts:
                hit = arr == d
                used = used | hit
                if keeps:
                    kept = kept | hit
            t_both += np.where(used, both[src, d], 0.0)
            t_forward += np.where(used, forward[src, d], 0.0)
            t_kept += kept * self._tensor_bytes(g.tid, plist[d])
        return [_Factor(scope, g.cls, {"both": t_both, "forward": t_forward, "kept": t_kept})]

    def _unary_tables(self, v: int) -> _Factor:
        """Weight-free per-split costs of one op: its seconds, kept output, parameter state and layer output."""
        var = self.vars[v]
        n = len(var.splits)
        parts = {key: np.zeros(n) for key in ("both", "forward", "kept", "param_s", "param_bytes", "layer_output")}
        layer_output = self.structure is not None and var.cls == "layer" and \
            self.graph.tensors[self.structure.outputs[0]].producer == var.op.index
        in_ids, out_ids = self.inputs_of[v], var.op.output_ids()
        for s in range(n):
            cost = self._op_costs[v][s]
            parts["both"][s] = cost.forward_s + cost.backward_s
            parts["forward"][s] = cost.forward_s
            if op_costs.saves_output(var.op):
                parts["kept"][s] = sum(self._tensor_bytes(t, p) for t, p in zip(out_ids, var.outs[s]))
            for pos in self.param_owner.get(v, []):
                stored = stored_placement(var.ins[s][pos])  # as resolve_placements stores it
                st = op_costs.stored_param_state(self.graph.tensors[in_ids[pos]], stored, self.mesh, self.hw,
                                                 self.dp_size, self.zero, self.accumulation)
                parts["param_s"][s] += st.sync_s + st.optimizer_s
                parts["param_bytes"][s] += st.parameters + st.gradients + st.optimizer
            if layer_output:
                out_pos = out_ids.index(self.structure.outputs[0])
                parts["layer_output"][s] = self._tensor_bytes(self.structure.outputs[0], var.outs[s][out_pos])
        return _Factor((v,), var.cls, parts)

    def solve(self, w: Weights) -> tuple[Plan, float]:
        """The plan minimising the weighted objective, and that objective's value."""
        factors = []
        for f in self.factors:
            wfb, wf, wmem = w.of(f.cls)
            table = wfb * f.parts["both"] + wf * f.parts["forward"]
            if w.lam:
                table = table + (w.lam * wmem) * f.parts["kept"]
            if "param_s" in f.parts:
                times = w.layers if f.cls == "layer" else 1
                table = table + times * (f.parts["param_s"] + w.lam * f.parts["param_bytes"])
                table = table + (w.lam * w.recomputed) * f.parts["layer_output"]
            factors.append((f.scope, table))
        if self.order is None:
            self.order = elimination_order([len(v.splits) for v in self.vars], [f.scope for f in self.factors])
        assignment, value = minimize([len(v.splits) for v in self.vars], factors, self.order)
        splits = {}
        for op in self.graph.ops:
            rep = self._rep_var(op.index)
            split = self.vars[rep].splits[assignment[rep]]
            if any(x is not None for x in split):
                splits[op.index] = split
        return Plan(self.mesh, splits, [], "auto"), value

