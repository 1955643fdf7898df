"""The debug check of collective order: consistent runs pass, a rank-dependent order is caught."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from dimshard.runtime.reliability.collective_order import CollectiveOrderError, compare_logs


def _swapped_groups(swap: bool) -> str:
    from dimshard.runtime.reliability import collective_order

    collective_order.enable()
    try:
        first, second = dist.new_group([0, 1]), dist.new_group([0, 1])
        x, y = torch.ones(4), torch.ones(2, 3)
        order = [(first, x), (second, y)]
        if swap and dist.get_rank() == 1:
            order.reverse()
        # async: gloo runs each group on its own thread, so the swapped order completes instead of hanging
        works = [dist.all_reduce(t, group=g, async_op=True) for g, t in order]
        for w in works:
            w.wait()
        try:
            n = collective_order.check_collective_order()
        except CollectiveOrderError as e:
            return f"error: {e}"
        return f"ok: {n}"
    finally:
        collective_order.disable()


@pytest.mark.slow
def test_same_order_passes_and_swapped_order_is_named():
    assert run_distributed(_swapped_groups, 2, False) == ["ok: 2", "ok: 2"]
    for message in run_distributed(_swapped_groups, 2, True):
        assert message.startswith("error: ranks 0 and 1 disagree at their collective #0"), message
        assert "allreduce on group [0, 1]" in message


def _plan_step_is_consistent(compile_dir: str, weights: str, input_ids: torch.Tensor) -> int:
    from parallel_harness import rank_step

    from dimshard.runtime.reliability import collective_order

    collective_order.enable()
    try:
        rank_step(compile_dir, weights, input_ids, "adamw", 1e-3)
        return collective_order.check_collective_order()
    finally:
        collective_order.disable()


@pytest.mark.slow
@pytest.mark.parametrize("policy,world", [("tp_sp", 2), ("tp", 4)])
def test_generated_plans_issue_collectives_in_one_order(tmp_path, policy, world):
    from parallel_harness import mini_llama_config, save_weights
    from transformers import LlamaForCausalLM

    from dimshard.planner import CompileConfig, compile_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(mini_llama_config())
    input_ids = torch.randint(0, 128, (2, 16))
    compile_model(model, {"input_ids": input_ids, "labels": input_ids.clone()}, tmp_path / "out",
                  CompileConfig(plan_ngpus=world, policy=policy, recompute="layer"))
    save_weights(model, tmp_path / "w.safetensors")
    counts = run_distributed(_plan_step_is_consistent, world, str(tmp_path / "out"),
                             str(tmp_path / "w.safetensors"), input_ids)
    assert all(n > 0 for n in counts), counts


def test_point_to_point_transfers_must_pair_up():
    shapes = (((4,), "float32"),)
    good = [[("p2p", 0, 1, shapes)], [("p2p", 0, 1, shapes)]]
    compare_logs(good)
    with pytest.raises(CollectiveOrderError, match="rank 0 sent rank 1"):
        compare_logs([[("p2p", 0, 1, shapes)], []])


def test_a_missing_collective_is_reported():
    event = ("collective", (0, 1), "allreduce", (((4,), "float32"),))
    with pytest.raises(CollectiveOrderError, match=r"rank 1 issued nothing"):
        compare_logs([[event], []])
    # Groups that do not hold both ranks of a pair are not compared for that pair.
    compare_logs([[("collective", (0,), "allreduce", ())], [], []])


def _trainer_checks_order(config, dataset_path: str) -> list[int]:
    from test_trainer_toy import SEQ, make_module, toy_plan

    from dimshard.runtime.data.prepared import load_token_dataset
    from dimshard.runtime.reliability import collective_order
    from dimshard.runtime.training import loop

    collective_order.enable()
    checked: list[int] = []

    def counting_check() -> int:
        checked.append(collective_order.check_collective_order())
        return checked[-1]

    loop.check_collective_order = counting_check
    try:
        plan = toy_plan(config.plan_ngpus, config.micro_batch_size)
        ctx, module = make_module(plan)
        loop.train(config, module, ctx, load_token_dataset(dataset_path, SEQ), plan)
        return checked
    finally:
        collective_order.disable()


@pytest.mark.slow
def test_trainer_checks_the_order_of_buckets_zero_and_logging_collectives(tmp_path):
    from test_trainer_toy import save_dataset, token_rows

    from dimshard.runtime.training.config import TrainConfig

    dataset = save_dataset(tmp_path / "data", token_rows())
    # 2 copies of a 2-rank plan: activation collectives, gradient buckets, ZeRO-1's all-gather.
    config = TrainConfig(plan_ngpus=2, runtime_ngpus=4, micro_batch_size=1, grad_accumulation_steps=2, max_steps=3,
                         lr=1e-2, checkpoint_dir="", dump_dir=str(tmp_path / "dump"), peak_tflops=1e-6,
                         log_interval=1)
    checked = run_distributed(_trainer_checks_order, 4, config, dataset, timeout_s=120)
    for per_rank in checked:
        assert len(per_rank) == 3 and all(n > 0 for n in per_rank), checked
