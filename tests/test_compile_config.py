"""``CompileConfig``: every input of a compile output is fingerprinted, so a stale output is never reused.

The central test changes one input at a time (the model, the example inputs, each planning
option, the hardware profile's contents, each library version) and checks that the previous
output is reported stale, naming what changed, and that compiling again makes it current.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parallel_harness import mini_llama_config

from dimshard.planner import CompileConfig, compile_model, compile_status
from dimshard.planner.cost.hardware import PROFILE_DIR

ROOT = Path(__file__).resolve().parents[1]


def _model(**overrides) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(mini_llama_config(num_hidden_layers=1, **overrides))


def _inputs(seq: int = 8, dtype: torch.dtype = torch.long) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(dtype), "labels": ids.clone()}


def _with_version(config: CompileConfig, library: str, version: str) -> CompileConfig:
    return dataclasses.replace(config, versions=tuple((n, version if n == library else v) for n, v in config.versions))


def test_each_input_makes_the_output_stale_and_recompiling_makes_it_current(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text((PROFILE_DIR / "h100.json").read_text())
    out = tmp_path / "out"
    model, inputs = _model(), _inputs()
    config = CompileConfig(plan_ngpus=2, policy="tp", hw_profile=str(profile))

    def profile_contents_change() -> None:
        data = json.loads(profile.read_text())
        data["copy_gbps"] *= 2
        profile.write_text(json.dumps(data))

    # (what changes, the words the stale message must hold, how the next compile differs)
    steps = [
        ("model config", "the model", lambda c, m, i: (c, _model(rms_norm_eps=1e-6), i)),
        ("example shape", "inputs changed", lambda c, m, i: (c, m, _inputs(seq=16))),
        ("example dtype", "inputs changed", lambda c, m, i: (c, m, {**i, "input_ids": i["input_ids"].int()})),
        ("plan_ngpus", "plan_ngpus changed", lambda c, m, i: (dataclasses.replace(c, plan_ngpus=4), m, i)),
        ("policy", "policy changed", lambda c, m, i: (dataclasses.replace(c, policy="tp_sp"), m, i)),
        ("policy options", "policy_options changed",
         lambda c, m, i: (dataclasses.replace(c, policy_options={"dp_size": 2}), m, i)),
        ("memory budget", "memory_budget_gb changed",
         lambda c, m, i: (dataclasses.replace(c, memory_budget_gb=50.0), m, i)),
        ("recompute", "recompute changed", lambda c, m, i: (dataclasses.replace(c, recompute="layer"), m, i)),
        ("param dtype", "param_dtype changed",
         lambda c, m, i: (dataclasses.replace(c, param_dtype=torch.bfloat16), m, i)),
        ("fused kernels", "fused_kernels changed", lambda c, m, i: (dataclasses.replace(c, fused_kernels=True), m, i)),
        ("loss", "loss changed", lambda c, m, i: (dataclasses.replace(c, loss="chunked_cross_entropy"), m, i)),
        ("loss chunk", "loss_chunk_size changed",
         lambda c, m, i: (dataclasses.replace(c, loss_chunk_size=4), m, i)),
        ("hardware profile contents", "hardware profile's contents",
         lambda c, m, i: (profile_contents_change(), (c, m, i))[1]),
        ("hardware profile", "hw_profile changed",
         lambda c, m, i: (dataclasses.replace(c, hw_profile=str(PROFILE_DIR / "h200.json")), m, i)),
        *[(f"{lib} version", "library versions", lambda c, m, i, lib=lib: (_with_version(c, lib, "0.0.0"), m, i))
          for lib in ("dimshard", "torch", "transformers")],
    ]
    compile_model(model, inputs, out, config)
    assert compile_status(out, config.for_model(model, inputs)) == (True, "matches")
    fingerprints = {json.loads((out / "plan.json").read_text())["fingerprint"]}
    for what, words, change in steps:
        config, model, inputs = change(config, model, inputs)
        current, why = compile_status(out, config.for_model(model, inputs))
        assert not current and "stale" in why and words in why, (what, why)
        result = compile_model(model, inputs, out, config)
        assert compile_status(out, config.for_model(model, inputs)) == (True, "matches"), what
        assert result.fingerprint == json.loads((out / "plan.json").read_text())["fingerprint"]
        assert result.fingerprint not in fingerprints, f"changing the {what} left the fingerprint unchanged"
        fingerprints.add(result.fingerprint)
    assert result.plan.name == "tp_sp" and result.plan.mesh.shape == (4,)


_FINGERPRINT_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_compile_config import _inputs, _model, _reference_config
print(_reference_config().for_model(_model(), _inputs()).fingerprint())
"""


def _reference_config() -> CompileConfig:
    return CompileConfig(plan_ngpus=2, policy="auto", policy_options={"mesh_shapes": [(2,)], "dp_size": 2, "zero": True},
                         memory_budget_gb=12.5, recompute="auto", param_dtype=torch.bfloat16, hw_profile="h200")


def test_fingerprint_is_stable_across_processes():
    here = _reference_config().for_model(_model(), _inputs()).fingerprint()
    # Another process with another string-hash seed (this one's is random) computes the same fingerprint.
    env = dict(os.environ, PYTHONHASHSEED="12345")
    there = subprocess.run([sys.executable, "-c", _FINGERPRINT_SCRIPT.format(tests=str(ROOT / "tests"))],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert there == here
    # Options given in another order, or as lists instead of tuples, are the same config.
    reordered = dataclasses.replace(_reference_config(),
                                    policy_options={"zero": True, "dp_size": 2, "mesh_shapes": [[2]]})
    assert reordered.for_model(_model(), _inputs()).fingerprint() == here


def test_config_is_frozen_hashable_and_picklable():
    config = _reference_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.plan_ngpus = 4
    with pytest.raises(TypeError):
        config.policy_options["dp_size"] = 4
    assert pickle.loads(pickle.dumps(config)) == config
    assert hash(config) == hash(_reference_config()) and config == _reference_config()
    assert json.loads(json.dumps(config.describe()))["policy_options"]["mesh_shapes"] == [[2]]


def test_bad_configs_say_what_to_do(tmp_path):
    with pytest.raises(TypeError, match=r"policy option\['obj'\] is a object; give plain values"):
        CompileConfig(policy_options={"obj": object()})
    with pytest.raises(ValueError, match="loss_chunk_size applies to loss='chunked_cross_entropy' only"):
        CompileConfig(loss_chunk_size=128)
    with pytest.raises(ValueError, match="CompileConfig\\(hw_profile=...\\)"):
        CompileConfig(policy_options={"hw_profile": "h100"})
    with pytest.raises(ValueError, match="registered policy's name"):
        CompileConfig(policy=lambda graph, ctx: None)
    with pytest.raises(ValueError, match="bind it first"):
        CompileConfig().fingerprint()
    model, inputs = _model(), _inputs()
    with pytest.raises(ValueError, match="cannot be fingerprinted"):
        compile_model(model, inputs, tmp_path, CompileConfig(), forward_fn=lambda m, **kw: m(**kw).loss)
    with pytest.raises(ValueError, match="bound to another model"):
        CompileConfig().for_model(model, inputs).for_model(model, _inputs(seq=16))


def _train_module(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("llama3_train", ROOT / "examples/llama3_128k/train.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_train_py_reuses_only_a_current_compile_output(tmp_path, monkeypatch):
    mini_llama_config(num_hidden_layers=1).save_pretrained(tmp_path / "model")
    train = _train_module(monkeypatch)
    args = train.TrainArgs(model_id=str(tmp_path / "model"), sequence_length=16, plan_ngpus=2, runtime_ngpus=2,
                           policy="tp", compile_dir=str(tmp_path / "compile"), hw_profile="h100")
    args.validate()
    assert train.compile_is_current(args, for_gpu=False) == (False, f"no compile output in {args.compile_dir}")
    train.compile_stage(args, for_gpu=False)
    assert train.compile_is_current(args, for_gpu=False) == (True, "matches")
    # Inputs the old hand-built fingerprint missed: the loss chunk, the memory budget and the profile.
    # The offload flags reach the planner too (the host budget was once parsed and dropped).
    for flag, value in (("loss_chunk_size", 8), ("memory_budget_gb", 40.0), ("hw_profile", "h200"),
                        ("host_memory_budget_gb", 50.0), ("offload", "optimizer")):
        changed = dataclasses.replace(args, **{flag: value})
        current, why = train.compile_is_current(changed, for_gpu=False)
        assert not current and flag in why, (flag, why)


def test_auto_without_a_host_budget_depends_on_this_machines_memory(tmp_path, monkeypatch):
    from dimshard.planner.cost import budgets

    config = _reference_config().for_model(_model(), _inputs())
    (tmp_path / "plan.json").write_text(json.dumps({"fingerprint": config.fingerprint(),
                                                    "compile_config": config.describe()}))
    assert compile_status(tmp_path, config) == (True, "matches")
    monkeypatch.setattr(budgets, "default_host_budget",
                        lambda hw, ranks_per_host=None: budgets.MemoryBudget(12345.0, "stub"))
    current, why = compile_status(tmp_path, config)
    assert not current and "host memory per GPU" in why
    given = dataclasses.replace(config, policy_options={**config.policy_options, "host_memory_budget_gb": 100.0})
    assert "host_memory_budget_gb_default" not in given.describe()
