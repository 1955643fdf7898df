"""dimshard.planner: trace a model, annotate its ops, plan the partition and write per-rank code.

The public API (docs/design.md, "Public API"):

- compile: ``compile_model``, ``CompileConfig``, ``CompileResult``, ``compile_status``;
- plans: ``Plan``, ``Mesh``, the placements ``Shard``, ``Replicate``, ``Partial``, ``resolve_placements``;
- policies: ``PolicyContext``, ``register_policy``, ``get_policy``, ``recompute_scopes``;
- ops: ``register_op``, ``set_rule``, ``Annotation``, ``parse_annotation``, ``trace``, ``Graph``;
- errors: ``PlanError``, ``TraceError``, ``AnnotationError``, ``CodegenError``.
"""

if "." not in __name__:  # imported by its bare name from the repository root: see _shadow_guard.py
    from _shadow_guard import step_aside

    step_aside(__name__, __path__[0])
else:
    from .codegen.rank_code import CodegenError
    from .compile import CompileResult, compile_model
    from .compile_config import CompileConfig, compile_status
    from .graph.ir import Graph
    from .graph.trace import TraceError, trace
    from .ops import rules as _rules  # noqa: F401  (registers the built-in rules)
    from .ops.annotations import Annotation, AnnotationError, parse_annotation
    from .ops.registry import register_op, set_rule
    from .plan.placements import Mesh, Partial, Plan, PlanError, Replicate, Shard
    from .plan.resolve import resolve_placements
    from .search import auto as _auto  # noqa: F401  (registers the auto policy)
    from .search.policies import PolicyContext, get_policy, recompute_scopes, register_policy

    __all__ = [
        "Annotation", "AnnotationError", "CodegenError", "CompileConfig", "CompileResult", "Graph", "Mesh", "Partial",
        "Plan", "PlanError", "PolicyContext", "Replicate", "Shard", "TraceError", "compile_model", "compile_status",
        "get_policy", "parse_annotation", "recompute_scopes", "register_op", "register_policy", "resolve_placements",
        "set_rule", "trace",
    ]
