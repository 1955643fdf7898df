"""The compile stage end to end: trace, plan, write ``gencode/rank{r}.py``, ``plan.json`` and buffers."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .codegen.fp8_report import append_fp8_report
from .codegen.rank_code import generate_rank_code, shard_holders, shard_slices
from .codegen.report import write_plan_report
from .compile_config import CHUNKED_LOSS, FORMAT_VERSION, MODEL_LOSS, CompileConfig
from .cost.hardware import load_hw_profile
from .cost.plan_estimate import compiled_estimate, estimate_entry, gpu_budget_of
from .cost.topology import node_manifest
from .graph.fusion import fused_kernels as fused_kernels_in
from .graph.ir import Graph
from .graph.layers import decoder_layer_scopes
from .graph.trace import trace
from .plan.gradient_buffers import grad_accumulation_steps, plan_entry
from .plan.offload_plan import apply_offload_request, offload_manifest
from .plan.placements import Plan, ResolvedPlan
from .plan.resolve import resolve_placements
from .search.fp8_choice import choose_fp8
from .search.policies import PolicyContext, get_policy


@dataclass
class CompileResult:
    """What ``compile_model`` produced: the folder, the graph, the plan (with its provenance) and its placements.

    ``config`` is the ``CompileConfig`` bound to the model; ``fingerprint`` is its fingerprint,
    also written into ``plan.json``.
    """

    output_dir: Path
    graph: Graph
    plan: Plan
    resolved: ResolvedPlan
    config: CompileConfig
    fingerprint: str
    seconds: float


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


def _plan_json(graph: Graph, resolved: ResolvedPlan, model: torch.nn.Module, compile_config: CompileConfig,
               example_inputs: Mapping[str, torch.Tensor], estimate: dict, nodes: dict) -> dict:
    from .graph.hf import checkpoint_names

    mesh = resolved.plan.mesh
    # Where save_pretrained puts each weight: the runtime reads a model folder by it (runtime/checkpointing/pretrained_weights.py).
    on_disk = checkpoint_names(model)
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
            **({"checkpoint_name": on_disk[name]} if name in on_disk else {}),
        })
    config = getattr(model, "config", None)
    seq_len = next(iter(example_inputs.values())).shape[-1]
    return {
        "format_version": FORMAT_VERSION,
        "plan_ngpus": mesh.size,
        "mesh": {"axis_names": list(mesh.axis_names), "shape": list(mesh.shape)},
        "unit_rank_coords": [list(mesh.coords(r)) for r in range(mesh.size)],
        "axis_groups": {name: mesh.groups(a) for a, name in enumerate(mesh.axis_names)},
        "nodes": nodes,
        "policy": resolved.plan.name,
        "recompute_scopes": list(resolved.plan.recompute_scopes),
        "offload": offload_manifest(resolved.plan),
        "gradients": plan_entry(grad_accumulation_steps(compile_config.policy_options)),
        "inputs": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                   for k, v in example_inputs.items()],
        "parameters": params,
        "buffers": [{"name": n, "file": "buffers.safetensors",
                     **({"checkpoint_name": on_disk[n]} if n in on_disk else {})} for n in graph.buffers]
        + [{"name": f"constant_{t}", "file": "buffers.safetensors"} for t in graph.constants],
        "model_stats": {
            "num_params": sum(graph.tensors[t].numel for t in graph.parameters.values()),
            "num_layers": len(decoder_layer_scopes(graph)),
            "hidden_size": getattr(config, "hidden_size", None),
            "seq_len": int(seq_len),
            "model_class": type(model).__name__,
        },
        "estimate": estimate,
        "compile_config": compile_config.describe(),
        "fingerprint": compile_config.fingerprint(),
    }


def _forward_fn(config: CompileConfig, forward_fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """The traced forward the config's ``loss`` names (see ``CompileConfig``)."""
    if config.loss == CHUNKED_LOSS:
        if forward_fn is not None:
            raise ValueError(f"loss='{CHUNKED_LOSS}' builds its own forward; pass no forward_fn, or name yours "
                             "with another loss value")
        from .graph.hf import chunked_causal_lm_forward

        return chunked_causal_lm_forward(config.loss_chunk_size)
    if config.loss == MODEL_LOSS and forward_fn is not None:
        raise ValueError("a forward_fn changes the compile output but a function cannot be fingerprinted: "
                         "name it with CompileConfig(loss='<name of your forward>')")
    if config.loss != MODEL_LOSS and forward_fn is None:
        raise ValueError(f"CompileConfig.loss is '{config.loss}', which names a forward_fn: pass it to compile_model "
                         f"(or use loss='{MODEL_LOSS}' or '{CHUNKED_LOSS}')")
    return forward_fn


def compile_model(model: torch.nn.Module, example_inputs: Mapping[str, torch.Tensor], output_dir: str | Path,
                  config: CompileConfig, forward_fn: Callable[..., Any] | None = None) -> CompileResult:
    """Trace ``model`` on ``example_inputs`` (real token-id tensors), plan it under ``config``, write the output.

    ``output_dir`` receives ``plan.json`` (with ``config``'s fingerprint and the plan's estimate,
    ``planner/cost/plan_estimate.py``), ``gencode/rank{r}.py`` for r < plan_ngpus,
    ``buffers.safetensors`` and ``plan_report.md`` (``planner/codegen/report.py``, the same estimate);
    an existing ``gencode`` folder is replaced. The graph is traced with parameters in
    ``config.param_dtype`` (the dtype the runtime keeps them in) and, with ``fused_kernels``,
    RMSNorm, SwiGLU and rotary as dimshard's fused kernels (``planner/graph/fusion.py``).
    ``forward_fn(model, **inputs)`` replaces ``model(**inputs)`` (see ``trace``); it must be named
    by ``config.loss``. The returned plan carries its provenance (``Plan.name``, ``Plan.search``).
    Raises PlanError, TraceError or CodegenError saying what to change.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    config = config.for_model(model, example_inputs)
    forward = _forward_fn(config, forward_fn)
    with fused_kernels_in(model) if config.fused_kernels else contextlib.nullcontext():
        graph = trace(model, example_inputs, param_dtype=config.param_dtype, forward_fn=forward)
    # The policy sees the very profile whose contents the fingerprint holds.
    ctx = PolicyContext(plan_ngpus=config.plan_ngpus, recompute=config.recompute,
                        memory_budget_gb=config.memory_budget_gb,
                        extra={**config.policy_options, "hw_profile": load_hw_profile(config.hw_profile)})
    plan = get_policy(config.policy)(graph, ctx)
    if plan.mesh.size != config.plan_ngpus:
        raise ValueError(f"policy '{config.policy}' returned a mesh of {plan.mesh.size} devices for plan_ngpus "
                         f"{config.plan_ngpus}")
    if plan.name == "custom":  # the default name: record which registered policy chose the plan
        plan.name = config.policy
    plan = apply_offload_request(graph, plan, ctx.extra)
    resolved = resolve_placements(graph, plan)
    # FP8 is compute only: it changes which kernel runs a linear, never a placement (docs/design.md, "FP8").
    fp8 = choose_fp8(graph, resolved, ctx.extra["hw_profile"], config.fp8, config.fp8_recipe)

    gencode = output_dir / "gencode"
    if gencode.exists():
        shutil.rmtree(gencode)
    gencode.mkdir(parents=True)
    for r in range(plan.mesh.size):
        code = generate_rank_code(graph, resolved, r, header=f"Policy: {plan.name}.", fp8=fp8.ops())
        (gencode / f"rank{r}.py").write_text(code)
    from safetensors.torch import save_file

    save_file(_buffer_values(model, graph), str(output_dir / "buffers.safetensors"))
    # One estimate for the report and plan.json: the one the search checked against the budgets.
    hw = ctx.extra["hw_profile"]
    est = compiled_estimate(graph, resolved, hw, ctx.extra)
    gpu_budget = gpu_budget_of(config.memory_budget_gb, config.memory_budget_source)
    write_plan_report(graph, resolved, ctx, output_dir / "plan_report.md", est, gpu_budget)
    append_fp8_report(output_dir / "plan_report.md", fp8)
    manifest = _plan_json(graph, resolved, model, config, example_inputs, estimate_entry(est, hw, gpu_budget, ctx.extra),
                          node_manifest(plan.mesh, hw))
    manifest["fp8"] = fp8.manifest()
    # plan.json last: its presence marks a complete compile output.
    tmp = output_dir / "plan.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(output_dir / "plan.json")
    return CompileResult(output_dir, graph, plan, resolved, config, manifest["fingerprint"],
                         time.perf_counter() - start)
