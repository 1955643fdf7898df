"""One training step of several model families on one GPU: MFU, tokens/s and peak memory per family.

    python benchmarks/model_breadth.py --seq_len 32768 --num_layers 4                 # one H200
    python benchmarks/model_breadth.py --device cpu --seq_len 64 --num_layers 2 --tiny   # CPU smoke run

Each family (``--families``, default Qwen2, Qwen3, Mistral with its sliding window, Gemma 2 with
attention and final-logit soft-capping, StableLM as the LayerNorm family) is built 8B-shaped
(``--tiny``: a few dozen units wide) with ``--num_layers`` layers through ``planner.hf.build_on_meta``
(dimshard's attention), compiled for one device with the chunked loss, and trained for
``--warmup`` + ``--steps`` optimizer steps (bf16 weights with fp32 AdamW masters on GPU) on random
tokens. MFU follows docs/design.md: 6*(N*S + 2*L*H*S^2) FLOPs per sequence over 989 TFLOP/s (the
reference formula counts full causal attention, so sliding-window layers score below their real
utilisation). A family that fails prints an error record and the next one runs.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from measurement import PEAK_TFLOPS, StepTimer, load_for_training, report

from dimshard.cli import parse_dataclass_args

# 8B-class shapes of each family (Gemma 2 as its 9B): hidden, intermediate, heads, kv heads, head dim, vocab.
SHAPES = {
    "qwen2": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                  vocab_size=152064),
    "qwen3": dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128, vocab_size=151936),
    "mistral": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128, vocab_size=32768, sliding_window=4096),
    "gemma2": dict(hidden_size=3584, intermediate_size=14336, num_attention_heads=16, num_key_value_heads=8,
                   head_dim=256, vocab_size=256000, sliding_window=4096, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, query_pre_attn_scalar=256),
    "stablelm": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=100352, partial_rotary_factor=0.25),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=256)


@dataclass
class BreadthArgs:
    """Flags of the benchmark (one field per flag)."""

    device: str = field(default="cuda", metadata={
        "help": "cuda (measure) or cpu (a smoke run that checks the path, not the numbers)", "choices": ("cuda", "cpu")})
    families: str = field(default="qwen2,qwen3,mistral,gemma2,stablelm", metadata={
        "help": f"comma-separated model types, from {', '.join(SHAPES)}"})
    num_layers: int = field(default=4, metadata={"help": "decoder layers of each model"})
    seq_len: int = field(default=32768, metadata={"help": "tokens per sequence (one sequence per step)"})
    steps: int = field(default=1, metadata={"help": "timed optimizer steps per family"})
    warmup: int = field(default=1, metadata={"help": "untimed optimizer steps first (kernel compilation)"})
    tiny: bool = field(default=False, metadata={"help": "tiny widths instead of 8B shapes (CPU smoke runs)"})
    fused_kernels: bool = field(default=True, metadata={
        "help": "trace RMSNorm/SwiGLU/rotary as the fused kernels where a family's modules match (GPU)"})
    compile_dir: str = field(default="/tmp/dimshard_model_breadth", metadata={
        "help": "parent folder of each family's compile output"})
    json_out: str | None = field(default=None, metadata={"help": "append each record as one JSON line to this file"})


def family_config(model_type: str, args: BreadthArgs) -> Any:
    """The benchmark config of ``model_type``: its 8B-class (or tiny) shape, no dropout."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in SHAPES:
        raise ValueError(f"--families names {model_type!r}; pick from {', '.join(SHAPES)}")
    shape = dict(SHAPES[model_type])
    if args.tiny:
        shape.update(TINY)
        if "sliding_window" in shape:
            shape["sliding_window"] = max(2, args.seq_len // 4)
        if "query_pre_attn_scalar" in shape:
            shape["query_pre_attn_scalar"] = TINY["head_dim"]
    config = CONFIG_MAPPING[model_type](num_hidden_layers=args.num_layers, max_position_embeddings=max(args.seq_len,
                                        8192), tie_word_embeddings=model_type == "gemma2", **shape)
    for name, value in config.to_dict().items():
        if isinstance(value, float) and "dropout" in name:
            setattr(config, name, 0.0)
    if model_type == "qwen2" and not args.tiny:
        config.use_sliding_window = False
    return config


def run_family(model_type: str, args: BreadthArgs) -> dict:
    """Compile and time one family; the record of ``benchmarks/RESULTS.md``'s columns."""
    from dimshard.planner import CompileConfig, compile_model
    from dimshard.planner.graph.hf import build_on_meta
    from dimshard.runtime.training.metrics import flops_per_sequence, peak_memory_gb

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    config = family_config(model_type, args)
    model = build_on_meta(config)
    ids = torch.zeros(1, args.seq_len, dtype=torch.long)
    out = Path(args.compile_dir) / model_type
    start = time.perf_counter()
    compile_config = CompileConfig(plan_ngpus=1, policy="dp", param_dtype=dtype, fused_kernels=args.fused_kernels,
                                   loss="chunked_cross_entropy", hw_profile=None if cuda else "cpu")
    compile_model(model, {"input_ids": ids, "labels": ids.clone()}, out, compile_config)
    compile_s = time.perf_counter() - start
    loaded = load_for_training(out, param_dtype=dtype, backend=None if cuda else "gloo")
    plan, ctx, module = loaded.plan, loaded.ctx, loaded.module
    optimizer, reducer = loaded.optimizer, loaded.reducer
    gen = torch.Generator(device=ctx.device).manual_seed(1234)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(ctx.device, warmup=args.warmup, steps=args.steps)
    for _ in timer:
        batch = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=gen, device=ctx.device)
        loss = module(batch, batch)
        loss.backward()
        optimizer.step(reducer.finish(), 1e-5, 1.0)
        reducer.zero_grad()
    reducer.close()
    step_s = timer.mean_s
    flops = flops_per_sequence(plan["model_stats"], args.seq_len)
    record = {
        "family": model_type, "gpu": torch.cuda.get_device_name() if cuda else "cpu", "layers": args.num_layers,
        "seq_len": args.seq_len, "num_params": plan["model_stats"]["num_params"],
        "window": getattr(config, "sliding_window", None) if model_type != "qwen2" else None,
        "step_s": round(step_s, 4), "tokens_per_s": round(args.seq_len / step_s, 1),
        "mfu": round(flops / step_s / (PEAK_TFLOPS * 1e12), 4), "peak_mem_gb": round(peak_memory_gb(ctx.device), 2),
        "compile_s": round(compile_s, 2), "loss": round(loss.item(), 4),
    }
    del module, optimizer, loaded
    if cuda:
        torch.cuda.empty_cache()
    return record


def main(argv: list[str] | None = None) -> list[dict]:
    """Run every family in turn; print one JSON line each (an ``error`` record for a failure)."""
    from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments

    enable_expandable_segments()  # before CUDA starts, as every rank of a training run
    args = parse_dataclass_args(BreadthArgs, argv, description=__doc__.split("\n\n")[0])
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/model_breadth.py measures a GPU but no CUDA device is visible; use --device cpu --tiny")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in SHAPES]
    if unknown:
        sys.exit(f"error: --families names {', '.join(unknown)}; pick from {', '.join(SHAPES)}")
    if not dist.is_initialized():
        kwargs: dict = {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        if args.device == "cuda":
            torch.cuda.set_device(0)
            kwargs["device_id"] = torch.device("cuda", 0)
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", **kwargs)
    records = []
    for family in families:
        try:
            record = run_family(family, args)
        except Exception as error:  # noqa: BLE001 — one family's failure must not stop the others
            record = {"family": family, "error": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}",
                      "where": traceback.format_exc(limit=-2).strip().splitlines()[-3:]}
        report(record, args.json_out)
        records.append(record)
    dist.destroy_process_group()
    return records


if __name__ == "__main__":
    main()
