"""What a plan offloads to host memory, as requested by the compile options, and its plan.json entry.

Two offloads exist (runtime/optimizer/host_adamw.py, runtime/activation_offload.py):

- ``optimizer``: AdamW's fp32 masters and moments live in host memory;
- ``activations``: the inputs of recomputed scopes wait for the backward in host memory.

The ``offload`` policy option (``PolicyContext.extra["offload"]``) is ``auto`` (the ``auto``
policy prices both next to recompute and sharding and chooses; other policies offload nothing),
``none``, or forces ``optimizer``, ``activations`` or ``all`` on any policy. Offloaded scopes are
always among the recomputed ones: only a recomputed scope keeps nothing but its inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..graph.ir import Graph
from ..graph.scopes import outermost_scopes
from .placements import Plan, PlanError

OFFLOAD_MODES = ("auto", "none", "optimizer", "activations", "all")


def offload_mode(extra: Mapping[str, Any] | None) -> str:
    """The ``offload`` option of the policy options (default ``auto``); ValueError for an unknown one."""
    mode = str((extra or {}).get("offload", "auto") or "auto")
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {mode!r}")
    return mode


def apply_offload_request(graph: Graph, plan: Plan, extra: Mapping[str, Any] | None) -> Plan:
    """``plan`` with the offloads the options force; under ``auto`` it is returned as the policy left it.

    Raises PlanError when activations are to be offloaded but the plan recomputes nothing.
    """
    mode = offload_mode(extra)
    if mode == "auto":
        return plan
    plan.offload_optimizer = mode in ("optimizer", "all")
    plan.offload_scopes = []
    if mode in ("activations", "all"):
        regions = outermost_scopes(list(plan.recompute_scopes))
        if not regions:
            raise PlanError(f"offload '{mode}' keeps the inputs of recomputed scopes in host memory, but this plan "
                            "recomputes nothing: set recompute to layer (or auto), or offload only the optimizer")
        plan.offload_scopes = regions
    return plan


def offload_manifest(plan: Plan) -> dict[str, Any]:
    """The ``offload`` entry of plan.json: ``{"optimizer": bool, "activation_scopes": [...]}``."""
    return {"optimizer": bool(plan.offload_optimizer), "activation_scopes": list(plan.offload_scopes)}


def with_offload_of(plan: Plan, source: Plan) -> Plan:
    """``plan`` with the offloads of ``source`` (for plans rebuilt from another, e.g. with renamed axes)."""
    plan.offload_optimizer = source.offload_optimizer
    plan.offload_scopes = list(source.offload_scopes)
    return plan
