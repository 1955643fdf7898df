"""FP8 loss parity: the same model trained in bf16 and with its linear layers in FP8 (docs/design.md, "FP8").

    python benchmarks/fp8_loss_parity.py --json_out fp8_parity.jsonl                  # one H100, ~1-2 min
    python benchmarks/fp8_loss_parity.py --recipe rowwise
    python benchmarks/fp8_loss_parity.py --device cpu --steps 30 --hidden_size 64 --num_layers 2 \
        --seq_len 64 --vocab_size 256 --batch_size 2                                   # CPU smoke run

A Llama-shaped model (default: hidden 1024, 8 layers, 117M parameters) is compiled twice through
dimshard, ``--fp8 off`` and ``--fp8 all`` (every layer linear in FP8, the output head in the
chunked loss stays in bf16), and each copy trains ``--steps`` AdamW steps from the same weights on
the same tokens: sequences of a fixed random Markov chain (each token has 4 likely successors), so
the loss falls from ln(vocab) towards the chain's entropy within a few hundred steps. The check:
the losses averaged over the last 50 steps differ by at most ``--final_tolerance`` (relative),
every 25-step window's mean by at most ``--window_tolerance``, and both runs learned (final loss
below 70% of the first). Prints one JSON record (both curves, every 10th step) and exits 1 if the
check fails.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from measurement import load_for_training, report

from dimshard.cli import parse_dataclass_args
from dimshard.runtime.distributed import destroy_parallel
from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments


@dataclass
class ParityArgs:
    """Flags of the benchmark (one field per flag)."""

    device: str = field(default="cuda", metadata={"help": "cuda (the check) or cpu (a smoke run of the path)",
                                                   "choices": ("cuda", "cpu")})
    recipe: str = field(default="tensorwise", metadata={"help": "FP8 recipe", "choices": (
        "tensorwise", "rowwise", "rowwise_gw_hp")})
    steps: int = field(default=300, metadata={"help": "optimizer steps per run"})
    batch_size: int = field(default=4, metadata={"help": "sequences per step"})
    seq_len: int = field(default=2048, metadata={"help": "tokens per sequence"})
    hidden_size: int = field(default=1024, metadata={"help": "hidden size"})
    num_layers: int = field(default=8, metadata={"help": "decoder layers"})
    vocab_size: int = field(default=2048, metadata={"help": "vocabulary (and Markov chain states)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (linear warmup over 20 steps)"})
    final_tolerance: float = field(default=0.02, metadata={
        "help": "largest relative difference of the last 50 steps' mean losses"})
    window_tolerance: float = field(default=0.05, metadata={
        "help": "largest relative difference of any 25-step window's mean losses"})
    compile_dir: str = field(default="/tmp/dimshard_fp8_parity", metadata={"help": "compile outputs go here"})
    json_out: str | None = field(default=None, metadata={"help": "append the record as one JSON line here"})


def markov_tokens(args: ParityArgs, seed: int = 0) -> torch.Tensor:
    """[steps, batch, seq] tokens of a fixed random chain: 4 successors per token, probabilities 0.55/0.25/0.15/0.05."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, args.vocab_size, size=(args.vocab_size, 4))
    count = args.steps * args.batch_size
    tokens = np.empty((count, args.seq_len), dtype=np.int64)
    tokens[:, 0] = rng.integers(0, args.vocab_size, size=count)
    for t in range(1, args.seq_len):
        pick = rng.choice(4, size=count, p=[0.55, 0.25, 0.15, 0.05])
        tokens[:, t] = successors[tokens[:, t - 1], pick]
    return torch.from_numpy(tokens).view(args.steps, args.batch_size, args.seq_len)


def train_curve(args: ParityArgs, fp8: str, tokens: torch.Tensor) -> tuple[list[float], float, int]:
    """(loss per step, seconds per step after the first, linears in FP8) of one compiled run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dimshard.planner import CompileConfig, compile_model

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    heads = max(args.hidden_size // 128, 4)
    config = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 7 // 2,
                         num_hidden_layers=args.num_layers, num_attention_heads=heads,
                         num_key_value_heads=max(heads // 2, 1), vocab_size=args.vocab_size,
                         max_position_embeddings=args.seq_len, attn_implementation="sdpa", tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    ids = torch.zeros(args.batch_size, args.seq_len, dtype=torch.long)
    folder = f"{args.compile_dir}/{fp8}_{args.recipe}"
    compile_model(model, {"input_ids": ids, "labels": ids.clone()}, folder,
                  CompileConfig(policy="dp", param_dtype=dtype, fused_kernels=cuda, loss="chunked_cross_entropy",
                                fp8=fp8, fp8_recipe=args.recipe, hw_profile=None if cuda else "cpu"))
    run = load_for_training(folder, param_dtype=dtype, backend=None if cuda else "gloo", weight_seed=1234)
    in_fp8 = sum(op["fp8"] for op in run.plan.get("fp8", {}).get("ops", []))
    losses, start = [], 0.0
    for step in range(args.steps):
        if step == 1:
            torch.cuda.synchronize() if cuda else None
            start = time.perf_counter()
        batch = tokens[step].to(run.ctx.device)
        loss = run.module(batch, batch)
        loss.backward()
        lr = args.lr * min(1.0, (step + 1) / 20)
        run.optimizer.step(run.reducer.finish(), lr, 1.0)
        run.reducer.zero_grad()
        losses.append(loss.item())
    seconds = (time.perf_counter() - start) / max(args.steps - 1, 1)
    run.reducer.close()
    destroy_parallel()
    return losses, seconds, in_fp8


def compare(reference: list[float], fp8: list[float], args: ParityArgs) -> dict:
    """The parity numbers of two loss curves and whether they pass (see the module docstring)."""
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    tail = min(50, len(reference))
    final = abs(mean(fp8[-tail:]) - mean(reference[-tail:])) / mean(reference[-tail:])
    windows = [abs(mean(fp8[i:i + 25]) - mean(reference[i:i + 25])) / mean(reference[i:i + 25])
               for i in range(0, len(reference) - 24, 25)] or [final]
    learned = all(mean(curve[-tail:]) < 0.7 * curve[0] for curve in (reference, fp8))
    finite = all(math.isfinite(v) for v in reference + fp8)
    passed = finite and learned and final <= args.final_tolerance and max(windows) <= args.window_tolerance
    return {"final_rel_diff": round(final, 5), "worst_window_rel_diff": round(max(windows), 5),
            "learned": learned, "finite": finite, "passed": passed}


def main(argv: list[str] | None = None) -> dict:
    """Train both runs, compare, print the record; exits 1 when parity fails on CUDA."""
    enable_expandable_segments()
    args = parse_dataclass_args(ParityArgs, argv, description=__doc__.split("\n\n")[0])
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/fp8_loss_parity.py needs a GPU; use --device cpu for a smoke run")
    tokens = markov_tokens(args)
    reference, bf16_s, _ = train_curve(args, "off", tokens)
    fp8, fp8_s, in_fp8 = train_curve(args, "all", tokens)
    record = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "recipe": args.recipe,
              "steps": args.steps, "tokens_per_step": args.batch_size * args.seq_len, "linears_in_fp8": in_fp8,
              **compare(reference, fp8, args), "bf16_step_s": round(bf16_s, 4), "fp8_step_s": round(fp8_s, 4),
              "bf16_loss": [round(v, 4) for v in reference[::10]], "fp8_loss": [round(v, 4) for v in fp8[::10]]}
    report(record, args.json_out)
    if args.device == "cuda" and not record["passed"]:
        sys.exit(1)
    return record


if __name__ == "__main__":
    main()
