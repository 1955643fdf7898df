"""Built-in partition policies and the policy registry. A policy is ``policy(graph, ctx) -> Plan``.

Write your own the same way and register it with ``register_policy`` (see docs/design.md, "Adding a policy").

The built-ins seed a few ops by their role in a decoder layer (Hugging Face module names:
``self_attn``, ``mlp``, ``*_proj``) and let every other op *follow* its inputs: an op splits the
dim its producers already split when that costs less communication than gathering.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..graph.ir import PARAMETER, Graph, Op
from ..graph.layers import decoder_layer_scopes
from ..plan.placements import Mesh, Partial, Plan, PlanError, Replicate, Shard
from ..plan.resolve import op_placements

_COLUMN = re.compile(r"(q_proj|k_proj|v_proj|gate_proj|up_proj|qkv_proj|gate_up_proj)\.weight$")
_ROW = re.compile(r"(o_proj|down_proj)\.weight$")


@dataclass
class PolicyContext:
    """What a policy may look at besides the graph."""

    plan_ngpus: int
    recompute: str = "none"  # none | layer | a comma-separated list of scopes
    memory_budget_gb: float | None = None
    extra: dict = field(default_factory=dict)


def recompute_scopes(graph: Graph, recompute: str) -> list[str]:
    """Scopes to recompute for a ``--recompute`` value: none, layer (every decoder layer) or a list."""
    if recompute in ("", "none", "auto"):
        return []
    if recompute == "layer":
        return decoder_layer_scopes(graph)
    return [s.strip() for s in recompute.split(",") if s.strip()]


def _weight_name(graph: Graph, op: Op) -> str | None:
    for tid in op.input_ids():
        t = graph.tensors[tid]
        if t.kind == PARAMETER:
            return t.name
    return None


def _bytes(graph: Graph, tid: int) -> int:
    return graph.tensors[tid].nbytes


def follow(graph: Graph, op: Op, produced: dict[int, tuple], mesh: Mesh, axis: int,
           current: list[str | None], split_partials: bool = False) -> str | None:
    """The split on ``axis`` that needs the least communication given how the inputs were produced.

    Candidates are the names an input is already sharded (or partial-summed) along; ties prefer
    splitting, so work stays divided. Returns None to run the op whole on that axis.
    """
    ann = op.annotation
    in_ids = op.input_ids()
    candidates: list[str | None] = [None]
    for i, tid in enumerate(in_ids):
        p = produced.get(tid)
        if p is None or not isinstance(p[axis], Shard):
            continue
        dim = ann.inputs[i].dims[p[axis].dim] if p[axis].dim < len(ann.inputs[i].dims) else None
        if dim is not None and dim.names and dim.names[0] not in ann.frozen and dim.names[0] not in candidates:
            candidates.append(dim.names[0])
    if split_partials and any(produced.get(t) is not None and isinstance(produced[t][axis], Partial)
                              for t in in_ids):
        # A partial sum may be reduce-scattered along any splittable dim instead of all-reduced.
        candidates += [n for n in ann.splittable() if n not in candidates]
    best, best_cost = None, None
    for name in candidates:
        split = list(current)
        split[axis] = name
        if name is not None and name in [s for a, s in enumerate(current) if a != axis]:
            continue
        try:
            ins, _ = op_placements(graph, op, tuple(split), mesh)
        except PlanError:
            continue
        cost = 0
        for tid, want in zip(in_ids, ins):
            have = produced.get(tid)
            if have is None:  # a parameter: stored as this op wants it
                continue
            # From Replicate, a Shard is a local slice and a Partial (a summand) local zeros: no communication.
            if have[axis] == want[axis] or isinstance(have[axis], Replicate) and isinstance(want[axis], Shard | Partial):
                continue
            # An all-reduce moves twice the bytes of a reduce-scatter or an all-gather.
            both = isinstance(have[axis], Partial) and isinstance(want[axis], Replicate)
            cost += _bytes(graph, tid) * (2 if both else 1)
        if best_cost is None or cost < best_cost or (cost == best_cost and best is None and name is not None):
            best, best_cost = name, cost
    return best


Seeder = Callable[[Graph, Op], "str | None"]


def _plan_by_seeds(graph: Graph, mesh: Mesh, seeders: list[Seeder], ctx: PolicyContext, name: str,
                   split_partials: bool = False) -> Plan:
    """Ops a seeder names get that split on its axis; every other op follows its inputs."""
    plan = Plan(mesh, {}, recompute_scopes(graph, ctx.recompute), name)
    produced: dict[int, tuple] = {}
    replicated = (Replicate(),) * len(mesh.shape)
    for tid, t in graph.tensors.items():
        if t.kind in ("input", "buffer", "constant"):
            produced[tid] = replicated
    for op in graph.ops:
        split: list[str | None] = [None] * len(mesh.shape)
        for axis, seeder in enumerate(seeders):
            split[axis] = seeder(graph, op)
        for axis in range(len(mesh.shape)):
            if split[axis] is None and mesh.shape[axis] > 1:
                split[axis] = follow(graph, op, produced, mesh, axis, split, split_partials)
        try:
            _, outs = op_placements(graph, op, tuple(split), mesh)
        except PlanError as e:
            raise PlanError(f"policy '{name}': {e}") from e
        plan.splits[op.index] = tuple(split)
        for tid, p in zip(op.output_ids(), outs):
            produced[tid] = p
    return plan


def _tp_seed(graph: Graph, op: Op) -> str | None:
    """Megatron roles: column-parallel projections split their output features, row-parallel their inputs."""
    if op.record.role != "projection":  # a linear layer: weight `n k`, output features n
        return _loss_seed(graph, op)
    weight = _weight_name(graph, op) or ""
    if _COLUMN.search(weight):
        return "n"
    if _ROW.search(weight):
        return "k"
    return None


def _loss_seed(graph: Graph, op: Op) -> str | None:
    """A token-wise loss op (chunked cross-entropy) splits its sequence dim: its output is per token."""
    if op.record.role == "token_loss" and op.annotation is not None:
        names = op.annotation.inputs[0].names()
        if len(names) >= 2 and names[1] not in op.annotation.frozen:
            return names[1]
    return None


def _sequence_seed(graph: Graph, op: Op) -> str | None:
    """Put the residual stream on Shard(sequence) from the token embedding on."""
    if op.record.role == "embedding" and op.annotation is not None:
        names = op.annotation.inputs[0].names()
        return names[1] if len(names) >= 2 else None
    return _loss_seed(graph, op)


def _batch_seed(graph: Graph, op: Op) -> str | None:
    """Split the batch from the token embedding on."""
    if op.record.role == "embedding" and op.annotation is not None:
        return op.annotation.inputs[0].names()[0]
    return None


def dp(graph: Graph, ctx: PolicyContext) -> Plan:
    """Data parallel only: the scale unit is one GPU; copies come from runtime_ngpus."""
    if ctx.plan_ngpus != 1:
        raise PlanError(f"policy 'dp' runs one model copy per GPU: use --plan_ngpus 1 (got {ctx.plan_ngpus})")
    return Plan(Mesh(("dp",), (1,)), {}, recompute_scopes(graph, ctx.recompute), "dp")


def tp(graph: Graph, ctx: PolicyContext) -> Plan:
    """Megatron tensor parallelism over all plan_ngpus: heads and MLP features split, all-reduce after."""
    mesh = Mesh(("tp",), (ctx.plan_ngpus,))
    return _plan_by_seeds(graph, mesh, [_tp_seed], ctx, "tp")


def tp_sp(graph: Graph, ctx: PolicyContext) -> Plan:
    """Tensor parallelism plus a sequence-split residual stream (reduce-scatter / all-gather around blocks)."""
    mesh = Mesh(("tp",), (ctx.plan_ngpus,))

    def seed(g: Graph, op: Op) -> str | None:
        return _tp_seed(g, op) or _sequence_seed(g, op)

    return _plan_by_seeds(graph, mesh, [seed], ctx, "tp_sp", split_partials=True)


def _experts_seed(graph: Graph, op: Op) -> str | None:
    """A mixture-of-experts layer's routed experts split their expert dim (each rank its share of experts)."""
    if op.record.role == "experts" and op.annotation is not None and "e" in op.annotation.splittable():
        return "e"
    return None


def ep(graph: Graph, ctx: PolicyContext) -> Plan:
    """Expert parallelism: experts split over all plan_ngpus, every dense op as ``tp_sp`` splits it.

    Each rank computes its experts' share of every token's output, a partial sum reduced like a
    row-parallel projection's (docs/design.md, "Mixture of experts"). With the policy option
    ``ep_size`` below plan_ngpus the mesh is ``tp x ep``: dense ops as ``tp_sp`` on ``tp`` and
    split by batch on ``ep``, experts split on ``ep`` (attention and experts on different axes).
    """
    ep_size = int((ctx.extra or {}).get("ep_size") or ctx.plan_ngpus)
    if ep_size < 1 or ctx.plan_ngpus % ep_size:
        raise PlanError(f"policy 'ep': ep_size {ep_size} must divide plan_ngpus {ctx.plan_ngpus}")

    def dense_seed(g: Graph, op: Op) -> str | None:
        return _tp_seed(g, op) or _sequence_seed(g, op)

    if ep_size == ctx.plan_ngpus:
        def seed(g: Graph, op: Op) -> str | None:
            return _experts_seed(g, op) or dense_seed(g, op)

        return _plan_by_seeds(graph, Mesh(("ep",), (ctx.plan_ngpus,)), [seed], ctx, "ep", split_partials=True)

    def experts_or_batch_seed(g: Graph, op: Op) -> str | None:
        return _experts_seed(g, op) or _batch_seed(g, op)

    mesh = Mesh(("tp", "ep"), (ctx.plan_ngpus // ep_size, ep_size))
    return _plan_by_seeds(graph, mesh, [dense_seed, experts_or_batch_seed], ctx, "ep", split_partials=True)


def _attention_sequence_seed(graph: Graph, op: Op) -> str | None:
    """A causal attention op or a recurrent op splits its sequence (planner/plan/sequence_split.py)."""
    from ..plan.sequence_split import extra_split_names

    names = extra_split_names(op)
    return names[0] if names else _sequence_seed(graph, op)


def cp(graph: Graph, ctx: PolicyContext) -> Plan:
    """Context parallelism over all plan_ngpus: the sequence of every softmax attention split (zigzag layout,
    K/V passed inside the op), the residual stream split along the sequence from the embedding on.

    Recurrent layers (kernels/recurrent/) split their sequence too, in the same layout: each scan and
    short convolution passes its state (or its last k - 1 tokens) between the ranks inside the op
    (``kernels/recurrent/sequence_split.py``; docs/design.md, "Recurrent layers").
    """
    mesh = Mesh(("cp",), (ctx.plan_ngpus,))
    return _plan_by_seeds(graph, mesh, [_attention_sequence_seed], ctx, "cp", split_partials=True)


def tp_batch(graph: Graph, ctx: PolicyContext) -> Plan:
    """2-D: tensor parallel on axis 'tp' (size 2) times batch split on axis 'batch' (the rest)."""
    if ctx.plan_ngpus % 2 or ctx.plan_ngpus < 4:
        raise PlanError(f"policy 'tp_batch' needs plan_ngpus a multiple of 2 and at least 4 (got {ctx.plan_ngpus})")
    mesh = Mesh(("tp", "batch"), (2, ctx.plan_ngpus // 2))
    return _plan_by_seeds(graph, mesh, [_tp_seed, _batch_seed], ctx, "tp_batch")


Policy = Callable[[Graph, PolicyContext], Plan]
POLICIES: dict[str, Policy] = {}


def register_policy(name: str, fn: Policy | None = None, *, replace: bool = False) -> Any:
    """Make ``fn(graph, ctx) -> Plan`` available as ``CompileConfig(policy=name)``; usable as a decorator.

    ``@register_policy("mine")`` above a function registers it and returns it unchanged. A name
    already taken by another function raises PlanError unless ``replace=True``.
    """
    def register(policy: Policy) -> Policy:
        if not callable(policy):
            raise PlanError(f"policy '{name}' must be a function (graph, ctx) -> Plan, got {policy!r}")
        taken = POLICIES.get(name)
        if taken is not None and taken is not policy and not replace:
            raise PlanError(f"a policy named '{name}' is already registered ({taken.__module__}.{taken.__qualname__}); "
                            "pick another name or pass replace=True")
        POLICIES[name] = policy
        return policy

    return register if fn is None else register(fn)


for _name, _policy in (("dp", dp), ("tp", tp), ("tp_sp", tp_sp), ("tp_batch", tp_batch), ("ep", ep),
                        ("cp", cp)):
    register_policy(_name, _policy)


def get_policy(name: str) -> Policy:
    """The policy registered as ``name``: the built-ins dp, tp, tp_sp, tp_batch, auto, or one of ``register_policy``.

    ``package.module:function`` imports the module (which may register policies as it loads) and,
    unless that registered ``name``, registers the function under it, so a command line can name a
    policy of the user's own code: ``--policy my_policies:mlp_tp``.
    """
    if name not in POLICIES and ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise PlanError(f"policy '{name}': cannot import module '{module_name}' ({e}); "
                            "put it on PYTHONPATH or install it") from None
        if name not in POLICIES:
            if not callable(getattr(module, attr, None)):
                raise PlanError(f"policy '{name}': module '{module_name}' has no function '{attr}'")
            register_policy(name, getattr(module, attr))
    if name not in POLICIES:
        raise PlanError(f"unknown policy '{name}'; choose one of {sorted(POLICIES)}, register yours with "
                        "planner.register_policy, or name it as package.module:function")
    return POLICIES[name]
