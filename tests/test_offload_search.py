"""Offload priced by the auto search: GPU and host budgets, the no-fit error, and the cost arithmetic."""

from __future__ import annotations

import pytest
import torch
from parallel_harness import mini_llama_config

from dimshard.planner import trace
from dimshard.planner.codegen.report import write_plan_report
from dimshard.planner.cost.hardware import load_hw_profile
from dimshard.planner.cost.model import GB, analyze
from dimshard.planner.cost.offload_cost import OffloadRates, apply_offload, owned_state
from dimshard.planner.graph.layers import decoder_layer_scopes
from dimshard.planner.plan.placements import Mesh, Plan, PlanError
from dimshard.planner.plan.resolve import resolve_placements
from dimshard.planner.search.auto import search
from dimshard.planner.search.policies import PolicyContext


@pytest.fixture(scope="module")
def graph():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # Long sequences against a small model: activations weigh as much as the optimizer state.
    model = LlamaForCausalLM(mini_llama_config(num_hidden_layers=4, max_position_embeddings=2048))
    ids = torch.randint(0, 128, (1, 1024))
    return trace(model, {"input_ids": ids, "labels": ids.clone()})


def _analysis(graph):
    hw = load_hw_profile("h100")
    resolved = resolve_placements(graph, Plan(Mesh(("unit",), (1,)), {}, []))
    return hw, resolved, analyze(graph, resolved, hw, regions=decoder_layer_scopes(graph))


def test_offload_moves_state_and_inputs_to_the_host(graph):
    hw, resolved, analysis = _analysis(graph)
    layers = decoder_layer_scopes(graph)
    base = analysis.estimate(layers)
    rates = OffloadRates.of(hw)
    opt = apply_offload(graph, resolved, analysis, layers, True, [], rates)
    elements, _ = owned_state(graph, resolved, 1, True)
    assert opt.host_bytes == pytest.approx(12 * elements)
    assert opt.estimate.memory["optimizer"] < base.memory["optimizer"] or opt.update_device == "gpu"
    assert opt.estimate.optimizer_s >= base.optimizer_s
    acts = apply_offload(graph, resolved, analysis, layers, False, layers[:2], rates)
    layer_input = 1024 * 64 * 4  # fp32 residual stream entering a layer
    assert acts.host_bytes == pytest.approx(2 * layer_input)
    assert acts.estimate.memory["optimizer"] == base.memory["optimizer"]
    assert acts.estimate.peak_bytes < base.peak_bytes
    assert acts.estimate.peak_bytes >= base.peak_bytes - 2 * layer_input
    with pytest.raises(ValueError, match="not outermost recomputed"):
        apply_offload(graph, resolved, analysis, layers[:1], False, layers[1:2], rates)


def test_search_offloads_only_when_the_gpu_budget_needs_it(graph, tmp_path):
    layers = decoder_layer_scopes(graph)
    _, _, analysis = _analysis(graph)
    least = analysis.estimate(layers).peak_bytes  # the smallest peak without offload
    roomy = search(graph, PolicyContext(1, "auto", 10.0, {"hw_profile": "h100"})).best.plan
    assert not roomy.offload_optimizer and not roomy.offload_scopes
    budget_gb = 0.97 * least / GB
    result = search(graph, PolicyContext(1, "auto", budget_gb, {"hw_profile": "h100", "host_memory_budget_gb": 1.0}))
    best = result.best
    assert best.feasible and best.estimate.peak_bytes <= budget_gb * GB
    assert best.plan.offload_optimizer or best.plan.offload_scopes
    assert 0 < best.estimate.host_bytes <= 1.0 * GB
    assert set(best.plan.offload_scopes) <= set(best.plan.recompute_scopes)
    # Nothing fits when the host cannot take what the GPU must shed: the error names both peaks.
    with pytest.raises(PlanError, match=r"GB per GPU, budget is .* GB, and .* GB host memory per rank, host budget is 1e-06 GB"):
        search(graph, PolicyContext(1, "auto", budget_gb, {"hw_profile": "h100", "host_memory_budget_gb": 1e-6}))
    with pytest.raises(PlanError, match="smallest plan found needs"):
        search(graph, PolicyContext(1, "auto", budget_gb, {"hw_profile": "h100", "offload": "none"}))


def test_report_shows_gpu_and_host_peaks(graph, tmp_path):
    from dimshard.planner.plan.resolve import resolve_placements as resolve

    layers = decoder_layer_scopes(graph)
    plan = Plan(Mesh(("unit",), (1,)), {}, layers, "dp", offload_scopes=layers[:3], offload_optimizer=True)
    text = write_plan_report(graph, resolve(graph, plan), PolicyContext(1, "layer", None, {"hw_profile": "h100",
                                                                                       "host_memory_budget_gb": 2.0}),
                             tmp_path / "plan_report.md")
    assert "## CPU offload" in text and "host budget 2.0 GB per rank" in text
    assert "optimizer state | in host memory" in text and "3 scope(s): model.layers.0" in text
