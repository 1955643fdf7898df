"""Offload in the auto search: offloaded variants of candidates too big for the GPU, and the no-fit error.

After the search has evaluated its split plans and recompute choices, every candidate that misses
the GPU budget but would be faster than the fastest one that fits gets offloaded variants
(``offload_cost.offload_variants``: the optimizer state, the inputs of the fewest leading
recomputed layers that make it fit, or both). Offload only adds time (host-device copies are
slower than HBM), so a candidate already slower than the best fit cannot win and is skipped; when
nothing fits, every candidate is tried. A variant is feasible when its GPU peak fits the GPU
budget and its host bytes fit the host budget per rank (``budgets.host_budget``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from ..cost import budgets
from ..cost.hardware import HardwareProfile
from ..cost.model import GB, Estimate
from ..cost.model import analyze as analyze_plan
from ..cost.offload_cost import describe, fits, offload_variants, offloaded_plan
from ..graph.ir import Graph
from ..graph.layers import decoder_layer_scopes
from ..plan.offload_plan import offload_mode
from ..plan.placements import Plan
from ..plan.resolve import resolve_placements


def split_key(plan: Plan) -> tuple:
    """What the resolved placements and the cost analysis of a plan depend on: its mesh and splits."""
    return plan.mesh.shape, tuple(sorted(plan.splits.items()))


def offload_candidates(graph: Graph, evaluated: Mapping[tuple, Any], extra: Mapping[str, Any] | None,
                       hw: HardwareProfile, gpu_budget: float | None, dp_size: int, zero: bool,
                       make: Callable[[Plan, Estimate, bool, str], Any], accumulation: int = 1,
                       analyses: dict[tuple, tuple] | None = None) -> list[Any]:
    """Offloaded candidates (built with ``make(plan, estimate, feasible, note)``) for the evaluated ones.

    ``evaluated`` maps signatures to the search's candidates (``.plan``, ``.estimate``,
    ``.feasible``, ``.note``). ``analyses`` maps ``split_key`` to the search's (resolved, analysis)
    of that split plan, analysed with every candidate's recompute scopes among its regions; the
    missing ones are computed (and added). Nothing is added when the ``offload`` option is
    ``none``, or when there is no GPU budget.
    """
    mode = offload_mode(extra)
    if mode == "none" or (gpu_budget is None and mode == "auto"):
        return []
    host_budget = budgets.host_budget(extra, hw).bytes
    best = min((c.estimate.step_s for c in evaluated.values() if c.feasible), default=math.inf)
    todo = [c for c in evaluated.values() if mode != "auto" or (not c.feasible and c.estimate.step_s < best)]
    analyses = {} if analyses is None else analyses
    regions = list(dict.fromkeys(decoder_layer_scopes(graph) + [s for c in todo for s in c.plan.recompute_scopes]))
    added = []
    for c in todo:
        key = split_key(c.plan)
        if key not in analyses:
            resolved = resolve_placements(graph, Plan(c.plan.mesh, dict(c.plan.splits), [], c.plan.name))
            analyses[key] = (resolved, analyze_plan(graph, resolved, hw, dp_size, zero, regions=regions,
                                                          accumulation=accumulation))
        resolved, analysis = analyses[key]
        for v in offload_variants(graph, resolved, analysis, list(c.plan.recompute_scopes), hw, gpu_budget,
                                  host_budget, extra, dp_size, zero):
            plan = offloaded_plan(c.plan, v)
            added.append(make(plan, v.estimate, fits(v.estimate, gpu_budget, host_budget),
                              f"{c.note}; offloaded: {describe(v, plan)}"))
    return added


def no_fit_message(candidates: list[Any], gpu_budget: float | None, extra: Mapping[str, Any] | None,
                   hw: HardwareProfile, hint: str) -> str:
    """The compile error when no candidate fits: the smallest GPU and host peaks found, and what to change."""
    host_budget = budgets.host_budget(extra, hw).bytes

    def host(c: Any) -> float:
        return getattr(c.estimate, "host_bytes", 0.0)

    smallest_gpu = min(candidates, key=lambda c: (c.estimate.peak_bytes, host(c)))
    gpu_ok = [c for c in candidates if gpu_budget is None or c.estimate.peak_bytes <= gpu_budget]
    gpu_text = f"{gpu_budget / GB:.3g} GB" if gpu_budget is not None else "unlimited"
    text = (f"smallest plan found needs {smallest_gpu.estimate.peak_bytes / GB:.3g} GB per GPU, budget is {gpu_text}, "
            f"and {host(smallest_gpu) / GB:.3g} GB host memory per rank")
    text += f", host budget is {host_budget / GB:.3g} GB" if host_budget is not None else ""
    if gpu_ok:
        least_host = min(gpu_ok, key=host)
        text += (f"; the smallest host need among plans that fit the GPU is {host(least_host) / GB:.3g} GB per rank "
                 f"({least_host.estimate.peak_bytes / GB:.3g} GB per GPU)")
    more = ", raise --host_memory_budget_gb (host RAM permitting)" if gpu_ok else ""
    return f"{text}: add GPUs (plan_ngpus), shorten sequence_length{hint}{more}"
