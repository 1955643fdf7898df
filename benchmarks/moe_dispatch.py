"""Expert-parallel dispatch on several GPUs: all-to-all against gather + reduce-scatter, one MoE layer.

``torchrun --nproc_per_node 8 benchmarks/moe_dispatch.py`` (NCCL; ``--device cpu`` runs it on gloo
with small shapes for a smoke check). Each rank holds ``--tokens`` tokens and an equal slice of the
experts (a Qwen3-30B-A3B layer by default: hidden 2048, 128 experts, top-8, expert width 768, bf16).
Two ways compute the same outputs for every rank's tokens, forward and backward:

- gather: all-gather the tokens (and their top-k ids and weights) over the ranks, ``moe_experts`` on
  the local experts (a partial sum over experts), reduce-scatter the partial outputs;
- all-to-all: ``moe_experts_dispatched`` (kernels/moe/dispatch.py), pairs sent to their experts'
  ranks and back with uneven counts.

Rank 0 prints, per routing (``uniform``: softmax of random logits; ``skewed``: logits biased towards
the first experts, as an unbalanced router), the median forward + backward milliseconds of both, their
peak memory above the inputs, the busiest rank's received pairs against the mean (the imbalance the
cost model assumes to be 1.25, ``EXPERT_IMBALANCE``), and the largest difference between the two
outputs relative to the largest output (must stay below 2e-2 in bf16, or the script exits 1).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from dimshard.kernels.moe import moe_experts
from dimshard.kernels.moe.dispatch import moe_experts_dispatched, route_to_ranks
from dimshard.runtime import comm
from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments

TOLERANCE = 2e-2


def _inputs(args: argparse.Namespace, skew: float, device: torch.device) -> list[torch.Tensor]:
    """This rank's tokens with their routing, and its slice of the experts' weights."""
    ranks, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator(device=device).manual_seed(1000 + rank)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(args.tokens, args.hidden, generator=g, device=device, dtype=dtype)
    logits = torch.randn(args.tokens, args.experts, generator=g, device=device)
    logits -= skew * torch.linspace(0, 1, args.experts, device=device)  # skew > 0: the first experts win more
    weights, index = logits.softmax(-1).topk(args.top_k, dim=-1)
    local = args.experts // ranks
    gw = torch.Generator(device=device).manual_seed(rank)
    gate_up = torch.randn(local, 2 * args.width, args.hidden, generator=gw, device=device, dtype=dtype)
    down = torch.randn(local, args.hidden, args.width, generator=gw, device=device, dtype=dtype)
    ids = torch.arange(rank * local, (rank + 1) * local)  # a CPU constant, as generated code holds it
    return [x, index, weights.to(dtype), ids, gate_up * args.hidden ** -0.5, down * args.width ** -0.5]


def _gathered(x, index, weights, ids, gate_up, down) -> torch.Tensor:
    full = moe_experts(comm.all_gather(x, 0, None), comm.all_gather(index, 0, None),
                       comm.all_gather(weights, 0, None), ids, gate_up, down)
    return comm.reduce_scatter(full, 0, None)


def _dispatched(x, index, weights, ids, gate_up, down) -> torch.Tensor:
    return moe_experts_dispatched(x, index, weights, ids, gate_up, down, group=None, comm=comm)


def _time(fn, inputs: list[torch.Tensor], repeats: int, device: torch.device) -> tuple[float, float, torch.Tensor]:
    """(median ms of forward + backward, peak bytes above the inputs, the output)."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    grad = torch.ones(inputs[0].shape, device=device, dtype=inputs[0].dtype)
    times, out = [], None
    for i in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        dist.barrier()
        start = time.perf_counter()
        out = fn(*leaves)
        out.backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(1e3 * (time.perf_counter() - start))
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
        for leaf in leaves:
            leaf.grad = None
    return statistics.median(times), float(peak), out.detach()


def main() -> int:
    enable_expandable_segments()  # before CUDA starts, as every rank runs
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--width", type=int, default=768, help="one expert's intermediate size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    if args.device == "cuda":
        dist.init_process_group("nccl")
        device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    ranks, failed = dist.get_world_size(), False
    for routing, skew in (("uniform", 0.0), ("skewed", 2.0)):
        inputs = _inputs(args, skew, device)
        _, send = route_to_ranks(inputs[1], args.experts // ranks, ranks)
        received = torch.tensor(comm.exchange_counts(send, None)).sum(0).float()
        gather_ms, gather_peak, reference = _time(_gathered, inputs, args.repeats, device)
        a2a_ms, a2a_peak, out = _time(_dispatched, inputs, args.repeats, device)
        error = ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
        failed |= error > TOLERANCE
        if dist.get_rank() == 0:
            print(f"{routing}: {ranks} ranks x {args.tokens} tokens, hidden {args.hidden}, {args.experts} experts, "
                  f"top-{args.top_k}, width {args.width} ({device.type}, torch {torch.__version__})\n"
                  f"  gather + reduce-scatter: {gather_ms:.2f} ms, peak +{gather_peak / 2**30:.2f} GiB\n"
                  f"  all-to-all dispatch:     {a2a_ms:.2f} ms, peak +{a2a_peak / 2**30:.2f} GiB\n"
                  f"  busiest rank's pairs / mean: {(received.max() / received.mean()).item():.3f}; "
                  f"max difference / max output: {error:.2e}", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
