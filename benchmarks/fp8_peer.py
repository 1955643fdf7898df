"""The peer FP8 baseline of issue 28: Hugging Face + Liger + gradient checkpointing, bf16 or torchao float8.

    python benchmarks/fp8_peer.py --seq_len 8192 --precision bf16 --json_out peer.jsonl
    python benchmarks/fp8_peer.py --seq_len 8192 --precision fp8 --json_out peer.jsonl   # torchao float8
    python benchmarks/train_mfu.py --num_layers 4 --seq_len 8192 --fp8 all --json_out ours.jsonl  # dimshard, same tokens

The model is the one ``train_mfu.py`` builds (Llama-3-8B shape, ``--num_layers`` layers, random bf16
weights) as a plain ``LlamaForCausalLM`` on one GPU: Liger's RMSNorm, SwiGLU, rotary and fused
linear cross-entropy patched in (``liger_kernel``; recorded as absent when not installed), every
decoder layer under gradient checkpointing and compiled (``torch.compile`` per layer), fused
AdamW. ``--precision fp8`` converts every linear but the output head to torchao's float8 training
(``convert_to_float8_training`` with ``--recipe``; the head is used by Liger's fused loss). It
times full steps as every benchmark does (benchmarks/measurement.py) and prints one JSON record
with MFU by docs/design.md's formula. torchao 0.17.0 is the release built against torch 2.11; it
is one wheel (``pip download torchao==0.17.0 --no-deps -d .wheels``, then ``pip install --no-deps``);
liger-kernel likewise.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field

import torch
from measurement import PEAK_TFLOPS, StepTimer, report

from dimshard.cli import parse_dataclass_args
from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments


@dataclass
class PeerArgs:
    """Flags of the benchmark (one field per flag)."""

    seq_len: int = field(default=8192, metadata={"help": "tokens per sequence (one sequence per step)"})
    num_layers: int = field(default=4, metadata={"help": "decoder layers of the Llama-3-8B-shaped model"})
    precision: str = field(default="fp8", metadata={"help": "bf16, or fp8 (torchao float8 training)",
                                                    "choices": ("bf16", "fp8")})
    recipe: str = field(default="tensorwise", metadata={"help": "torchao float8 recipe",
                                                        "choices": ("tensorwise", "rowwise", "rowwise_with_gw_hp")})
    compile_layers: bool = field(default=True, metadata={"help": "torch.compile each decoder layer"})
    steps: int = field(default=6, metadata={"help": "timed steps"})
    warmup: int = field(default=3, metadata={"help": "untimed steps first (compilation happens here)"})
    json_out: str | None = field(default=None, metadata={"help": "append the record as one JSON line here"})


def build_peer(args: PeerArgs) -> tuple[torch.nn.Module, dict]:
    """The Hugging Face model as the peer runs it, and what was applied (liger, float8 linears, compiled layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.num_layers,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=max(args.seq_len, 8192), rope_theta=500000.0,
                         attn_implementation="sdpa", tie_word_embeddings=False, use_cache=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    applied = {"liger": importlib.util.find_spec("liger_kernel") is not None, "float8_linears": 0}
    if applied["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.precision == "fp8":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        def eligible(module: torch.nn.Module, name: str) -> bool:
            return (isinstance(module, torch.nn.Linear) and "lm_head" not in name
                    and module.in_features % 16 == 0 and module.out_features % 16 == 0)

        convert_to_float8_training(model, module_filter_fn=eligible,
                                   config=Float8LinearConfig.from_recipe_name(args.recipe))
        applied["float8_linears"] = sum("Float8" in type(m).__name__ for m in model.modules())
    if args.compile_layers:
        for layer in model.model.layers:
            layer.compile()
    return model, applied


def main(argv: list[str] | None = None) -> dict:
    """Time the peer's steps and print its record."""
    enable_expandable_segments()
    args = parse_dataclass_args(PeerArgs, argv, description=__doc__.split("\n\n")[0])
    if not torch.cuda.is_available():
        sys.exit("benchmarks/fp8_peer.py measures a GPU; none is visible")
    torch.manual_seed(0)
    model, applied = build_peer(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(1234)
    torch.cuda.reset_peak_memory_stats()
    timer = StepTimer("cuda", warmup=args.warmup, steps=args.steps)
    for _ in timer:
        ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=gen, device="cuda")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = sum(p.numel() for p in model.parameters())
    # docs/design.md, "Measuring: MFU": 6 * (N * S + 2 * L * H * S^2) per sequence.
    flops = 6 * (params * args.seq_len + 2 * args.num_layers * 4096 * args.seq_len**2)
    record = {"gpu": torch.cuda.get_device_name(), "peer": "hf+liger+checkpointing", **applied,
              "precision": args.precision, "recipe": args.recipe if args.precision == "fp8" else None,
              "compiled_layers": args.compile_layers, "layers": args.num_layers, "seq_len": args.seq_len,
              "num_params": params, "step_s": round(timer.mean_s, 4),
              "tokens_per_s": round(args.seq_len / timer.mean_s, 1),
              "mfu": round(flops / timer.mean_s / (PEAK_TFLOPS * 1e12), 4),
              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "loss": round(loss.item(), 4),
              "torch": torch.__version__,
              "torchao": __import__("torchao").__version__ if args.precision == "fp8" else None}
    report(record, args.json_out)
    return record


if __name__ == "__main__":
    main()
