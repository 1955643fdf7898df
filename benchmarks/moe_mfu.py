"""Mixture-of-experts training step: dimshard's compiled plan against Hugging Face's fastest experts, one GPU.

    python benchmarks/moe_mfu.py --seq_len 32768          # Qwen3-30B-A3B shape, 4 layers: both, side by side
    python benchmarks/moe_mfu.py --seq_len 131072 --policy auto
    python benchmarks/moe_mfu.py --tiny --device cpu --seq_len 64 --steps 1 --warmup 1   # CPU smoke run

The model is Qwen3-30B-A3B-shaped (hidden 2048, 32 query / 4 KV heads of 128, 128 experts, top-8,
expert width 768, vocabulary 151936) with ``--num_layers`` layers (``--tiny``: hidden 64, 8 experts
of width 32, 4 / 2 heads of 16, vocabulary 256). Two runs in one process, each timed over
``--steps`` full steps (forward, backward, AdamW) on random tokens, bf16 on GPU:

- ``dimshard``: the model compiled with the chunked loss (``--policy``, ``--plan_ngpus``; the
  experts run as ``kernels/moe``'s op, grouped GEMM on the GPU), loaded and stepped as the
  trainer does (benchmarks/measurement.py);
- ``hugging_face``: the same config with ``experts_implementation="grouped_mm"`` (transformers'
  fastest built-in experts on a GPU), sdpa attention, gradient checkpointing, its own loss, and
  Liger's kernels where the ``liger_kernel`` package is installed and supports the family.

MFU counts the active parameters only: ``6 * N_active * S + 6 * 2 * L * A * S^2`` FLOPs per
sequence of S tokens (forward and backward; ``N_active`` the parameters a token passes through:
embedding and head excluded as in docs/design.md's formula, routed experts counted k of e, ``A``
the attention width, heads x head dim), over 989 TFLOP/s. Each run prints one JSON line: step
seconds, tokens/s, MFU, peak memory (GiB allocated), and for dimshard the plan's estimate. A run
that runs out of memory prints that instead of numbers.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist
from measurement import PEAK_TFLOPS, StepTimer, load_for_training, report

from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments


def moe_config(tiny: bool, num_layers: int, seq_len: int):
    """The Qwen3-MoE config of the benchmark (Qwen3-30B-A3B's shape, or the tiny one)."""
    from transformers import Qwen3MoeConfig

    sizes = (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128, vocab_size=256) if tiny else
             dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                  num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144, vocab_size=151936))
    return Qwen3MoeConfig(num_hidden_layers=num_layers, max_position_embeddings=max(seq_len, 4096),
                          tie_word_embeddings=False, **sizes)


def active_flops_per_sequence(config, seq_len: int) -> float:
    """Training FLOPs of one sequence with the active parameters (see the module docstring)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    width = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    attention = h * (width + 2 * kv) + width * h
    experts = 3 * h * config.moe_intermediate_size * config.num_experts_per_tok + h * config.num_experts
    active = layers * (attention + experts)
    return 6.0 * active * seq_len + 6.0 * 2 * layers * width * seq_len * seq_len


def _record(name: str, config, args, step_s: float | None, device: torch.device, **extra) -> dict:
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    record = {"run": name, "layers": config.num_hidden_layers, "seq_len": args.seq_len, **extra}
    if step_s is not None:
        flops = active_flops_per_sequence(config, args.seq_len)
        record.update(step_s=round(step_s, 4), tokens_per_s=round(args.seq_len / step_s, 1),
                      mfu=round(flops / step_s / (PEAK_TFLOPS * 1e12), 4), tflops=round(flops / step_s / 1e12, 1),
                      peak_mem_gib=None if peak is None else round(peak, 2))
    return record


def run_dimshard(args, config, device: torch.device) -> dict:
    """Compile the config, load rank 0's module, time its steps; the record (or why it stopped)."""
    from dimshard.planner import CompileConfig, compile_model
    from dimshard.planner.graph.hf import build_on_meta
    from dimshard.runtime.training.metrics import plan_estimate_record

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ids = torch.zeros(1, args.seq_len, dtype=torch.long)
    start = time.perf_counter()
    compile_model(build_on_meta(config), {"input_ids": ids, "labels": ids.clone()}, args.compile_dir,
                  CompileConfig(plan_ngpus=args.plan_ngpus, policy=args.policy, recompute=args.recompute,
                                param_dtype=dtype, loss="chunked_cross_entropy",
                                hw_profile=args.hw_profile or (None if device.type == "cuda" else "cpu")))
    compile_s = time.perf_counter() - start
    loaded = load_for_training(args.compile_dir, param_dtype=dtype, backend=None if device.type == "cuda" else "gloo")
    gen = torch.Generator(device=device).manual_seed(0)
    timer = StepTimer(device, warmup=args.warmup, steps=args.steps)
    try:
        for _ in timer:
            tokens = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=gen, device=device)
            loaded.module(tokens, tokens).backward()
            loaded.optimizer.step(loaded.reducer.finish(), 1e-5, 1.0)
            loaded.reducer.zero_grad()
    except torch.OutOfMemoryError:
        return _record("dimshard", config, args, None, device, out_of_memory=True)
    finally:
        loaded.reducer.close()
    return _record("dimshard", config, args, timer.mean_s, device, policy=loaded.plan["policy"],
                   mesh=loaded.plan["mesh"], compile_s=round(compile_s, 1),
                   **plan_estimate_record(loaded.plan))


def run_hugging_face(args, config, device: torch.device) -> dict:
    """Hugging Face's model with grouped_mm experts, checkpointing (and Liger if installed): the record."""
    from transformers import AutoModelForCausalLM

    liger = False
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_moe

        apply_liger_kernel_to_qwen3_moe()
        liger = True
    except ImportError:
        pass
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    experts = "grouped_mm" if device.type == "cuda" else "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", experts_implementation=experts,
                                                 dtype=dtype)
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    timer = StepTimer(device, warmup=args.warmup, steps=args.steps)
    try:
        for _ in timer:
            tokens = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=gen, device=device)
            model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        return _record("hugging_face", config, args, None, device, out_of_memory=True, experts=experts, liger=liger)
    return _record("hugging_face", config, args, timer.mean_s, device, experts=experts, liger=liger,
                   gradient_checkpointing=True)


def main(argv: list[str] | None = None) -> list[dict]:
    enable_expandable_segments()  # before CUDA starts, as every rank runs
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run)")
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=32768)
    parser.add_argument("--policy", default="dp", help="dimshard policy (dp: the whole model on one GPU; auto)")
    parser.add_argument("--plan_ngpus", type=int, default=1)
    parser.add_argument("--recompute", default="auto", help="dimshard recompute: none, layer, auto")
    parser.add_argument("--hw_profile", default=None, help="hardware profile (default: the GPU's own)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", default="dimshard,hugging_face", help="which runs, comma-separated")
    parser.add_argument("--compile_dir", default="/tmp/dimshard_moe_bench")
    parser.add_argument("--json_out", default=None, help="append each record as a JSON line to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/moe_mfu.py measures a GPU but none is visible; use --tiny --device cpu for a smoke run")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    config = moe_config(args.tiny, args.num_layers, args.seq_len)
    records = []
    for name in args.runs.split(","):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        run = {"dimshard": run_dimshard, "hugging_face": run_hugging_face}[name]
        records.append(run(args, config, device))
        report(records[-1], args.json_out)
        gc.collect()
    dist.destroy_process_group()
    return records


if __name__ == "__main__":
    main()
