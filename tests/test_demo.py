"""The README's first command: the whole user story on a CPU (examples/llama3_128k/demo.py).

Run as a user would, from a folder that is not the repository, with fewer steps: data, tokenizer,
mini model, compile, a 2-rank run, merge and a Hugging Face folder that loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "llama3_128k" / "demo.py"


@pytest.mark.slow
def test_demo_trains_merges_and_exports(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([sys.executable, str(DEMO), "--output_dir", str(out), "--steps", "10"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    losses = [float(line.split()[1]) for line in run.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[0].isdigit()]
    assert len(losses) == 2 and losses[-1] < losses[0], run.stdout[-2000:]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf_model")
    assert model.config.num_hidden_layers == 4 and (out / "merged.safetensors").is_file()
