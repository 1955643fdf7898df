"""The offload section of ``plan_report.md``: GPU and host peaks and what lives in host memory."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..cost.budgets import host_budget, host_margin
from ..cost.hardware import HardwareProfile
from ..cost.model import GB, Estimate
from ..cost.offload_cost import OffloadRates, optimizer_update_seconds, owned_state
from ..graph.ir import Graph
from ..plan.placements import ResolvedPlan


def report_lines(graph: Graph, resolved: ResolvedPlan, est: Estimate, hw: HardwareProfile,
                 extra: Mapping[str, Any] | None, dp_size: int = 1, zero: bool = True) -> list[str]:
    """Markdown lines: GPU peak, host memory per rank against the host budget, and what is offloaded."""
    plan = resolved.plan
    host = host_budget(extra, hw)
    budget = f" (host budget {host.gb:.1f} GB per rank)" if host.gb is not None else ""
    process_gb = host_margin(hw)[1]
    lines = ["## CPU offload", "", "| | per rank |", "|---|---|",
             f"| GPU peak | {est.peak_bytes / GB:.3g} GB |",
             f"| host memory held | {est.host_bytes / GB:.3g} GB{budget} |",
             f"| expected resident set | {est.host_bytes / GB + process_gb:.3g} GB ({process_gb:.1f} GB the process "
             "holds itself besides the offloaded state) |"]
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
