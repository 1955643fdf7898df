"""benchmarks/train_mfu.py --fake_world_size: one rank of a larger job, alone, with its estimate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_rank_zero_of_an_eight_rank_job_runs_alone_and_prints_its_estimate(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks/train_mfu.py"), "--device", "cpu", "--num_layers", "2",
                          "--seq_len", "32", "--hidden_size", "64", "--intermediate_size", "128", "--num_heads", "8",
                          "--num_kv_heads", "4", "--vocab_size", "256", "--steps", "1", "--warmup", "1",
                          "--no-fused_kernels", "--plan_ngpus", "4", "--fake_world_size", "8", "--policy", "tp_sp",
                          "--compile_dir", str(tmp_path / "compile")],
                         check=True, capture_output=True, text=True, timeout=300)
    record = json.loads(run.stdout.strip().splitlines()[-1])
    # Two copies of a 4-rank plan: ZeRO shards over 2 copies, the plan's collectives run on the fake group.
    assert record["world_size"] == 8 and record["plan_ngpus"] == 4 and record["fake_process_group"] is True
    assert record["mesh"]["shape"] == [4] and record["step_s"] > 0
    assert 0 < record["est_compute_only_s"] <= record["est_step_s"] and record["est_hw_profile"] == "cpu"
