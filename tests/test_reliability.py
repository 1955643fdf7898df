"""Faults on real multi-process jobs (gloo): crashes at every stage of a checkpoint save, an
exception, a full disk or a corrupt shard on one rank, and SIGTERM.

Each rank is its own process started the way torchrun starts train.py (env:// rendezvous), running
tests/reliability_worker.py: the toy model of test_trainer_toy.py through the real trainer under
failure_watchdog. Faults are injected with DIMSHARD_FAULT (runtime/reliability/faults.py). Nothing here kills
a surviving rank on its behalf, except where a rank is crashed on purpose (as torchrun would).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
from test_trainer_toy import save_dataset, token_rows

from dimshard.runtime.checkpointing.commit import complete_checkpoints, find_latest_checkpoint
from dimshard.runtime.checkpointing.sharded import verify_shard
from dimshard.runtime.reliability.faults import CRASH_EXIT_CODE

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "reliability_worker.py"
# A rank left hanging would wait for gloo's timeout; this only bounds the test.
HANG_LIMIT_S = 90


def _options(tmp_path: Path, name: str, dataset: str, world: int, **overrides) -> dict:
    values = {"plan_ngpus": 2, "runtime_ngpus": world, "micro_batch_size": 2, "max_steps": 6, "lr": 1e-2,
              "warmup_steps": 1, "lr_schedule": "cosine", "weight_decay": 0.1, "dtype": "fp32",
              "checkpoint_dir": str(tmp_path / name / "ckpt"), "checkpoint_interval": 2,
              "keep_last_checkpoints": 1, "dump_dir": str(tmp_path / name), "log_interval": 1,
              "dataset": dataset}
    values.update(overrides)
    return values


def _launch(world: int, options: dict, fault: str = "", kill_after_failure: bool = False) -> list[dict]:
    """Start ``world`` ranks and wait for all; returns per rank {rc, out, err, killed}.

    With ``kill_after_failure`` the survivors of a failed rank are killed 5 s later, as torchrun
    does; otherwise every rank must end by itself.
    """
    # The rendezvous store lives here, as torchrun's agent hosts it: it outlives any rank.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=HANG_LIMIT_S))
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
               WORLD_SIZE=str(world), PYTHONUNBUFFERED="1", TORCHELASTIC_USE_AGENT_STORE="True")
    env.pop("DIMSHARD_FAULT", None)
    if fault:
        env["DIMSHARD_FAULT"] = fault
    procs = [subprocess.Popen([sys.executable, str(WORKER), json.dumps(options)], cwd=ROOT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    deadline, failed_at, killed = time.monotonic() + HANG_LIMIT_S, None, set()
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (kill_after_failure and failed_at is not None and now > failed_at + 5):
            for r, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    killed.add(r)
        time.sleep(0.1)
    results = []
    for r, p in enumerate(procs):
        out, err = p.communicate()
        results.append({"rc": p.returncode, "out": out, "err": err, "killed": r in killed})
    del store
    return results


def _losses(results: list[dict]) -> list[float]:
    assert all(r["rc"] == 0 for r in results), [r["err"][-2000:] for r in results]
    line = next(ln for ln in results[0]["out"].splitlines() if ln.startswith("losses "))
    return json.loads(line.removeprefix("losses "))


def _assert_intact(checkpoint_dir: Path, step: int, world: int) -> None:
    latest = find_latest_checkpoint(checkpoint_dir)
    assert latest is not None and latest.name == f"step_{step}", latest
    assert (checkpoint_dir / "latest").read_text().strip() in (f"step_{step}", f"step_{step - 2}")
    for rank in range(world):
        verify_shard(latest, rank)  # whole: sizes and sha256 as recorded


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The toy dataset and the losses of an uninterrupted 6-step run on 2 ranks."""
    tmp = tmp_path_factory.mktemp("reliability")
    dataset = save_dataset(tmp / "data", token_rows())
    losses = _losses(_launch(2, _options(tmp, "uninterrupted", dataset, 2)))
    assert len(losses) == 6
    return {"dataset": dataset, "losses": losses, "tmp": tmp}


# (fault point, rank it hits, the step a resume continues from): the save of step 4 is cut short.
CRASH_STAGES = [
    ("save.shard", 1, 2),  # a shard half written
    ("save.written", 1, 2),  # one rank's files complete, the others' maybe not
    ("save.staged", 0, 2),  # every file written, not yet renamed
    ("save.renamed", 0, 4),  # step_4 in place, `latest` still names step_2
    ("save.latest", 0, 4),  # `latest` names step_4, step_2 not yet pruned
    ("save.pruned", 0, 4),  # committed and pruned, the ranks not yet out of the save
]


@pytest.mark.parametrize("point,rank,resume_step", CRASH_STAGES, ids=[s[0] for s in CRASH_STAGES])
def test_a_crash_at_any_stage_of_a_save_resumes_from_the_last_complete_step_exactly(data, point, rank,
                                                                                  resume_step):
    tmp, dataset = data["tmp"], data["dataset"]
    name = f"crash_{point}"
    options = _options(tmp, name, dataset, 2)
    crashed = _launch(2, options, fault=f"crash@{point}:rank={rank}:step=4", kill_after_failure=True)
    assert crashed[rank]["rc"] == CRASH_EXIT_CODE, crashed[rank]["err"][-2000:]
    checkpoint_dir = Path(options["checkpoint_dir"])
    _assert_intact(checkpoint_dir, resume_step, 2)

    resumed = _losses(_launch(2, {**options, "resume_path": "auto"}))
    assert resumed == data["losses"][resume_step:]  # bit-identical continuation
    assert [p.name for p in complete_checkpoints(checkpoint_dir)] == ["step_6"]  # keep_last 1
    assert not [p for p in checkpoint_dir.iterdir() if p.name.endswith((".tmp", ".replaced", ".deleting"))]
    # The resumed run appended to its own metrics: one record per step, none twice.
    records = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == data["losses"]


@pytest.mark.parametrize("world", [2, 4])
def test_an_exception_on_one_rank_ends_every_rank_with_its_message(data, world):
    options = _options(data["tmp"], f"raise{world}", data["dataset"], world)
    results = _launch(world, options, fault="raise@train.step:rank=1:step=3")
    for rank, result in enumerate(results):
        assert not result["killed"], f"rank {rank} hung"
        assert result["rc"] != 0 and "injected fault raise@train.step on rank 1" in result["err"], result["err"]
    _assert_intact(Path(options["checkpoint_dir"]), 2, world)


@pytest.mark.parametrize("world", [2, 4])
def test_a_full_disk_or_a_corrupt_shard_on_one_rank_ends_every_rank_and_keeps_the_previous_step(data, world):
    options = _options(data["tmp"], f"enospc{world}", data["dataset"], world)
    results = _launch(world, options, fault="enospc@save.shard:rank=1:step=4")
    for rank, result in enumerate(results):
        assert not result["killed"], f"rank {rank} hung"
        assert result["rc"] != 0 and "No space left on device" in result["err"], result["err"]
        assert "Traceback" not in result["err"]
    checkpoint_dir = Path(options["checkpoint_dir"])
    _assert_intact(checkpoint_dir, 2, world)

    # Rank 1's shard of the surviving step is damaged: every rank refuses it, naming the file.
    shard = checkpoint_dir / "step_2" / "rank1.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    results = _launch(world, {**options, "resume_path": "auto"})
    for rank, result in enumerate(results):
        assert not result["killed"], f"rank {rank} hung"
        assert result["rc"] != 0 and "rank1.safetensors is truncated or corrupt" in result["err"], result["err"]


def test_sigterm_saves_at_the_next_step_boundary_and_the_run_resumes_exactly(data):
    tmp, dataset = data["tmp"], data["dataset"]
    # Slow steps, so that the signal lands mid-run; no interval checkpoints; a constant lr, so that
    # the schedule does not depend on max_steps.
    options = _options(tmp, "preempted", dataset, 2, max_steps=200, checkpoint_interval=0, step_sleep_s=0.05,
                       lr_schedule="constant")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(WORKER), json.dumps(options)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp / "preempted" / "metrics.jsonl"
    deadline = time.monotonic() + HANG_LIMIT_S
    while time.monotonic() < deadline and launcher.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)  # what a scheduler does; torchrun forwards it to the workers
    out, err = launcher.communicate(timeout=HANG_LIMIT_S)
    assert "stopped by a signal after step" in out, (out[-2000:], err[-3000:])
    checkpoint_dir = Path(options["checkpoint_dir"])
    latest = find_latest_checkpoint(checkpoint_dir)
    assert latest is not None
    stop_step = int(latest.name.removeprefix("step_"))
    assert 3 <= stop_step < 200
    for rank in range(2):
        verify_shard(latest, rank)
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, stop_step + 1))  # every rank stopped at the same step

    total = stop_step + 2
    resumed = _losses(_launch(2, {**options, "max_steps": total, "resume_path": "auto", "step_sleep_s": 0}))
    straight = _losses(_launch(2, _options(tmp, "straight", dataset, 2, max_steps=total, checkpoint_interval=0,
                                           lr_schedule="constant")))
    assert resumed == straight[stop_step:]
    assert [json.loads(line)["loss"] for line in metrics.read_text().splitlines()] == straight
