"""Training-step benchmark: MFU, tokens/s and peak memory of a compiled plan on GPUs.

    torchrun --nproc_per_node 2 benchmarks/train_mfu.py --num_layers 4 --seq_len 131072 --plan_ngpus 2 --policy tp

Builds a Llama-3-8B-shaped model (hidden 4096, 32 heads, 8 KV heads, intermediate 14336,
vocabulary 128256) with ``--num_layers`` layers, compiles it with the chunked cross-entropy loss,
and times full training steps (forward, backward, gradient reduction, ZeRO AdamW) on random
tokens with the runtime the trainer uses. MFU follows DESIGN.md: 3*2*(N*S + 2*L*H*S^2) FLOPs
per sequence over 989 TFLOP/s per GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

PEAK_TFLOPS = 989.0


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_layers", type=int, default=4, help="decoder layers of the Llama-3-8B-shaped model")
    p.add_argument("--seq_len", type=int, default=8192, help="tokens per sequence")
    p.add_argument("--micro_batch_size", type=int, default=1, help="sequences per micro-batch per model copy")
    p.add_argument("--grad_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--plan_ngpus", type=int, default=1, help="GPUs in one model copy (the rest are data parallel)")
    p.add_argument("--policy", default="dp", help="partition policy: dp, tp, tp_sp, tp_batch, auto")
    p.add_argument("--recompute", default="none", help="none, layer, or a comma-separated list of scopes")
    p.add_argument("--memory_budget_gb", type=float, default=None, help="budget for the auto policy")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--loss_chunk_size", type=int, default=0, help="tokens per chunk of the chunked loss; 0: automatic")
    p.add_argument("--fused_kernels", choices=("on", "off"), default="on",
                   help="trace RMSNorm/SwiGLU/rotary as the fused Triton kernels (as train.py does on GPU)")
    p.add_argument("--compile_dir", default="/tmp/dimshard_bench", help="where the compile output is written")
    p.add_argument("--json_out", default=None, help="append the result as one JSON line to this file")
    p.add_argument("--hidden_size", type=int, default=4096, help="hidden size (shrink for smoke tests)")
    p.add_argument("--intermediate_size", type=int, default=14336, help="MLP width")
    p.add_argument("--num_heads", type=int, default=32, help="attention heads")
    p.add_argument("--num_kv_heads", type=int, default=8, help="key/value heads")
    p.add_argument("--vocab_size", type=int, default=128256, help="vocabulary size")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; rank 0 prints and returns the result record."""
    args = _args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/train_mfu.py measures GPUs: no CUDA device is visible here")
    from transformers import LlamaConfig, LlamaForCausalLM

    from dimshard.planner.compile import compile_model
    from dimshard.planner.hf import chunked_causal_lm_forward
    from dimshard.runtime.distributed import init_parallel
    from dimshard.runtime.grad_reducer import GradReducer
    from dimshard.runtime.metrics import flops_per_sequence
    from dimshard.runtime.module import load_parallel_module, read_plan
    from dimshard.runtime.optimizer import ZeroAdamW

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized():
        kwargs = {"device_id": torch.device("cuda", local_rank)}
        if world == 1 and "MASTER_ADDR" not in os.environ:
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group("nccl", **kwargs)
    rank = dist.get_rank()
    config = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                         num_key_value_heads=args.num_kv_heads, vocab_size=args.vocab_size,
                         max_position_embeddings=max(args.seq_len, 8192), rope_theta=500000.0,
                         attn_implementation="sdpa", tie_word_embeddings=False)
    compile_seconds = None
    if rank == 0:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        ids = torch.zeros(args.micro_batch_size, args.seq_len, dtype=torch.long)
        start = time.perf_counter()
        compile_model(model, {"input_ids": ids, "labels": ids.clone()}, args.compile_dir, plan_ngpus=args.plan_ngpus,
                      policy=args.policy, recompute=args.recompute, param_dtype=torch.bfloat16,
                      memory_budget_gb=args.memory_budget_gb,
                      forward_fn=chunked_causal_lm_forward(args.loss_chunk_size),
                      fused_kernels=args.fused_kernels == "on")
        compile_seconds = time.perf_counter() - start
    dist.barrier()
    plan = read_plan(args.compile_dir)
    ctx = init_parallel(plan)
    module = load_parallel_module(args.compile_dir, ctx)
    with torch.no_grad():
        for lp in module.local_parameters():
            lp.param.normal_(0.0, 0.02) if len(lp.full_shape) > 1 else lp.param.fill_(1.0)
    params = module.local_parameters()
    optimizer = ZeroAdamW(params, ctx, weight_decay=0.1, param_dtype=torch.bfloat16)
    reducer = GradReducer(params, ctx)
    gen = torch.Generator(device=ctx.device).manual_seed(1234 + ctx.copy_index)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for micro in range(args.grad_accumulation_steps):
            ids = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_len), generator=gen,
                                device=ctx.device)
            ctxmgr = reducer.no_sync() if micro < args.grad_accumulation_steps - 1 else contextlib.nullcontext()
            with ctxmgr:
                loss = module(ids, ids)
                (loss / args.grad_accumulation_steps).backward()
        optimizer.step(reducer.finish(), 1e-5, 1.0)
        reducer.zero_grad()
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = sum(times) / len(times)
    sequences = args.micro_batch_size * args.grad_accumulation_steps * ctx.dp_size
    flops = flops_per_sequence(plan["model_stats"], args.seq_len) * sequences
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=ctx.device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    record = {
        "gpu": torch.cuda.get_device_name(), "world_size": ctx.world_size, "plan_ngpus": args.plan_ngpus,
        "policy": plan["policy"], "mesh": plan["mesh"], "recompute": args.recompute, "layers": args.num_layers,
        "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size,
        "grad_accumulation_steps": args.grad_accumulation_steps, "num_params": plan["model_stats"]["num_params"],
        "step_s": round(step_s, 4), "tokens_per_s": round(sequences * args.seq_len / step_s, 1),
        "mfu": round(flops / step_s / (ctx.world_size * PEAK_TFLOPS * 1e12), 4),
        "peak_mem_gb": round(peak.item(), 2), "compile_s": compile_seconds, "loss": round(loss.item(), 4),
    }
    if rank == 0:
        print(json.dumps(record), flush=True)
        if args.json_out:
            with Path(args.json_out).open("a") as f:
                f.write(json.dumps(record) + "\n")
    dist.barrier()
    reducer.close()
    dist.destroy_process_group()
    return record


if __name__ == "__main__":
    main()
