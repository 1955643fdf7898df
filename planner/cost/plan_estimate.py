"""The estimate of a plan as it will run: the one number the budget check, plan.json and the report use.

``plan_estimate`` prices a resolved plan with its recompute scopes and its offloads
(``model.PlanAnalysis.estimate``, then ``offload_cost.apply_offload`` when something is
offloaded). The ``auto`` search checks every candidate against the budgets with it (offloaded
variants through ``apply_offload``, the same computation); ``compile_model`` takes the chosen
plan's estimate (``compiled_estimate``: the search's own, or ``plan_estimate`` for a policy that
does not search) and writes it to ``plan.json`` (``estimate_entry``) and ``plan_report.md``.
Benchmarks and the runtime's out-of-memory message read plan.json's entry, never estimating
again with other options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..graph.ir import Graph
from ..graph.layers import decoder_layer_scopes
from ..plan.gradient_buffers import grad_accumulation_steps
from ..plan.placements import Plan, ResolvedPlan
from .budgets import MemoryBudget, gpu_margin, host_budget, host_margin
from .hardware import HardwareProfile
from .model import GB, Estimate, PlanAnalysis
from .model import analyze as analyze_plan
from .offload_cost import OffloadRates, apply_offload, fits


def plan_estimate(graph: Graph, resolved: ResolvedPlan, analysis: PlanAnalysis, plan: Plan, hw: HardwareProfile,
                  dp_size: int = 1, zero: bool = True) -> Estimate:
    """Step time and memory of ``plan`` as it runs: its recompute scopes, optimizer and activation offloads.

    ``resolved`` and ``analysis`` are those of ``plan``'s splits (recompute and offload do not
    change placements); ``analysis`` must have ``plan``'s recompute scopes among its regions.
    """
    scopes = list(plan.recompute_scopes)
    if not (plan.offload_optimizer or plan.offload_scopes):
        return analysis.estimate(scopes)
    return apply_offload(graph, resolved, analysis, scopes, plan.offload_optimizer, plan.offload_scopes,
                         OffloadRates.of(hw), dp_size, zero).estimate


def _same_choices(a: Plan, b: Plan) -> bool:
    return (a.mesh.shape == b.mesh.shape and a.splits == b.splits and list(a.recompute_scopes) == list(b.recompute_scopes)
            and bool(a.offload_optimizer) == bool(b.offload_optimizer) and list(a.offload_scopes) == list(b.offload_scopes))


def compiled_estimate(graph: Graph, resolved: ResolvedPlan, hw: HardwareProfile,
                      extra: Mapping[str, Any] | None) -> Estimate:
    """The estimate ``compile_model`` records for ``resolved``: the one its search checked against the budgets,
    else ``plan_estimate`` with the policy options' ``dp_size``, ``zero`` and ``grad_accumulation_steps``."""
    plan = resolved.plan
    search = plan.search
    if search is not None and _same_choices(search.best.plan, plan):
        return search.best.estimate
    return priced_estimate(graph, resolved, hw, extra)


def priced_estimate(graph: Graph, resolved: ResolvedPlan, hw: HardwareProfile,
                    extra: Mapping[str, Any] | None) -> Estimate:
    """``plan_estimate`` of ``resolved`` priced on ``hw`` now, with the policy options' ``dp_size``, ``zero``
    and ``grad_accumulation_steps`` (what ``compiled_estimate`` does for a plan that was not searched)."""
    plan = resolved.plan
    extra = extra or {}
    dp_size, zero = int(extra.get("dp_size", 1)), bool(extra.get("zero", True))
    regions = list(dict.fromkeys(list(plan.recompute_scopes) + decoder_layer_scopes(graph)))
    analysis = analyze_plan(graph, resolved, hw, dp_size, zero, regions=regions,
                            accumulation=grad_accumulation_steps(extra))
    return plan_estimate(graph, resolved, analysis, plan, hw, dp_size, zero)


def gpu_budget_of(memory_budget_gb: float | None, source: str = "") -> MemoryBudget:
    """The GPU budget a compile ran under, with its source (``CompileConfig.memory_budget_source``)."""
    if memory_budget_gb is None:
        return MemoryBudget(None, source or "none given")
    return MemoryBudget(float(memory_budget_gb), source or "given (CompileConfig.memory_budget_gb)")


def estimate_entry(est: Estimate, hw: HardwareProfile, gpu: MemoryBudget,
                   extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """plan.json's ``estimate``: the estimate (seconds, bytes per GPU and per rank) and the budgets it was checked against.

    ``host_process_bytes`` is what the training process holds in host memory besides the
    offloaded state (the profile's measured ``host_process_gb``): the expected resident set is
    ``host_offload_bytes + host_process_bytes``. ``gpu_context_bytes`` and ``reserved_over_estimate``
    are the GPU margins of the default budget (``budgets.gpu_margin``): the runtime's out-of-memory
    message computes from them what the card it runs on holds.
    """
    host = host_budget(extra, hw)
    context_gb, overhead, _ = gpu_margin(hw)
    return {
        "hw_profile": est.hw_name,
        "dp_size": est.dp_size,
        "step_s": est.step_s,
        "compute_s": est.compute_s,
        "comm_s": est.comm_s,
        "grad_sync_s": est.grad_sync_s,
        "optimizer_s": est.optimizer_s,
        "gpu_peak_bytes": est.peak_bytes,
        "gpu_peak_phase": est.peak_phase,
        "gpu_memory_bytes": dict(est.memory),
        "gpu_budget_bytes": gpu.bytes,
        "gpu_budget_source": gpu.source,
        "gpu_context_bytes": context_gb * GB,
        "reserved_over_estimate": overhead,
        "host_offload_bytes": est.host_bytes,
        "host_process_bytes": host_margin(hw)[1] * GB,
        "host_budget_bytes": host.bytes,
        "host_budget_source": host.source,
        "fits_budgets": fits(est, gpu.bytes, host.bytes),
    }
