"""Memory budgets and what a run holds to them: default budgets from the device and the host less measured
margins, one estimate for the budget check, plan.json, plan_report.md and benchmarks, expandable segments on
every rank, and the one-line out-of-memory error."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from parallel_harness import mini_llama_config

from dimshard.planner import CompileConfig, compile_model
from dimshard.planner.cost import budgets
from dimshard.planner.cost.budgets import DeviceMemory, default_gpu_budget, default_host_budget
from dimshard.planner.cost.hardware import load_hw_profile
from dimshard.runtime.reliability import gpu_memory
from dimshard.runtime.reliability.gpu_memory import (
    ALLOC_CONF,
    EXPANDABLE_SEGMENTS,
    GpuOutOfMemory,
    enable_expandable_segments,
    out_of_memory_message,
)

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


# --- default budgets ------------------------------------------------------------------------


def test_default_gpu_budget_is_the_device_less_the_profiles_measured_margin(monkeypatch):
    hw = load_hw_profile("h100")
    assert hw.gpu_context_gb and hw.reserved_over_estimate is not None and hw.memory_margin_source
    card = DeviceMemory("NVIDIA H100 80GB HBM3", 0, total=85.03e9, free=83.6e9, reserved=0.0)
    monkeypatch.setattr(budgets, "device_memory", lambda: card)
    budget = default_gpu_budget(hw)
    # Capacity rounded down to 0.1 GB; this process's own context is not another process's memory.
    assert budget.gb == math.floor((85.0 - hw.gpu_context_gb) / (1 + hw.reserved_over_estimate) * 10) / 10
    assert "cuda:0 NVIDIA H100 80GB HBM3 85.0 GB" in budget.source and "measured" in budget.source
    assert "other processes" not in budget.source
    # Another process holds 10 GB at launch: the budget shrinks by it.
    crowded = DeviceMemory(card.name, 0, total=85.03e9, free=73.6e9, reserved=0.0)
    monkeypatch.setattr(budgets, "device_memory", lambda: crowded)
    less = default_gpu_budget(hw)
    assert less.gb == pytest.approx(math.floor((85.0 - 10.0 - hw.gpu_context_gb)
                                               / (1 + hw.reserved_over_estimate) * 10) / 10, abs=0.11)
    assert "held by other processes at launch" in less.source
    # Compiling without the GPU: the profile's capacity less the same margin.
    monkeypatch.setattr(budgets, "device_memory", lambda: None)
    offline = default_gpu_budget(hw)
    assert offline.gb == budget.gb and "compiled without that GPU" in offline.source
    # A profile without measured margins says so.
    bare = load_hw_profile({**hw.to_dict(), "name": "bare", "gpu_context_gb": None, "reserved_over_estimate": None})
    assert "no measured margin" in default_gpu_budget(bare).source


def test_default_host_budget_is_this_machines_ram_less_the_measured_margins(monkeypatch):
    hw = load_hw_profile("h100")
    monkeypatch.setattr(budgets, "host_ram", lambda: (135.13e9, "MemTotal"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    one = default_host_budget(hw)
    assert one.gb == math.floor((135.13 - hw.host_os_gb - hw.host_process_gb) * 10) / 10
    assert "MemTotal 135.1 GB" in one.source
    # The one-H100, 128 GiB machine takes the 8B 128K offload plan, which needs 124 GB of offloaded state.
    assert one.gb >= 124.3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert default_host_budget(hw).gb == math.floor(((135.13 - hw.host_os_gb) / 8 - hw.host_process_gb) * 10) / 10
    # Without the job's GPUs here: the profile's RAM and GPUs per node.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "host_memory_gb" in default_host_budget(hw).source


def test_host_ram_reads_meminfo():
    found = budgets.host_ram()
    assert found is not None
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    assert 0 < found[0] <= total


# --- one estimate -----------------------------------------------------------------------------


def _compile(tmp_path: Path, name: str, **config) -> tuple:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(mini_llama_config(num_hidden_layers=4, max_position_embeddings=2048))
    ids = torch.zeros(1, 1024, dtype=torch.long)
    result = compile_model(model, {"input_ids": ids, "labels": ids.clone()}, tmp_path / name,
                           CompileConfig(plan_ngpus=1, hw_profile="h100", **config))
    return result, json.loads((tmp_path / name / "plan.json").read_text()), (tmp_path / name / "plan_report.md")


def test_report_plan_json_and_budget_check_read_one_estimate_with_offload(tmp_path):
    from dimshard.planner.codegen.report import _size
    from dimshard.planner.cost.model import GB, analyze, estimate
    from dimshard.planner.cost.plan_estimate import plan_estimate
    from dimshard.planner.graph.layers import decoder_layer_scopes
    from dimshard.runtime.training.metrics import plan_estimate_record

    _, least, _ = _compile(tmp_path, "least", policy="dp", recompute="layer")
    budget_gb = 0.97 * least["estimate"]["gpu_peak_bytes"] / GB  # below every plan that offloads nothing
    result, plan, report = _compile(tmp_path, "tight", policy="auto", recompute="auto", memory_budget_gb=budget_gb,
                                    memory_budget_source="a test's tight budget",
                                    policy_options={"host_memory_budget_gb": 1.0})
    checked = result.plan.search.best
    assert checked.feasible and (plan["offload"]["optimizer"] or plan["offload"]["activation_scopes"])
    est = plan["estimate"]
    # The budget check's number is plan.json's and the report's, to the byte.
    assert est["gpu_peak_bytes"] == checked.estimate.peak_bytes <= budget_gb * GB
    assert est["host_offload_bytes"] == checked.estimate.host_bytes <= 1.0 * GB
    assert est["gpu_budget_bytes"] == pytest.approx(budget_gb * GB) and est["fits_budgets"]
    assert est["gpu_budget_source"] == "a test's tight budget"
    text = report.read_text()
    assert f"**{_size(est['gpu_peak_bytes'])}**, budget {_size(budget_gb * GB)}" in text
    assert f"peak estimate {_size(est['gpu_peak_bytes'])} within it; from a test's tight budget" in text
    assert "## CPU offload" in text and "plan.json records" in text
    # Priced again from the written plan, offloads included, it is the same computation.
    regions = list(dict.fromkeys(decoder_layer_scopes(result.graph) + list(result.plan.recompute_scopes)))
    hw = load_hw_profile("h100")
    analysis = analyze(result.graph, result.resolved, hw, regions=regions)
    again = plan_estimate(result.graph, result.resolved, analysis, result.plan, hw)
    assert again.peak_bytes == pytest.approx(est["gpu_peak_bytes"], rel=1e-9)
    # What benchmarks used to print: the same plan priced without its offloads, over the budget.
    assert estimate(result.graph, result.resolved, hw).peak_bytes > budget_gb * GB
    # Benchmarks print plan.json's number.
    assert plan_estimate_record(plan)["est_peak_gib"] == round(est["gpu_peak_bytes"] / GIB, 2)


# --- expandable segments -------------------------------------------------------------------------


def test_expandable_segments_are_enabled_unless_the_user_configured_the_allocator(monkeypatch):
    for name in gpu_memory.ALLOC_CONF_NAMES:
        monkeypatch.delenv(name, raising=False)
    assert enable_expandable_segments() and os.environ[ALLOC_CONF] == EXPANDABLE_SEGMENTS
    monkeypatch.setenv(ALLOC_CONF, "expandable_segments:False,max_split_size_mb:128")
    assert not enable_expandable_segments()
    assert os.environ[ALLOC_CONF] == "expandable_segments:False,max_split_size_mb:128"
    monkeypatch.delenv(ALLOC_CONF)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "backend:native")  # torch's device-neutral name counts too
    assert not enable_expandable_segments() and ALLOC_CONF not in os.environ


def test_every_rank_and_benchmark_enables_them_before_cuda(monkeypatch):
    from dimshard.runtime.distributed import destroy_parallel, init_parallel

    for name in gpu_memory.ALLOC_CONF_NAMES:
        monkeypatch.delenv(name, raising=False)
    plan = {"plan_ngpus": 1, "mesh": {"axis_names": ["dp"], "shape": [1]}, "unit_rank_coords": [[0]],
            "axis_groups": {"dp": [[0]]}, "parameters": []}
    init_parallel(plan, backend="gloo")  # the runtime entry of generated code and the trainer
    destroy_parallel()
    assert os.environ[ALLOC_CONF] == EXPANDABLE_SEGMENTS
    # train.py's run path before it touches CUDA, and every benchmark script's main before its work.
    train = (ROOT / "examples/llama3_128k/train.py").read_text()
    run_stage = train[train.index("def run_stage("):]
    assert run_stage.index("enable_expandable_segments()") < run_stage.index("torch.cuda")
    scripts = [p for p in (ROOT / "benchmarks").glob("*.py") if "__main__" in p.read_text()]  # not measurement.py
    assert len(scripts) >= 9
    for script in scripts:
        text = script.read_text()
        main = text[text.index("\ndef main("):]
        assert "enable_expandable_segments()" in main or "train_mfu.main(" in main, script.name


# --- out of memory ---------------------------------------------------------------------------------


_TORCH_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
              "1.06 GiB is free.\nIncluding non-PyTorch memory, this process has 78.12 GiB memory in use.")


def _estimate(peak_gib: float, budget_gb: float) -> dict:
    return {"gpu_peak_bytes": peak_gib * GIB, "gpu_budget_bytes": budget_gb * 1e9,
            "gpu_budget_source": "cuda:0 NVIDIA H100 80GB HBM3 85.0 GB, less ...",
            "gpu_context_bytes": 1.45e9, "reserved_over_estimate": 0.041}


def test_out_of_memory_in_a_training_step_is_one_line_saying_what_to_change(tmp_path, monkeypatch):
    from test_trainer_toy import RowsDataset, make_module, token_rows, toy_plan

    from dimshard.runtime.training.config import TrainConfig
    from dimshard.runtime.training.loop import train

    plan = {**toy_plan(1), "estimate": _estimate(64.6, 79.9)}
    ctx, module = make_module(plan)
    calls = []
    forward = module.forward

    def forward_that_runs_out(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError(_TORCH_OOM)
        return forward(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward_that_runs_out)
    peaks = {"allocated": 76.3 * GIB, "reserved": 76.6 * GIB, "total": 79.19 * GIB, "usable": 77.8 * GIB}
    monkeypatch.setattr(gpu_memory, "measured_peaks", lambda device: peaks)
    config = TrainConfig(plan_ngpus=1, runtime_ngpus=1, micro_batch_size=2, max_steps=3, checkpoint_dir="",
                         dump_dir=str(tmp_path / "dump"))
    with pytest.raises(GpuOutOfMemory) as raised:
        train(config, module, ctx, RowsDataset(token_rows()), plan)
    message = str(raised.value)
    assert "\n" not in message and raised.value.__cause__ is None
    assert message.startswith("CUDA out of memory (rank 0, step 2, tried to allocate 2.00 GiB)")
    assert "the plan's estimate is 64.60 GiB per GPU (budget 79.9 GB: cuda:0 NVIDIA H100" in message
    assert "measured peak 76.30 GiB allocated, 76.60 GiB reserved, of 79.19 GiB" in message
    # The run needed 78.6 GiB where 77.8 fit: the estimate scaled down, in steps of 0.5 GB.
    suggested = math.floor(2 * 64.6 * GIB / 1e9 * 77.8 / (76.6 + 2.0)) / 2
    assert f"recompile with a lower --memory_budget_gb (e.g. {suggested:g}" in message


def test_out_of_memory_message_names_a_budget_above_the_card(monkeypatch):
    monkeypatch.delenv(ALLOC_CONF, raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    peaks = {"allocated": 76.3 * GIB, "reserved": 76.57 * GIB, "total": 79.19 * GIB, "usable": 77.8 * GIB}
    message = out_of_memory_message({"estimate": _estimate(118.22, 200.0)}, torch.cuda.OutOfMemoryError(_TORCH_OOM),
                                    peaks, rank=3, step=1)
    card = (79.19 * GIB - 1.45e9) / 1.041
    assert f"the budget is above the {card / 1e9:.1f} GB this card holds" in message
    assert f"(e.g. {math.floor(2 * card / 1e9) / 2:g}:" in message
    assert f"{ALLOC_CONF}={EXPANDABLE_SEGMENTS}" in message  # not set here: the message says to
    old = out_of_memory_message({}, torch.cuda.OutOfMemoryError("CUDA out of memory."), None)
    assert "holds no memory estimate" in old and "--memory_budget_gb" in old

