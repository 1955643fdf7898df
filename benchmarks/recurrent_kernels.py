"""GPU check and timing of the recurrent ops (kernels/recurrent/): which kernel each op runs, its error
against the float32 chunked reference, and forward+backward time and peak memory next to the reference.

    python benchmarks/recurrent_kernels.py --seq_lens 4096,32768 --json_out recurrent.jsonl
    python benchmarks/recurrent_kernels.py --device cpu --tiny      # a smoke run of the same code

Shapes are one layer of the 1.3B models of issue 27 (hidden 2048): Gated DeltaNet with 16 heads of
128 (q, k) by 128 (v); GLA with 16 heads of 128; Mamba2 with 64 heads of 64, 1 group, state 128;
Mamba with 4096 channels, state 16; the short convolution over 4096 channels, width 4; bf16 inputs.

Each record: ``op``, ``backend`` (the fused kernel ``backends.select`` kept, or ``reference``),
``max_rel_error`` (output and input gradients against the reference computed in float32 from the
same bf16 inputs, on a 2048-token slice), ``ms`` (median forward+backward), ``reference_ms``,
``peak_gb`` and ``tflops``: forward+backward FLOPs of the chunked form, 3x the forward, whose
multiply-adds per token and head are ``c (dk + dv)`` (the in-chunk scores and their product with
the values, c = 64) plus ``2 dk dv`` (reading and updating the state), plus for the delta rule
``c dk + dk dv`` (the keys' products and the state read of the corrections) and ``c (dk + dv) / 2``
(the triangular solve), each multiply-add 2 FLOPs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measurement import median_ms, report  # noqa: E402

from dimshard.kernels import recurrent  # noqa: E402
from dimshard.kernels.recurrent import backends  # noqa: E402
from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments  # noqa: E402

CHUNK = 64


def _problems(length: int, tiny: bool, device: torch.device) -> dict[str, tuple[Callable, Callable, list, float]]:
    """op -> (dimshard op call, float32 reference call, bf16 inputs, forward FLOPs)."""
    scale = 8 if tiny else 1
    bf16 = dict(device=device, dtype=torch.bfloat16)
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, **kw):
        return torch.randn(*shape, generator=g).to(**{**bf16, **kw})

    b, h, dk, dv = 1, 16 // scale, 128 // scale, 128 // scale
    gdn = [randn(b, length, h, dk), randn(b, length, h, dk), randn(b, length, h, dv),
           -torch.rand(b, length, h, generator=g).to(device) * 0.1, torch.rand(b, length, h, generator=g).to(device)]
    per_head = b * length * h
    gdn_flops = 2 * per_head * (CHUNK * (dk + dv) + 2 * dk * dv + CHUNK * dk + dk * dv + CHUNK * (dk + dv) / 2)
    gla = gdn[:3] + [-torch.rand(b, length, h, dk, generator=g).to(device) * 0.1]
    gla_flops = 2 * per_head * (CHUNK * (dk + dv) + 2 * dk * dv)
    mh, p, n = 64 // scale, 64 // scale, 128 // scale
    ssd = [randn(b, length, mh, p), torch.randn(b, length, mh, generator=g).to(device),
           -torch.rand(mh, generator=g).to(device) - 0.5, randn(b, length, 1, n), randn(b, length, 1, n),
           torch.rand(mh, generator=g).to(device), torch.rand(mh, generator=g).to(device)]
    ssd_flops = 2 * b * length * mh * (CHUNK * (n + p) + 2 * n * p)
    d, ns = 4096 // scale, 16
    mamba = [randn(b, d, length), randn(b, d, length), -torch.rand(d, ns, generator=g).to(device) - 0.5,
             randn(b, ns, length), randn(b, ns, length), torch.rand(d, generator=g).to(device), randn(b, d, length),
             torch.rand(d, generator=g).to(device)]
    mamba_flops = 2 * b * length * d * (16 * ns + 2 * ns)  # chunk 16, value width 1
    conv = [randn(b, d, length), randn(d, 4), randn(d)]

    def ref32(fn: Callable) -> Callable:
        return lambda *a: fn(*[x.float() if x.is_floating_point() else x for x in a])

    return {
        "gated_delta_rule": (lambda *a: recurrent.gated_delta_rule(*a, use_qk_l2norm=True),
                             ref32(lambda *a: recurrent.gated_delta_rule_reference(*a, use_qk_l2norm=True)[0]),
                             gdn, gdn_flops),
        "gated_linear_attention": (recurrent.gated_linear_attention,
                                   ref32(lambda *a: recurrent.gated_linear_attention_reference(*a)[0]), gla, gla_flops),
        "state_space_dual": (lambda *a: recurrent.state_space_dual(*a, dt_softplus=True),
                             ref32(lambda *a: recurrent.state_space_dual_reference(*a, dt_softplus=True)[0]),
                             ssd, ssd_flops),
        "selective_scan": (lambda *a: recurrent.selective_scan(*a, delta_softplus=True),
                           ref32(lambda *a: recurrent.selective_scan_reference(*a, delta_softplus=True)[0]),
                           mamba, mamba_flops),
        "causal_conv1d": (lambda *a: recurrent.causal_conv1d(*a, activation="silu"),
                          ref32(lambda *a: recurrent.causal_conv1d_reference(*a, activation="silu")), conv,
                          2 * b * length * d * 4),
    }


def _fwd_bwd(fn: Callable, inputs: list[torch.Tensor]) -> Callable[[], None]:
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]

    def step() -> None:
        out = fn(*leaves)
        out.float().sum().backward()
        for x in leaves:
            x.grad = None
    return step


def _sequence_slice(name: str, inputs: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The first ``tokens`` tokens of every sequence-long input (dim 1, or dim 2 for Mamba's [b, d, l])."""
    dim = 2 if name in ("selective_scan", "causal_conv1d") else 1
    length = inputs[0].shape[dim]
    # By position, not by size: Mamba's channels may equal the sequence length.
    return [x.narrow(dim, 0, tokens) if x.dim() > dim and x.shape[dim] == length and tokens < length else x
            for x in inputs]


def main(argv: list[str] | None = None) -> int:
    enable_expandable_segments()  # before CUDA starts, as every rank runs
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    parser.add_argument("--seq_lens", default="4096,32768", help="comma-separated sequence lengths")
    parser.add_argument("--ops", default="", help="comma-separated ops (default: all)")
    parser.add_argument("--tiny", action="store_true", help="8x smaller heads and channels (smoke runs)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--json_out", default=None, help="also append each record to this JSON-lines file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    for length in [int(s) for s in args.seq_lens.split(",")]:
        for name, (op, reference, inputs, flops) in _problems(length, args.tiny, device).items():
            if args.ops and name not in args.ops.split(","):
                continue
            small = _sequence_slice(name, inputs, min(length, 2048))
            error = backends.relative_error(op, reference, small)
            chosen = [v for (key, dev), v in backends._CHOSEN.items() if key.startswith(name) and dev == str(device)]
            backend = chosen[0][0] if chosen and chosen[0] is not None else "reference"
            record = {"op": name, "seq_len": length, "device": torch.cuda.get_device_name(device)
                      if device.type == "cuda" else "cpu", "backend": backend, "max_rel_error": error}
            for label, fn in (("ms", op), ("reference_ms", reference)):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    record[label] = median_ms(_fwd_bwd(fn, inputs), device, warmup=1, repeats=args.repeats)
                except torch.OutOfMemoryError:
                    record[label] = None
                if device.type == "cuda":
                    record[label.replace("ms", "peak_gb")] = torch.cuda.max_memory_allocated(device) / 1e9
            if record.get("ms"):
                record["tflops"] = 3 * flops / (record["ms"] * 1e-3) / 1e12
            report(record, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
