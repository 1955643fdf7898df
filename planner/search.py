"""The ``auto`` policy: the fastest mesh, per-op splits and recompute that fit a per-GPU memory budget.

The search, per candidate mesh (1-D ``n`` and every 2-D ``a x b = n``):

1. **One layer stands for all.** ``layer_structure`` checks that the decoder layers are identical
   (same ops, annotations and shapes, position by position) and that each reads only the residual
   stream from the previous layer plus side inputs (rotary tables) from before the first layer.
   Then the problem has one variable per op of the prologue (embedding, rotary), of layer 0 and of
   the epilogue (final norm, loss): every layer gets layer 0's splits. Its size does not depend
   on the number of layers.
2. **Exact minimisation.** Each variable's domain is the op's valid splits (one name of
   ``annotation.splittable()`` or None per mesh axis, checked by ``plan.op_placements``). The
   objective is additive: per op, its compute time on local shards (times the layers it stands
   for, plus its recomputed forwards) and its share of memory; per tensor, one factor over its
   producer and all its readers holding the collectives that bring it to each distinct placement
   the readers want (once per placement, as codegen emits them) in forward and backward, and the
   bytes of each distinct copy kept for backward. The residual read by layer 0 gets two factors:
   from the embedding (first layer) and from layer 0's own output (the other layers), which is
   exact because every layer has the same splits. This factor graph is minimised exactly by
   variable elimination (min-sum, weighted min-fill elimination order), whose cost is
   exponential only in the induced width of the layer's dataflow graph (attention's q/k/v
   branches and the residual stream keep about five variables together).
3. **Memory.** The budget is handled by Lagrangian relaxation: the objective is time plus
   ``lambda`` times memory (parameters and optimizer state, activations kept, inputs of recomputed
   layers), solved for a geometric range of ``lambda`` and for recompute weights of 0 and all
   layers. Each solution is then evaluated exactly by ``cost.analyze`` for every recompute choice
   (the first k layers recomputed, k = 0..L: the last layers' backward runs first, so theirs is
   the memory that is freed soonest; and the first k layers whole with only the MLP of each other
   layer, k = 0..L-1) and the fastest one within the budget wins.

Complexity: per mesh, ``O(#solves * sum over eliminations of the product of the domain sizes in
the eliminated variable's neighbourhood)`` plus ``O(#solves * #ops * (2L + 1))`` for the exact
evaluations; #solves <= 2 * (1 + len(LAMBDA_MULTIPLIERS)). Llama-3-8B at 128K on 8 GPUs: 85
variables, domains <= 4 splits (mesh 8) or <= 13 (4 x 2), largest table 2e3 / 3e5 entries, 0.02-0.03
s per solve; the whole search (24 solves and their full-graph evaluations of 65 recompute
choices) about 21 s on one core of the 2-core CI machine. The mini Llama on 2 x 2 (batch splittable too): domains <= 21, largest table 1e7, 0.3 s.

Options read from ``PolicyContext``: ``plan_ngpus``, ``memory_budget_gb`` (10^9 bytes; None: no
limit), ``recompute`` (``auto``: searched; ``none``; ``layer``: every layer; or a comma-separated
list of scopes, kept as given) and ``extra``: ``hw_profile`` (name, path or HardwareProfile;
default ``cost.default_hw_profile()``), ``dp_size`` (data-parallel copies, default 1), ``zero``
(ZeRO-1, default True), ``mesh_shapes`` (the meshes to try, default ``candidate_meshes``).
``auto`` leaves its ``SearchResult`` in ``ctx.extra["auto_search"]`` for the plan report.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from .cost import (
    GB,
    SDPA,
    Estimate,
    HardwareProfile,
    dtype_bytes,
    is_chunked_loss,
    load_hw_profile,
    local_shape,
    op_cost,
    param_state,
    redistribution_cost,
    replica_count,
    saved_inputs,
    saves_output,
)
from .cost import analyze as analyze_plan
from .graph import ACTIVATION, PARAMETER, Graph, Op
from .plan import REPLICATE, Mesh, Plan, PlanError, op_placements, resolve_placements
from .policies import POLICIES, PolicyContext, decoder_layer_scopes, recompute_scopes

# Multipliers of the natural time-per-byte scale tried for the memory weight lambda.
LAMBDA_MULTIPLIERS = (0.1, 1.0, 10.0, 100.0, 1e4)
# A factor over more table entries than this is split into pairwise factors (slightly inexact).
MAX_GROUP_ENTRIES = 2_000_000
MAX_TABLE_ENTRIES = 40_000_000
RUNNER_UPS = 5


# --------------------------------------------------------------------------------------------
# Repeated layers
# --------------------------------------------------------------------------------------------


def _in_scope(scope: str, root: str) -> bool:
    return scope == root or scope.startswith(root + ".")


@dataclass
class LayerStructure:
    """Identical decoder layers: op ranges and the residual tensor entering and leaving each layer."""

    scopes: list[str]
    starts: list[int]  # first op index of each layer
    length: int  # ops per layer
    inputs: list[int]  # tensor id of the residual each layer reads
    outputs: list[int]  # tensor id of the residual each layer produces

    def locate(self, op_index: int) -> tuple[int, int] | None:
        """(layer, position in layer) of an op, or None for prologue and epilogue ops."""
        if op_index < self.starts[0] or op_index >= self.starts[-1] + self.length:
            return None
        layer = (op_index - self.starts[0]) // self.length
        return layer, op_index - self.starts[layer]


def layer_structure(graph: Graph) -> LayerStructure | None:
    """The repeated-layer structure of ``graph``, or None when its layers cannot share one plan.

    Promises, when not None: layers are consecutive op ranges of equal length whose ops match by
    position (name, annotation, input and output shapes, tensor kinds); layer i >= 1 reads, from
    outside itself, only layer i-1's output at fixed positions and the same prologue tensors as
    layer 0; each layer's output is read only by the next layer (the last: by the epilogue).
    """
    scopes = decoder_layer_scopes(graph)
    if len(scopes) < 2:
        return None
    members = [[op.index for op in graph.ops if _in_scope(op.scope, s)] for s in scopes]
    n = len(members[0])
    starts = [m[0] for m in members]
    for i, m in enumerate(members):
        if len(m) != n or m != list(range(m[0], m[0] + n)) or (i and m[0] != starts[i - 1] + n):
            return None
    for i in range(1, len(scopes)):
        for j in range(n):
            a, b = graph.ops[starts[0] + j], graph.ops[starts[i] + j]
            if a.name != b.name or str(a.annotation) != str(b.annotation):
                return None
            ta = [graph.tensors[t] for t in a.input_ids() + a.output_ids()]
            tb = [graph.tensors[t] for t in b.input_ids() + b.output_ids()]
            if [(t.shape, t.dtype, t.kind) for t in ta] != [(t.shape, t.dtype, t.kind) for t in tb]:
                return None
    consumers = graph.consumers()
    graph_out = set(graph.output_ids())

    def outside_reads(i: int) -> dict[tuple[int, int], int]:
        reads = {}
        lo, hi = starts[i], starts[i] + n
        for j in range(n):
            for pos, tid in enumerate(graph.ops[lo + j].input_ids()):
                t = graph.tensors[tid]
                if t.kind == ACTIVATION and t.producer is not None and not lo <= t.producer < hi:
                    reads[(j, pos)] = tid
        return reads

    outputs = []
    for i in range(len(scopes)):
        lo, hi = starts[i], starts[i] + n
        leaving = [tid for j in range(lo, hi) for tid in graph.ops[j].output_ids()
                   if tid in graph_out or any(not lo <= c < hi for c in consumers.get(tid, []))]
        if len(leaving) != 1:
            return None
        outputs.append(leaving[0])
        later = [c for c in consumers[leaving[0]] if not lo <= c < hi]
        if tid_out_of_place(later, i, starts, n, len(scopes)) or leaving[0] in graph_out:
            return None
    reads = [outside_reads(i) for i in range(len(scopes))]
    residual_at = {k for k, t in reads[1].items() if t == outputs[0]}
    side = {k: t for k, t in reads[1].items() if k not in residual_at}
    if not residual_at or any(graph.tensors[t].producer >= starts[0] for t in side.values()):
        return None
    for i in range(2, len(scopes)):
        if {k for k, t in reads[i].items() if t == outputs[i - 1]} != residual_at:
            return None
        if {k: t for k, t in reads[i].items() if k not in residual_at} != side:
            return None
    first = {reads[0].get(k) for k in residual_at}
    if len(first) != 1 or None in first or {k: t for k, t in reads[0].items() if k not in residual_at} != side:
        return None
    layer0_input = first.pop()
    if graph.tensors[layer0_input].producer >= starts[0]:
        return None
    return LayerStructure(scopes, starts, n, [layer0_input] + outputs[:-1], outputs)


def tid_out_of_place(readers: list[int], layer: int, starts: list[int], n: int, layers: int) -> bool:
    """True when a layer's output is read anywhere but the next layer (the epilogue for the last)."""
    if layer == layers - 1:
        return any(c < starts[-1] + n for c in readers)
    lo = starts[layer + 1]
    return any(not lo <= c < lo + n for c in readers)


# --------------------------------------------------------------------------------------------
# Exact min-sum over a factor graph
# --------------------------------------------------------------------------------------------


def elimination_order(sizes: list[int], scopes: list[tuple[int, ...]]) -> tuple[list[int], float]:
    """A variable elimination order by weighted min-fill, and the largest table it creates.

    Each step eliminates the variable whose elimination joins the fewest new value pairs among
    its neighbours (ties: the smallest table), which keeps the induced tables small on the
    chain-like graphs of decoder layers.
    """
    adjacent: dict[int, set[int]] = {v: set() for v in range(len(sizes))}
    for scope in scopes:
        for v in scope:
            adjacent[v].update(u for u in scope if u != v)
    order: list[int] = []
    largest = 0.0

    def table(v: int) -> float:
        return float(sizes[v]) * float(np.prod([sizes[u] for u in adjacent[v]], dtype=np.float64))

    def fill(v: int) -> float:
        nb = sorted(adjacent[v])
        return sum(sizes[a] * sizes[b] for i, a in enumerate(nb) for b in nb[i + 1:] if b not in adjacent[a])

    remaining = set(adjacent)
    while remaining:
        v = min(remaining, key=lambda u: (fill(u), table(u), u))
        largest = max(largest, table(v))
        neighbours = adjacent.pop(v)
        for a in neighbours:
            adjacent[a].discard(v)
            adjacent[a].update(neighbours - {a})
        remaining.discard(v)
        order.append(v)
    return order, largest


def minimize(sizes: list[int], factors: list[tuple[tuple[int, ...], np.ndarray]],
             order: tuple[list[int], float] | None = None) -> tuple[list[int], float]:
    """Assignment minimising the sum of ``factors`` (scope: sorted distinct variables, table over their values).

    Exact variable elimination (min-sum) in ``order`` (default: ``elimination_order``). Raises
    PlanError when a table would exceed MAX_TABLE_ENTRIES (the graph is too entangled for exact search).
    """
    order, largest = order if order is not None else elimination_order(sizes, [scope for scope, _ in factors])
    if largest > MAX_TABLE_ENTRIES:
        raise PlanError(f"the per-layer placement problem needs a table of {largest:,.0f} entries; "
                        "use a built-in policy or a 1-D mesh for this model")
    alive: dict[int, tuple[tuple[int, ...], np.ndarray]] = {}
    by_var: dict[int, set[int]] = {v: set() for v in range(len(sizes))}
    for fid, (scope, table) in enumerate(factors):
        alive[fid] = (scope, table.astype(np.float32))
        for v in scope:
            by_var[v].add(fid)
    next_id = len(factors)
    eliminated: list[tuple[int, tuple[int, ...], np.ndarray]] = []
    for v in order:
        union = tuple(sorted({u for fid in by_var[v] for u in alive[fid][0]} | {v}))
        combined = np.zeros([sizes[u] for u in union], dtype=np.float32)
        for fid in list(by_var[v]):
            scope, table = alive.pop(fid)
            for u in scope:
                by_var[u].discard(fid)
            combined += table.reshape([sizes[u] if u in scope else 1 for u in union])
        axis = union.index(v)
        rest = union[:axis] + union[axis + 1:]
        best = combined.argmin(axis=axis)
        eliminated.append((v, rest, best))
        if rest:
            alive[next_id] = (rest, np.take_along_axis(combined, np.expand_dims(best, axis), axis).squeeze(axis))
            for u in rest:
                by_var[u].add(next_id)
            next_id += 1
    assignment = [0] * len(sizes)
    for v, rest, best in reversed(eliminated):
        assignment[v] = int(best[tuple(assignment[u] for u in rest)]) if rest else int(best)
    total = sum(float(table[tuple(assignment[u] for u in scope)]) for scope, table in factors)
    return assignment, total


# --------------------------------------------------------------------------------------------
# The placement problem of one mesh
# --------------------------------------------------------------------------------------------


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
class _Weights:
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


class _Problem:
    """Variables, domains and factor ingredients for one mesh; ``solve(weights)`` returns a Plan."""

    def __init__(self, graph: Graph, structure: LayerStructure | None, mesh: Mesh, hw: HardwareProfile,
                 dp_size: int, zero: bool) -> None:
        self.graph, self.structure, self.mesh, self.hw = graph, structure, mesh, hw
        self.dp_size, self.zero = dp_size, zero
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
        self._op_costs = [[op_cost(graph, v.op, v.ins[s], v.outs[s], mesh, hw) for s in range(len(v.splits))]
                          for v in self.vars]
        self.factors = [self._unary_tables(v) for v in range(len(self.vars))]
        for g in self.groups:
            self.factors += [f for f in self._group_tables(g) if any(t.any() for t in f.parts.values())]
        self.order: tuple[list[int], float] | None = None

    # --- construction ---------------------------------------------------------------------
    def _domain(self, op: Op, cls: str) -> _Var:
        if op.annotation is None:
            raise PlanError(f"op {op.index} {op.name} has no annotation; trace with annotate=True")
        names = op.annotation.splittable()
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
            keeps = set(saved_inputs(graph, op))
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
        return self.vars[source[1]].ins[s][source[2]]

    def _redistribution(self, tid: int, src: tuple, dst: tuple) -> tuple[float, float]:
        t = self.graph.tensors[tid]
        key = (t.shape, t.dtype, t.requires_grad, src, dst)
        if key not in self._cost_cache:
            cc = redistribution_cost(t.shape, dtype_bytes(t.dtype), src, dst, self.mesh, self.hw, t.requires_grad)
            self._cost_cache[key] = (cc.forward_s + cc.backward_s, cc.forward_s)
        return self._cost_cache[key]

    def _tensor_bytes(self, tid: int, placement: tuple) -> float:
        t = self.graph.tensors[tid]
        n = 1
        for s in local_shape(t.shape, placement, self.mesh):
            n *= s
        return float(n * dtype_bytes(t.dtype))

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
            if saves_output(var.op):
                parts["kept"][s] = sum(self._tensor_bytes(t, p) for t, p in zip(out_ids, var.outs[s]))
            for pos in self.param_owner.get(v, []):
                t = self.graph.tensors[in_ids[pos]]
                p = var.ins[s][pos]
                numel = int(np.prod(local_shape(t.shape, p, self.mesh), dtype=np.int64))
                st = param_state(numel, t.dtype, replica_count(p, self.mesh), self.hw, self.dp_size, self.zero)
                parts["param_s"][s] += st.sync_s + st.optimizer_s
                parts["param_bytes"][s] += st.parameters + st.gradients + st.optimizer
            if layer_output:
                out_pos = out_ids.index(self.structure.outputs[0])
                parts["layer_output"][s] = self._tensor_bytes(self.structure.outputs[0], var.outs[s][out_pos])
        return _Factor((v,), var.cls, parts)

    def solve(self, w: _Weights) -> tuple[Plan, float]:
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


# --------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One evaluated plan with its estimate; ``note`` says how it was found."""

    plan: Plan
    estimate: Estimate
    feasible: bool
    note: str


@dataclass
class SearchResult:
    """The chosen candidate, the runner-ups (best first, distinct plans) and search statistics."""

    best: Candidate
    candidates: list[Candidate]
    budget_bytes: float | None
    hw: HardwareProfile
    seconds: float
    solves: int
    layers_planned_once: int  # repeated layers sharing layer 0's plan (0: the whole graph was planned)


def candidate_meshes(n: int) -> list[tuple[int, ...]]:
    """1-D ``(n,)`` and every 2-D factorisation ``(a, b)``, ``a >= b >= 2`` (axis order is immaterial)."""
    shapes: list[tuple[int, ...]] = [(n,)]
    for b in range(2, int(n ** 0.5) + 1):
        if n % b == 0:
            shapes.append((n // b, b))
    return shapes


def _role(op: Op, name: str | None) -> str:
    if name is None:
        return "replica"
    first = op.annotation.inputs[0].names() if op.annotation and op.annotation.inputs else []
    if name not in first or op.name == SDPA and first.index(name) > 0:
        return "tp"
    i = first.index(name)
    if i == 0:
        return "batch"
    return "tp" if i == len(first) - 1 else "sp"


def name_axes(graph: Graph, plan: Plan) -> Plan:
    """The same plan with mesh axes named by what the matmuls and attention split on them (tp, sp, batch)."""
    if plan.mesh.size == 1:
        return Plan(Mesh(("unit",), (1,)), dict(plan.splits), list(plan.recompute_scopes), plan.name)
    votes: list[dict[str, float]] = [{} for _ in plan.mesh.shape]
    for op in graph.ops:
        heavy = op.name == SDPA or op.name.endswith("linear") or "matmul" in op.name or is_chunked_loss(op)
        if not heavy:
            continue
        weight = float(np.prod(graph.tensors[op.output_ids()[0]].shape or (1,), dtype=np.float64))
        for axis, name in enumerate(plan.split_of(op.index)):
            role = _role(op, name)
            votes[axis][role] = votes[axis].get(role, 0.0) + weight
    names: list[str] = []
    for v in votes:
        role = max(v, key=v.get) if v else "axis"
        name, i = role, 2
        while name in names:
            name, i = f"{role}{i}", i + 1
        names.append(name)
    return Plan(Mesh(tuple(names), plan.mesh.shape), dict(plan.splits), list(plan.recompute_scopes), plan.name)


def _signature(plan: Plan) -> tuple:
    return plan.mesh.shape, tuple(sorted(plan.splits.items())), tuple(plan.recompute_scopes)


def mlp_scopes(graph: Graph, layers: list[str]) -> list[str] | None:
    """``<layer>.mlp`` for every decoder layer, when every layer has such a child scope, else None."""
    scopes = {op.scope for op in graph.ops}
    mlps = [f"{layer}.mlp" for layer in layers]
    has = all(any(s == m or s.startswith(m + ".") for s in scopes) for m in mlps)
    return mlps if layers and has else None


def _recompute_choices(graph: Graph, mode: str) -> list[list[str]]:
    """The recompute scope lists to evaluate; for ``auto`` the first k layers whole, each alone and
    followed by the MLPs of all the other layers (selective recompute: at long sequences attention
    dominates the time and the MLP's wide activations the memory), else the one list given."""
    if mode == "auto":
        layers = decoder_layer_scopes(graph)
        choices = [layers[:k] for k in range(len(layers) + 1)]
        mlps = mlp_scopes(graph, layers)
        if mlps:
            choices += [layers[:k] + mlps[k:] for k in range(len(layers))]
        return choices
    return [recompute_scopes(graph, mode or "none")]


def _search_mesh(graph: Graph, problem: _Problem, n_layers: int, choices: list[list[str]], budget: float | None,
                 solve_ks: list[int], evaluated: dict[tuple, Candidate]) -> int:
    """Solve one mesh's problem for each recompute weight and memory weight; add candidates; return #solves."""
    hw, dp_size, zero = problem.hw, problem.dp_size, problem.zero
    regions = list(dict.fromkeys(decoder_layer_scopes(graph) + [s for c in choices for s in c]))
    shape = problem.mesh.shape
    solves = 0
    for k in solve_ks:
        lambdas = [0.0]
        while lambdas:
            lam = lambdas.pop(0)
            plan, _ = problem.solve(_Weights(max(n_layers, 1), k, lam))
            solves += 1
            analysis = analyze_plan(graph, resolve_placements(graph, plan), hw, dp_size, zero, regions=regions)
            fastest = None
            for scopes in choices:
                est = analysis.estimate(scopes)
                candidate = Candidate(Plan(plan.mesh, plan.splits, list(scopes), "auto"), est,
                                      budget is None or est.peak_bytes <= budget,
                                      f"mesh {'x'.join(map(str, shape))}, split weights for {k} recomputed layers, "
                                      f"memory weight {lam:.3g} s/byte")
                evaluated.setdefault(_signature(candidate.plan), candidate)
                if candidate.feasible and (fastest is None or est.step_s < fastest.step_s):
                    fastest = est
            # The time-optimal splits already fit with the least recompute allowed: memory needs no weight.
            if lam == 0.0 and budget is not None and (fastest is None or fastest.recompute_scopes != choices[0]):
                least = analysis.estimate(choices[0])
                unit = least.step_s / max(least.peak_bytes, 1.0)
                lambdas += [m * unit for m in LAMBDA_MULTIPLIERS]
    return solves


def search(graph: Graph, ctx: PolicyContext) -> SearchResult:
    """Evaluate meshes, splits and recompute choices; the fastest plan within ``ctx.memory_budget_gb`` wins.

    Returns the best candidate and up to RUNNER_UPS runner-ups (distinct split assignments, each
    with its best recompute choice), with mesh axes named by role. Raises PlanError, naming the
    smallest peak memory any evaluated plan reached, when nothing fits the budget.
    """
    start = time.perf_counter()
    extra = ctx.extra or {}
    hw = load_hw_profile(extra.get("hw_profile"))
    dp_size, zero = int(extra.get("dp_size", 1)), bool(extra.get("zero", True))
    budget = ctx.memory_budget_gb * GB if ctx.memory_budget_gb is not None else None
    structure = layer_structure(graph)
    n_layers = len(structure.scopes) if structure else 0
    choices = _recompute_choices(graph, ctx.recompute)
    solve_ks = sorted({0, n_layers}) if ctx.recompute == "auto" else [min(len(choices[0]), n_layers)]
    shapes = [tuple(s) for s in extra.get("mesh_shapes") or candidate_meshes(ctx.plan_ngpus)]
    for shape in shapes:
        if int(np.prod(shape)) != ctx.plan_ngpus:
            raise PlanError(f"mesh shape {shape} does not hold plan_ngpus = {ctx.plan_ngpus} devices")
    evaluated: dict[tuple, Candidate] = {}
    solves = 0
    for shape in shapes:
        problem = _Problem(graph, structure, Mesh(tuple(f"axis{i}" for i in range(len(shape))), shape), hw,
                           dp_size, zero)
        solves += _search_mesh(graph, problem, n_layers, choices, budget, solve_ks, evaluated)
    ranked = sorted(evaluated.values(),
                    key=lambda c: (not c.feasible, c.estimate.step_s if c.feasible else c.estimate.peak_bytes))
    if not ranked[0].feasible:
        smallest = min(c.estimate.peak_bytes for c in ranked)
        hint = "" if ctx.recompute == "auto" else ", or enable recompute (recompute=auto)"
        raise PlanError(
            f"smallest plan found needs {smallest / GB:.3g} GB per GPU, budget is {ctx.memory_budget_gb:.3g} GB: "
            f"add GPUs (plan_ngpus), shorten sequence_length{hint}"
        )
    distinct: dict[tuple, Candidate] = {}
    for c in ranked:
        if c.feasible or budget is None:
            distinct.setdefault((c.plan.mesh.shape, tuple(sorted(c.plan.splits.items()))), c)
    top = list(distinct.values())[:RUNNER_UPS + 1]
    for c in top:
        c.plan = name_axes(graph, c.plan)
    return SearchResult(top[0], top, budget, hw, time.perf_counter() - start, solves, n_layers)


def auto(graph: Graph, ctx: PolicyContext) -> Plan:
    """Policy ``auto``: the fastest estimated plan within ``ctx.memory_budget_gb`` (see the module docstring).

    Leaves the SearchResult (chosen plan, runner-ups and their estimates) in ``ctx.extra["auto_search"]``.
    """
    result = search(graph, ctx)
    if ctx.extra is not None:
        ctx.extra["auto_search"] = result
    return result.best.plan


POLICIES["auto"] = auto
