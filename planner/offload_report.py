"""The offload section of ``plan_report.md``: GPU and host peaks and what lives in host memory."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .cost import GB, Estimate
from .cost import analyze as analyze_plan
from .graph import Graph
from .hardware import HardwareProfile
from .layers import decoder_layer_scopes
from .offload_cost import (
    OffloadRates,
    apply_offload,
    host_budget_bytes,
    optimizer_update_seconds,
    owned_state,
)
from .plan import ResolvedPlan


def estimate_with_offload(graph: Graph, resolved: ResolvedPlan, est: Estimate, hw: HardwareProfile,
                          dp_size: int = 1, zero: bool = True, accumulation: int = 1) -> Estimate:
    """``est`` (of a plan not priced by the search) with the plan's own offloads applied; unchanged without."""
    plan = resolved.plan
    if not (plan.offload_optimizer or plan.offload_scopes) or est.host_bytes:
        return est
    regions = list(dict.fromkeys(decoder_layer_scopes(graph) + list(plan.recompute_scopes)))
    analysis = analyze_plan(graph, resolved, hw, dp_size, zero, regions=regions, accumulation=accumulation)
    return apply_offload(graph, resolved, analysis, list(plan.recompute_scopes), plan.offload_optimizer,
                         plan.offload_scopes, OffloadRates.of(hw), dp_size, zero).estimate


def report_lines(graph: Graph, resolved: ResolvedPlan, est: Estimate, hw: HardwareProfile,
                 extra: Mapping[str, Any] | None, dp_size: int = 1, zero: bool = True) -> list[str]:
    """Markdown lines: GPU peak, host peak per rank against the host budget, and what is offloaded."""
    plan = resolved.plan
    host_budget = host_budget_bytes(extra, hw)
    budget = f" (host budget {host_budget / GB:.1f} GB per rank)" if host_budget is not None else ""
    lines = ["## CPU offload", "", "| | per rank |", "|---|---|",
             f"| GPU peak | {est.peak_bytes / GB:.3g} GB |",
             f"| host memory held | {est.host_bytes / GB:.3g} GB{budget} |"]
    rates = OffloadRates.of(hw)
    if plan.offload_optimizer:
        elements, param_bytes = owned_state(graph, resolved, dp_size, zero)
        device, seconds = optimizer_update_seconds(elements, param_bytes, 0.0, rates)
        lines.append(f"| optimizer state | in host memory, {12 * elements / GB:.3g} GB; update estimated at "
                     f"{seconds * 1e3:.0f} ms on the {device.upper()} (the runtime times both and takes the faster) |")
    else:
        lines.append("| optimizer state | on the GPU |")
    if plan.offload_scopes:
        shown = ", ".join(plan.offload_scopes[:3]) + (" ..." if len(plan.offload_scopes) > 3 else "")
        lines.append(f"| recomputed inputs in host memory | {len(plan.offload_scopes)} scope(s): {shown} |")
    else:
        lines.append("| recomputed inputs in host memory | none |")
    lines += ["", f"Rates: host-to-device {rates.h2d / 1e9:.0f} GB/s, device-to-host {rates.d2h / 1e9:.0f} GB/s "
              f"(pinned), CPU AdamW {rates.cpu_adam / 1e9:.2f} G elements/s (hardware profile `{hw.name}`).", ""]
    return lines
