"""Explain a plan: ``plan_report.md``, a markdown page a person reads to see what the planner chose and why.

It shows the mesh, the split of every op of one decoder layer (all layers share it under ``auto``;
for other policies layer 0 is shown), the collectives of one layer with their bytes, the estimated
step time split into compute and communication, which mesh axes cross nodes and what that costs
(``node_report.py``), peak memory per GPU by category, the recompute
choice, and, for ``auto``, the runner-up plans with their estimates. Works for any plan.
"""

from __future__ import annotations

from pathlib import Path

from ..cost.budgets import MemoryBudget, host_budget
from ..cost.hardware import HardwareProfile, load_hw_profile
from ..cost.model import GB, Estimate
from ..cost.plan_estimate import compiled_estimate, gpu_budget_of
from ..graph.ir import Graph
from ..graph.layers import decoder_layer_scopes
from ..plan.placements import ResolvedPlan, Shard
from ..search.policies import PolicyContext
from .node_report import report_lines as node_lines
from .offload_report import report_lines as offload_lines
from .sequence_split_report import report_lines as sequence_split_lines

PEAK_TFLOPS = 989.0  # dense bf16 peak of H100/H200, the MFU denominator of docs/design.md, "Measuring: MFU"


def _ms(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:,.1f} us"
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.2f} s"


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", GB), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.2f} {unit}"
    return f"{nbytes:,.0f} B"


def _split_text(resolved: ResolvedPlan, op_index: int) -> str:
    mesh = resolved.plan.mesh
    parts = [f"{axis}:{name}" for axis, name in zip(mesh.axis_names, resolved.plan.split_of(op_index))
             if name is not None]
    return ", ".join(parts) or "-"


def _placement_text(placement: tuple) -> str:
    return "(" + ", ".join(f"S{p.dim}" if isinstance(p, Shard) else type(p).__name__[0] for p in placement) + ")"


def _short_name(name: str) -> str:
    for prefix in ("torch.nn.functional.", "torch.Tensor.", "torch."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _split_layers_and_mlps(scopes: list[str], layer_scopes: list[str]) -> tuple[int, int] | None:
    """(k, m) when ``scopes`` are the first k decoder layers followed by the MLPs of the next m, else None."""
    k = 0
    while k < len(scopes) and k < len(layer_scopes) and scopes[k] == layer_scopes[k]:
        k += 1
    rest = scopes[k:]
    if rest != [f"{layer}.mlp" for layer in layer_scopes[k:k + len(rest)]]:
        return None
    return k, len(rest)


def _compress_scopes(scopes: list[str], layer_scopes: list[str]) -> str:
    """``the first 26 of 32 decoder layers (model.layers.0 .. model.layers.25)`` and the like."""
    if not scopes:
        return "none"
    shape = _split_layers_and_mlps(scopes, layer_scopes) if layer_scopes else None
    if shape is None:
        return ", ".join(scopes)
    k, m = shape
    n = len(layer_scopes)
    whole = ("none of the decoder layers whole" if k == 0 else f"every decoder layer ({k})" if k == n
             else f"the first {k} of {n} decoder layers ({scopes[0]} .. {scopes[k - 1]})")
    if not m:
        return whole
    return f"{whole}; the MLP only of the other {m} ({scopes[k]} .. {scopes[-1]})"


def _recompute_column(scopes: list[str], layer_scopes: list[str]) -> str:
    """Short form for the runner-up table: ``25/32 layers`` or ``10/32 layers + 22 MLPs``."""
    shape = _split_layers_and_mlps(scopes, layer_scopes) if layer_scopes else None
    if shape is None:
        return f"{len(scopes)} scopes"
    k, m = shape
    return f"{k}/{len(layer_scopes)} layers" + (f" + {m} MLPs" if m else "")


def model_mfu(graph: Graph, est: Estimate, plan_ngpus: int, peak_tflops: float = PEAK_TFLOPS) -> float | None:
    """MFU of one step by the formula ``6*(N*S + 2*L*H*S^2)`` of docs/design.md, "Measuring: MFU", per sequence, or None if not a decoder.

    N: parameters, L: decoder layers, H: the residual stream's width, S: the input's last dim;
    sequences: the input's first dim (one micro-batch of one model copy on ``plan_ngpus`` GPUs).
    """
    layers = decoder_layer_scopes(graph)
    if not layers or not graph.inputs or est.step_s <= 0:
        return None
    first = graph.tensors[next(iter(graph.inputs.values()))].shape
    if len(first) != 2:
        return None
    batch, seq = first
    layer_ops = [op for op in graph.ops if op.scope == layers[0] or op.scope.startswith(layers[0] + ".")]
    hidden = graph.tensors[layer_ops[-1].output_ids()[0]].shape[-1] if layer_ops else 0
    n = sum(graph.tensors[t].numel for t in graph.parameters.values())
    flops = 3 * 2 * (n * seq + 2 * len(layers) * hidden * seq * seq) * batch
    return flops / (est.step_s * plan_ngpus * peak_tflops * 1e12)


def _budget_lines(est: Estimate, gpu: MemoryBudget, host: MemoryBudget, hw: HardwareProfile) -> list[str]:
    """Which budgets the plan was checked against, where each came from, and where the margins were measured."""
    lines = ["## Memory budgets", "",
             "The estimate above is the one the budget check used and plan.json records (`estimate`).", ""]
    if gpu.bytes is None:
        lines.append(f"- GPU: no limit ({gpu.source}).")
    else:
        verdict = "within it" if est.peak_bytes <= gpu.bytes else \
            f"**over it by {_size(est.peak_bytes - gpu.bytes)}**"
        lines.append(f"- GPU: {_size(gpu.bytes)} per GPU, peak estimate {_size(est.peak_bytes)} {verdict}; "
                     f"from {gpu.source}.")
    if host.bytes is None:
        lines.append(f"- Host: no limit ({host.source}).")
    else:
        lines.append(f"- Host: {_size(host.bytes)} per rank for offloaded state, {_size(est.host_bytes)} offloaded; "
                     f"from {host.source}.")
    if hw.memory_margin_source:
        lines.append(f"- Margins of profile `{hw.name}`: {hw.memory_margin_source}.")
    return [*lines, ""]


def plan_report(graph: Graph, resolved: ResolvedPlan, est: Estimate, hw: HardwareProfile,
                gpu_budget: MemoryBudget | None = None, candidates: list | None = None, search_note: str = "",
                offload_extra: dict | None = None) -> str:
    """The markdown report of a resolved plan with its estimate; ``candidates`` (auto's) add a runner-up table.

    ``gpu_budget`` is the budget the plan was compiled under (default: none); the host budget is
    the one ``offload_extra`` (the policy options) gives (``budgets.host_budget``).
    """
    gpu_budget = gpu_budget or gpu_budget_of(None)
    plan = resolved.plan
    mesh = plan.mesh
    layer_scopes = decoder_layer_scopes(graph)
    lines = [f"# Plan report: policy `{plan.name}`", ""]
    lines += [f"Hardware profile `{hw.name}` ({hw.device or 'no description'}); estimates assume no overlap of "
              "communication with compute. Memory in GB of 10^9 bytes, per GPU.", ""]
    if search_note:
        lines += [search_note, ""]
    lines += ["## Mesh", "", "| axis | size | unit-rank groups |", "|---|---|---|"]
    for a, (name, size) in enumerate(zip(mesh.axis_names, mesh.shape)):
        groups = mesh.groups(a)
        shown = ", ".join(str(g) for g in groups[:4]) + (" ..." if len(groups) > 4 else "")
        lines.append(f"| {name} | {size} | {shown} |")
    lines += ["", f"plan_ngpus = {mesh.size}, data-parallel copies = {est.dp_size}.", ""]

    mfu = model_mfu(graph, est, mesh.size)
    lines += ["## Estimated step", "", "| | time |", "|---|---|",
              f"| compute (forward, backward, recompute) | {_ms(est.compute_s)} |",
              f"| communication (activations) | {_ms(est.comm_s)} |",
              f"| gradient and parameter sync | {_ms(est.grad_sync_s)} |",
              f"| optimizer | {_ms(est.optimizer_s)} |",
              f"| **step** | **{_ms(est.step_s)}** |", ""]
    if mfu is not None:
        lines += [f"Estimated MFU {mfu * 100:.1f}% (docs/design.md formula, {PEAK_TFLOPS:.0f} TFLOP/s per GPU).", ""]
    lines += node_lines(graph, resolved, est, hw, offload_extra)

    lines += ["## Peak memory per GPU", "", "| category | bytes |", "|---|---|"]
    for key, value in est.memory.items():
        lines.append(f"| {key} | {_size(value)} |")
    budget = f", budget {_size(gpu_budget.bytes)}" if gpu_budget.bytes is not None else ""
    lines += [f"| **peak** ({est.peak_phase}) | **{_size(est.peak_bytes)}**{budget} |", ""]
    lines += _budget_lines(est, gpu_budget, host_budget(offload_extra, hw), hw)
    lines += [f"Recompute: {_compress_scopes(list(plan.recompute_scopes), layer_scopes)}.", ""]
    if plan.offload_optimizer or plan.offload_scopes or est.host_bytes:
        lines += offload_lines(graph, resolved, est, hw, offload_extra, est.dp_size)

    root = layer_scopes[0] if layer_scopes else None
    if root is not None:
        ops = [op for op in graph.ops if op.scope == root or op.scope.startswith(root + ".")]
        title = "every decoder layer (shown: layer 0)" if plan.name == "auto" else f"{root}"
    else:
        ops = list(graph.ops)
        title = "the whole graph"
    lines += [f"## Splits of {title}", "",
              "| # | op | scope | annotation | split | output placement |", "|---|---|---|---|---|---|"]
    for op in ops:
        suffix = op.scope[len(root):].lstrip(".") if root else op.scope
        outs = resolved.op_outputs[op.index]
        out = _placement_text(outs[0]) if outs else ""
        lines.append(f"| {op.index} | {_short_name(op.name)} | {suffix or '.'} | `{op.annotation}` | "
                     f"{_split_text(resolved, op.index)} | {out} |")
    lines.append("")

    lines += sequence_split_lines(graph, resolved, hw, ops)
    in_layer = [c for c in est.collectives if root is not None and (
        graph.ops[c.op_index].scope == root or graph.ops[c.op_index].scope.startswith(root + "."))]
    lines += [f"## Collectives of {root or 'the graph'}", ""]
    if not in_layer and root is not None:
        lines += ["None: the layer runs without communication.", ""]
    else:
        rows = in_layer if root is not None else est.collectives
        lines += ["| before op | tensor | collective | axis | bytes per rank | time | pass |", "|---|---|---|---|---|---|---|"]
        for c in rows:
            lines.append(f"| {c.op_index} {_short_name(graph.ops[c.op_index].name)} | t{c.tensor_id}"
                         f"{list(graph.tensors[c.tensor_id].shape)} | {c.kind} | {mesh.axis_names[c.axis]} ({c.group_size}) | "
                         f"{_size(c.nbytes)} | {_ms(c.seconds)} | {c.phase} |")
        if root is not None:
            total_b = sum(c.nbytes for c in rows)
            total_t = sum(c.seconds for c in rows)
            lines += ["", f"Per layer: {_size(total_b)} per rank in {_ms(total_t)} (forward and backward; a "
                      "recomputed layer repeats its forward collectives)."]
        lines.append("")
    others = [c for c in est.collectives if c not in in_layer and not any(
        graph.ops[c.op_index].scope == s or graph.ops[c.op_index].scope.startswith(s + ".") for s in layer_scopes)]
    if root is not None and others:
        lines += ["Outside the decoder layers: " + ", ".join(
            f"{c.kind} of t{c.tensor_id} before op {c.op_index} ({_size(c.nbytes)}, {c.phase})" for c in others) + ".",
            ""]

    if candidates:
        lines += ["## Runner-up plans", "",
                  "| mesh | recompute | step | compute | comm | peak memory | fits | found by |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in candidates:
            e = c.estimate
            m = c.plan.mesh
            mesh_text = " x ".join(f"{n}={s}" for n, s in zip(m.axis_names, m.shape))
            recompute = _recompute_column(list(c.plan.recompute_scopes), layer_scopes)
            lines.append(f"| {mesh_text} | {recompute} | {_ms(e.step_s)} | {_ms(e.compute_s)} | "
                         f"{_ms(e.comm_s)} | {_size(e.peak_bytes)} | {'yes' if c.feasible else 'no'} | {c.note} |")
        lines.append("")
    return "\n".join(lines)


def write_plan_report(graph: Graph, resolved: ResolvedPlan, ctx: PolicyContext, path: str | Path,
                      est: Estimate | None = None, gpu_budget: MemoryBudget | None = None) -> str:
    """Write ``plan_report.md`` for any policy's resolved plan and return its text.

    ``est`` is the plan's estimate as ``compile_model`` records it in plan.json; by default
    ``plan_estimate.compiled_estimate`` (a searched plan's own, else priced here with
    ``ctx.extra["hw_profile"]``, ``dp_size``, ``zero``). ``gpu_budget`` says where
    ``ctx.memory_budget_gb`` came from (default: given by the caller). A searched plan also lists
    its runner-ups.
    """
    extra = ctx.extra or {}
    result = resolved.plan.search
    hw = result.hw if result is not None else load_hw_profile(extra.get("hw_profile"))
    est = est if est is not None else compiled_estimate(graph, resolved, hw, extra)
    gpu_budget = gpu_budget or gpu_budget_of(ctx.memory_budget_gb)
    if result is not None:
        note = (f"Searched in {result.seconds:.1f} s ({result.solves} exact solves"
                + (f"; one plan for all {result.layers_planned_once} identical layers" if result.layers_planned_once
                   else "") + ").")
        text = plan_report(graph, resolved, est, hw, gpu_budget, result.candidates, note, extra)
    else:
        text = plan_report(graph, resolved, est, hw, gpu_budget, offload_extra=extra)
    Path(path).write_text(text)
    return text
