"""Sharded checkpoints: atomic visibility, bit-exact resume after a crash, corrupt shards refused."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch.distributed as dist
from dist_utils import run_distributed
from test_trainer_toy import SEQ, make_module, save_dataset, token_rows, toy_plan

from dimshard.runtime.checkpointing import commit, sharded
from dimshard.runtime.checkpointing.commit import CheckpointError
from dimshard.runtime.checkpointing.sharded import load_checkpoint
from dimshard.runtime.data.prepared import load_token_dataset
from dimshard.runtime.optimizer.zero_adamw import ZeroAdamW
from dimshard.runtime.training.config import TrainConfig
from dimshard.runtime.training.loop import train


def _config(tmp_path, name: str, **overrides) -> TrainConfig:
    values = {
        "plan_ngpus": 2, "runtime_ngpus": 4, "micro_batch_size": 2, "grad_accumulation_steps": 1, "max_steps": 6,
        "lr": 1e-2, "warmup_steps": 2, "lr_schedule": "cosine", "weight_decay": 0.1, "dtype": "bf16",
        "checkpoint_dir": str(tmp_path / name / "ckpt"), "checkpoint_interval": 2, "keep_last_checkpoints": 2,
        "dump_dir": str(tmp_path / name / "dump"), "log_interval": 1,
    }
    values.update(overrides)
    return TrainConfig(**values)


def _train(config: TrainConfig, dataset_path: str, crash_at_save: int | None = None) -> dict:
    if crash_at_save is not None:
        calls = []
        real_save_file = sharded.save_file

        def save_file(*args, **kwargs):
            calls.append(1)
            if len(calls) == crash_at_save and dist.get_rank() == 1:
                os._exit(1)  # a killed process: no exception handling, no cleanup
            return real_save_file(*args, **kwargs)

        sharded.save_file = save_file
    plan = toy_plan(config.plan_ngpus, config.micro_batch_size)
    ctx, module = make_module(plan)
    result = train(config, module, ctx, load_token_dataset(dataset_path, SEQ), plan)
    return {"start": result.start_step, "losses": [r["loss"] for r in result.records]}


def _load_errors(config: TrainConfig, step_dir: str) -> str:
    plan = toy_plan(config.plan_ngpus, config.micro_batch_size)
    ctx, module = make_module(plan)
    optimizer = ZeroAdamW(module.local_parameters(), ctx, param_dtype=None)
    try:
        load_checkpoint(step_dir, local_params=module.local_parameters(), optimizer=optimizer, ctx=ctx, plan=plan)
    except CheckpointError as error:
        return str(error)
    return ""


def test_crash_then_resume_continues_bit_identically_and_corrupt_shards_are_refused(tmp_path):
    dataset = save_dataset(tmp_path / "data", token_rows())

    uninterrupted = run_distributed(_train, 4, _config(tmp_path, "a"), dataset, timeout_s=90)[0]
    assert len(uninterrupted["losses"]) == 6
    root = tmp_path / "a" / "ckpt"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_4", "step_6"]  # keep_last 2
    assert (root / "latest").read_text().strip() == "step_6"
    expected = {"plan.json", "trainer_state.json"} | {f"rank{r}.{ext}" for r in range(4) for ext in
                                                      ("safetensors", "json")}
    assert {p.name for p in (root / "step_6").iterdir()} == expected
    state = json.loads((root / "step_6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 4 and state["sampler"]["position"] == 6 * 4

    # Rank 1 dies while writing the second checkpoint (step 4): step_2 stays the complete one.
    crashed = _config(tmp_path, "b")
    with pytest.raises(RuntimeError, match="rank 1"):
        run_distributed(_train, 4, crashed, dataset, 2, timeout_s=90)
    root_b = tmp_path / "b" / "ckpt"
    assert (root_b / "latest").read_text().strip() == "step_2"
    assert not (root_b / "step_4").exists()
    assert (root_b / "step_4.tmp").exists()

    resumed = run_distributed(_train, 4, dataclasses.replace(crashed, resume_path="auto"), dataset,
                              timeout_s=90)[0]
    assert resumed["start"] == 2
    assert resumed["losses"] == uninterrupted["losses"][2:]  # bit-identical, not approximately
    assert not (root_b / "step_4.tmp").exists()  # the interrupted save's leftovers were removed

    # Corrupt shards: one truncated, one with a flipped byte (same size).
    step_dir = root / "step_6"
    truncated = step_dir / "rank1.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    errors = run_distributed(_load_errors, 4, crashed, str(step_dir), timeout_s=60)
    assert all("rank1.safetensors is truncated or corrupt" in e and "earlier step_<N>" in e for e in errors)
    step_dir = root / "step_4"
    flipped = step_dir / "rank2.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF
    flipped.write_bytes(bytes(data))
    errors = run_distributed(_load_errors, 4, crashed, str(step_dir), timeout_s=60)
    assert all("rank2.safetensors is corrupt: its sha256" in e for e in errors)

    # Another layout cannot load a sharded checkpoint and is told to merge it.
    one = dataclasses.replace(crashed, plan_ngpus=1, runtime_ngpus=1)
    assert "ckpt_merger.py" in _load_errors(one, str(root_b))


def _complete(folder, step: int) -> None:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))


def test_commit_leftovers_never_look_complete_and_an_interrupted_replacement_is_undone(tmp_path):
    root = tmp_path / "ckpt"
    _complete(root / "step_2", 2)
    _complete(root / "step_4.replaced", 4)  # a re-save of step 4 cut short between its two renames
    (root / "step_4").mkdir()  # ... with no trainer_state.json: not complete
    _complete(root / "step_6.tmp", 6)
    _complete(root / "step_8.deleting", 8)
    (root / "latest").write_text("step_4\n")
    assert [p.name for p in commit.complete_checkpoints(root)] == ["step_2", "step_4.replaced"]
    assert commit.find_latest_checkpoint(root).name == "step_4.replaced"

    staging = commit.prepare_staging(root, 10)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_10.tmp", "step_2", "step_4"]
    assert (root / "step_4" / "trainer_state.json").is_file() and staging == root / "step_10.tmp"

    (staging / "trainer_state.json").write_text("{}")
    commit.commit_staging(root, staging, 10, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_10", "step_4"]
    assert (root / "latest").read_text().strip() == "step_10"


def test_a_run_writes_only_into_a_checkpoint_dir_it_owns(tmp_path):
    root = tmp_path / "ckpt"
    commit.check_checkpoint_dir_owned(root, None)  # absent
    _complete(root / "step_3.tmp", 3)
    commit.check_checkpoint_dir_owned(root, None)  # only an interrupted save: nothing to lose
    _complete(root / "step_2", 2)
    with pytest.raises(CheckpointError, match="--resume_path auto to continue that run, another --name"):
        commit.check_checkpoint_dir_owned(root, None)
    commit.check_checkpoint_dir_owned(root, root / "step_2")  # resumed from it
    with pytest.raises(CheckpointError, match="another --checkpoint_dir"):
        commit.check_checkpoint_dir_owned(root, tmp_path / "elsewhere" / "step_2")
