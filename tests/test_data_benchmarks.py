"""The data benchmarks run on CPU at tiny sizes and print what they promise."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_data_loader_benchmark_cpu(tmp_path):
    (record,) = _run("benchmarks/data_loader.py", "--sequence_length", "512", "--batches", "3", "--warmup", "1",
                     "--workers", "0", "--demo_chars", "20000", "--document_masking", "--step_seconds", "6.67")
    assert record["tokens_per_s"] > 0 and record["needed_tokens_per_s"] == round(512 / 6.67, 1)


def test_document_masking_benchmark_cpu(tmp_path):
    lengths, causal, masked = _run(
        "benchmarks/document_masking.py", "--device", "cpu", "--num_layers", "1", "--seq_len", "128",
        "--hidden_size", "32", "--intermediate_size", "64", "--num_heads", "4", "--num_kv_heads", "2",
        "--vocab_size", "128", "--steps", "1", "--warmup", "1", "--min_long", "48", "--max_long", "64",
        "--max_short", "24", "--no-fused_kernels", "--recompute", "none", "--compile_dir", str(tmp_path))
    assert sum(lengths["document_lengths"]) == 128
    assert causal["mode"] == "causal" and causal["attention_kept"] == 1.0
    assert masked["mode"] == "document_masking" and masked["documents"] == len(lengths["document_lengths"])
    assert 0 < masked["attention_kept"] < 1 and math.isfinite(masked["loss"])
