"""The ``auto`` policy: the fastest mesh, per-op splits and recompute that fit a per-GPU memory budget.

The search, per candidate mesh (1-D ``n`` and every 2-D ``a x b = n``):

1. **One layer stands for all.** ``layer_structure`` checks that the decoder layers are identical
   (same ops, annotations and shapes, position by position) and that each reads only the residual
   stream from the previous layer plus side inputs (rotary tables) from before the first layer.
   Then the problem has one variable per op of the prologue (embedding, rotary), of layer 0 and of
   the epilogue (final norm, loss): every layer gets layer 0's splits. Its size does not depend
   on the number of layers.
2. **Exact minimisation.** Each variable's domain is the op's valid splits (one name of
   ``annotation.splittable()`` or None per mesh axis, checked by ``resolve.op_placements``). The
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
   layers. Each solution is then evaluated exactly by ``model.analyze`` for every recompute choice
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
default ``hardware.default_hw_profile()``), ``dp_size`` (data-parallel copies, default 1), ``zero``
(ZeRO-1, default True), ``grad_accumulation_steps`` (micro-batches per optimizer step, default 1:
``plan/gradient_buffers.py``), ``mesh_shapes`` (the meshes to try, default ``candidate_meshes``).
The plan ``auto`` returns carries its ``SearchResult`` as ``plan.search`` (the plan report reads it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..cost.hardware import HardwareProfile, load_hw_profile
from ..cost.model import GB, Estimate
from ..cost.model import analyze as analyze_plan
from ..cost.offload_cost import fits
from ..cost.plan_estimate import plan_estimate
from ..cost.topology import node_ordered_meshes
from ..graph.ir import Graph, Op
from ..graph.layers import decoder_layer_scopes, layer_structure, mlp_scopes
from ..plan.gradient_buffers import grad_accumulation_steps
from ..plan.offload_plan import offload_mode, with_offload_of
from ..plan.placements import Mesh, Plan, PlanError
from ..plan.resolve import resolve_placements
from ..plan.sequence_split import not_offered as sequence_split_not_offered
from ..plan.sequence_split import sequence_split_axis
from .offload_search import no_fit_message, offload_candidates, split_key
from .placement_problem import PlacementProblem, Weights
from .policies import PolicyContext, recompute_scopes, register_policy
from .solver import MAX_TABLE_ENTRIES, SearchTooLarge, elimination_order

# Multipliers of the natural time-per-byte scale tried for the memory weight lambda.
LAMBDA_MULTIPLIERS = (0.1, 1.0, 10.0, 100.0, 1e4)
RUNNER_UPS = 5
# Cost classes whose splits name the mesh axes (tp, sp, batch).
_HEAVY = ("matmul", "attention", "linear_cross_entropy")

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
    if name not in first or op.record.cost == "attention" and first.index(name) > 0:
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
        if op.record.cost not in _HEAVY:
            continue
        weight = float(np.prod(graph.tensors[op.output_ids()[0]].shape or (1,), dtype=np.float64))
        for axis, name in enumerate(plan.split_of(op.index)):
            role = _role(op, name)
            votes[axis][role] = votes[axis].get(role, 0.0) + weight
    # An axis on which attention is split along the sequence is the context-parallel axis.
    cp_axes = {sequence_split_axis(op, plan.split_of(op.index), plan.mesh) for op in graph.ops}
    names: list[str] = []
    for axis, v in enumerate(votes):
        role = "cp" if axis in cp_axes else max(v, key=v.get) if v else "axis"
        name, i = role, 2
        while name in names:
            name, i = f"{role}{i}", i + 1
        names.append(name)
    return Plan(Mesh(tuple(names), plan.mesh.shape), dict(plan.splits), list(plan.recompute_scopes), plan.name)


def _signature(plan: Plan) -> tuple:
    return plan.mesh.shape, tuple(sorted(plan.splits.items())), tuple(plan.recompute_scopes)


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


def _search_mesh(graph: Graph, problem: PlacementProblem, n_layers: int, choices: list[list[str]], budget: float | None,
                 solve_ks: list[int], evaluated: dict[tuple, Candidate], analyses: dict[tuple, tuple]) -> int:
    """Solve one mesh's problem for each recompute weight and memory weight; add candidates; return #solves.

    ``analyses`` gathers each split plan's (resolved placements, analysis), keyed by
    ``offload_search.split_key``, for the offload search to reuse.
    """
    hw, dp_size, zero, accumulation = problem.hw, problem.dp_size, problem.zero, problem.accumulation
    regions = list(dict.fromkeys(decoder_layer_scopes(graph) + [s for c in choices for s in c]))
    shape = problem.mesh.shape
    solves = 0
    for k in solve_ks:
        lambdas = [0.0]
        while lambdas:
            lam = lambdas.pop(0)
            plan, _ = problem.solve(Weights(max(n_layers, 1), k, lam))
            solves += 1
            key = split_key(plan)
            if key not in analyses:
                resolved = resolve_placements(graph, plan)
                analyses[key] = (resolved, analyze_plan(graph, resolved, hw, dp_size, zero, regions=regions,
                                                        accumulation=accumulation))
            resolved, analysis = analyses[key]
            fastest = None
            for scopes in choices:
                candidate_plan = Plan(plan.mesh, plan.splits, list(scopes), "auto")
                # The budget check reads the estimate plan.json and plan_report.md will show.
                est = plan_estimate(graph, resolved, analysis, candidate_plan, hw, dp_size, zero)
                candidate = Candidate(candidate_plan, est, fits(est, budget, None),
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
    accumulation = grad_accumulation_steps(extra)
    budget = ctx.memory_budget_gb * GB if ctx.memory_budget_gb is not None else None
    structure = layer_structure(graph)
    n_layers = len(structure.scopes) if structure else 0
    choices = _recompute_choices(graph, ctx.recompute)
    solve_ks = sorted({0, n_layers}) if ctx.recompute == "auto" else [min(len(choices[0]), n_layers)]
    shapes = [tuple(s) for s in extra.get("mesh_shapes") or node_ordered_meshes(candidate_meshes(ctx.plan_ngpus), hw)]
    for shape in shapes:
        if int(np.prod(shape)) != ctx.plan_ngpus:
            raise PlanError(f"mesh shape {shape} does not hold plan_ngpus = {ctx.plan_ngpus} devices")
    evaluated: dict[tuple, Candidate] = {}
    analyses: dict[tuple, tuple] = {}
    solves = 0
    too_entangled: list[str] = []
    for shape in shapes:
        mesh = Mesh(tuple(f"axis{i}" for i in range(len(shape))), shape)
        problem = PlacementProblem(graph, structure, mesh, hw, dp_size, zero, accumulation)
        problem.order = elimination_order([len(v.splits) for v in problem.vars], [f.scope for f in problem.factors])
        if problem.order[1] > MAX_TABLE_ENTRIES:
            with sequence_split_not_offered():  # its choices made this mesh too entangled: plan it without them
                problem = PlacementProblem(graph, structure, mesh, hw, dp_size, zero, accumulation)
        try:
            solves += _search_mesh(graph, problem, n_layers, choices, budget, solve_ks, evaluated, analyses)
        except SearchTooLarge as error:
            # Exact search cannot solve this mesh (e.g. a 2-D mesh over layers whose routers all feed
            # the loss): the other meshes still compete; only when none can is it an error.
            too_entangled.append(f"{'x'.join(map(str, shape))} ({error})")
            continue
        if len(shape) == 1 and shape[0] <= hw.gpus_per_node and problem.offers_sequence_split():
            # Within a node heads-only plans compete closely; the Lagrangian sweep finds one plan per memory
            # weight, so the extra choices can hide a better one: sweep this mesh without them as well.
            with sequence_split_not_offered():
                problem = PlacementProblem(graph, structure, mesh, hw, dp_size, zero, accumulation)
            solves += _search_mesh(graph, problem, n_layers, choices, budget, solve_ks, evaluated, analyses)
    if not evaluated:
        raise PlanError(f"no mesh of {ctx.plan_ngpus} GPUs could be searched: {'; '.join(too_entangled)}")
    offloaded = offload_candidates(graph, evaluated, extra, hw, budget, dp_size, zero, Candidate, accumulation,
                                   analyses)
    if offload_mode(extra) not in ("auto", "none"):
        # A forced offload applies to the plan compile_model writes: only offloaded candidates may win.
        if not offloaded:
            raise PlanError(f"offload '{offload_mode(extra)}' keeps the inputs of recomputed scopes in host memory, "
                            f"but recompute '{ctx.recompute}' recomputes nothing: set recompute to auto or layer, or "
                            "offload only the optimizer")
        evaluated = {}
    for c in offloaded:
        evaluated.setdefault((*_signature(c.plan), c.plan.offload_optimizer, tuple(c.plan.offload_scopes)), c)
    ranked = sorted(evaluated.values(),
                    key=lambda c: (not c.feasible, c.estimate.step_s if c.feasible else c.estimate.peak_bytes))
    if not ranked[0].feasible:
        hint = "" if ctx.recompute == "auto" else ", or enable recompute (recompute=auto)"
        raise PlanError(no_fit_message(ranked, budget, extra, hw, hint))
    distinct: dict[tuple, Candidate] = {}
    for c in ranked:
        if c.feasible or budget is None:
            distinct.setdefault((c.plan.mesh.shape, tuple(sorted(c.plan.splits.items()))), c)
    top = list(distinct.values())[:RUNNER_UPS + 1]
    for c in top:
        c.plan = with_offload_of(name_axes(graph, c.plan), c.plan)
    return SearchResult(top[0], top, budget, hw, time.perf_counter() - start, solves, n_layers)


def auto(graph: Graph, ctx: PolicyContext) -> Plan:
    """Policy ``auto``: the fastest estimated plan within ``ctx.memory_budget_gb`` (see the module docstring).

    The plan carries its provenance: ``plan.search`` is the SearchResult (runner-ups, estimates).
    """
    result = search(graph, ctx)
    plan = result.best.plan
    plan.search = result
    return plan


register_policy("auto", auto)
