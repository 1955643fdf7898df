"""The compile stage end to end: trace, plan, write ``gencode/rank{r}.py``, ``plan.json`` and buffers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .codegen import generate_rank_code, shard_holders, shard_slices
from .fusion import fused_kernels as fused_kernels_in
from .graph import Graph
from .offload_plan import apply_offload_request, offload_manifest
from .plan import Plan, ResolvedPlan, resolve_placements
from .policies import PolicyContext, decoder_layer_scopes, get_policy
from .report import write_plan_report
from .trace import default_output, trace

FORMAT_VERSION = 1


@dataclass
class CompileResult:
    """What ``compile_model`` produced: the folder, the graph, the plan and its placements.

    ``policy_context`` is the context the policy was called with; what a policy leaves in its
    ``extra`` stays there (``auto`` leaves its search result under ``"auto_search"``).
    """

    output_dir: Path
    graph: Graph
    plan: Plan
    resolved: ResolvedPlan
    fingerprint: str
    seconds: float
    policy_context: PolicyContext


def _config_dict(model: torch.nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None:
        return {"class": type(model).__name__}
    d = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def compile_fingerprint(model: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor], plan_ngpus: int,
                        policy: str, recompute: str, param_dtype: torch.dtype | None, extra: Mapping | None) -> str:
    """A hash of everything that determines the compile output (config, shapes, plan options)."""
    from .. import __version__

    payload = {
        "format": FORMAT_VERSION, "version": __version__, "config": _config_dict(model), "model": type(model).__name__,
        "inputs": {k: [list(v.shape), str(v.dtype)] for k, v in example_inputs.items()},
        "plan_ngpus": plan_ngpus, "policy": policy, "recompute": recompute, "param_dtype": str(param_dtype),
        "extra": dict(extra or {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _buffer_values(model: torch.nn.Module, graph: Graph) -> dict[str, torch.Tensor]:
    """Full values of the buffers the graph reads, rebuilding meta buffers of HF modules from the config."""
    buffers = dict(model.named_buffers())
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name in graph.buffers:
        value = buffers[name]
        if value.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = modules[owner_name]
            config = getattr(model, "config", None)
            try:  # rotary-embedding modules of Hugging Face models are rebuilt from the config alone
                with torch.device("cpu"):
                    rebuilt = type(owner)(config=config)
                value = getattr(rebuilt, attr)
            except Exception as e:  # noqa: BLE001 — any failure means we cannot know the values
                raise ValueError(
                    f"buffer {name} is on the meta device and cannot be rebuilt from the config ({e}); "
                    "build the model with real buffers (planner.build_on_meta keeps them real)"
                ) from e
        out[name] = value.detach().to("cpu").contiguous()
    for tid, value in graph.constants.items():
        out[f"constant_{tid}"] = value.contiguous()
    return out


def _plan_json(graph: Graph, resolved: ResolvedPlan, model: torch.nn.Module, fingerprint: str,
               example_inputs: Mapping[str, torch.Tensor]) -> dict:
    mesh = resolved.plan.mesh
    params = []
    for name, tid in graph.parameters.items():
        t = graph.tensors[tid]
        placement = resolved.stored[tid]
        shards: dict[tuple, list[int]] = {}
        for r in range(mesh.size):
            slices = shard_slices(t.shape, placement, mesh.shape, mesh.coords(r))
            shards.setdefault(slices, []).append(r)
        for ranks in shards.values():
            assert tuple(ranks) == shard_holders(placement, mesh, ranks[0])
        params.append({
            "name": name, "full_shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
            "placement": [repr(p) for p in placement],
            "shards": [{"slices": [list(s) for s in slices], "unit_ranks": ranks} for slices, ranks in shards.items()],
        })
    config = getattr(model, "config", None)
    seq_len = next(iter(example_inputs.values())).shape[-1]
    return {
        "format_version": FORMAT_VERSION,
        "plan_ngpus": mesh.size,
        "mesh": {"axis_names": list(mesh.axis_names), "shape": list(mesh.shape)},
        "unit_rank_coords": [list(mesh.coords(r)) for r in range(mesh.size)],
        "axis_groups": {name: mesh.groups(a) for a, name in enumerate(mesh.axis_names)},
        "policy": resolved.plan.name,
        "recompute_scopes": list(resolved.plan.recompute_scopes),
        "offload": offload_manifest(resolved.plan),
        "inputs": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                   for k, v in example_inputs.items()],
        "parameters": params,
        "buffers": [{"name": n, "file": "buffers.safetensors"} for n in graph.buffers]
        + [{"name": f"constant_{t}", "file": "buffers.safetensors"} for t in graph.constants],
        "model_stats": {
            "num_params": sum(graph.tensors[t].numel for t in graph.parameters.values()),
            "num_layers": len(decoder_layer_scopes(graph)),
            "hidden_size": getattr(config, "hidden_size", None),
            "seq_len": int(seq_len),
            "model_class": type(model).__name__,
        },
        "fingerprint": fingerprint,
    }


def compile_model(
    model: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    output_dir: str | Path,
    plan_ngpus: int = 1,
    policy: str | Callable[..., Plan] = "dp",
    recompute: str = "none",
    param_dtype: torch.dtype | None = None,
    output_fn: Callable[[Any], torch.Tensor] = default_output,
    memory_budget_gb: float | None = None,
    extra_fingerprint: Mapping | None = None,
    forward_fn: Callable[..., Any] | None = None,
    fused_kernels: bool = False,
    policy_options: Mapping[str, Any] | None = None,
) -> CompileResult:
    """Trace ``model`` on ``example_inputs`` (real token-id tensors), plan it, write the compile output.

    ``output_dir`` receives ``plan.json``, ``gencode/rank{r}.py`` for r < plan_ngpus and
    ``buffers.safetensors``; an existing ``gencode`` folder is replaced. ``policy`` is a built-in
    name (dp, tp, tp_sp, tp_batch, auto) or a function ``(graph, ctx) -> Plan``. ``param_dtype``
    (e.g. torch.bfloat16) is the dtype the runtime keeps parameters in; the graph is traced with it.
    ``forward_fn(model, **inputs)``, when given, replaces ``model(**inputs)`` (see ``trace``).
    ``fused_kernels`` traces RMSNorm, the SwiGLU activation and rotary embedding as dimshard's
    fused kernels (see ``planner/fusion.py``). ``policy_options`` go to the policy as
    ``PolicyContext.extra`` (for ``auto`` and the report: ``hw_profile``, ``dp_size``, ``zero``,
    ``mesh_shapes``); they are part of the fingerprint. ``plan_report.md`` (the explain-plan page of
    ``planner/report.py``) is written next to ``plan.json`` for every policy.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    policy_name = policy if isinstance(policy, str) else getattr(policy, "__name__", "custom")
    fingerprint = compile_fingerprint(model, example_inputs, plan_ngpus, policy_name, recompute, param_dtype,
                                      {**dict(extra_fingerprint or {}), "fused_kernels": fused_kernels,
                                       "policy_options": dict(policy_options or {})})
    with fused_kernels_in(model) if fused_kernels else contextlib.nullcontext():
        graph = trace(model, example_inputs, output_fn=output_fn, param_dtype=param_dtype, forward_fn=forward_fn)
    ctx = PolicyContext(plan_ngpus=plan_ngpus, recompute=recompute, memory_budget_gb=memory_budget_gb,
                        extra=dict(policy_options or {}))
    policy_fn = get_policy(policy) if isinstance(policy, str) else policy
    plan = policy_fn(graph, ctx)
    if plan.mesh.size != plan_ngpus:
        raise ValueError(f"policy '{policy_name}' returned a mesh of {plan.mesh.size} devices for plan_ngpus {plan_ngpus}")
    plan = apply_offload_request(graph, plan, ctx.extra)
    resolved = resolve_placements(graph, plan)

    gencode = output_dir / "gencode"
    if gencode.exists():
        shutil.rmtree(gencode)
    gencode.mkdir(parents=True)
    for r in range(plan.mesh.size):
        code = generate_rank_code(graph, resolved, r, header=f"Policy: {plan.name}.")
        (gencode / f"rank{r}.py").write_text(code)
    from safetensors.torch import save_file

    save_file(_buffer_values(model, graph), str(output_dir / "buffers.safetensors"))
    write_plan_report(graph, resolved, ctx, output_dir / "plan_report.md")
    manifest = _plan_json(graph, resolved, model, fingerprint, example_inputs)
    # plan.json last: its presence marks a complete compile output.
    tmp = output_dir / "plan.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(output_dir / "plan.json")
    return CompileResult(output_dir, graph, plan, resolved, fingerprint, time.perf_counter() - start, ctx)
