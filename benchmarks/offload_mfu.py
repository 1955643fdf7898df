"""CPU-offload benchmark: step time, MFU, GPU and host peak memory of a Llama-3-8B-shaped model on one device.

    python3 benchmarks/offload_mfu.py --num_layers 32 --seq_len 131072 --offload optimizer --recompute layer

Builds a Llama-3-8B-shaped model (hidden 4096, 32 heads, 8 KV heads, intermediate 14336, vocabulary
128256, random weights) with ``--num_layers`` layers, compiles it for one device under the ``dp``
policy (or ``--policy auto``) with the chunked cross-entropy loss and the given recompute and
``--offload`` (none, optimizer, activations, all; plan.json records it, generated code and the
optimizer honour it), and times full training steps (forward, backward, gradient reduction, AdamW
with fp32 masters) on random tokens. Prints one JSON record and a one-line table row: step
seconds, optimizer-step seconds, tokens/s, MFU (6*(N*S + 2*L*H*S^2) per sequence over 989 TFLOP/s),
peak GPU memory (allocated and reserved), host memory (the process's peak resident set, and the
bytes the offloads hold) and where the offloaded AdamW update ran, next to the plan's own estimate
(plan.json ``estimate``: the numbers its budget check used). Under ``--policy auto`` without
``--memory_budget_gb`` the GPU budget is train.py's default (this GPU's memory less the measured
margin, planner/cost/budgets.py), and without ``--host_memory_budget_gb`` the host budget too. Expandable
segments are enabled first (runtime/reliability/gpu_memory.py); running out of GPU memory ends with one line.
Runs on CPU at tiny sizes (``--hidden_size 64 ...``), where host memory is on both sides of every copy.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from measurement import PEAK_TFLOPS, StepTimer, load_for_training, report, synchronize

from dimshard.cli import parse_dataclass_args
from dimshard.runtime.reliability.gpu_memory import (
    GpuOutOfMemory,
    enable_expandable_segments,
    out_of_memory_guard,
)


@dataclass
class OffloadArgs:
    """Flags of the benchmark (one field per flag)."""

    num_layers: int = field(default=4, metadata={"help": "decoder layers of the Llama-3-8B-shaped model"})
    seq_len: int = field(default=8192, metadata={"help": "tokens per sequence"})
    offload: str = field(default="optimizer", metadata={
        "help": "what lives in host memory: none, optimizer, activations, all (auto: the auto policy decides)",
        "choices": ("auto", "none", "optimizer", "activations", "all")})
    update_device: str = field(default="auto", metadata={
        "help": "where the offloaded AdamW update runs: cpu, gpu or auto (timed)", "choices": ("auto", "cpu", "gpu")})
    policy: str = field(default="dp", metadata={"help": "partition policy (dp or auto on one device)"})
    recompute: str = field(default="layer", metadata={"help": "none, layer, auto, or a comma-separated list of scopes"})
    memory_budget_gb: float | None = field(default=None, metadata={
        "help": "GPU budget for the auto policy (GB); default: this GPU's memory less the measured margin"})
    host_memory_budget_gb: float | None = field(default=None, metadata={
        "help": "host-memory budget per rank for the auto policy (GB); default: this machine's RAM less the "
                "measured margins"})
    hw_profile: str = field(default="", metadata={
        "help": "cost-model hardware profile (shipped name or JSON); default: this GPU's (cpu without one)"})
    steps: int = field(default=2, metadata={"help": "timed optimizer steps"})
    warmup: int = field(default=1, metadata={"help": "untimed optimizer steps first"})
    fused_kernels: bool | None = field(default=None, metadata={
        "help": "trace RMSNorm/SwiGLU/rotary as the fused Triton kernels; default: on GPU only"})
    compile_dir: str = field(default="/tmp/dimshard_offload_bench", metadata={"help": "compile output folder"})
    json_out: str | None = field(default=None, metadata={"help": "append the record as one JSON line to this file"})
    hidden_size: int = field(default=4096, metadata={"help": "hidden size (shrink for CPU smoke runs)"})
    intermediate_size: int = field(default=14336, metadata={"help": "MLP width"})
    num_heads: int = field(default=32, metadata={"help": "attention heads"})
    num_kv_heads: int = field(default=8, metadata={"help": "key/value heads"})
    vocab_size: int = field(default=128256, metadata={"help": "vocabulary size"})


def _compile(args: OffloadArgs, on_gpu: bool) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dimshard.planner import CompileConfig, compile_model
    from dimshard.planner.cost.budgets import MemoryBudget, default_gpu_budget
    from dimshard.planner.cost.hardware import load_hw_profile

    config = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                         num_key_value_heads=args.num_kv_heads, vocab_size=args.vocab_size,
                         max_position_embeddings=max(args.seq_len, 8192), rope_theta=500000.0,
                         attn_implementation="sdpa", tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    ids = torch.zeros(1, args.seq_len, dtype=torch.long)
    options: dict = {"offload": args.offload}
    if args.host_memory_budget_gb is not None:
        options["host_memory_budget_gb"] = args.host_memory_budget_gb
    fused = on_gpu if args.fused_kernels is None else args.fused_kernels
    hw_profile = args.hw_profile or (None if on_gpu else "cpu")
    if args.memory_budget_gb is not None:
        budget = MemoryBudget(args.memory_budget_gb, "--memory_budget_gb")
    elif args.policy == "auto":
        budget = default_gpu_budget(load_hw_profile(hw_profile), on_device=on_gpu)
    else:
        budget = MemoryBudget(None, f"none: policy {args.policy} plans no memory")
    compile_config = CompileConfig(plan_ngpus=1, policy=args.policy, recompute=args.recompute,
                                   memory_budget_gb=budget.gb, memory_budget_source=budget.source,
                                   policy_options=options, param_dtype=torch.bfloat16 if on_gpu else torch.float32,
                                   fused_kernels=fused, loss="chunked_cross_entropy", hw_profile=hw_profile)
    start = time.perf_counter()
    compile_model(model, {"input_ids": ids, "labels": ids.clone()}, args.compile_dir, compile_config)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    """Compile, train ``warmup + steps`` steps, print and return the result record."""
    enable_expandable_segments()  # before CUDA starts: the budgets' margins were measured with it
    args = parse_dataclass_args(OffloadArgs, argv, description=__doc__.split("\n\n")[0])
    from dimshard.runtime.training.metrics import flops_per_sequence, host_memory_gib, plan_estimate_record

    on_gpu = torch.cuda.is_available()
    compile_s = _compile(args, on_gpu)
    # The same weights whatever is offloaded (seeded): equal losses are part of the check.
    loaded = load_for_training(args.compile_dir, param_dtype=torch.bfloat16 if on_gpu else torch.float32,
                               update_device=args.update_device, weight_seed=0)
    plan, ctx, module = loaded.plan, loaded.ctx, loaded.module
    optimizer, reducer = loaded.optimizer, loaded.reducer
    device = ctx.device
    offload = plan.get("offload") or {}
    gen = torch.Generator(device=device).manual_seed(1234)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    optimizer_times, losses = [], []
    timer = StepTimer(device, warmup=args.warmup, steps=args.steps)
    for step in timer:
        with out_of_memory_guard(plan, device, step=step + 1):
            ids = torch.randint(0, args.vocab_size, (1, args.seq_len), generator=gen, device=device)
            loss = module(ids, ids)
            loss.backward()
            grads = reducer.finish()
            synchronize(device)
            optimizer_start = time.perf_counter()
            optimizer.step(grads, 1e-5, 1.0)
        reducer.zero_grad()
        synchronize(device)
        if step >= args.warmup:
            optimizer_times.append(time.perf_counter() - optimizer_start)
        losses.append(loss.detach())
    losses = [round(loss.item(), 4) for loss in losses]
    step_s = timer.mean_s
    flops = flops_per_sequence(plan["model_stats"], args.seq_len)
    offloader = getattr(module, "activation_offload", None)
    state = optimizer.host_state
    record = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu", "layers": args.num_layers,
        "seq_len": args.seq_len, "num_params": plan["model_stats"]["num_params"], "policy": plan["policy"],
        "recompute_scopes": len(plan["recompute_scopes"]), "offload_optimizer": bool(offload.get("optimizer")),
        "offload_activation_scopes": len(offload.get("activation_scopes", [])),
        "update_device": optimizer.update_device if optimizer.offload else None,
        "update_rates_gelem_s": {k: round(v / 1e9, 3) for k, v in optimizer.update_rates.items()},
        "step_s": round(step_s, 4), "optimizer_s": round(sum(optimizer_times) / len(optimizer_times), 4),
        "tokens_per_s": round(args.seq_len / step_s, 1),
        "mfu": round(flops / step_s / (PEAK_TFLOPS * 1e12), 4) if on_gpu else None,
        "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
        "gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if on_gpu else None,
        "host_peak_rss_gib": round(host_memory_gib()["peak"], 2),
        "host_optimizer_gib": round(state.host_bytes / 2**30, 2) if state is not None else 0.0,
        "host_activations_peak_gib": round(offloader.host_peak_bytes / 2**30, 2) if offloader is not None else 0.0,
        "compile_s": round(compile_s, 1), "optimizer_init_s": round(loaded.optimizer_init_s, 1), "losses": losses,
        # The plan's own estimate, the one its budget check used (plan.json): GiB like the measurements.
        **plan_estimate_record(plan),
    }
    if on_gpu and record.get("est_peak_gib"):
        # benchmarks/memory_margin.py's reading of the same name (planner/cost/budgets.py).
        record["reserved_over_estimate"] = round(record["gpu_reserved_gib"] / record["est_peak_gib"] - 1, 4)
    report(record, args.json_out)
    print(f"| {args.num_layers} | {args.seq_len} | {args.offload} | {record['update_device']} | {record['step_s']} | "
          f"{record['optimizer_s']} | {record['tokens_per_s']} | {record['mfu']} | {record['gpu_peak_gib']} | "
          f"{record['host_peak_rss_gib']} | {record['host_optimizer_gib']} + {record['host_activations_peak_gib']} |",
          flush=True)
    reducer.close()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return record


if __name__ == "__main__":
    try:
        sys.exit(0 if main() else 1)
    except GpuOutOfMemory as error:
        sys.exit(f"error: {error}")
