"""GradReducer + ZeroAdamW on the toy module against torch.optim.AdamW on the full model."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from test_trainer_toy import (
    RowsDataset,
    make_module,
    reference_run,
    token_rows,
    toy_plan,
)

from dimshard.runtime.data.prepared import MicroBatchStream
from dimshard.runtime.module import take_slice
from dimshard.runtime.optimizer.grad_reducer import GradReducer
from dimshard.runtime.optimizer.zero_adamw import ZeroAdamW

STEPS, LR, WD, BETAS = 3, 1e-2, 0.1, (0.9, 0.95)


def _train(setup: dict) -> dict:
    """Train the toy for STEPS with the runtime's reducer and optimizer; report what it saw."""
    plan = toy_plan(setup["plan_ngpus"], setup["micro_batch_size"])
    ctx, module = make_module(plan)
    local = module.local_parameters()
    optimizer = ZeroAdamW(local, ctx, betas=BETAS, weight_decay=WD, zero=setup.get("zero", True),
                          param_dtype=setup.get("param_dtype"), **setup.get("optimizer_kwargs", {}))
    reducer = GradReducer(local, ctx, bucket_size_mb=setup.get("bucket_size_mb", 25.0),
                          keep_param_dtype=setup.get("keep_param_dtype", False))
    stream = MicroBatchStream(RowsDataset(token_rows()), micro_batch_size=setup["micro_batch_size"],
                              dp_size=ctx.dp_size, copy_index=ctx.copy_index, seed=0)
    accumulation = setup["accumulation"]
    losses, norms, skipped, launched = [], [], [], []
    before = {lp.name: lp.param.detach().clone() for lp in local}
    for step in range(STEPS):
        loss_sum = torch.zeros(())
        for k in range(accumulation):
            batch = next(stream)
            with contextlib.nullcontext() if k == accumulation - 1 else reducer.no_sync():
                loss = module(batch["input_ids"], batch["labels"])
                (loss / accumulation).backward()
            loss_sum += loss.detach().float() / accumulation
            launched.append(reducer.launched_buckets)
        grads = reducer.finish()
        if setup.get("inf_at_step") == step and ctx.rank == dist.get_world_size() - 1:
            grads[-1].view(-1)[0] = float("inf")  # one rank only: every rank must still skip
        result = optimizer.step(grads, LR, setup.get("clip"))
        reducer.zero_grad()
        dist.all_reduce(loss_sum)
        losses.append(float(loss_sum) / dist.get_world_size())
        norms.append(result.grad_norm)
        skipped.append(result.skipped)
        if setup.get("inf_at_step") == step:
            after_skip = {lp.name: lp.param.detach().clone() for lp in local}
            assert all(torch.equal(before[n], after_skip[n]) for n in before), "a skipped step changed parameters"
        before = {lp.name: lp.param.detach().clone() for lp in local}
    masters = {}
    if optimizer.keep_master:
        tensors, meta = optimizer.state_dict()
        masters = {p["name"]: (p["flat_range"], tensors[f"master.{p['name']}"]) for p in meta["pieces"]}
    return {
        "losses": losses, "norms": norms, "skipped": skipped, "skipped_steps": optimizer.skipped_steps,
        "shards": {lp.name: (lp.slices, lp.param.detach().clone()) for lp in local},
        "masters": masters, "grad_dtypes": {str(g.dtype) for g in reducer.grads}, "launched": launched,
        "grad_dtype_by_name": {lp.name: str(g.dtype) for lp, g in zip(local, reducer.grads)},
    }


def _check_against_reference(results: list[dict], reference, tolerance: float = 1e-5) -> None:
    losses, norms, state = reference[0], reference[1], reference[2]
    for result in results:
        assert result["losses"] == pytest.approx(losses, abs=tolerance)
        assert result["norms"] == pytest.approx(norms, rel=1e-5)
        for name, (slices, shard) in result["shards"].items():
            diff = (shard.float() - take_slice(state[name], slices)).abs().max().item()
            assert diff <= tolerance, f"{name}: max abs diff {diff}"


def _worlds(world_size: int, setups: list[dict]) -> list[list[dict]]:
    return run_distributed(_run_setups, world_size, setups, timeout_s=90)


def _run_setups(setups: list[dict]) -> list[dict]:
    return [_train(setup) for setup in setups]


def test_equals_torch_adamw_two_processes_with_and_without_accumulation():
    rows = token_rows()
    clip_free = reference_run(rows, steps=STEPS, global_batch=4, lr=LR, weight_decay=WD, betas=BETAS)
    clip = 0.5 * min(clip_free[1])  # forces clipping at every step
    clipped = reference_run(rows, steps=STEPS, global_batch=4, lr=LR, weight_decay=WD, betas=BETAS, clip=clip)
    assert max(clipped[1]) > clip
    setups = [
        # dp_size 1 (plan_ngpus 2), 2 micro-batches of 2 accumulated
        {"plan_ngpus": 2, "micro_batch_size": 2, "accumulation": 2},
        # dp_size 2 (plan_ngpus 1), one micro-batch of 2 per copy; buckets of a few elements
        {"plan_ngpus": 1, "micro_batch_size": 2, "accumulation": 1, "bucket_size_mb": 0.0005},
        # dp_size 2 with accumulation and ZeRO off
        {"plan_ngpus": 1, "micro_batch_size": 1, "accumulation": 2, "zero": False},
        # clipping, dp_size 2 and dp_size 1
        {"plan_ngpus": 1, "micro_batch_size": 2, "accumulation": 1, "clip": clip},
        {"plan_ngpus": 2, "micro_batch_size": 4, "accumulation": 1, "clip": clip},
    ]
    per_rank = _worlds(2, setups)
    for index, setup in enumerate(setups):
        reference = clipped if "clip" in setup else clip_free
        _check_against_reference([rank_results[index] for rank_results in per_rank], reference)
        for rank_results in per_rank:
            assert rank_results[index]["grad_dtypes"] == {"torch.float32"}
            # Buckets are launched by the backward hooks, before finish(): all of them after the
            # synchronizing micro-step, none after a no_sync one.
            launched = rank_results[index]["launched"]
            total = launched[0][1]
            expected = [(0 if (i + 1) % setup["accumulation"] else total, total) for i in range(len(launched))]
            assert launched == expected
            assert setup.get("bucket_size_mb", 25.0) > 1 or total > 4


def test_equals_torch_adamw_four_processes():
    reference = reference_run(token_rows(), steps=STEPS, global_batch=4, lr=LR, weight_decay=WD, betas=BETAS)
    setups = [
        {"plan_ngpus": 2, "micro_batch_size": 1, "accumulation": 2},  # dp 2 x tp 2, accumulation
        {"plan_ngpus": 4, "micro_batch_size": 2, "accumulation": 2, "bucket_size_mb": 0.0002},  # tp 4
        {"plan_ngpus": 1, "micro_batch_size": 1, "accumulation": 1},  # dp 4
    ]
    per_rank = _worlds(4, setups)
    for index in range(len(setups)):
        _check_against_reference([rank_results[index] for rank_results in per_rank], reference)


def test_skips_step_on_non_finite_grad_norm_and_bf16_keeps_fp32_masters():
    reference = reference_run(token_rows(), steps=STEPS, global_batch=4, lr=LR, weight_decay=WD, betas=BETAS)
    skipped_reference = reference_run(token_rows(), steps=STEPS, global_batch=4, lr=LR, weight_decay=WD,
                                      betas=BETAS, skip_steps=(1,))
    setups = [
        {"plan_ngpus": 1, "micro_batch_size": 2, "accumulation": 1, "inf_at_step": 1},
        {"plan_ngpus": 2, "micro_batch_size": 2, "accumulation": 2, "param_dtype": torch.bfloat16},
    ]
    per_rank = _worlds(2, setups)
    for rank_results in per_rank:
        skipping, bf16 = rank_results
        assert skipping["skipped"] == [False, True, False]
        assert skipping["skipped_steps"] == 1
        assert math.isinf(skipping["norms"][1])
        # The skipped step left nothing behind (no update, no Adam step count): the run equals a
        # reference that consumed step 1's batch without updating.
        assert skipping["norms"][::2] == pytest.approx(skipped_reference[1][::2], rel=1e-5)
        for name, (slices, shard) in skipping["shards"].items():
            assert (shard - take_slice(skipped_reference[2][name], slices)).abs().max().item() <= 1e-5
        # bf16 parameters: fp32 gradient buffers, parameters are the rounded fp32 masters, and
        # Adam's update size (~lr per step) bounds the distance to the fp32 reference.
        assert bf16["grad_dtypes"] == {"torch.float32"}
        for name, (slices, shard) in bf16["shards"].items():
            assert shard.dtype == torch.bfloat16
            flat_range, master = bf16["masters"][name]
            assert master.dtype == torch.float32
            assert torch.equal(shard.reshape(-1)[flat_range[0]:flat_range[1]], master.to(torch.bfloat16))
            full = take_slice(reference[2][name], slices).reshape(-1)[flat_range[0]:flat_range[1]]
            assert (master - full).abs().max().item() < 3 * LR
        assert bf16["losses"] == pytest.approx(reference[0], abs=2e-2)
