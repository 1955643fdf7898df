"""Sequence-split attention blocks against one monolithic causal attention call, in one process.

Runs every rank's blocks of a P-way zigzag split of one sequence (`kernels/_cp_simulate.py`: the
blocks, log-sum-exp merges and gradient accumulations `sequence_split_attention` runs on each
rank, without the transfers), forward and backward, and compares the summed time with one fused
causal attention call over the whole sequence (forward + backward, same backend): the split's
compute overhead, which is what context parallelism adds when its transfers are overlapped.
Reports per method ("ring": P blocks per rank, "allgather": 3 blocks per rank on the gathered
sequence) the forward, backward and total ms, the ratio to the monolithic call, the max abs error
of out / dq / dk / dv against the monolithic call (and, for scale, the monolithic call of the
other fused backend against it), attention TFLOP/s and MFU (3.5 x 2·hq·L²·e causal fwd+bwd flops
over 989 TFLOP/s), tokens/s and peak memory.

    python benchmarks/context_parallel_blocks.py                  # H200: 128K tokens, P=8, Llama-3-8B heads
    python benchmarks/context_parallel_blocks.py --seq_len 512 --world_sizes 2,4 --num_heads 4 \\
        --num_kv_heads 2 --head_dim 16 --dtype float32            # CPU, tiny (math backend)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from measurement import PEAK_TFLOPS, median_ms, synchronize, write_json_report

from dimshard.cli import parse_dataclass_args
from dimshard.kernels.sequence_split.blocks import (
    block_backward,
    block_forward,
    choose_backend,
    fused_backend_works,
)
from dimshard.kernels.sequence_split.layout import as_blhe
from dimshard.kernels.sequence_split.simulate import SimulatedSplit

GIB = 2**30


@dataclass
class BlocksConfig:
    """Command-line flags: one field each, with its help text."""

    seq_len: int = field(default=131072, metadata={"help": "tokens of the one sequence (batch 1)"})
    world_sizes: str = field(default="8", metadata={"help": "comma-separated split sizes P to simulate"})
    methods: str = field(default="ring,allgather", metadata={"help": "comma-separated subset of ring,allgather"})
    num_heads: int = field(default=32, metadata={"help": "query heads"})
    num_kv_heads: int = field(default=8, metadata={"help": "key/value heads (GQA when fewer than num_heads)"})
    head_dim: int = field(default=128, metadata={"help": "attention head dim"})
    dtype: str = field(default="bfloat16", metadata={"help": "bfloat16, float16 or float32"})
    backend: str = field(default="", metadata={"help": "cudnn, flash or math; empty: the fastest that works here"})
    device: str = field(default="", metadata={"help": "cuda or cpu; empty: cuda when available"})
    warmup: int = field(default=1, metadata={"help": "untimed runs before timing"})
    repeats: int = field(default=3, metadata={"help": "timed runs; the median is reported"})
    json_out: str = field(default="", metadata={"help": "write all results as JSON to this path"})


def peak_gib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory allocated while fn() runs, above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / GIB


def max_errors(ours: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> dict[str, float]:
    """Max abs difference of out, dq, dk, dv."""
    names = ("out", "dq", "dk", "dv")
    return {n: float((a.float() - b.float()).abs().max()) for n, a, b in zip(names, ours, ref)}


@dataclass
class Row:
    """One measured configuration."""

    name: str
    backend: str
    world_size: int
    fwd_ms: float
    total_ms: float
    peak_gib: float | None
    ratio: float | None = None
    errors: dict[str, float] = field(default_factory=dict)


def _monolithic(backend: str, q, k, v, dout, scale) -> Callable[[], tuple[torch.Tensor, ...]]:
    def forward():
        return block_forward(backend, q, k, v, scale, True)

    def step():
        out, lse = forward()
        return (out, *block_backward(backend, dout, q, k, v, out, lse, scale, True))

    step.forward = forward  # type: ignore[attr-defined]
    return step


def run(cfg: BlocksConfig) -> list[Row]:
    """Measure the monolithic call and every (P, method) split; the rows in that order."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, cfg.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(heads: int) -> torch.Tensor:
        # [b, l, h, e] storage viewed as [b, h, l, e], the layout the model's projections give.
        return as_blhe(torch.randn(1, heads, cfg.seq_len, cfg.head_dim, generator=gen).to(device, dtype))

    q, k, v, dout = rand(cfg.num_heads), rand(cfg.num_kv_heads), rand(cfg.num_kv_heads), rand(cfg.num_heads)
    scale = cfg.head_dim**-0.5
    backend = choose_backend(q, k, cfg.backend or None)
    if device.type == "cuda":
        works = {b: fused_backend_works(b, device, dtype, cfg.head_dim) for b in ("cudnn", "flash")}
        print(f"fused backends that pass the GQA check against the math path: {works}; using {backend}", flush=True)
        if backend == "math" and cfg.seq_len > 16384:
            raise SystemExit(f"no fused attention backend works here; the math path cannot run {cfg.seq_len} tokens")
    rows = []

    mono = _monolithic(backend, q, k, v, dout, scale)
    fwd = median_ms(mono.forward, device, cfg.warmup, cfg.repeats)
    total = median_ms(mono, device, cfg.warmup, cfg.repeats)
    rows.append(Row("monolithic causal", backend, 1, fwd, total, peak_gib(mono, device), 1.0))
    print(f"measured: {rows[-1]}", flush=True)
    reference = mono()
    others = [b for b in ("cudnn", "flash") if b != backend and device.type == "cuda"]
    for other in others:
        if fused_backend_works(other, device, dtype, cfg.head_dim):
            alt = _monolithic(other, q, k, v, dout, scale)
            row = Row("monolithic causal", other, 1, median_ms(alt.forward, device, 1, 1),
                      median_ms(alt, device, 0, 1), None, None, max_errors(alt(), reference))
            row.ratio = row.total_ms / rows[0].total_ms
            rows.append(row)
            print(f"measured: {row}", flush=True)

    for world_size in [int(p) for p in cfg.world_sizes.split(",")]:
        split = SimulatedSplit(q, k, v, dout, world_size, backend, scale)
        for method in cfg.methods.split(","):
            def forward(split=split, method=method):
                return split.forward(method)

            def step(split=split, method=method):
                outputs = split.forward(method)
                return outputs, split.backward(method, outputs)

            try:
                fwd = median_ms(forward, device, cfg.warmup, cfg.repeats)
                total = median_ms(step, device, cfg.warmup, cfg.repeats)
                outputs, (dqs, dkvs) = step()
                ours = (split.natural_order([o for o, _ in outputs]), *split.gradients(dqs, dkvs))
                ours = tuple(x.to(dtype) for x in ours)  # what each rank hands back, in the input dtype
                errors = max_errors(ours, reference)
                del outputs, dqs, dkvs, ours
                row = Row(f"split {method}", backend, world_size, fwd, total, peak_gib(step, device),
                          total / rows[0].total_ms, errors)
            except RuntimeError as error:  # e.g. out of memory: report it, measure the rest
                print(f"split {method} P={world_size} failed: {error}", flush=True)
                continue
            rows.append(row)
            print(f"measured: {row}", flush=True)
        del split
    return rows


def print_table(cfg: BlocksConfig, rows: list[Row], device: str) -> None:
    flops = 3.5 * 2 * cfg.num_heads * cfg.seq_len**2 * cfg.head_dim
    print(f"\n# sequence-split attention blocks: L={cfg.seq_len}, {cfg.num_heads} q / {cfg.num_kv_heads} kv heads, "
          f"d={cfg.head_dim}, {cfg.dtype}, {device}; flops fwd+bwd {flops:.3e} (3.5 x causal fwd)")
    header = ("config", "backend", "P", "fwd ms", "bwd ms", "total ms", "x mono", "TFLOP/s", "MFU", "tok/s",
              "peak GiB", "max err out/dq/dk/dv")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        rate = flops / (r.total_ms * 1e-3) / 1e12
        err = "/".join(f"{r.errors[n]:.2e}" for n in ("out", "dq", "dk", "dv")) if r.errors else "reference"
        cells = (r.name, r.backend, str(r.world_size), f"{r.fwd_ms:.1f}", f"{r.total_ms - r.fwd_ms:.1f}",
                 f"{r.total_ms:.1f}", f"{r.ratio:.3f}" if r.ratio else "", f"{rate:.4g}",
                 f"{rate / PEAK_TFLOPS:.1%}", f"{cfg.seq_len / (r.total_ms * 1e-3):.0f}",
                 f"{r.peak_gib:.2f}" if r.peak_gib is not None else "", err)
        print("| " + " | ".join(cells) + " |")


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Parse flags, measure, print the table (and write JSON when asked)."""
    from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments

    enable_expandable_segments()  # before CUDA starts, as every rank of a training run
    cfg = parse_dataclass_args(BlocksConfig, argv, description=__doc__.split("\n\n")[0])
    rows = run(cfg)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
    print_table(cfg, rows, device)
    if cfg.json_out:
        write_json_report(cfg.json_out, cfg, rows, device=device, torch=torch.__version__)
    return rows


if __name__ == "__main__":
    main()
