"""Offload recorded in the plan: generated code keeps recomputed inputs in host memory, values unchanged."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from dist_utils import run_distributed
from parallel_harness import assemble, max_diff, mini_llama_config, rank_step, reference_step, save_weights

from dimshard.planner import CompileConfig, compile_model
from dimshard.planner.plan.placements import PlanError

TOL = 1e-5


@pytest.mark.parametrize("policy,plan_ngpus,world", [("tp_sp", 2, 2), ("dp", 1, 2)])
def test_offloaded_activations_match_single_process(tmp_path, policy, plan_ngpus, world):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(mini_llama_config())
    input_ids = torch.randint(0, 128, (4, 16))
    example = input_ids[: 4 // (world // plan_ngpus)]
    config = CompileConfig(plan_ngpus=plan_ngpus, policy=policy, recompute="layer", policy_options={"offload": "all"})
    compile_model(model, {"input_ids": example, "labels": example.clone()}, tmp_path / "out", config)
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["offload"] == {"optimizer": True, "activation_scopes": ["model.layers.0", "model.layers.1"]}
    code = (tmp_path / "out" / "gencode" / "rank0.py").read_text()
    assert code.count("offloaded_checkpoint(self.activation_offload") == 2 and "checkpoint(self._" not in code
    save_weights(model, tmp_path / "weights.safetensors")
    ref = reference_step(copy.deepcopy(model), input_ids, "adamw", 1e-3)
    results = run_distributed(rank_step, world, str(tmp_path / "out"), str(tmp_path / "weights.safetensors"),
                              input_ids, "adamw", 1e-3)
    for r in results:
        assert abs(r["loss"] - ref["loss"]) <= TOL
    worst, where = max_diff(assemble(results, "grads", ref["grads"]), ref["grads"])
    assert worst <= TOL, f"gradient of {where} differs by {worst}"
    worst, where = max_diff(assemble(results, "params", ref["params"]), ref["params"])
    assert worst <= TOL, f"updated {where} differs by {worst}"


def test_offloading_activations_without_recompute_is_a_clear_error(tmp_path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(mini_llama_config(num_hidden_layers=1))
    ids = torch.randint(0, 128, (1, 8))
    with pytest.raises(PlanError, match="recomputes nothing"):
        compile_model(model, {"input_ids": ids, "labels": ids.clone()}, tmp_path / "out",
                      CompileConfig(policy="dp", recompute="none", policy_options={"offload": "activations"}))
    with pytest.raises(ValueError, match="offload must be one of"):
        compile_model(model, {"input_ids": ids, "labels": ids.clone()}, tmp_path / "out",
                      CompileConfig(policy="dp", policy_options={"offload": "gpu"}))
