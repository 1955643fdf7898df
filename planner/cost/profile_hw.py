"""Measure this GPU's sustained rates and write a hardware profile JSON the cost model loads.

    python -m dimshard.planner.cost.profile_hw --output h100.json
    torchrun --nproc_per_node 8 -m dimshard.planner.cost.profile_hw --output h100.json   # with collectives

Measures the bf16 (and fp32) matmul rate, scaled-dot-product attention forward plus backward
(causal, head dim 128, through the attention the generated code calls, counted as three forward
FLOPs as the cost model does), copy bandwidth
(bytes read plus written), the kernel launch overhead and, when run under torchrun with more than
one rank, the NCCL bus bandwidth (nccl-tests' convention) and small-message latency of
all-reduce, all-gather, reduce-scatter and all-to-all over all ranks, and on GPUs with FP8 GEMMs
their tensorwise and rowwise rates and the FP8 cast's (``measure_fp8``). Values it cannot measure
(collectives on one GPU) come from ``--base`` and are listed under ``estimated``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ...cli import parse_dataclass_args
from ..plan.collectives import COLLECTIVES_TABLE
from .hardware import COLLECTIVES, load_hw_profile
from .offload_profile import measure_offload_rates


@dataclass
class ProfileArgs:
    """Flags of the profiling command (one field per flag)."""

    output: str = field(metadata={"help": "JSON file to write (rank 0 writes it)"})
    name: str = field(default="", metadata={"help": "profile name; default: h100/h200 from the device name, else gpu"})
    base: str = field(default="h200", metadata={
        "help": "shipped profile or JSON whose values fill what is not measured (collectives on one GPU)"})
    matmul_size: int = field(default=8192, metadata={"help": "m = n = k of the timed bf16 matmul"})
    attention_seq_len: int = field(default=32768, metadata={"help": "sequence length of the timed attention"})
    attention_heads: int = field(default=32, metadata={"help": "query heads of the timed attention"})
    attention_kv_heads: int = field(default=8, metadata={"help": "key/value heads of the timed attention"})
    copy_mb: int = field(default=1024, metadata={"help": "MB copied per timed copy"})
    collective_mb: int = field(default=256, metadata={"help": "MB per rank in each timed collective"})
    iters: int = field(default=20, metadata={"help": "timed repetitions per measurement (after warm-up)"})


def _parse(argv: list[str] | None) -> ProfileArgs:
    return parse_dataclass_args(ProfileArgs, argv, description=__doc__.split("\n\n")[0])


def _time(fn: Callable[[], object], iters: int) -> float:
    """Mean seconds per call over ``iters`` calls after three warm-up calls (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def measure_matmul(size: int, dtype: torch.dtype, iters: int) -> float:
    """Sustained TFLOP/s of a ``size`` cube matmul in ``dtype``."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    return 2 * size**3 / _time(lambda: a @ b, iters) / 1e12


def measure_attention(seq_len: int, heads: int, kv_heads: int, iters: int) -> float:
    """TFLOP/s of causal attention forward plus backward, head dim 128, bf16, counting 3x the forward FLOPs.

    Times the attention the generated code calls (``dimshard.kernels.scaled_dot_product_attention``,
    cuDNN first). The cost model counts backward as twice the forward, so this is 6/7 of the
    figure in FlashAttention's accounting (backward 2.5x).
    """
    try:
        from dimshard.kernels import scaled_dot_product_attention as sdpa
    except ImportError:
        from torch.nn.functional import scaled_dot_product_attention as sdpa

    d = 128
    q = torch.randn(1, heads, seq_len, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, seq_len, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, kv_heads, seq_len, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, heads, seq_len, d, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        out = sdpa(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
        out.backward(grad)

    forward_flops = 4 * heads * seq_len * seq_len * d / 2
    return 3 * forward_flops / _time(step, max(iters // 4, 3)) / 1e12


def measure_copy(megabytes: int, iters: int) -> float:
    """GB/s of a device-to-device copy, counting bytes read plus written."""
    src = torch.empty(megabytes * 10**6 // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / _time(lambda: dst.copy_(src), iters) / 1e9


def measure_launch(iters: int) -> float:
    """Microseconds per tiny kernel (launch overhead)."""
    x = torch.zeros(1, device="cuda")
    return _time(lambda: x.add_(1), iters * 50) * 1e6


def measure_fp8(size: int, megabytes: int, iters: int) -> dict:
    """FP8 rates for the planner (docs/design.md, "FP8"), through the calls ``kernels/fp8`` makes.

    ``fp8_matmul_tflops``: a ``size`` cube ``torch._scaled_mm`` in e4m3 with bf16 output, tensorwise
    and rowwise scales; ``fp8_cast_gbps``: bf16 bytes per second through ``quantize`` (amax, scale
    and the saturated e4m3 cast) of a ``megabytes`` tensor, the slower of its row-major and
    column-major writes. Empty on a GPU without FP8 GEMMs.
    """
    from dimshard.kernels.fp8.linear import fp8_gemm_supported, scaled_mm
    from dimshard.kernels.fp8.scaling import E4M3, quantize

    if not fp8_gemm_supported(torch.device("cuda")):
        return {}
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    rates = {}
    for scaling, dim in (("tensorwise", None), ("rowwise", -1)):
        aq, a_scale = quantize(a, E4M3, dim, dim is not None)
        bq, b_scale = quantize(b, E4M3, dim, dim is not None)  # rows of b: columns of the column-major b.t()
        b_scale = b_scale.t() if dim is not None else b_scale
        operands = (aq, a_scale, bq.t(), b_scale)
        seconds = _time(lambda operands=operands: scaled_mm(*operands, torch.bfloat16, False), iters)
        rates[scaling] = round(2 * size**3 / seconds / 1e12, 1)
    x = torch.randn(megabytes * 10**6 // 2, device="cuda", dtype=torch.bfloat16).view(-1, 4096)
    # The slower of the two layouts a cast writes (kernels/fp8/scaling.py): every cast is priced at it.
    seconds = max(_time(lambda layout=layout: quantize(x, E4M3, layout=layout), iters) for layout in ("row", "column"))
    return {"fp8_matmul_tflops": rates, "fp8_cast_gbps": round(x.numel() * 2 / seconds / 1e9, 1)}


def measure_collectives(megabytes: int, iters: int) -> tuple[dict[str, float], dict[str, float]]:
    """Bus bandwidth (GB/s) and 4 KB latency (us) of each communicating collective over the default group.

    Each kind is timed through its ``measure`` call in ``planner/plan/collectives.py``; the bus
    bandwidth counts that kind's ``sent_bytes`` per rank (nccl-tests' convention).
    """
    n = dist.get_world_size()
    numel = megabytes * 10**6 // 2
    numel -= numel % n
    x = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    small = torch.randn(2048 * n, device="cuda", dtype=torch.bfloat16)
    busbw, alpha = {}, {}
    for kind in COLLECTIVES:
        collective = COLLECTIVES_TABLE[kind]
        big, tiny = collective.measure(x, n), collective.measure(small, n)
        dist.barrier()
        busbw[kind] = round(collective.sent_bytes(x.nbytes, n) / _time(big, iters) / 1e9, 1)
        dist.barrier()
        alpha[kind] = round(_time(tiny, iters * 5) * 1e6, 1)
    return busbw, alpha


def main(argv: list[str] | None = None) -> dict:
    """Measure and write the profile; returns it (on every rank)."""
    args = _parse(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_hw measures a GPU, but no CUDA device is visible (torch.cuda.is_available() is False): "
                 "run it on the GPU machine, e.g. `torchrun --nproc_per_node 8 -m dimshard.planner.cost.profile_hw "
                 "--output h100.json`, or use a shipped profile (planner/cost/hw_profiles/)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    base = load_hw_profile(args.base)
    device = torch.cuda.get_device_name()
    name = args.name or next((k.lower() for k in ("H200", "H100") if k in device.upper()), "gpu")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    matmul = {"bfloat16": round(measure_matmul(args.matmul_size, torch.bfloat16, args.iters), 1),
              "float32": round(measure_matmul(args.matmul_size // 2, torch.float32, args.iters), 1)}
    matmul["float16"] = matmul["bfloat16"]
    attention = round(measure_attention(args.attention_seq_len, args.attention_heads, args.attention_kv_heads,
                                        args.iters), 1)
    estimated = ["attention_tflops.float32"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        measured, alpha = measure_collectives(args.collective_mb, args.iters)
        # Keyed by group size: the cost model takes the nearest size, and merging files keeps several.
        busbw = {kind: {str(dist.get_world_size()): value} for kind, value in measured.items()}
        collectives_note = f"NCCL over {dist.get_world_size()} ranks"
    else:
        busbw, alpha = dict(base.busbw_gbps), dict(base.alpha_us)
        estimated += ["busbw_gbps", "alpha_us"]
        collectives_note = f"collectives copied from profile '{base.name}' (one rank: nothing to measure)"
    assert set(COLLECTIVES) <= set(busbw)
    profile = {
        "name": name,
        "device": device,
        "memory_gb": round(torch.cuda.get_device_properties(local_rank).total_memory / 1e9, 1),
        "matmul_tflops": matmul,
        "attention_tflops": {"bfloat16": attention, "float16": attention,
                             "float32": base.attention_tflops.get("float32", attention / 16)},
        "copy_gbps": round(measure_copy(args.copy_mb, args.iters), 1),
        "busbw_gbps": busbw,
        "alpha_us": alpha,
        "kernel_launch_us": round(measure_launch(args.iters), 2),
        # Pinned host-device copies, the CPU AdamW rate and MemTotal (planner/cost/offload_profile.py).
        **measure_offload_rates(iters=min(args.iters, 10)),
        # FP8 GEMMs and casts, where the GPU has them (planner/search/fp8_choice.py).
        **measure_fp8(args.matmul_size, args.copy_mb, args.iters),
        "estimated": estimated,
        "source": (f"measured {started} by python -m dimshard.planner.cost.profile_hw (torch {torch.__version__}): "
                   f"matmul {args.matmul_size}^3, causal sdpa seq {args.attention_seq_len} heads "
                   f"{args.attention_heads}/{args.attention_kv_heads} dim 128, copy {args.copy_mb} MB; "
                   f"{collectives_note}"),
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(args.output).write_text(json.dumps(profile, indent=2) + "\n")
        print(json.dumps(profile, indent=2))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return profile


if __name__ == "__main__":
    main()
