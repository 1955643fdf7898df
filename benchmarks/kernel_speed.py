"""Benchmark dimshard.kernels against their eager equivalents at Llama-3-8B shapes (CUDA only).

For each kernel: forward+backward time (median of CUDA-event timings), the achieved rate
(TFLOP/s for matrix work, TB/s counting the fewest bytes the op must move for memory-bound
work), that rate as a fraction of the measured floor (a large bf16 matrix product, a large
device-to-device copy counting bytes read plus written), the peak memory above inputs and
gradients (``torch.cuda.max_memory_allocated`` minus what was allocated before the step minus
the sizes of the gradients that took new memory), the step's whole peak above what existed
before it (gradients included: where SwiGLU writes its input gradients in place, the saving
shows here), and the relative error ||ours - eager|| / ||eager|| over outputs and
gradients where the eager op fits in memory. Prints a table; ``--json_out`` writes every number.

    python benchmarks/kernel_speed.py                       # everything, default shapes
    python benchmarks/kernel_speed.py --kernels chunk_ce --seq_len 32768
    python benchmarks/kernel_speed.py --kernels swiglu       # with and without in-place gradients
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from measurement import write_json_report

from dimshard.cli import parse_dataclass_args

ALL_KERNELS = ("floors", "chunk_ce", "attention", "rms_norm", "swiglu", "rotary")
GIB = 2**30
DEVICE = "cuda"


@dataclass
class BenchmarkConfig:
    """Command-line flags: one field each, with its help text."""

    kernels: str = field(default=",".join(ALL_KERNELS), metadata={"help": f"comma-separated subset of {ALL_KERNELS}"})
    seq_len: int = field(default=131072, metadata={"help": "tokens per step (batch 1) for every kernel"})
    hidden_size: int = field(default=4096, metadata={"help": "model width d"})
    vocab_size: int = field(default=128256, metadata={"help": "vocabulary size n of the output projection"})
    intermediate_size: int = field(default=14336, metadata={"help": "MLP width for swiglu"})
    num_heads: int = field(default=32, metadata={"help": "query heads"})
    num_kv_heads: int = field(default=8, metadata={"help": "key/value heads (GQA when fewer than num_heads)"})
    head_dim: int = field(default=128, metadata={"help": "attention head dim"})
    chunk_size: int = field(
        default=1024, metadata={"help": "chunk_linear_cross_entropy chunk_size, recompute path (precompute_grad=False)"}
    )
    precompute_chunk_size: int = field(
        default=0, metadata={"help": "chunk_linear_cross_entropy chunk_size, precompute path; 0: automatic"}
    )
    vocab_splits: int = field(default=0, metadata={"help": "chunk_linear_cross_entropy vocab_splits; 0: automatic"})
    eager_seq_len: int = field(
        default=8192, metadata={"help": "tokens for the eager cross-entropy baseline (its logits do not fit at 131072)"}
    )
    attention_seq_len: int = field(default=131072, metadata={"help": "sequence length for the attention runs"})
    warmup: int = field(default=2, metadata={"help": "untimed runs before timing"})
    repeats: int = field(default=5, metadata={"help": "timed runs; the median is reported"})
    json_out: str = field(default="", metadata={"help": "write all results as JSON to this path"})


@dataclass
class Row:
    """One measured implementation of one kernel."""

    kernel: str
    impl: str
    shape: str
    ms: float | None = None
    rate: float | None = None
    unit: str = ""
    of_floor: float | None = None
    extra_gib: float | None = None
    step_gib: float | None = None
    rel_error: float | None = None
    note: str = ""


def time_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs, timed with CUDA events after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_gib(step: Callable[[], Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor] = ()) -> tuple[float, float]:
    """(GiB allocated at peak during ``step`` beyond what existed before it and the gradients it returns,
    GiB at peak beyond what existed before it). Gradients written into ``inputs`` took no new memory."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = step()
    torch.cuda.synchronize()
    existing = {x.data_ptr() for x in inputs}
    grad_bytes = sum(g.numel() * g.element_size() for g in grads if g is not None and g.data_ptr() not in existing)
    step_bytes = torch.cuda.max_memory_allocated() - before
    del grads
    return (step_bytes - grad_bytes) / GIB, step_bytes / GIB


def fwd_bwd(op: Callable[..., Any], inputs: Sequence[torch.Tensor], wrt: Sequence[torch.Tensor],
            grad_out: Sequence[torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A step running ``op(*inputs)`` and the gradients of its outputs (given grad_out) w.r.t. ``wrt``."""

    def step() -> tuple[torch.Tensor, ...]:
        out = op(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        return torch.autograd.grad(out, wrt, grad_out)

    return step


def relative_error(ours: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """Largest ||a - b|| / ||b|| over matching tensors (outputs and gradients), in float64.

    Summed over pieces of 2^26 elements: whole float64 copies of [131072, 14336] tensors would take
    42 GiB next to the operands, more than an H100 has left.
    """
    worst = 0.0
    for a, b in zip(ours, ref):
        diff = norm = 0.0
        for x, y in zip(a.reshape(-1).split(1 << 26), b.reshape(-1).split(1 << 26)):
            y = y.double()
            diff += (x.double() - y).square().sum().item()
            norm += y.square().sum().item()
        worst = max(worst, math.sqrt(diff / norm) if norm > 0 else math.inf)
    return worst


def outputs_and_grads(op: Callable[..., Any], inputs: Sequence[torch.Tensor], wrt_index: Sequence[int],
                      grad_out: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs of ``op`` and the gradients of the inputs at ``wrt_index`` (for error checks)."""
    inputs = [x.detach().requires_grad_(i in wrt_index) for i, x in enumerate(inputs)]
    out = op(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(out, [inputs[i] for i in wrt_index], grad_out)
    return [o.detach() for o in out] + list(grads)


def measure(cfg: BenchmarkConfig, kernel: str, impl: str, shape: str, op: Callable[..., Any],
            inputs: Sequence[torch.Tensor], wrt_index: Sequence[int], grad_out: Sequence[torch.Tensor],
            work: float, unit: str, floor: float | None) -> Row:
    """Time and measure one implementation; ``work`` is flops (TFLOP/s) or bytes (TB/s) per fwd+bwd."""
    row = Row(kernel, impl, shape, unit=unit)
    try:
        inputs = [x.detach().requires_grad_(i in wrt_index) for i, x in enumerate(inputs)]
        wrt = [inputs[i] for i in wrt_index]
        step = fwd_bwd(op, inputs, wrt, grad_out)
        row.ms = time_ms(step, cfg.warmup, cfg.repeats)
        row.extra_gib, row.step_gib = peak_gib(step, inputs)
        row.rate = work / (row.ms * 1e-3) / 1e12
        row.of_floor = row.rate / floor if floor else None
    except torch.cuda.OutOfMemoryError:
        row.note = "out of memory"
    torch.cuda.empty_cache()
    return row


# --- floors -------------------------------------------------------------------------------------

def _matmul_row(cfg: BenchmarkConfig, label: str, m: int, k: int, n: int) -> Row:
    a = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b.t(), cfg.warmup + 3, cfg.repeats * 4)
    return Row("floor", label, f"{m}x{k}x{n}", ms, 2 * m * k * n / (ms * 1e-3) / 1e12, "TFLOP/s")


def _copy_row(cfg: BenchmarkConfig) -> Row:
    src = torch.randn(GIB, device=DEVICE, dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), cfg.warmup + 3, cfg.repeats * 4)
    return Row("floor", "device copy", "2 GiB -> 2 GiB", ms, 2 * src.numel() * 2 / (ms * 1e-3) / 1e12, "TB/s")


def measure_floors(cfg: BenchmarkConfig) -> tuple[list[Row], float, float]:
    """Rows for the floors, the bf16 matmul rate (TFLOP/s) and the copy bandwidth (TB/s, read + write)."""
    square = _matmul_row(cfg, "bf16 matmul", 8192, 8192, 8192)
    # The cross-entropy's own product shape (one tile of the automatic tiling), for reference.
    tile = _matmul_row(cfg, "bf16 matmul (CE tile)", min(cfg.seq_len, 16 * cfg.chunk_size), cfg.hidden_size,
                       math.ceil(cfg.vocab_size / 16))
    copy = _copy_row(cfg)
    torch.cuda.empty_cache()
    return [square, tile, copy], square.rate, copy.rate


# --- kernels ------------------------------------------------------------------------------------

def bench_chunk_ce(cfg: BenchmarkConfig, matmul_rate: float) -> list[Row]:
    """Chunked CE at eager_seq_len and seq_len; eager where it fits.

    Both gradient paths: precompute (gradients taken in the forward, 3 products; the default) and
    recompute (logits recomputed in the backward, 4 products), each with the Triton elementwise
    kernels and PyTorch-only; plus the precompute path under a per-token incoming gradient, whose
    weight gradient is recomputed in the backward (5 products). The other rows get the uniform
    gradient of a mean loss, 1/tokens per token.
    """
    from dimshard.kernels import chunk_linear_cross_entropy, chunk_linear_cross_entropy_reference

    d, n, pad = cfg.hidden_size, cfg.vocab_size, -100
    splits = cfg.vocab_splits or None
    rows = []

    def inputs(tokens: int) -> list[torch.Tensor]:
        hidden = torch.randn(1, tokens, d, device=DEVICE, dtype=torch.bfloat16)
        weight = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16) / d**0.5
        labels = torch.randint(0, n, (1, tokens), device=DEVICE)
        labels[torch.rand(1, tokens, device=DEVICE) < 0.05] = pad
        return [hidden, weight, labels]

    def ours(precompute: bool) -> Callable[..., torch.Tensor]:
        chunk = (cfg.precompute_chunk_size or None) if precompute else cfg.chunk_size

        def run(h, w, y):
            return chunk_linear_cross_entropy(h, w, y, pad, chunk_size=chunk, vocab_splits=splits,
                                              precompute_grad=precompute)

        return run

    def eager(h, w, y):
        return chunk_linear_cross_entropy_reference(h, w, y, pad)

    # (impl, op, per-token incoming gradient?, Triton?, products executed)
    variants = [
        ("dimshard precompute (grads in forward, Triton elementwise)", ours(True), False, True, 3),
        ("dimshard recompute (logits again in backward, Triton elementwise)", ours(False), False, True, 4),
        ("dimshard precompute, per-token grad_output (weight grad recomputed)", ours(True), True, True, 5),
        ("dimshard precompute, PyTorch-only path", ours(True), False, False, 3),
        ("dimshard recompute, PyTorch-only path", ours(False), False, False, 4),
    ]
    for tokens in sorted({cfg.eager_seq_len, cfg.seq_len}):
        x = inputs(tokens)
        uniform = [torch.full((1, tokens), 1.0 / tokens, device=DEVICE)]
        per_token = [torch.rand(1, tokens, device=DEVICE) * (2.0 / tokens)]
        flops3 = 3 * 2 * tokens * d * n  # the 3-matmul floor's work, whatever a path executes
        floor_ms = flops3 / (matmul_rate * 1e12) * 1e3
        shape = f"l={tokens} d={d} n={n}"
        fits_eager = tokens <= cfg.eager_seq_len
        for impl, op, non_uniform, triton, products in variants:
            grad = per_token if non_uniform else uniform
            if not triton:
                os.environ["DIMSHARD_DISABLE_TRITON"] = "1"
            try:
                row = measure(cfg, "chunk_ce", impl, shape, op, x, [0, 1], grad, flops3, "TFLOP/s", matmul_rate)
            finally:
                os.environ.pop("DIMSHARD_DISABLE_TRITON", None)
            if row.ms:
                row.note = f"{row.ms / floor_ms:.2f}x the 3-matmul floor ({floor_ms:.0f} ms); {products} products"
            if row.ms and triton and fits_eager:
                try:
                    row.rel_error = relative_error(outputs_and_grads(op, x, [0, 1], grad),
                                                   outputs_and_grads(eager, x, [0, 1], grad))
                except torch.cuda.OutOfMemoryError:
                    row.note += "; no rel err: eager out of memory"
                torch.cuda.empty_cache()
            rows.append(row)
        if fits_eager:
            eager_row = measure(cfg, "chunk_ce", "eager (HF: full logits, fp32 CE)", shape, eager, x, [0, 1], uniform,
                                flops3, "TFLOP/s", matmul_rate)
            if eager_row.ms:
                eager_row.note = f"{eager_row.ms / floor_ms:.2f}x the 3-matmul floor"
            rows.append(eager_row)
        del x
        torch.cuda.empty_cache()
    return rows


def bench_attention(cfg: BenchmarkConfig, matmul_rate: float) -> list[Row]:
    """Our sdpa against torch's default order, flash only, and cuDNN (native GQA or repeated K/V)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dimshard.kernels import scaled_dot_product_attention
    from dimshard.kernels.attention import cudnn_can_run

    length, heads, kv_heads, dim = cfg.attention_seq_len, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    gqa = heads != kv_heads
    q = torch.randn(1, heads, length, dim, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, length, dim, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(1, kv_heads, length, dim, device=DEVICE, dtype=torch.bfloat16)
    grad = [torch.randn(1, heads, length, dim, device=DEVICE, dtype=torch.bfloat16)]
    # Causal: half the score matrix. fwd = 2 products, bwd = 2.5x fwd (FlashAttention's accounting).
    flops = 3.5 * 4 * heads * length * length * dim * 0.5
    shape = f"L={length} h={heads}/{kv_heads} d={dim} causal"
    native = cudnn_can_run(q, k, v, None, 0.0, True, gqa)
    expanded_k = k.repeat_interleave(heads // kv_heads, dim=1)
    expanded_ok = cudnn_can_run(q, expanded_k, expanded_k, None, 0.0, True, False)
    del expanded_k

    def ours(a, b, c):
        return scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=gqa)

    def torch_default(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=gqa)

    def only(backend):
        def run(a, b, c):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=gqa)
        return run

    def cudnn_expanded(a, b, c):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            reps = heads // kv_heads
            return F.scaled_dot_product_attention(a, b.repeat_interleave(reps, 1), c.repeat_interleave(reps, 1),
                                                  is_causal=True)

    x = [q, k, v]
    rows = [measure(cfg, "attention", "dimshard sdpa", shape, ours, x, [0, 1, 2], grad, flops, "TFLOP/s", matmul_rate)]
    rows[0].note = f"cuDNN takes GQA natively: {native}"
    rows.append(measure(cfg, "attention", "torch sdpa (default order)", shape, torch_default, x, [0, 1, 2], grad,
                        flops, "TFLOP/s", matmul_rate))
    rows.append(measure(cfg, "attention", "torch sdpa, flash only", shape, only(SDPBackend.FLASH_ATTENTION), x,
                        [0, 1, 2], grad, flops, "TFLOP/s", matmul_rate))
    if gqa and not native and expanded_ok:
        rows.append(measure(cfg, "attention", "cuDNN, K/V repeated", shape, cudnn_expanded, x, [0, 1, 2], grad,
                            flops, "TFLOP/s", matmul_rate))
    elif native:
        rows.append(measure(cfg, "attention", "torch sdpa, cuDNN only", shape, only(SDPBackend.CUDNN_ATTENTION), x,
                            [0, 1, 2], grad, flops, "TFLOP/s", matmul_rate))
    # Values: against torch's default backend at this length (a math reference would need L^2 memory).
    rows[0].rel_error = relative_error(outputs_and_grads(ours, x, [0, 1, 2], grad),
                                       outputs_and_grads(torch_default, x, [0, 1, 2], grad))
    del q, k, v, x, grad
    torch.cuda.empty_cache()
    return rows


def bench_memory_bound(cfg: BenchmarkConfig, copy_bw: float, kernel: str) -> list[Row]:
    """One of rms_norm, swiglu, rotary: the Triton op against the Hugging Face eager code."""
    from dimshard.kernels import (
        apply_rotary,
        apply_rotary_reference,
        rms_norm,
        rms_norm_reference,
        swiglu,
        swiglu_reference,
    )

    bf16, length = torch.bfloat16, cfg.seq_len
    if kernel == "rms_norm":
        x = torch.randn(1, length, cfg.hidden_size, device=DEVICE, dtype=bf16)
        w = torch.randn(cfg.hidden_size, device=DEVICE, dtype=bf16)
        inputs, wrt, grad = [x, w], [0, 1], [torch.randn_like(x)]
        ours, eager = (lambda a, b: rms_norm(a, b, 1e-5)), (lambda a, b: rms_norm_reference(a, b, 1e-5))
        moved = 5 * x.numel() * 2  # fwd: read x, write y; bwd: read x, dy, write dx
        shape = f"[{length}, {cfg.hidden_size}]"
    elif kernel == "swiglu":
        gate = torch.randn(1, length, cfg.intermediate_size, device=DEVICE, dtype=bf16)
        up = torch.randn_like(gate)
        inputs, wrt, grad = [gate, up], [0, 1], [torch.randn_like(gate)]
        ours, eager = swiglu, swiglu_reference
        in_place = lambda g, u: swiglu(g, u, inplace_grads=True)  # noqa: E731
        moved = 8 * gate.numel() * 2  # fwd: read 2, write 1; bwd: read 3, write 2
        shape = f"[{length}, {cfg.intermediate_size}]"
    else:
        heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = torch.randn(1, length, heads, dim, device=DEVICE, dtype=bf16).transpose(1, 2)  # HF's layout
        k = torch.randn(1, length, kv_heads, dim, device=DEVICE, dtype=bf16).transpose(1, 2)
        angles = torch.randn(1, length, dim // 2, device=DEVICE)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(bf16), angles.sin().to(bf16)
        inputs, wrt = [q, k, cos, sin], [0, 1]
        grad = [torch.randn_like(q), torch.randn_like(k)]
        ours, eager = apply_rotary, apply_rotary_reference
        # fwd and bwd each read q, k and write their results; cos and sin read once per pass.
        moved = 2 * (2 * (q.numel() + k.numel()) + 2 * cos.numel()) * 2
        shape = f"q[1,{heads},{length},{dim}] k[1,{kv_heads},{length},{dim}]"
    rows = [
        measure(cfg, kernel, "dimshard (Triton)", shape, ours, inputs, wrt, grad, moved, "TB/s", copy_bw),
        measure(cfg, kernel, "eager (HF)", shape, eager, inputs, wrt, grad, moved, "TB/s", copy_bw),
    ]
    reference = outputs_and_grads(eager, inputs, wrt, grad)
    rows[0].rel_error = relative_error(outputs_and_grads(ours, inputs, wrt, grad), reference)
    if kernel == "swiglu":
        # Gradients written into gate and up: the backward allocates nothing. It overwrites its inputs, so
        # it runs on copies, timed and checked like the others (the copies' values drift between runs).
        copies = [x.clone() for x in inputs]
        rows.append(measure(cfg, kernel, "dimshard (Triton, in-place grads)", shape, in_place, copies, wrt, grad,
                            moved, "TB/s", copy_bw))
        copies = [x.clone() for x in inputs]
        rows[-1].rel_error = relative_error(outputs_and_grads(in_place, copies, wrt, grad), reference)
        del copies
    del reference
    del inputs, grad
    torch.cuda.empty_cache()
    return rows


# --- report -------------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: Sequence[Row]) -> None:
    """Print the rows as an aligned text table."""
    header = ["kernel", "impl", "shape", "fwd+bwd ms", "rate", "of floor", "extra GiB", "step GiB", "rel err",
              "note"]
    table = [header] + [
        [r.kernel, r.impl, r.shape, _fmt(r.ms, ".2f"), f"{_fmt(r.rate, '.1f' if r.unit == 'TFLOP/s' else '.2f')} {r.unit}",
         _fmt(None if r.of_floor is None else 100 * r.of_floor, ".0f") + ("%" if r.of_floor is not None else ""),
         _fmt(r.extra_gib, ".2f"), _fmt(r.step_gib, ".2f"), _fmt(r.rel_error, ".1e"), r.note]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if i == 0:
            print("-+-".join("-" * width for width in widths))


def environment() -> dict[str, Any]:
    """GPU, library versions, and whether bf16 matmuls with fp32 results work (the CE uses them)."""
    from dimshard.kernels.chunk_linear_cross_entropy import _fp32_out_matmul_ok

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": triton_version,
        "python": platform.python_version(),
        "fp32_out_matmul": _fp32_out_matmul_ok(torch.zeros(1, device=DEVICE).device),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks; exit code 2 without CUDA or for unknown kernel names."""
    from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments

    enable_expandable_segments()  # before CUDA starts, as every rank of a training run
    cfg = parse_dataclass_args(BenchmarkConfig, argv, description=__doc__.split("\n\n")[0])
    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs a CUDA GPU: it times GPU kernels against the GPU's own matmul and "
              "copy rates. Run it on a GPU machine; the CPU paths are covered by the tests "
              "(pytest tests/test_kernels_*.py).", file=sys.stderr)
        return 2
    selected = [k.strip() for k in cfg.kernels.split(",") if k.strip()]
    unknown = set(selected) - set(ALL_KERNELS)
    if unknown:
        print(f"unknown kernels {sorted(unknown)}; choose from {ALL_KERNELS}", file=sys.stderr)
        return 2
    env = environment()
    print(json.dumps(env))
    torch.manual_seed(0)
    rows, matmul_rate, copy_bw = measure_floors(cfg)
    if "floors" not in selected:
        rows = []
    for kernel in selected:
        if kernel == "chunk_ce":
            rows += bench_chunk_ce(cfg, matmul_rate)
        elif kernel == "attention":
            rows += bench_attention(cfg, matmul_rate)
        elif kernel in ("rms_norm", "swiglu", "rotary"):
            rows += bench_memory_bound(cfg, copy_bw, kernel)
    print_table(rows)
    if cfg.json_out:
        write_json_report(cfg.json_out, cfg, rows, environment=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
