"""The plan report's section on nodes: which mesh axes cross node boundaries and what crossing costs a step."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ..cost.hardware import HardwareProfile
from ..cost.model import GB, Estimate
from ..cost.plan_estimate import priced_estimate
from ..cost.topology import gpus_per_node, internode_bytes_per_s
from ..graph.ir import Graph
from ..plan.placements import ResolvedPlan


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:,.2f} GB" if nbytes >= GB else f"{nbytes / 1e6:,.2f} MB"


def _axis_traffic(est: Estimate) -> dict[int, tuple[float, float]]:
    """Bytes per rank and seconds of the activation collectives of one step, by mesh axis.

    A forward collective inside a recomputed scope runs twice (the recompute repeats it).
    """
    recomputed = tuple(est.recompute_scopes)
    traffic: dict[int, tuple[float, float]] = {}
    for c in est.collectives:
        repeats = 2 if c.phase == "forward" and c.region is not None and any(
            c.region == s or c.region.startswith(s + ".") for s in recomputed) else 1
        nbytes, seconds = traffic.get(c.axis, (0.0, 0.0))
        traffic[c.axis] = (nbytes + repeats * c.nbytes, seconds + repeats * c.seconds)
    return traffic


def report_lines(graph: Graph, resolved: ResolvedPlan, est: Estimate, hw: HardwareProfile,
                 extra: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines for ``plan_report.md``: the node size the plan was costed for and, when the job
    (``plan_ngpus`` times the estimate's data-parallel copies) spans nodes, each mesh axis's link
    with its collectives per step, and the step against the same plan priced as if one node held
    every GPU (``priced_estimate`` on the profile with ``gpus_per_node`` raised to the job's size)."""
    mesh = resolved.plan.mesh
    per_node = gpus_per_node(hw)
    total = mesh.size * est.dp_size
    copies = f" x {est.dp_size} data-parallel copies" if est.dp_size > 1 else ""
    lines = ["## Nodes", ""]
    if total <= per_node:
        return [*lines, f"All {total} GPUs ({mesh.size} per copy{copies}) fit in one node of {per_node} "
                        f"(profile `{hw.name}`): nothing crosses nodes.", ""]
    nodes = math.ceil(total / per_node)
    link = f"{internode_bytes_per_s(hw) * 8 / 1e9:,.0f} Gb/s per GPU, +{hw.internode_alpha_us:g} us"
    lines += [f"{total} GPUs ({mesh.size} per copy{copies}) on {nodes} nodes of {per_node} (profile `{hw.name}`; "
              f"between nodes {link} per collective). Global rank g sits on node g // {per_node}; the runtime "
              "stops a launch whose nodes split an axis this plan keeps inside one (plan.json `nodes`).", ""]
    one_node = priced_estimate(graph, resolved, dataclasses.replace(hw, gpus_per_node=total), extra)
    crossing, inside = _axis_traffic(est), _axis_traffic(one_node)
    lines += ["| axis | size | one group spans | activation collectives per step | time | inside one node |",
              "|---|---|---|---|---|---|"]
    for a, (name, size) in enumerate(zip(mesh.axis_names, mesh.shape)):
        spans = max(len({r // per_node for r in group}) for group in mesh.groups(a))
        where = f"**{spans} nodes**" if spans > 1 else "1 node"
        nbytes, seconds = crossing.get(a, (0.0, 0.0))
        lines.append(f"| {name} | {size} | {where} | {_size(nbytes)} | {_ms(seconds)} | "
                     f"{_ms(inside.get(a, (0.0, 0.0))[1])} |")
    cost = est.step_s - one_node.step_s
    lines += ["", f"Gradient and parameter sync: {_ms(est.grad_sync_s)} ({_ms(one_node.grad_sync_s)} inside one node).",
              f"Step: {_ms(est.step_s)}; {_ms(one_node.step_s)} if one node held all {total} GPUs, so crossing nodes "
              f"costs {_ms(cost)} a step (+{cost / max(one_node.step_s, 1e-12) * 100:,.1f}%).", ""]
    return lines
