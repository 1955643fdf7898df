"""FP8 as a planner choice (planner/search/fp8_choice.py, codegen/fp8_code.py, docs/design.md "FP8").

- ``--fp8 all`` on 2 tensor-parallel gloo ranks equals one process running the Hugging Face model
  with every linear but the head through ``fp8_linear`` (loss, gradients, updated weights);
- generated code passes each split's process groups; plan.json and plan_report.md list every decision;
- ``auto`` prices FP8 from the profile: the 8B shape's layer products go to FP8, small products and
  the output head stay in their dtype, and a profile without measured FP8 rates keeps all of them
  with a one-line reason.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from dist_utils import run_distributed
from parallel_harness import (
    assert_matches_reference,
    mini_llama_config,
    rank_step,
    reference_step,
    save_weights,
)

from dimshard.kernels.fp8.linear import fp8_linear
from dimshard.kernels.fp8.scaling import RECIPES
from dimshard.planner import CompileConfig, compile_model
from dimshard.planner.compile_config import FP8_MODES, FP8_RECIPES
from dimshard.planner.cost.hardware import load_hw_profile
from dimshard.planner.search import fp8_choice

TOL = 1e-5


def _through_fp8(model: torch.nn.Module, recipe: str) -> torch.nn.Module:
    """The model with every linear but the output head computing through fp8_linear."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.forward = (lambda m: lambda x: fp8_linear(x, m.weight, m.bias, recipe=recipe))(module)
    return model


def test_modes_and_recipes_agree():
    assert FP8_MODES == fp8_choice.FP8_MODES and set(FP8_RECIPES) == set(RECIPES)
    with pytest.raises(ValueError, match="fp8 must be one of"):
        CompileConfig(fp8="on")


@pytest.mark.slow
# Recomputed layers run fp8_linear again in backward; tp_sp gathers the sequence before the products.
@pytest.mark.parametrize("recipe,policy,recompute", [("tensorwise", "tp", "none"), ("rowwise", "tp_sp", "layer")])
def test_tensor_parallel_fp8_equals_one_process(tmp_path, recipe, policy, recompute):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(mini_llama_config())
    input_ids = torch.randint(0, 128, (2, 16))
    config = CompileConfig(plan_ngpus=2, policy=policy, recompute=recompute, fp8="all", fp8_recipe=recipe,
                           hw_profile="cpu")
    out = tmp_path / "out"
    compile_model(model, {"input_ids": input_ids, "labels": input_ids.clone()}, out, config)

    code = (out / "gencode" / "rank1.py").read_text()
    assert "from dimshard.kernels.fp8.linear import fp8_linear" in code and f"recipe='{recipe}'" in code
    assert code.count("n_groups=(self.groups['tp'],)") == 10 and code.count("k_groups=(self.groups['tp'],)") == 4
    assert "lm_head" not in "".join(line for line in code.splitlines() if "fp8_linear(" in line)
    plan = json.loads((out / "plan.json").read_text())["fp8"]
    assert plan["mode"] == "all" and plan["recipe"] == recipe and sum(op["fp8"] for op in plan["ops"]) == 14
    assert [op["reason"] for op in plan["ops"] if not op["fp8"]] == ["output head: its logits keep the weights' dtype"]
    assert "## FP8" in (out / "plan_report.md").read_text()

    save_weights(model, tmp_path / "weights.safetensors")
    ref = reference_step(_through_fp8(copy.deepcopy(model), recipe), input_ids, "sgd", 1e-2)
    exact = reference_step(copy.deepcopy(model), input_ids, "sgd", 1e-2)
    assert abs(ref["loss"] - exact["loss"]) > 1e-6  # FP8 changes the numbers: the comparison below is FP8's
    results = run_distributed(rank_step, 2, str(out), str(tmp_path / "weights.safetensors"), input_ids, "sgd", 1e-2)
    assert_matches_reference(results, ref, TOL)


def _hw_with_fp8(tflops: float = 1300.0, cast_gbps: float = 1500.0) -> dict:
    hw = load_hw_profile("h100").to_dict()
    hw.update(fp8_matmul_tflops={"tensorwise": tflops, "rowwise": tflops * 0.9}, fp8_cast_gbps=cast_gbps)
    return hw


def _decisions(tmp_path, seq: int, hidden: int, fp8: str, hw) -> dict:
    from dimshard.planner.graph.hf import build_on_meta

    config = mini_llama_config(hidden_size=hidden, intermediate_size=hidden * 7 // 2, num_hidden_layers=1,
                               num_attention_heads=max(hidden // 128, 4), num_key_value_heads=max(hidden // 512, 2),
                               vocab_size=4096)
    model = build_on_meta(config)
    ids = torch.zeros(1, seq, dtype=torch.long)
    compile_model(model, {"input_ids": ids, "labels": ids.clone()}, tmp_path / f"{seq}_{hidden}_{fp8}",
                  CompileConfig(policy="dp", fp8=fp8, hw_profile=hw, param_dtype=torch.bfloat16))
    return json.loads((tmp_path / f"{seq}_{hidden}_{fp8}" / "plan.json").read_text())["fp8"]


def test_auto_prices_fp8_per_op(tmp_path):
    hw = tmp_path / "h100_fp8.json"
    hw.write_text(json.dumps(_hw_with_fp8()))
    large = _decisions(tmp_path, 8192, 4096, "auto", str(hw))
    by_scope = {op["scope"].rsplit(".", 1)[-1]: op for op in large["ops"]}
    for name in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert by_scope[name]["fp8"], by_scope[name]
    for op in large["ops"][:-1]:  # each decision follows its price
        assert op["fp8"] == (op["fp8_s"] < op["bf16_s"]), op
    assert not by_scope["lm_head"]["fp8"] and large["estimated_saving_s"] > 0
    # Small products: the casts' launches and passes cost more than the faster product saves.
    small = _decisions(tmp_path, 64, 256, "auto", str(hw))
    assert not any(op["fp8"] for op in small["ops"])
    assert all("costs" in op["reason"] or "output head" in op["reason"] for op in small["ops"])
    # Slow casts make FP8 lose even on the large shape.
    hw.write_text(json.dumps(_hw_with_fp8(cast_gbps=20.0)))
    assert not any(op["fp8"] for op in _decisions(tmp_path, 8192, 4096, "auto", str(hw))["ops"])


def test_profile_without_fp8_rates_keeps_bf16(tmp_path):
    from dimshard.planner.cost.hardware import load_hw_profile

    unmeasured = {k: v for k, v in load_hw_profile("h100").to_dict().items() if not k.startswith("fp8_")}
    hw = tmp_path / "unmeasured.json"
    hw.write_text(json.dumps({**unmeasured, "name": "unmeasured"}))
    chosen = _decisions(tmp_path, 8192, 4096, "auto", str(hw))
    assert not any(op["fp8"] for op in chosen["ops"])
    assert chosen["unavailable"].startswith("hardware profile 'unmeasured' has no measured tensorwise FP8 rate")
    # --fp8 all needs no rate: it forces every eligible linear.
    forced = _decisions(tmp_path, 8192, 4096, "all", str(hw))
    assert sum(op["fp8"] for op in forced["ops"]) == 7
