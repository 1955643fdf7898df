"""GPU check of the experts op: the grouped-product path equals the per-expert loop, and its speed.

``python benchmarks/moe_grouped_check.py`` on one GPU. For each shape (a Qwen3-30B-A3B layer's:
hidden 2048, 128 experts, top-8, expert width 768; a small one; sizes that are not multiples of
8, which must take the loop) it runs ``moe_experts`` (sorted pairs, ``torch``'s grouped GEMM where
``grouped_kernel_applicable``) and ``experts_reference`` (a loop over experts) on the same inputs in
float32, on all experts and on a shard of them, and compares output and every gradient:
the largest difference relative to the reference's largest entry must stay below 2e-2 (bf16), or
the script exits 1. It prints which path ran, the torch version, the grouped kernel's entry point,
and the forward + backward time of both paths. ``--tokens`` sets the token count (default 8192).
"""

from __future__ import annotations

import argparse
import sys

import torch

from dimshard.kernels.moe import experts_reference, moe_experts
from dimshard.kernels.moe.grouped_mm import _FUNCTIONAL, _PRIVATE, grouped_kernel_applicable
from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments

TOLERANCE = 2e-2
SHAPES = [  # (hidden, experts, top_k, width)
    (2048, 128, 8, 768),  # Qwen3-30B-A3B
    (256, 8, 2, 128),
    (250, 6, 2, 100),  # not multiples of 8: the loop
]


def _inputs(tokens: int, hidden: int, experts: int, top_k: int, width: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, hidden, generator=g, **bf16)
    scores = torch.randn(tokens, experts, generator=g, device="cuda").softmax(-1)
    weights, index = scores.topk(top_k, dim=-1)
    gate_up = torch.randn(experts, 2 * width, hidden, generator=g, **bf16) * hidden ** -0.5
    down = torch.randn(experts, hidden, width, generator=g, **bf16) * width ** -0.5
    return [x, index, weights, torch.arange(experts, device="cuda"), gate_up, down]


def _run(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def _timed_ms(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor, repeats: int = 5) -> float:
    _run(fn, inputs, grad_out)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        _run(fn, inputs, grad_out)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def _relative_error(mine: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.float().abs().max().item() or 1.0
    return (mine.float() - reference.float()).abs().max().item() / scale


def check(tokens: int) -> bool:
    """Compare both paths on every shape, whole and on a shard of experts; print one line each."""
    ok = True
    for hidden, experts, top_k, width in SHAPES:
        inputs = _inputs(tokens, hidden, experts, top_k, width)
        shard = slice(experts // 4, experts // 2)
        for label, case in (("all experts", inputs), ("experts shard", inputs[:3] + [t[shard] for t in inputs[3:]])):
            grad_out = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
            out, grads = _run(moe_experts, case, grad_out)
            as_float = [t.float() if t.is_floating_point() else t for t in case]
            ref, ref_grads = _run(experts_reference, as_float, grad_out.float())
            errors = [_relative_error(out, ref)] + [_relative_error(a, b) for a, b in zip(grads, ref_grads)]
            worst = max(errors)
            ok &= worst <= TOLERANCE
            grouped = grouped_kernel_applicable(case[0], case[4])
            line = (f"hidden {hidden} experts {experts} top-{top_k} width {width} {label}: "
                    f"{'grouped GEMM' if grouped else 'loop'} path, worst relative difference {worst:.2e} "
                    f"({'ok' if worst <= TOLERANCE else 'FAILED'})")
            if label == "all experts":
                line += (f"; fwd+bwd {_timed_ms(moe_experts, case, grad_out):.2f} ms against the loop's "
                         f"{_timed_ms(experts_reference, case, grad_out):.2f} ms")
            print(line, flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    enable_expandable_segments()  # before CUDA starts, as every rank runs
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per call")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    entry = "torch.nn.functional.grouped_mm" if _FUNCTIONAL is not None else "torch._grouped_mm" if _PRIVATE else None
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, grouped GEMM entry point: {entry}", flush=True)
    return 0 if check(args.tokens) else 1


if __name__ == "__main__":
    sys.exit(main())
