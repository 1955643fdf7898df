"""Training-step cost of document masking: the same packed tokens with and without document boundaries.

    python benchmarks/document_masking.py                       # one H200: 4-layer 8B-shaped model at 128K
    python benchmarks/document_masking.py --device cpu --num_layers 2 --seq_len 256 --hidden_size 64 \
        --intermediate_size 128 --num_heads 4 --num_kv_heads 2 --vocab_size 256 --steps 1 --warmup 1 \
        --min_long 64 --max_long 128 --max_short 32 --no-fused_kernels      # CPU smoke run

Builds a Llama-3-8B-shaped model (hidden 4096, 32 heads, 8 KV heads, intermediate 14336,
vocabulary 128256) with ``--num_layers`` layers and dimshard's attention op, packs one sequence of
``--seq_len`` tokens from a seeded mix of short and long documents, compiles it twice (plain
causal, and with ``position_ids``/``document_ids`` as train.py --document_masking does) and times
full training steps (forward, backward, ZeRO AdamW) of each on one device. Prints one JSON line per
mode: step time, tokens/s, MFU by the reference formula 6*(N*S + 2*L*H*S^2) per sequence over 989
TFLOP/s (which counts full causal attention, so masking shows as a higher MFU when it skips work),
the fraction of causal attention the documents keep, and peak memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from measurement import PEAK_TFLOPS, StepTimer, load_for_training, report

from dimshard.cli import parse_dataclass_args


@dataclass
class MaskingArgs:
    """Flags of the benchmark (one field per flag)."""

    device: str = field(default="cuda", metadata={"help": "cuda (measure) or cpu (a smoke run)",
                                                  "choices": ("cuda", "cpu")})
    num_layers: int = field(default=4, metadata={"help": "decoder layers of the Llama-3-8B-shaped model"})
    seq_len: int = field(default=131072, metadata={"help": "tokens per packed sequence"})
    steps: int = field(default=5, metadata={"help": "timed training steps per mode"})
    warmup: int = field(default=2, metadata={"help": "untimed steps first (the FlexAttention kernel compiles)"})
    short_fraction: float = field(default=0.7, metadata={"help": "probability that a document is short"})
    max_short: int = field(default=4096, metadata={"help": "short documents: 16 .. this many tokens"})
    min_long: int = field(default=16384, metadata={"help": "long documents: this many tokens at least"})
    max_long: int = field(default=65536, metadata={"help": "long documents: at most this many tokens"})
    seed: int = field(default=0, metadata={"help": "seed of the document lengths and tokens"})
    fused_kernels: bool = field(default=True, metadata={"help": "trace RMSNorm/SwiGLU/rotary as fused kernels"})
    recompute: str = field(default="layer", metadata={
        "help": "activation recompute: layer (4 layers at 128K fit one H200 with it), none, or scopes"})
    loss_chunk_size: int = field(default=0, metadata={"help": "tokens per chunk of the chunked loss; 0: automatic"})
    compile_dir: str = field(default="/tmp/dimshard_docmask", metadata={"help": "compile outputs go under here"})
    hidden_size: int = field(default=4096, metadata={"help": "hidden size (shrink for smoke runs)"})
    intermediate_size: int = field(default=14336, metadata={"help": "MLP width"})
    num_heads: int = field(default=32, metadata={"help": "attention heads"})
    num_kv_heads: int = field(default=8, metadata={"help": "key/value heads"})
    vocab_size: int = field(default=128256, metadata={"help": "vocabulary size"})


def document_lengths(args: MaskingArgs) -> list[int]:
    """Seeded lengths of short and long documents filling exactly ``seq_len`` tokens."""
    generator = torch.Generator().manual_seed(args.seed)
    lengths: list[int] = []
    while sum(lengths) < args.seq_len:
        if torch.rand((), generator=generator) < args.short_fraction:
            low, high = 16, args.max_short
        else:
            low, high = args.min_long, args.max_long
        lengths.append(int(torch.randint(low, high + 1, (), generator=generator)))
    lengths[-1] -= sum(lengths) - args.seq_len
    return [n for n in lengths if n > 0]


def packed_inputs(args: MaskingArgs, lengths: list[int], masking: bool) -> dict[str, torch.Tensor]:
    """One packed row as the data loader gives it (runtime/data/packed_loader.py)."""
    from dimshard.runtime.data.packed_stream import labels_for

    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab_size, (1, args.seq_len), generator=generator)
    if not masking:
        return {"input_ids": ids, "labels": ids.clone()}
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    documents = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    labels = torch.from_numpy(labels_for(ids.numpy(), positions.numpy()))
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "document_ids": documents}


def run_mode(args: MaskingArgs, lengths: list[int], masking: bool) -> dict:
    """Compile and time one mode; returns its result record."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dimshard.kernels.hf_attention import register
    from dimshard.planner import CompileConfig, compile_model
    from dimshard.runtime.training.metrics import flops_per_sequence, peak_memory_gb

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model_config = LlamaConfig(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                               num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                               num_key_value_heads=args.num_kv_heads, vocab_size=args.vocab_size,
                               max_position_embeddings=max(args.seq_len, 8192), rope_theta=500000.0,
                               attn_implementation=register(), tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config)
    inputs = packed_inputs(args, lengths, masking)
    out_dir = f"{args.compile_dir}/{'masked' if masking else 'causal'}"
    config = CompileConfig(plan_ngpus=1, policy="dp", recompute=args.recompute, param_dtype=dtype,
                           fused_kernels=args.fused_kernels, loss="chunked_cross_entropy",
                           loss_chunk_size=args.loss_chunk_size, hw_profile=None if cuda else "cpu")
    compile_model(model, {k: torch.zeros_like(v) for k, v in inputs.items()}, out_dir, config)
    loaded = load_for_training(out_dir, param_dtype=dtype, backend=None if cuda else "gloo")
    plan, ctx, module = loaded.plan, loaded.ctx, loaded.module
    optimizer, reducer = loaded.optimizer, loaded.reducer
    batch = {k: v.to(ctx.device) for k, v in inputs.items()}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(ctx.device, warmup=args.warmup, steps=args.steps)
    for _ in timer:
        loss = module(**batch)
        loss.backward()
        optimizer.step(reducer.finish(), 1e-5, 1.0)
        reducer.zero_grad()
    reducer.close()
    step_s = timer.mean_s
    kept = sum(n * (n + 1) / 2 for n in lengths) / (args.seq_len * (args.seq_len + 1) / 2) if masking else 1.0
    return {
        "mode": "document_masking" if masking else "causal", "device": torch.cuda.get_device_name() if cuda else "cpu",
        "layers": args.num_layers, "seq_len": args.seq_len, "documents": len(lengths) if masking else 1,
        "attention_kept": round(kept, 4), "step_s": round(step_s, 4), "tokens_per_s": round(args.seq_len / step_s, 1),
        "mfu": round(flops_per_sequence(plan["model_stats"], args.seq_len) / step_s / (PEAK_TFLOPS * 1e12), 4),
        "peak_mem_gb": round(peak_memory_gb(ctx.device), 2), "loss": round(loss.item(), 4),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Run both modes in one process (one device); print and return their records."""
    from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments

    enable_expandable_segments()  # before CUDA starts, as every rank of a training run
    import torch.distributed as dist

    args = parse_dataclass_args(MaskingArgs, argv, description=__doc__.split("\n\n")[0])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is visible; use --device cpu for a smoke run")
    if args.device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    lengths = document_lengths(args)
    print(json.dumps({"document_lengths": lengths}), flush=True)
    records = []
    for masking in (False, True):
        records.append(run_mode(args, lengths, masking))
        report(records[-1])
        if args.device == "cuda":
            torch.cuda.empty_cache()
    dist.destroy_process_group()
    return records


if __name__ == "__main__":
    main()
