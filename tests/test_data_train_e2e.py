"""train.py on a data spec under torchrun (gloo, CPU): two mixed sources streamed, tokenized and packed
on the fly with document masking, two data-parallel copies; a run stopped at a checkpoint and
resumed logs exactly the losses of the uninterrupted run, and its saved data state is the one the
uninterrupted loader reaches at that step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "llama3_128k"
SEQ = 64


def _python(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tokenizer, a JSONL source of long documents, a JSONL source of short ones, a 2-layer mini Llama."""
    work = tmp_path_factory.mktemp("data_e2e")
    _python(str(EXAMPLE / "demo_data.py"), "--output_dir", str(work / "corpus"), "--max_chars", "60000",
            "--vocab_size", "512")
    with open(work / "short.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"body": f"note {i}: " + "short text " * (i % 5 + 1)}) + "\n")
    _python(str(EXAMPLE / "create_mini_model.py"), "--model_id", str(EXAMPLE / "configs" / "llama3_8b.json"),
            "--output_id", str(work / "model"), "--num_hidden_layers", "2", "--hidden_size", "64",
            "--intermediate_size", "128", "--num_attention_heads", "4", "--num_key_value_heads", "2",
            "--vocab_size", "512", "--tokenizer_path", str(work / "corpus" / "tokenizer"))
    return work


def _train(work: Path, tag: str, *flags: str) -> None:
    _python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE / "train.py"),
            "--model_id", str(work / "model"), "--data_sources", f"{work / 'corpus' / 'corpus.jsonl'},{work / 'short.jsonl'}",
            "--data_probs", "0.7,0.3", "--data_text_columns", "text,body", "--data_streaming",
            "--data_shuffle_buffer", "32", "--document_masking", "--data_workers", "0", "--sequence_length", str(SEQ),
            "--plan_ngpus", "1", "--runtime_ngpus", "2", "--policy", "dp", "--micro_batch_size", "2",
            "--compile_dir", str(work / "compile"), "--checkpoint_dir", str(work / tag / "ckpt"),
            "--dump_dir", str(work / tag / "dump"), "--lr", "2e-3", "--lr_schedule", "constant", "--dtype", "fp32",
            "--loss_chunk_size", "48", *flags)


def _losses(work: Path, tag: str) -> list[float]:
    lines = (work / tag / "dump" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if line]


def _sampler(work: Path, tag: str, step: int) -> dict:
    return json.loads((work / tag / "ckpt" / f"step_{step}" / "trainer_state.json").read_text())["sampler"]


@pytest.mark.slow
def test_spec_run_resumes_exactly(work):
    _train(work, "full", "--max_steps", "6", "--checkpoint_interval", "3")
    full = _losses(work, "full")
    assert len(full) == 6 and full[-1] < full[0]
    _train(work, "stopped", "--max_steps", "3", "--checkpoint_interval", "3")
    _train(work, "stopped", "--max_steps", "6", "--resume_path", "auto")
    assert _losses(work, "stopped") == full
    state = _sampler(work, "stopped", 3)
    assert state == _sampler(work, "full", 3)
    assert state["kind"] == "packed_stream" and len(state["copies"]) == 2 and state["copies"][0] != state["copies"][1]
    assert _sampler(work, "stopped", 6) == _sampler(work, "full", 6)
