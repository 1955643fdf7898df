"""Gradients kept in the parameter dtype for single-holder shards: the same training as fp32 buffers.

With one micro-batch per step and no reduction, an fp32 gradient buffer only holds the widened
autograd gradient, so keeping it in bf16 must change nothing: losses, gradient norms, parameters
and fp32 masters equal those of fp32 buffers, with clipping active, on every update path (device,
offloaded to the CPU, offloaded and streamed through the device), with widening cut into small
batches and chunks.
"""

from __future__ import annotations

import pytest
import torch
from test_trainer_optimizer import _worlds
from test_trainer_toy import make_module, toy_plan

from dimshard.runtime.optimizer.grad_reducer import GradReducer

UPDATE_PATHS = [
    {"widen_numel": 5},
    {"offload": True, "update_device": "cpu", "offload_chunk_numel": 7},
    {"offload": True, "update_device": "gpu", "offload_chunk_numel": 7},
]


def _setups(plan_ngpus: int) -> list[dict]:
    setups = []
    for kwargs in UPDATE_PATHS:
        for keep in (False, True):
            setups.append({"plan_ngpus": plan_ngpus, "micro_batch_size": 4, "accumulation": 1,
                           "param_dtype": torch.bfloat16, "clip": 0.05, "keep_param_dtype": keep,
                           "optimizer_kwargs": kwargs})
    return setups


def _assert_same_training(fp32_buffers: dict, kept: dict) -> None:
    assert kept["losses"] == fp32_buffers["losses"]
    assert kept["norms"] == pytest.approx(fp32_buffers["norms"], rel=1e-6)
    assert max(kept["norms"]) > 0.05  # clipping was active
    for name, (_, shard) in fp32_buffers["shards"].items():
        assert torch.equal(kept["shards"][name][1], shard), name
    assert fp32_buffers["masters"].keys() == kept["masters"].keys()
    for name, (_, master) in fp32_buffers["masters"].items():
        assert torch.equal(kept["masters"][name][1], master), name


def test_one_process_keeps_bf16_gradients_and_trains_identically():
    (results,) = _worlds(1, _setups(1))
    for fp32_buffers, kept in zip(results[::2], results[1::2]):
        assert fp32_buffers["grad_dtypes"] == {"torch.float32"}
        assert kept["grad_dtypes"] == {"torch.bfloat16"}
        _assert_same_training(fp32_buffers, kept)


def test_split_shards_keep_bf16_and_replicated_ones_stay_fp32():
    # Two unit ranks of one copy: split shards have one holder, replicated ones two (summed).
    for results in _worlds(2, _setups(2)):
        for fp32_buffers, kept in zip(results[::2], results[1::2]):
            dtypes = kept["grad_dtype_by_name"]
            assert dtypes["fc1.weight"] == dtypes["fc2.weight"] == "torch.bfloat16"
            assert dtypes["embed.weight"] == dtypes["norm.weight"] == "torch.float32"
            _assert_same_training(fp32_buffers, kept)


def test_data_parallel_copies_keep_fp32_gradients():
    setup = {"plan_ngpus": 1, "micro_batch_size": 2, "accumulation": 1, "param_dtype": torch.bfloat16,
             "keep_param_dtype": True}
    for (result,) in _worlds(2, [setup]):
        assert result["grad_dtypes"] == {"torch.float32"}  # averaged over the two copies


def _accumulate_with_kept_dtype(_: None) -> str:
    ctx, module = make_module(toy_plan(1))
    for lp in module.local_parameters():
        lp.param.data = lp.param.data.to(torch.bfloat16)
    reducer = GradReducer(module.local_parameters(), ctx, keep_param_dtype=True)
    try:
        with reducer.no_sync():
            pass
    except RuntimeError as error:
        return str(error)
    return ""


def test_accumulation_is_refused_when_gradients_keep_the_parameter_dtype():
    (message,) = _worlds_fn(_accumulate_with_kept_dtype)
    assert "cannot accumulate micro-batches" in message


def _worlds_fn(fn):
    from dist_utils import run_distributed

    return run_distributed(fn, 1, None, timeout_s=60)


def test_plan_prices_and_records_the_gradient_dtype(tmp_path):
    import json
    import warnings

    from parallel_harness import mini_llama_config
    from transformers import LlamaForCausalLM

    from dimshard.planner import CompileConfig, compile_model
    from dimshard.planner.cost.model import estimate
    from dimshard.planner.plan.placements import PlanError
    from dimshard.runtime.optimizer.grad_reducer import keeps_param_dtype

    torch.manual_seed(0)
    model = LlamaForCausalLM(mini_llama_config())
    ids = torch.randint(0, 128, (1, 16))
    inputs = {"input_ids": ids, "labels": ids.clone()}
    results = {}
    for steps in (1, 3):
        config = CompileConfig(plan_ngpus=1, policy="dp", param_dtype=torch.bfloat16,
                               policy_options={"grad_accumulation_steps": steps})
        results[steps] = compile_model(model, inputs, tmp_path / str(steps), config)
    plans = {k: json.loads((tmp_path / str(k) / "plan.json").read_text()) for k in results}
    assert plans[1]["gradients"] == {"param_dtype_single_holder": True}
    assert plans[3]["gradients"] == {"param_dtype_single_holder": False}

    # One GPU, bf16: 2 bytes per element without accumulation, 4 with it (fp32 sums).
    r = results[1]
    numel = sum(r.graph.tensors[t].numel for t in r.graph.parameters.values())
    one = estimate(r.graph, r.resolved, "cpu", accumulation=1).memory["gradients"]
    three = estimate(r.graph, r.resolved, "cpu", accumulation=3).memory["gradients"]
    copies = estimate(r.graph, r.resolved, "cpu", dp_size=2, accumulation=1).memory["gradients"]
    assert (one, three, copies) == (2 * numel, 4 * numel, 4 * numel)

    with pytest.raises(PlanError, match="grad_accumulation_steps must be a positive integer"):
        compile_model(model, inputs, tmp_path / "bad",
                      CompileConfig(plan_ngpus=1, policy="dp", policy_options={"grad_accumulation_steps": 0}))

    # The runtime follows the plan for one micro-batch; with accumulation it keeps fp32 and says so.
    assert keeps_param_dtype(plans[1], 1) and not keeps_param_dtype(plans[3], 1) and not keeps_param_dtype({}, 1)
    with pytest.warns(UserWarning, match="grad_accumulation_steps=4"):
        assert not keeps_param_dtype(plans[1], 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not keeps_param_dtype(plans[3], 4)
