"""The ``auto`` policy: exact search, plans that run correctly, memory budgets, and Llama-3-8B at 128K tokens."""

from __future__ import annotations

import copy
import itertools
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from parallel_harness import (
    assert_matches_reference,
    mini_llama_config,
    rank_step,
    reference_step,
    save_weights,
)

from dimshard.planner import CompileConfig, compile_model, register_op, trace
from dimshard.planner.codegen.report import model_mfu, write_plan_report
from dimshard.planner.cost.model import GB
from dimshard.planner.graph.layers import layer_structure
from dimshard.planner.plan.placements import PlanError, Shard
from dimshard.planner.search.auto import auto, search
from dimshard.planner.search.policies import POLICIES, PolicyContext
from dimshard.planner.search.solver import minimize

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mini_graph():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(mini_llama_config())
    ids = torch.randint(0, 128, (4, 16))
    return trace(model, {"input_ids": ids, "labels": ids.clone()})


def test_minimize_is_exact_on_random_factor_graphs():
    rng = np.random.default_rng(0)
    for _ in range(20):
        sizes = list(rng.integers(1, 5, size=6))
        factors = []
        for _ in range(8):
            scope = tuple(sorted(rng.choice(6, size=int(rng.integers(1, 4)), replace=False).tolist()))
            factors.append((scope, rng.random([sizes[v] for v in scope])))
        assignment, value = minimize(sizes, factors)
        brute = min(sum(t[tuple(a[v] for v in s)] for s, t in factors)
                    for a in itertools.product(*[range(n) for n in sizes]))
        assert value == pytest.approx(brute, rel=1e-5)
        assert sum(t[tuple(assignment[v] for v in s)] for s, t in factors) == pytest.approx(value, rel=1e-6)


def test_layers_share_one_plan(mini_graph):
    st = layer_structure(mini_graph)
    assert st is not None and st.scopes == ["model.layers.0", "model.layers.1"]
    assert st.inputs[1] == st.outputs[0]  # the residual stream links the layers
    plan = auto(mini_graph, PolicyContext(2, "none", None, {"hw_profile": "h100"}))
    for j in range(st.length):
        assert plan.split_of(st.starts[0] + j) == plan.split_of(st.starts[1] + j)
    assert plan.name == "auto" and "auto" in POLICIES
    # Provenance: the plan carries the search that chose it, and its runner-ups.
    assert plan.search.best.plan is plan and plan.runner_ups == plan.search.candidates[1:]
    assert all(c.estimate.step_s >= plan.search.best.estimate.step_s for c in plan.runner_ups)
    builtin = POLICIES["tp"](mini_graph, PolicyContext(2))
    assert builtin.name == "tp" and builtin.search is None and builtin.runner_ups == []


def _peak_gb(graph, plan_ngpus: int) -> float:
    return search(graph, PolicyContext(plan_ngpus, "auto", None, {"hw_profile": "h100"})).best.estimate.peak_gb


CASES = [
    # (plan_ngpus, recompute, budget as a fraction of the unconstrained peak, extra)
    (2, "auto", None, {}),
    (4, "auto", 0.6, {}),  # tight: needs recompute and more splitting
    (4, "auto", 0.8, {"mesh_shapes": [(2, 2)]}),  # a 2-D mesh (unconstrained, this toy runs fastest replicated)
]


@pytest.mark.parametrize("plan_ngpus,recompute,budget_fraction,extra", CASES)
def test_auto_plan_matches_single_process(tmp_path, mini_graph, plan_ngpus, recompute, budget_fraction, extra):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(mini_llama_config())
    input_ids = torch.randint(0, 128, (4, 16))
    budget = None if budget_fraction is None else budget_fraction * _peak_gb(mini_graph, plan_ngpus)
    config = CompileConfig(plan_ngpus=plan_ngpus, policy="auto", recompute=recompute, memory_budget_gb=budget,
                           hw_profile="h100", policy_options=extra)
    result = compile_model(model, {"input_ids": input_ids, "labels": input_ids.clone()}, tmp_path / "out", config)
    sharded = [t for t in result.graph.parameters.values()
               if any(isinstance(p, Shard) for p in result.resolved.stored[t])]
    assert sharded, "the plan splits no parameter: the check would not exercise a parallel plan"
    if extra.get("mesh_shapes"):
        assert result.plan.mesh.shape == (2, 2)
        assert all(any(split[axis] for split in result.plan.splits.values()) for axis in range(2))
    save_weights(model, tmp_path / "weights.safetensors")
    ref = reference_step(copy.deepcopy(model), input_ids, "adamw", 1e-3)
    results = run_distributed(rank_step, plan_ngpus, str(tmp_path / "out"), str(tmp_path / "weights.safetensors"),
                              input_ids, "adamw", 1e-3)
    assert_matches_reference(results, ref, TOL)


def test_tiny_budget_recomputes_or_splits_more(mini_graph):
    free = search(mini_graph, PolicyContext(4, "auto", None, {"hw_profile": "h100"})).best
    budget_gb = 0.6 * free.estimate.peak_gb
    tight = search(mini_graph, PolicyContext(4, "auto", budget_gb, {"hw_profile": "h100"})).best
    assert not free.plan.recompute_scopes  # recompute only costs time when memory is free
    assert tight.estimate.peak_bytes <= budget_gb * GB < free.estimate.peak_bytes
    assert tight.estimate.step_s >= free.estimate.step_s
    more_split = tight.estimate.memory["parameters"] < free.estimate.memory["parameters"] or \
        tight.estimate.memory["activations"] < free.estimate.memory["activations"]
    assert tight.plan.recompute_scopes or more_split


def test_impossible_budget_names_the_smallest_reachable_peak(mini_graph):
    ctx = PolicyContext(2, "auto", 1e-6, {"hw_profile": "h100"})
    with pytest.raises(PlanError, match=r"smallest plan found needs .* GB per GPU, budget is 1e-06 GB") as info:
        auto(mini_graph, ctx)
    smallest = float(re.search(r"needs ([0-9.e-]+) GB", str(info.value)).group(1))
    assert "plan_ngpus" in str(info.value) and "sequence_length" in str(info.value)
    # The number is what the search can actually reach: just above it fits, just below it does not.
    assert search(mini_graph, PolicyContext(2, "auto", smallest * 1.01, {"hw_profile": "h100"})).best.feasible
    with pytest.raises(PlanError):
        search(mini_graph, PolicyContext(2, "auto", smallest * 0.99, {"hw_profile": "h100"}))
    with pytest.raises(PlanError, match="enable recompute"):
        auto(mini_graph, PolicyContext(2, "none", 1e-6, {"hw_profile": "h100"}))


def test_report_explains_builtin_and_auto_plans(tmp_path, mini_graph):
    from dimshard.planner.plan.resolve import resolve_placements

    ctx = PolicyContext(2, "layer", None, {"hw_profile": "h100"})
    resolved = resolve_placements(mini_graph, POLICIES["tp_sp"](mini_graph, ctx))
    text = write_plan_report(mini_graph, resolved, ctx, tmp_path / "plan_report.md")
    assert (tmp_path / "plan_report.md").read_text() == text
    for heading in ("## Mesh", "## Estimated step", "## Peak memory per GPU", "## Splits of", "## Collectives of"):
        assert heading in text
    assert "reduce_scatter" in text and "all_gather" in text and "every decoder layer (2)" in text
    ctx = PolicyContext(4, "auto", None, {"hw_profile": "h100"})
    resolved = resolve_placements(mini_graph, auto(mini_graph, ctx))
    text = write_plan_report(mini_graph, resolved, ctx, tmp_path / "auto.md")
    assert "## Runner-up plans" in text and "exact solves" in text


# --- Llama-3-8B at 131072 tokens on 8 GPUs ---------------------------------------------------


@register_op("b l d^, n^ d^, b l -> b l")
def chunked_cross_entropy_standin(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                  padding_idx: int, chunk_size: int = 1024) -> torch.Tensor:
    """Per-token loss of ``hidden @ weight.T`` (the real kernel never holds more than one chunk of logits)."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=padding_idx,
                           reduction="none").view(labels.shape)


def _chunked_loss_op():
    try:
        from dimshard.kernels import chunk_linear_cross_entropy
    except ImportError:
        return chunked_cross_entropy_standin
    return chunk_linear_cross_entropy


class ChunkedLossLlama(torch.nn.Module):
    """The training job's wrapper: decoder, then the chunked cross-entropy on shifted labels."""

    def __init__(self, causal_lm: torch.nn.Module, chunk_size: int = 4096) -> None:
        super().__init__()
        self.model, self.lm_head, self.chunk_size = causal_lm.model, causal_lm.lm_head, chunk_size
        self.loss_op = _chunked_loss_op()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids).last_hidden_state
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
        losses = self.loss_op(hidden, self.lm_head.weight, shifted, -100, self.chunk_size)
        return losses.sum() / (shifted != -100).sum()


def test_llama3_8b_128k_on_8_gpus_plans_within_80gb(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((ROOT / "examples/llama3_128k/configs/llama3_8b.json").read_text())
    config = LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        causal_lm = LlamaForCausalLM(config).to(torch.bfloat16)
    # Rotary tables are computed for real during tracing: rebuild that module (and its buffers) on the CPU.
    causal_lm.model.rotary_emb = type(causal_lm.model.rotary_emb)(config=config)
    ids = torch.zeros(1, 131072, dtype=torch.long)
    start = time.perf_counter()
    config = CompileConfig(plan_ngpus=8, policy="auto", recompute="auto", param_dtype=torch.bfloat16,
                           memory_budget_gb=80.0, hw_profile="h100")
    result = compile_model(ChunkedLossLlama(causal_lm), {"input_ids": ids, "labels": ids.clone()}, tmp_path / "out",
                           config)
    seconds = time.perf_counter() - start
    print((tmp_path / "out" / "plan_report.md").read_text())
    best = result.plan.search.best
    mfu = model_mfu(result.graph, best.estimate, 8)
    print(f"compile {seconds:.1f} s; {best.estimate.summary()}; estimated MFU {mfu * 100:.1f}%")
    assert best.estimate.peak_bytes <= 80 * GB
    assert len(list((tmp_path / "out" / "gencode").glob("rank*.py"))) == 8


# --- the GPU benchmark's CPU path ------------------------------------------------------------


def test_plan_accuracy_cpu_smoke_run(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "records.jsonl"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/plan_accuracy.py"), "--device", "cpu", "--steps", "1",
                    "--warmup", "1", "--num_layers", "2", "--recompute", "none,layer",
                    "--compile_dir", str(tmp_path / "compile"), "--json_out", str(out)], check=True, timeout=120)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["recompute"] for r in records] == ["none", "layer"]
    assert records[1]["recompute_layers"] == 2 and records[0]["recompute_layers"] == 0
    for r in records:
        assert r["estimated_s"] > 0 and r["measured_s"] > 0 and np.isfinite(r["loss"])
    # Recomputing adds a forward pass to the estimate.
    assert records[1]["estimated_compute_s"] > records[0]["estimated_compute_s"]
    help_text = subprocess.run([sys.executable, str(ROOT / "benchmarks/plan_accuracy.py"), "--help"], check=True,
                               capture_output=True, text=True).stdout
    assert "--seq_lens" in help_text and "--device" in help_text


def test_train_mfu_cpu_smoke_run(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/train_mfu.py"), "--device", "cpu", "--num_layers", "2",
                          "--seq_len", "32", "--hidden_size", "64", "--intermediate_size", "128", "--num_heads", "4",
                          "--num_kv_heads", "2", "--vocab_size", "256", "--steps", "1", "--warmup", "1",
                          "--no-fused_kernels", "--compile_dir", str(tmp_path / "compile")],
                         check=True, capture_output=True, text=True, timeout=300)
    record = json.loads(run.stdout.strip().splitlines()[-1])
    assert record["gpu"] == "cpu" and record["policy"] == "dp" and record["step_s"] > 0
    assert record["tokens_per_s"] > 0 and record["mfu"] >= 0 and np.isfinite(record["loss"])


def test_layers_that_also_feed_the_loss_their_router_logits_are_still_repeated_layers():
    # A mixture-of-experts layer writes its router's logits for the load-balancing loss: a side output
    # only the epilogue reads. The layers still repeat, so auto solves one layer's problem.
    from test_moe_families import moe_models

    from dimshard.planner.graph.hf import chunked_causal_lm_forward

    _, model = moe_models("mixtral", aux_loss=True)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    graph = trace(model, {"input_ids": ids, "labels": ids.clone()}, forward_fn=chunked_causal_lm_forward())
    structure = layer_structure(graph)
    assert structure is not None and len(structure.scopes) == model.config.num_hidden_layers >= 2
    # Each layer's residual is what the next layer reads; the router logits are not among the outputs.
    for i in range(1, len(structure.scopes)):
        assert structure.inputs[i] == structure.outputs[i - 1]
