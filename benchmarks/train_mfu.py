"""Training-step benchmark: MFU, tokens/s and peak memory of a compiled plan on GPUs.

    torchrun --nproc_per_node 2 benchmarks/train_mfu.py --num_layers 4 --seq_len 131072 --plan_ngpus 2 --policy tp
    python benchmarks/train_mfu.py --num_layers 32 --seq_len 131072 --plan_ngpus 8 --fake_world_size 8 \
        --policy auto --memory_budget_gb 80 --hw_profile h200     # rank 0 of the 8-GPU job, on one GPU
    python benchmarks/train_mfu.py --device cpu --num_layers 2 --seq_len 32 --hidden_size 64 --intermediate_size 128 \
        --num_heads 4 --num_kv_heads 2 --vocab_size 256 --steps 1 --warmup 1 --no-fused_kernels   # CPU smoke run
    python benchmarks/train_mfu.py --num_layers 4 --seq_len 8192 --fp8 all    # the FP8 column (--fp8 auto: priced)

Builds a Llama-3-8B-shaped model (hidden 4096, 32 heads, 8 KV heads, intermediate 14336,
vocabulary 128256) with ``--num_layers`` layers, compiles it with the chunked cross-entropy loss,
and times full training steps (forward, backward, gradient reduction, ZeRO AdamW) on random
tokens with the runtime the trainer uses, running exactly the compiled plan: its recompute, its
activation offload (generated code) and its optimizer offload (plan.json ``offload``). Under
``--policy auto`` without ``--memory_budget_gb`` the budget is train.py's default: this GPU's
memory less the profile's measured margin (planner/cost/budgets.py). The record puts the plan's own
estimate (plan.json ``estimate``: what the budget check used) next to the measurement: step
seconds, peak GPU memory allocated and reserved (GiB), host resident set. Every rank enables
expandable segments first (runtime/reliability/gpu_memory.py); running out of GPU memory stops every rank
with one line. MFU follows docs/design.md ("Measuring: MFU"): 6*(N*S + 2*L*H*S^2) FLOPs per
sequence over 989 TFLOP/s per GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from measurement import PEAK_TFLOPS, StepTimer, load_for_training, report

from dimshard.cli import parse_dataclass_args
from dimshard.runtime.reliability.failures import exit_after_failure, failure_watchdog
from dimshard.runtime.reliability.gpu_memory import (
    GpuOutOfMemory,
    enable_expandable_segments,
    out_of_memory_guard,
)


@dataclass
class MfuArgs:
    """Flags of the benchmark (one field per flag)."""

    device: str = field(default="cuda", metadata={
        "help": "cuda (measure) or cpu (a smoke run on gloo that checks the path, not the numbers)",
        "choices": ("cuda", "cpu")})
    num_layers: int = field(default=4, metadata={"help": "decoder layers of the Llama-3-8B-shaped model"})
    seq_len: int = field(default=8192, metadata={"help": "tokens per sequence"})
    micro_batch_size: int = field(default=1, metadata={"help": "sequences per micro-batch per model copy"})
    grad_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    plan_ngpus: int = field(default=1, metadata={"help": "GPUs in one model copy (the rest are data parallel)"})
    policy: str = field(default="dp", metadata={"help": "partition policy: dp, tp, tp_sp, tp_batch, auto"})
    recompute: str = field(default="none", metadata={"help": "none, layer, auto, or a comma-separated list of scopes"})
    memory_budget_gb: float | None = field(default=None, metadata={
        "help": "per-GPU budget for the auto policy (GB); default: this GPU's memory less the measured margin"})
    steps: int = field(default=6, metadata={"help": "timed optimizer steps"})
    warmup: int = field(default=2, metadata={"help": "untimed optimizer steps first"})
    loss_chunk_size: int = field(default=0, metadata={"help": "tokens per chunk of the chunked loss; 0: automatic"})
    fused_kernels: bool = field(default=True, metadata={
        "help": "trace RMSNorm/SwiGLU/rotary as the fused Triton kernels (as train.py does on GPU)"})
    compile_dir: str = field(default="/tmp/dimshard_bench", metadata={"help": "where the compile output is written"})
    json_out: str | None = field(default=None, metadata={"help": "append the result as one JSON line to this file"})
    fake_world_size: int = field(default=0, metadata={
        "help": "run rank 0 of a job of this many GPUs alone, under torch's fake process group: collectives "
                "move no data, so the step time is that rank's compute and the peak its memory (0: off)"})
    hw_profile: str | None = field(default=None, metadata={
        "help": "hardware profile the planner and the printed estimate use (shipped name or JSON path); "
                "default: the GPU's own"})
    hidden_size: int = field(default=4096, metadata={"help": "hidden size (shrink for smoke tests)"})
    intermediate_size: int = field(default=14336, metadata={"help": "MLP width"})
    num_heads: int = field(default=32, metadata={"help": "attention heads"})
    num_kv_heads: int = field(default=8, metadata={"help": "key/value heads"})
    vocab_size: int = field(default=128256, metadata={"help": "vocabulary size"})
    fp8: str = field(default="off", metadata={
        "help": "FP8 products of the linear layers: off, auto (priced per op from the hardware profile), all "
                "(docs/design.md, \"FP8\")", "choices": ("off", "auto", "all")})
    fp8_recipe: str = field(default="tensorwise", metadata={
        "help": "FP8 scaling recipe", "choices": ("tensorwise", "rowwise", "rowwise_gw_hp")})


def _budget(args: MfuArgs, cuda: bool):
    """The GPU budget to compile under: the flag, or for auto train.py's default (this GPU's, less the margin)."""
    from dimshard.planner.cost.budgets import MemoryBudget, default_gpu_budget
    from dimshard.planner.cost.hardware import load_hw_profile

    if args.memory_budget_gb is not None:
        return MemoryBudget(args.memory_budget_gb, "--memory_budget_gb")
    if args.policy != "auto":
        return MemoryBudget(None, f"none: policy {args.policy} plans no memory")
    return default_gpu_budget(load_hw_profile(args.hw_profile or (None if cuda else "cpu")), on_device=cuda)


def _gpu_outside_allocator(device: torch.device) -> tuple[float, float, float]:
    """(peak reserved GiB, GiB the card has in use beyond PyTorch's reserve, reserved / allocated peak - 1).

    The second is this process's CUDA context, NCCL buffers and library handles when it is alone on
    the card (nvidia-smi's used memory less ``memory_reserved``); NaN off CUDA.
    """
    if device.type != "cuda":
        return float("nan"), float("nan"), float("nan")
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.max_memory_reserved(device)
    outside = (total - free - torch.cuda.memory_reserved(device)) / 2**30
    return reserved / 2**30, outside, reserved / max(torch.cuda.max_memory_allocated(device), 1) - 1


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; rank 0 prints and returns the result record."""
    enable_expandable_segments()  # before CUDA starts: the budgets' margins were measured with it
    args = parse_dataclass_args(MfuArgs, argv, description=__doc__.split("\n\n")[0])
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("benchmarks/train_mfu.py measures GPUs but no CUDA device is visible; use --device cpu for a smoke run")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.fake_world_size:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.fake_world_size)
    if not dist.is_initialized():
        kwargs: dict = {}
        if cuda:
            torch.cuda.set_device(local_rank)
            kwargs["device_id"] = torch.device("cuda", local_rank)
        if world == 1 and "MASTER_ADDR" not in os.environ:
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group("nccl" if cuda else "gloo", **kwargs)
    with failure_watchdog():  # a rank that fails (out of GPU memory, ...) stops every rank with its line
        return _measure(args, cuda)


def _measure(args: MfuArgs, cuda: bool) -> dict:
    """Compile on rank 0, load this rank's module, time the steps; every rank returns the record."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dimshard.planner import CompileConfig, compile_model
    from dimshard.runtime.training.metrics import (
        flops_per_sequence,
        host_memory_gib,
        peak_memory_gb,
        plan_estimate_record,
    )

    dtype = torch.bfloat16 if cuda else torch.float32
    rank = dist.get_rank()
    model_config = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                         num_key_value_heads=args.num_kv_heads, vocab_size=args.vocab_size,
                         max_position_embeddings=max(args.seq_len, 8192), rope_theta=500000.0,
                         attn_implementation="sdpa", tie_word_embeddings=False)
    compile_seconds = None
    if rank == 0:
        with torch.device("meta"):
            model = LlamaForCausalLM(model_config)
        ids = torch.zeros(args.micro_batch_size, args.seq_len, dtype=torch.long)
        start = time.perf_counter()
        budget = _budget(args, cuda)
        # The plan is priced for this run's copies and micro-batches: its estimate is what runs.
        options = {"grad_accumulation_steps": args.grad_accumulation_steps,
                   "dp_size": dist.get_world_size() // args.plan_ngpus}
        config = CompileConfig(plan_ngpus=args.plan_ngpus, policy=args.policy, recompute=args.recompute,
                               param_dtype=dtype, memory_budget_gb=budget.gb, memory_budget_source=budget.source,
                               fused_kernels=args.fused_kernels, loss="chunked_cross_entropy",
                               loss_chunk_size=args.loss_chunk_size, policy_options=options,
                               hw_profile=args.hw_profile or (None if cuda else "cpu"),
                               fp8=args.fp8, fp8_recipe=args.fp8_recipe)
        compile_model(model, {"input_ids": ids, "labels": ids.clone()}, args.compile_dir, config)
        compile_seconds = time.perf_counter() - start
    dist.barrier()
    loaded = load_for_training(args.compile_dir, param_dtype=dtype,
                               backend=None if cuda or args.fake_world_size else "gloo",
                               accumulation=args.grad_accumulation_steps)
    plan, ctx, module = loaded.plan, loaded.ctx, loaded.module
    optimizer, reducer = loaded.optimizer, loaded.reducer
    gen = torch.Generator(device=ctx.device).manual_seed(1234 + ctx.copy_index)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(ctx.device, warmup=args.warmup, steps=args.steps)
    for step in timer:
        with out_of_memory_guard(plan, ctx.device, rank, step + 1):
            for micro in range(args.grad_accumulation_steps):
                ids = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_len), generator=gen,
                                    device=ctx.device)
                ctxmgr = reducer.no_sync() if micro < args.grad_accumulation_steps - 1 else contextlib.nullcontext()
                with ctxmgr:
                    loss = module(ids, ids)
                    (loss / args.grad_accumulation_steps).backward()
            optimizer.step(reducer.finish(), 1e-5, 1.0)
        reducer.zero_grad()
    step_s = timer.mean_s
    sequences = args.micro_batch_size * args.grad_accumulation_steps * ctx.dp_size
    flops = flops_per_sequence(plan["model_stats"], args.seq_len) * sequences
    readings = [peak_memory_gb(ctx.device), *_gpu_outside_allocator(ctx.device), host_memory_gib()["peak"],
                host_memory_gib()["rss"]]
    readings = torch.tensor(readings, device=ctx.device, dtype=torch.float64)
    dist.all_reduce(readings, op=dist.ReduceOp.MAX)  # the fullest rank's
    peak, reserved, outside, overhead, host_peak, host_rss = readings.tolist()
    offload = plan.get("offload") or {}
    record = {
        "gpu": torch.cuda.get_device_name() if cuda else "cpu", "world_size": ctx.world_size, "plan_ngpus": args.plan_ngpus,
        "policy": plan["policy"], "mesh": plan["mesh"], "recompute": args.recompute, "layers": args.num_layers,
        "recompute_scopes": len(plan["recompute_scopes"]), "offload_optimizer": bool(offload.get("optimizer")),
        "offload_activation_scopes": len(offload.get("activation_scopes", [])),
        "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size,
        "grad_accumulation_steps": args.grad_accumulation_steps, "num_params": plan["model_stats"]["num_params"],
        "step_s": round(step_s, 4), "tokens_per_s": round(sequences * args.seq_len / step_s, 1),
        "mfu": round(flops / step_s / (ctx.world_size * PEAK_TFLOPS * 1e12), 4),
        "peak_mem_gb": round(peak, 2), "peak_reserved_gib": round(reserved, 2),
        # What benchmarks/memory_margin.py turns into the profile's margins (planner/cost/budgets.py).
        "gpu_outside_allocator_gib": round(outside, 3), "reserved_over_allocated": round(overhead, 4),
        "host_peak_rss_gib": round(host_peak, 2), "host_rss_gib": round(host_rss, 2),
        "compile_s": compile_seconds, "loss": round(loss.item(), 4),
        # FP8 (plan.json "fp8"): the mode, and how many linears ran in FP8 under which recipe.
        "fp8": args.fp8, "fp8_recipe": args.fp8_recipe,
        "linears_in_fp8": sum(op["fp8"] for op in (plan.get("fp8") or {}).get("ops", [])),
        # Under the fake group collectives cost nothing: compare its step with est_compute_only_s.
        "fake_process_group": bool(args.fake_world_size),
        # The plan's own estimate, the one its budget check used (plan.json): peak_mem_gb is GiB like est_peak_gib.
        **plan_estimate_record(plan, args.grad_accumulation_steps),
    }
    record = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}  # CPU: unmeasured
    if "est_peak_gib" in record and cuda:
        record["peak_over_estimate"] = round(peak / record["est_peak_gib"], 3)
        record["reserved_over_estimate"] = round(reserved / record["est_peak_gib"] - 1, 4)
    if rank == 0:
        report(record, args.json_out)
    dist.barrier()
    reducer.close()
    dist.destroy_process_group()
    return record


if __name__ == "__main__":
    try:
        main()
    except GpuOutOfMemory as error:
        print(f"error: {error}", file=sys.stderr)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            exit_after_failure(1)  # the other ranks were told (failure_watchdog); no teardown
        sys.exit(1)
