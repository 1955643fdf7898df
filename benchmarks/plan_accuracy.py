"""How well the cost model predicts: estimated vs measured step time and peak memory of compiled plans.

    torchrun --nproc_per_node 8 benchmarks/plan_accuracy.py --policies auto,tp_sp --seq_lens 32768,65536
    python benchmarks/plan_accuracy.py --seq_lens 4096,8192 --recompute none,layer     # one GPU
    python benchmarks/plan_accuracy.py --device cpu                                    # CPU smoke run

For every (policy, recompute, sequence length) it compiles a Llama-3-8B-shaped model (hidden 4096,
32 heads, 8 KV heads, intermediate 14336, vocabulary 128256; ``--num_layers`` layers) with the
chunked cross-entropy loss on ``plan_ngpus`` = the number of processes, loads the generated module
on every rank with random bf16 weights, times forward plus backward, and prints the estimate
(plan.json's ``estimate``, the one the plan was accepted with: forward plus backward; memory:
parameters, activations and transients, as this loop has no optimizer and no gradient buffers) next to the measurement
(``torch.cuda.max_memory_allocated``) and their ratio. ``--device cpu`` runs a tiny model on gloo to check the whole path, not the numbers.
"""

from __future__ import annotations

import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from measurement import StepTimer, append_json_line

from dimshard.cli import parse_dataclass_args
from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments


@dataclass
class AccuracyArgs:
    """Flags of the benchmark (one field per flag)."""

    device: str = field(default="cuda", metadata={"help": "cuda (measure) or cpu (smoke run of a tiny model on gloo)"})
    policies: str = field(default="auto", metadata={"help": "comma-separated policies: auto, dp, tp, tp_sp, tp_batch"})
    recompute: str = field(default="none,layer", metadata={"help": "comma-separated recompute choices: none, layer, auto"})
    seq_lens: str = field(default="", metadata={"help": "comma-separated sequence lengths; default 8192,16384 (cpu: 32)"})
    num_layers: int = field(default=4, metadata={"help": "decoder layers"})
    hidden_size: int = field(default=0, metadata={"help": "hidden size; default 4096 (cpu: 64)"})
    intermediate_size: int = field(default=0, metadata={"help": "MLP width; default 14336 (cpu: 128)"})
    num_heads: int = field(default=0, metadata={"help": "attention heads; default 32 (cpu: 8)"})
    num_kv_heads: int = field(default=0, metadata={"help": "key/value heads; default 8 (cpu: 4)"})
    vocab_size: int = field(default=0, metadata={"help": "vocabulary size; default 128256 (cpu: 256)"})
    loss_chunk_size: int = field(default=0, metadata={"help": "tokens per chunk of the chunked loss; 0: automatic"})
    fused_kernels: str = field(default="auto", metadata={"help": "fused RMSNorm/SwiGLU/rotary: auto (on for cuda), on, off"})
    memory_budget_gb: float = field(default=0.0, metadata={"help": "per-GPU budget for auto (0: none)"})
    hw_profile: str = field(default="", metadata={"help": "cost-model profile name or JSON; default: this GPU's (cpu: cpu)"})
    steps: int = field(default=5, metadata={"help": "timed forward+backward steps"})
    warmup: int = field(default=2, metadata={"help": "untimed steps first"})
    compile_dir: str = field(default="/tmp/dimshard_plan_accuracy", metadata={"help": "where compile outputs go"})
    json_out: str = field(default="", metadata={"help": "append one JSON line per measurement to this file"})


_CUDA_SHAPE = {"hidden_size": 4096, "intermediate_size": 14336, "num_heads": 32, "num_kv_heads": 8, "vocab_size": 128256}
_CPU_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_heads": 8, "num_kv_heads": 4, "vocab_size": 256}


def parse_args(argv: list[str] | None = None) -> AccuracyArgs:
    """Flags from the command line, with device-dependent defaults filled in."""
    args = parse_dataclass_args(AccuracyArgs, argv, description=__doc__.split("\n\n")[0])
    shape = _CPU_SHAPE if args.device == "cpu" else _CUDA_SHAPE
    for key, value in shape.items():
        if not getattr(args, key):
            setattr(args, key, value)
    args.seq_lens = args.seq_lens or ("32" if args.device == "cpu" else "8192,16384")
    args.hw_profile = args.hw_profile or ("cpu" if args.device == "cpu" else "")
    return args


def _model(args: AccuracyArgs, seq_len: int, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                         num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                         num_key_value_heads=args.num_kv_heads, vocab_size=args.vocab_size,
                         max_position_embeddings=max(seq_len, 8192), rope_theta=500000.0,
                         attn_implementation="sdpa", tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    # Parameters stay on meta (no memory); rotary tables are rebuilt for real, in float32, from the config.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def compile_and_estimate(args: AccuracyArgs, policy: str, recompute: str, seq_len: int, plan_ngpus: int,
                         out: Path) -> dict:
    """Compile one configuration into ``out`` and return the plan's estimate (plan.json's ``estimate``)."""
    from dimshard.planner import CompileConfig, compile_model
    from dimshard.runtime.module import read_plan

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    ids = torch.zeros(1, seq_len, dtype=torch.long)
    config = CompileConfig(
        plan_ngpus=plan_ngpus, policy=policy, recompute=recompute, param_dtype=dtype,
        memory_budget_gb=args.memory_budget_gb or None, loss="chunked_cross_entropy",
        loss_chunk_size=args.loss_chunk_size, hw_profile=args.hw_profile or None,
        fused_kernels=args.fused_kernels == "on" or (args.fused_kernels == "auto" and args.device != "cpu"))
    start = time.perf_counter()
    result = compile_model(_model(args, seq_len, dtype), {"input_ids": ids, "labels": ids.clone()}, out, config)
    # The estimate the plan was accepted with, as plan_report.md shows it: no second estimate here.
    est = read_plan(out)["estimate"]
    m = est["gpu_memory_bytes"]
    # This loop has no optimizer and no preallocated gradient buffers (its .grad tensors appear as
    # backward frees activations): compare the parameters, activations and transients.
    comparable = m["parameters"] + m["activations"] + m["recompute"] + m["working"]
    return {"mesh": dict(zip(result.plan.mesh.axis_names, result.plan.mesh.shape)),
            "recompute_layers": len(result.plan.recompute_scopes), "estimated_s": est["compute_s"] + est["comm_s"],
            "estimated_compute_s": est["compute_s"], "estimated_comm_s": est["comm_s"],
            "estimated_peak_gb": comparable / 1e9, "estimated_training_peak_gb": est["gpu_peak_bytes"] / 1e9,
            "hw_profile": est["hw_profile"], "compile_s": time.perf_counter() - start}


def measure(args: AccuracyArgs, out: Path, seq_len: int) -> dict:
    """Load the compiled module on this rank, run forward+backward, return mean seconds and peak GB."""
    from dimshard.runtime.distributed import init_parallel
    from dimshard.runtime.module import load_parallel_module, read_plan

    ctx = init_parallel(read_plan(out), backend="gloo" if args.device == "cpu" else None)
    module = load_parallel_module(out, ctx)
    with torch.no_grad():
        for lp in module.local_parameters():
            # Seeded by name and slice so replicas of a shard agree, as a real checkpoint would.
            gen = torch.Generator(device=lp.param.device).manual_seed(zlib.crc32(f"{lp.name}{lp.slices}".encode()))
            if len(lp.full_shape) > 1:
                lp.param.normal_(0.0, 0.02, generator=gen)
            else:
                lp.param.fill_(1.0)
    cuda = ctx.device.type == "cuda"
    gen = torch.Generator(device=ctx.device).manual_seed(1234)
    ids = torch.randint(0, args.vocab_size, (1, seq_len), generator=gen, device=ctx.device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(ctx.device, warmup=args.warmup, steps=args.steps)
    for _ in timer:
        for lp in module.local_parameters():
            lp.param.grad = None  # the previous pass's
        loss = module(ids, ids)
        loss.backward()
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
    stats = torch.tensor([timer.mean_s, peak], device=ctx.device, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    del module
    if cuda:
        torch.cuda.empty_cache()
    return {"measured_s": stats[0].item(), "measured_peak_gb": stats[1].item(), "loss": loss.item()}


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every configuration; rank 0 prints a table and returns the records."""
    enable_expandable_segments()  # before CUDA starts, as every rank of a training run
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("plan_accuracy measures GPUs but no CUDA device is visible; use --device cpu for a smoke run")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        # Rank 0 compiles while the others wait at a barrier: the default group must exist first.
        if args.device == "cuda":
            dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
        else:
            dist.init_process_group("gloo")
    records = []
    configs = [(p, r, int(s)) for p in args.policies.split(",") for r in args.recompute.split(",")
               for s in args.seq_lens.split(",")]
    for policy, recompute, seq_len in configs:
        out = Path(args.compile_dir) / f"{policy}_{recompute}_{seq_len}_{world}"
        record = {"policy": policy, "recompute": recompute, "seq_len": seq_len, "plan_ngpus": world}
        if rank == 0:
            record.update(compile_and_estimate(args, policy, recompute, seq_len, world, out))
        if dist.is_initialized():
            dist.barrier()
        record.update(measure(args, out, seq_len))
        record["time_ratio"] = record["measured_s"] / record["estimated_s"] if rank == 0 else None
        if rank == 0:
            record["memory_ratio"] = record["measured_peak_gb"] / record["estimated_peak_gb"]
            records.append(record)
            print(f"{policy:7s} recompute={recompute:5s} seq={seq_len:7d} mesh={record['mesh']} "
                  f"layers recomputed={record['recompute_layers']}: step est {record['estimated_s'] * 1e3:9.1f} ms "
                  f"meas {record['measured_s'] * 1e3:9.1f} ms (x{record['time_ratio']:.2f}); peak est "
                  f"{record['estimated_peak_gb']:7.2f} GB meas {record['measured_peak_gb']:7.2f} GB "
                  f"(x{record['memory_ratio']:.2f})", flush=True)
            append_json_line(args.json_out, {**record, "device": torch.cuda.get_device_name()
                                             if args.device == "cuda" else "cpu"})
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return records


if __name__ == "__main__":
    main()
