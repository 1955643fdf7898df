"""The training loop end to end on the toy module, and the data stream."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from dist_utils import run_distributed
from test_trainer_toy import (
    SEQ,
    RowsDataset,
    make_module,
    reference_run,
    save_dataset,
    token_rows,
    toy_plan,
)

from dimshard.runtime.data.prepared import MicroBatchStream, load_token_dataset
from dimshard.runtime.training.config import TrainConfig
from dimshard.runtime.training.loop import train
from dimshard.runtime.training.metrics import MetricsLogger, model_flops_utilization


def _train(config: TrainConfig, dataset_path: str) -> list[dict]:
    plan = toy_plan(config.plan_ngpus, config.micro_batch_size)
    ctx, module = make_module(plan)
    result = train(config, module, ctx, load_token_dataset(dataset_path, SEQ), plan)
    return result.records


def test_train_logs_global_mean_loss_equal_to_single_process_reference(tmp_path):
    rows = token_rows()
    dataset = save_dataset(tmp_path / "data", rows)
    config = TrainConfig(
        plan_ngpus=2, runtime_ngpus=4, micro_batch_size=1, grad_accumulation_steps=2, max_steps=4, lr=1e-2,
        warmup_steps=1, lr_schedule="cosine", min_lr_ratio=0.0, weight_decay=0.1, clip_grad_norm=1.0,
        checkpoint_dir="", dump_dir=str(tmp_path / "dump"), peak_tflops=1e-6, log_interval=1,
    )
    losses, norms, *_ = reference_run(rows, steps=4, global_batch=4, lr=1e-2, warmup_steps=1, schedule="cosine",
                                      weight_decay=0.1, clip=1.0)
    records = run_distributed(_train, 4, config, dataset, timeout_s=90)
    assert all(r == records[0] for r in records)  # the same record values on every rank
    assert [r["loss"] for r in records[0]] == pytest.approx(losses, abs=1e-5)
    assert [r["grad_norm"] for r in records[0]] == pytest.approx(norms, rel=1e-5)
    assert [r["step"] for r in records[0]] == [1, 2, 3, 4]
    written = [json.loads(line) for line in (tmp_path / "dump" / "metrics.jsonl").read_text().splitlines()]
    assert written == records[0]
    for record in written:
        assert set(record) == {"step", "loss", "grad_norm", "lr", "tokens_per_s", "mfu", "peak_mem_gb",
                               "skipped_steps"}
        assert record["tokens_per_s"] > 0 and record["peak_mem_gb"] > 0 and record["skipped_steps"] == 0
        sequences_per_s = record["tokens_per_s"] / SEQ
        expected_mfu = model_flops_utilization(sequences_per_s, toy_plan(2)["model_stats"], 4, 1e-6)
        assert record["mfu"] == pytest.approx(expected_mfu)


def test_train_rejects_a_config_that_does_not_match_the_compile_output(tmp_path):
    dataset = save_dataset(tmp_path / "data", token_rows())
    config = TrainConfig(plan_ngpus=1, runtime_ngpus=1, micro_batch_size=3, checkpoint_dir="",
                         dump_dir=str(tmp_path / "dump"))
    plan = toy_plan(1, micro_batch_size=2)
    ctx, module = make_module(plan)
    with pytest.raises(ValueError, match="--micro_batch_size 3"):
        train(config, module, ctx, load_token_dataset(dataset), plan)
    with pytest.raises(ValueError, match="--runtime_ngpus 2"):
        train(TrainConfig(plan_ngpus=1, runtime_ngpus=2, micro_batch_size=2), module, ctx,
              load_token_dataset(dataset), plan)


def test_dataset_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="bookcorpus.py"):
        load_token_dataset(str(tmp_path / "missing"))
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(ValueError, match="no input_ids column"):
        load_token_dataset(str(tmp_path / "text"))
    path = save_dataset(tmp_path / "data", token_rows(4))
    with pytest.raises(ValueError, match="--sequence_length 16"):
        load_token_dataset(path, sequence_length=16)
    assert len(load_token_dataset(path, sequence_length=SEQ)) == 4


def test_stream_splits_rounds_over_copies_and_resumes():
    rows = RowsDataset(token_rows(10))
    single = MicroBatchStream(rows, micro_batch_size=4, dp_size=1, copy_index=0, seed=3)
    copies = [MicroBatchStream(rows, micro_batch_size=2, dp_size=2, copy_index=c, seed=3) for c in range(2)]
    for _ in range(5):  # 10 rows, rounds of 4: epoch 0 has 2 rounds, then a new order
        whole = next(single)["input_ids"]
        parts = [next(copy) for copy in copies]
        assert torch.equal(torch.cat([p["input_ids"] for p in parts]), whole)
        assert all(p["labels"] is p["input_ids"] and p["input_ids"].dtype == torch.long for p in parts)
        assert copies[0].state_dict() == copies[1].state_dict() == single.state_dict()
    assert single.state_dict()["epoch"] == 2
    resumed = MicroBatchStream(rows, micro_batch_size=2, dp_size=2, copy_index=1, seed=3)
    resumed.load_state_dict(copies[1].state_dict())
    assert all(torch.equal(next(resumed)["input_ids"], next(copies[1])["input_ids"]) for _ in range(3))
    with pytest.raises(ValueError, match="--seed 3"):
        MicroBatchStream(rows, micro_batch_size=2, dp_size=2, copy_index=0, seed=4).load_state_dict(
            copies[0].state_dict())


def test_metrics_logger_writes_jsonl_and_lines(tmp_path, capsys):
    logger = MetricsLogger(tmp_path / "dump", enabled=True, total_steps=3, tensorboard=False)
    records = [{"step": 1, "loss": 2.5, "mfu": None}, {"step": 2, "loss": 2.25, "mfu": 0.5}]
    for record in records:
        logger.advance()
        logger.log(record)
    logger.close()
    lines = (tmp_path / "dump" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    if not sys.stderr.isatty():  # under pytest: plain lines instead of a progress bar
        assert "step 2 loss=2.25 mfu=0.5" in capsys.readouterr().out
    silent = MetricsLogger(tmp_path / "other", enabled=False, total_steps=3)
    silent.log(records[0])
    assert not (tmp_path / "other").exists()
