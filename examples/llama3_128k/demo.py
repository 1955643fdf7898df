"""The whole user story on a CPU, offline, in a few minutes: data, mini model, compile, train, merge, export.

    python examples/llama3_128k/demo.py [--output_dir examples/llama3_128k/demo_output]

Each stage runs the same command a user would type (printed before it runs), so the demo is
also a worked example of the real 128K job at toy scale:

1. demo_data.py      a corpus of Python standard-library docstrings and a BPE tokenizer trained on it
2. bookcorpus.py     tokenize and pack into sequences of --sequence_length tokens
3. create_mini_model.py  a 4-layer Llama with the Llama-3-8B architecture, narrow and random
4. train.py --run_mode compile   trace, plan (tensor parallel over 2 ranks), write gencode/ + plan.json
5. torchrun --nproc_per_node 2 train.py   train on 2 CPU processes (gloo), checkpointing as it goes
6. tools/ckpt_merger.py   merge the shards into one file and a Hugging Face folder (with the tokenizer)

train.py runs in the output folder under ``--name demo``, so its compile output, checkpoints and
metrics land where every run's do by default: ``<output_dir>/runs/demo/{compile,checkpoints,
metrics.jsonl}``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dimshard.cli import parse_dataclass_args

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@dataclass
class DemoArgs:
    """Flags of the demo."""

    output_dir: str = field(default=str(HERE / "demo_output"), metadata={"help": "folder for every artefact"})
    steps: int = field(default=60, metadata={"help": "optimizer steps to train"})
    sequence_length: int = field(default=256, metadata={"help": "tokens per training sequence"})
    policy: str = field(default="tp", metadata={"help": "partition policy for the 2-rank scale unit"})
    nproc: int = field(default=2, metadata={"help": "processes (CPU ranks) to train on"})
    plan_ngpus: int = field(default=2, metadata={"help": "ranks in one partitioned model copy"})


RUN_NAME = "demo"


def _run(cmd: list[str], env: dict | None = None, cwd: Path = ROOT) -> None:
    where = f"(in {cwd}) " if cwd != ROOT else ""
    print(f"\n{where}$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=cwd)


def main(argv: list[str] | None = None) -> int:
    """Run every stage; print the training losses and where the outputs are."""
    args = parse_dataclass_args(DemoArgs, argv)
    out = Path(args.output_dir).resolve()
    run_dir = out / "runs" / RUN_NAME
    for stale in (f"runs/{RUN_NAME}", "hf_model", "merged.safetensors"):
        # A fresh story each time: an earlier run's checkpoints and metrics would mix into this one.
        path = out / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()

    data_dir, model_dir = out / "data", out / "llama3_mini"
    _run([py, str(HERE / "demo_data.py"), "--output_dir", str(out / "corpus"), "--max_chars", "1500000"], env)
    _run([py, str(HERE / "bookcorpus.py"), "--data_path_or_name", str(out / "corpus" / "corpus.jsonl"),
          "--tokenizer_path_or_name", str(out / "corpus" / "tokenizer"), "--save_path", str(data_dir),
          "--sequence_length", str(args.sequence_length)], env)
    _run([py, str(HERE / "create_mini_model.py"), "--model_id", str(HERE / "configs" / "llama3_8b.json"),
          "--output_id", str(model_dir), "--num_hidden_layers", "4", "--hidden_size", "128",
          "--intermediate_size", "384", "--num_attention_heads", "4", "--num_key_value_heads", "2",
          "--vocab_size", "2048", "--tokenizer_path", str(out / "corpus" / "tokenizer")], env)
    common = ["--name", RUN_NAME, "--model_id", str(model_dir), "--dataset_path", str(data_dir),
              "--plan_ngpus", str(args.plan_ngpus), "--runtime_ngpus", str(args.nproc), "--policy", args.policy,
              "--max_steps", str(args.steps), "--lr", "3e-3", "--warmup_steps", "4", "--micro_batch_size", "2",
              "--checkpoint_interval", str(max(args.steps // 2, 1)), "--log_interval", "5", "--dtype", "fp32",
              "--loss_chunk_size", "128"]
    _run([py, str(HERE / "train.py"), "--run_mode", "compile", *common], env, cwd=out)
    _run([py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
          str(HERE / "train.py"), *common], env, cwd=out)
    _run([py, str(ROOT / "tools" / "ckpt_merger.py"), "--ckpt_dir", str(run_dir / "checkpoints"),
          "--output_fname", str(out / "merged.safetensors"), "--hf_output_dir", str(out / "hf_model"),
          "--model_config", str(model_dir)], env)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    print("\nstep  loss")
    for r in records:
        print(f"{r['step']:4d}  {r['loss']:.4f}")
    first, last = records[0]["loss"], records[-1]["loss"]
    print(f"\nloss {first:.3f} -> {last:.3f} in {args.steps} steps ({time.perf_counter() - start:.0f} s). "
          f"Generated code: {run_dir / 'compile' / 'gencode'}; Hugging Face model: {out / 'hf_model'}")
    if not last < first:
        print("error: the loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
