"""The multi-GPU check script itself, rehearsed on 2 gloo processes: it must pass a correct run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_multi_gpu_check_passes_on_gloo(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "benchmarks" / "multi_gpu_check.py"), "--backend", "gloo", "--dtypes", "float32,bfloat16",
         "--cases", "tp_sp,tp_x_dp_zero1", "--work_dir", str(tmp_path), "--seq_len", "32", "--batch", "4"],
        capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "4 passed, 0 failed" in out.stdout, out.stdout[-3000:]
