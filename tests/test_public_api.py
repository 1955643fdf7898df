"""The public API: what ``dimshard.planner`` and ``dimshard.runtime`` export, and the README's examples as written."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from dist_utils import run_distributed
from parallel_harness import assert_matches_reference, rank_step, reference_step, save_weights

import dimshard.planner
import dimshard.runtime
from dimshard.planner.search import policies

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

PLANNER_API = {"compile_model", "CompileConfig", "CompileResult", "compile_status", "Plan", "Mesh", "Shard",
               "Replicate", "Partial", "PolicyContext", "register_op", "set_rule", "register_policy", "get_policy",
               "PlanError", "TraceError", "AnnotationError", "CodegenError"}
RUNTIME_API = {"init_parallel", "ParallelContext", "destroy_parallel", "read_plan", "load_parallel_module",
               "GradReducer", "ZeroAdamW", "save_checkpoint", "load_checkpoint", "MetricsLogger", "train"}


def test_planner_and_runtime_export_what_the_docs_promise():
    assert PLANNER_API <= set(dimshard.planner.__all__)
    assert RUNTIME_API <= set(dimshard.runtime.__all__)
    for package in (dimshard.planner, dimshard.runtime):
        missing = [name for name in package.__all__ if getattr(package, name, None) is None]
        assert not missing, f"{package.__name__} lists {missing} in __all__ but does not define them"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        dimshard.runtime.not_a_name  # noqa: B018


def test_register_policy_refuses_a_taken_name(monkeypatch):
    monkeypatch.setattr(policies, "POLICIES", dict(policies.POLICIES))

    @dimshard.planner.register_policy("mine")
    def mine(graph, ctx):
        raise AssertionError("not called")

    assert dimshard.planner.get_policy("mine") is mine and dimshard.planner.get_policy("auto").__name__ == "auto"
    with pytest.raises(dimshard.planner.PlanError, match="already registered"):
        dimshard.planner.register_policy("mine", lambda graph, ctx: None)
    dimshard.planner.register_policy("mine", mine)  # the same function again is fine
    with pytest.raises(dimshard.planner.PlanError, match="unknown policy 'nope'.*register_policy"):
        dimshard.planner.get_policy("nope")


def tp_by_import_path(graph, ctx):
    """A user policy no module registers: named as ``test_public_api:tp_by_import_path``."""
    return dimshard.planner.get_policy("tp")(graph, ctx)


def test_a_policy_can_be_named_by_its_import_path(monkeypatch):
    monkeypatch.setattr(policies, "POLICIES", dict(policies.POLICIES))
    assert dimshard.planner.get_policy("test_public_api:tp_by_import_path") is tp_by_import_path
    assert "test_public_api:tp_by_import_path" in policies.POLICIES
    with pytest.raises(dimshard.planner.PlanError, match="cannot import module 'no_such_module_here'"):
        dimshard.planner.get_policy("no_such_module_here:policy")
    with pytest.raises(dimshard.planner.PlanError, match="has no function 'missing'"):
        dimshard.planner.get_policy("test_public_api:missing")


def readme_python_blocks() -> str:
    """Every ```python block of README.md, in order, as one program."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert blocks, "README.md has no python code block"
    return "\n".join(blocks)


def test_readme_custom_policy_runs_as_written_and_matches_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(policies, "POLICIES", dict(policies.POLICIES))  # the README registers a policy
    namespace: dict = {"__name__": "readme"}
    exec(compile(readme_python_blocks(), str(ROOT / "README.md"), "exec"), namespace)
    result = namespace["result"]
    plan = json.loads((result.output_dir / "plan.json").read_text())
    assert plan["policy"] == "mlp_tp" and plan["plan_ngpus"] == 2
    split = {p["name"] for p in plan["parameters"] if len(p["shards"]) == 2}
    assert split == {f"model.layers.{i}.mlp.{w}_proj.weight" for i in range(2) for w in ("gate", "up", "down")}
    assert "all_reduce" in (result.output_dir / "gencode" / "rank0.py").read_text()
    # The README's plan trains exactly like the model it was compiled from.
    model, ids = namespace["model"], namespace["ids"]
    save_weights(model, tmp_path / "weights.safetensors")
    ref = reference_step(copy.deepcopy(model), ids, "sgd", 1e-2)
    results = run_distributed(rank_step, 2, str(result.output_dir), str(tmp_path / "weights.safetensors"), ids,
                              "sgd", 1e-2)
    assert_matches_reference(results, ref, TOL)
