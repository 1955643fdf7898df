"""How the benchmarks measure and report, in one place, so that their numbers mean the same thing.

- ``load_for_training``: one rank's generated module of a compile output with random weights, and
  the ZeRO AdamW and gradient reducer the trainer would build for it (the plan's offloads on);
- ``StepTimer``: the timed loop, ``for step in StepTimer(device, warmup=..., steps=...)``; each
  pass runs between two device synchronizations, the first ``warmup`` passes untimed;
- ``median_ms``: the median of a function's timed runs;
- ``report`` and ``append_json_line``: a record as one JSON line on stdout and in ``--json_out``;
  ``write_json_report``: a table's rows with the config that produced them, as one JSON file.

A module beside the benchmark scripts: ``python benchmarks/<script>.py`` finds it on ``sys.path``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from dimshard.runtime.distributed import ParallelContext, init_parallel
from dimshard.runtime.module import ParallelModule, load_parallel_module, read_plan
from dimshard.runtime.optimizer.grad_reducer import GradReducer, keeps_param_dtype
from dimshard.runtime.optimizer.zero_adamw import ZeroAdamW, offloads_optimizer
from dimshard.runtime.reliability.gpu_memory import out_of_memory_guard

PEAK_TFLOPS = 989.0  # dense bf16 TFLOP/s of an H100 / H200 SXM: the MFU denominator (docs/design.md)


@dataclasses.dataclass
class TrainingRank:
    """One rank's share of a compiled model, ready to take training steps as the trainer takes them."""

    plan: dict
    ctx: ParallelContext
    module: ParallelModule
    optimizer: ZeroAdamW
    reducer: GradReducer
    optimizer_init_s: float  # seconds to build the optimizer (state allocated; offload update timed)


def load_for_training(compile_dir: str | Path, *, param_dtype: torch.dtype, backend: str | None = None,
                      accumulation: int = 1, update_device: str = "auto",
                      weight_seed: int | None = None) -> TrainingRank:
    """This rank's module of ``compile_dir`` with random weights, with its optimizer and reducer.

    Weights come from torch's global generator (seeded with ``weight_seed`` first unless None):
    N(0, 0.02) for matrices, ones for vectors (norm scales). The optimizer is ZeRO AdamW with
    weight decay 0.1 and the plan's optimizer offload (``update_device`` says where an offloaded
    update runs); it is built under ``out_of_memory_guard``, so running out of GPU memory there is
    one line. The reducer keeps gradients in the parameters' dtype where the plan allows it for
    ``accumulation`` micro-batches per step. ``backend`` goes to ``init_parallel``.
    """
    plan = read_plan(compile_dir)
    ctx = init_parallel(plan, backend=backend)
    module = load_parallel_module(compile_dir, ctx)
    if weight_seed is not None:
        torch.manual_seed(weight_seed)
    params = module.local_parameters()
    with torch.no_grad():
        for lp in params:
            lp.param.normal_(0.0, 0.02) if len(lp.full_shape) > 1 else lp.param.fill_(1.0)
    start = time.perf_counter()
    with out_of_memory_guard(plan, ctx.device, ctx.rank):
        optimizer = ZeroAdamW(params, ctx, weight_decay=0.1, param_dtype=param_dtype,
                              offload=offloads_optimizer(plan), update_device=update_device)
    optimizer_init_s = time.perf_counter() - start
    reducer = GradReducer(params, ctx, keep_param_dtype=keeps_param_dtype(plan, accumulation))
    return TrainingRank(plan, ctx, module, optimizer, reducer, optimizer_init_s)


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Wall seconds of each pass of a loop, the device synchronized before and after every pass.

        timer = StepTimer(device, warmup=2, steps=5)
        for step in timer:  # step = 0 .. warmup + steps - 1
            ...             # one pass: everything in the body is timed
        timer.mean_s        # the mean of the last ``steps`` passes (the first ``warmup`` are untimed)

    ``seconds`` lists the timed passes' seconds in order; a pass left by ``break`` is not counted.
    """

    def __init__(self, device: torch.device | str, *, warmup: int, steps: int) -> None:
        self.device = torch.device(device)
        self.warmup = warmup
        self.steps = steps
        self.seconds: list[float] = []

    def __iter__(self) -> Iterator[int]:
        for step in range(self.warmup + self.steps):
            synchronize(self.device)
            start = time.perf_counter()
            yield step
            synchronize(self.device)
            if step >= self.warmup:
                self.seconds.append(time.perf_counter() - start)

    @property
    def mean_s(self) -> float:
        """Mean seconds of a timed pass (ZeroDivisionError before any)."""
        return sum(self.seconds) / len(self.seconds)


def median_ms(fn: Callable[[], Any], device: torch.device | str, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` runs after ``warmup`` (see ``StepTimer``)."""
    timer = StepTimer(device, warmup=warmup, steps=repeats)
    for _ in timer:
        fn()
    return statistics.median(timer.seconds) * 1e3


def append_json_line(path: str | Path | None, record: dict[str, Any]) -> None:
    """Append ``record`` to ``path`` as one JSON line (nothing when ``path`` is None or empty)."""
    if path:
        with Path(path).open("a") as f:
            f.write(json.dumps(record) + "\n")


def report(record: dict[str, Any], json_out: str | Path | None = None) -> None:
    """Print ``record`` as one JSON line (flushed) and append it to ``json_out`` when given."""
    print(json.dumps(record), flush=True)
    append_json_line(json_out, record)


def write_json_report(path: str | Path, config: Any, rows: Sequence[Any], **context: Any) -> None:
    """Write ``{"config", **context, "rows"}`` to ``path`` as indented JSON: the dataclass ``config``
    that produced the dataclass ``rows``, and what else (device, versions) they were measured on."""
    with open(path, "w") as f:
        json.dump({"config": dataclasses.asdict(config), **context,
                   "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
