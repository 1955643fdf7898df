"""Training metrics: MFU arithmetic, peak memory (and the plan's estimate of it in the same units), and the
per-logging-step record sinks.

Each logging step produces one record ``{step, loss, grad_norm, lr, tokens_per_s, mfu,
peak_mem_gb, skipped_steps}`` that is appended to ``<dump_dir>/metrics.jsonl``, shown on the
progress bar (or printed as a line when stderr is not a terminal), and optionally written to
TensorBoard. Only a resumed run appends to an existing metrics.jsonl (its own: records past the
step it resumed from, logged by the interrupted attempt, are dropped first since those steps run
again); a fresh run never writes into another run's file (``check_metrics_file``).
"""

from __future__ import annotations

import json
import resource
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


def flops_per_sequence(model_stats: dict[str, Any], sequence_length: int | None = None) -> float:
    """Training FLOPs of one sequence: ``3 * 2 * (N*S + 2*L*H*S^2)`` (docs/design.md, "Measuring: MFU").

    ``model_stats`` is plan.json's: ``num_params`` N, ``num_layers`` L, ``hidden_size`` H and
    ``seq_len`` S (overridden by ``sequence_length``). Forward is the bracket times 2, and
    forward plus backward three times that.
    """
    n, layers, hidden = model_stats["num_params"], model_stats["num_layers"], model_stats["hidden_size"]
    s = sequence_length or model_stats["seq_len"]
    return 3 * 2 * (n * s + 2 * layers * hidden * s * s)


def model_flops_utilization(
    sequences_per_s: float, model_stats: dict[str, Any], world_size: int, peak_tflops: float | None,
    sequence_length: int | None = None,
) -> float | None:
    """MFU as a fraction: achieved model FLOP/s over ``world_size * peak_tflops * 1e12``; None without a peak."""
    if peak_tflops is None or peak_tflops <= 0:
        return None
    return flops_per_sequence(model_stats, sequence_length) * sequences_per_s / (world_size * peak_tflops * 1e12)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process in GiB: CUDA max allocated on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def host_memory_gib() -> dict[str, float]:
    """This process's resident set now and at its peak (``rss``, ``peak``: VmRSS, VmHWM), GiB.

    Page-locked buffers (offloaded optimizer state and activations) are included; NaN off Linux.
    """
    found = {"rss": float("nan"), "peak": float("nan")}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key = {"VmRSS:": "rss", "VmHWM:": "peak"}.get(line.split(":")[0] + ":")
            if key:
                found[key] = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return found


def plan_estimate_record(plan: dict[str, Any], accumulation: int = 1) -> dict[str, Any]:
    """plan.json's ``estimate`` (docs/contract.md) in the units measurements are printed in; {} without one.

    ``est_step_s``: ``accumulation`` micro-batches, the gradient sync and the optimizer;
    ``est_compute_only_s``: the same without communication (what a rank under a fake process
    group measures); ``est_peak_gib``: allocated GPU memory per GPU (compare with
    ``torch.cuda.max_memory_allocated``); ``est_host_rss_gib``: offloaded state plus the process's own
    host memory (compare with VmHWM); the budgets in GB (10^9 bytes) with their sources.
    """
    est = plan.get("estimate")
    if not est:
        return {}

    def gb(nbytes: float | None) -> float | None:
        return None if nbytes is None else round(nbytes / 1e9, 2)

    return {
        "est_step_s": round((est["compute_s"] + est["comm_s"]) * accumulation + est["grad_sync_s"] + est["optimizer_s"],
                            4),
        "est_compute_only_s": round(est["compute_s"] * accumulation + est["optimizer_s"], 4),
        "est_peak_gib": round(est["gpu_peak_bytes"] / 2**30, 2),
        "est_host_offload_gib": round(est["host_offload_bytes"] / 2**30, 2),
        "est_host_rss_gib": round((est["host_offload_bytes"] + est["host_process_bytes"]) / 2**30, 2),
        "est_hw_profile": est["hw_profile"],
        "gpu_budget_gb": gb(est["gpu_budget_bytes"]), "gpu_budget_source": est["gpu_budget_source"],
        "host_budget_gb": gb(est["host_budget_bytes"]), "host_budget_source": est["host_budget_source"],
    }


METRICS_FILE = "metrics.jsonl"


def check_metrics_file(dump_dir: str | Path, *, resuming: bool, replace: bool) -> None:
    """Raise ValueError when a fresh run (``resuming`` False) would write into a dump_dir whose
    metrics.jsonl holds records, unless ``replace`` (``--resume_path auto``: the same run started
    again before its first checkpoint) allows starting that file anew."""
    path = Path(dump_dir) / METRICS_FILE
    if resuming or replace or not path.is_file() or path.stat().st_size == 0:
        return
    raise ValueError(f"--dump_dir {dump_dir} already holds {METRICS_FILE} of another run; pass --resume_path auto "
                     "to continue that run, another --name, or another --dump_dir")


def _records_up_to(path: Path, step: int) -> list[str]:
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    return kept


class MetricsLogger:
    """Writes metric records on the logging rank; every method is a no-op elsewhere.

    ``total_steps``/``initial_step`` size the progress bar; ``tensorboard`` writes events to
    ``<dump_dir>/tb`` when the tensorboard package is installed (a warning otherwise). A
    ``resumed`` run keeps the records of steps up to ``initial_step`` and appends; otherwise
    metrics.jsonl starts empty.
    """

    def __init__(
        self,
        dump_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        initial_step: int = 0,
        tensorboard: bool = False,
        run_name: str = "dimshard",
        resumed: bool = False,
    ) -> None:
        self.enabled = enabled
        self._file = None
        self._bar = None
        self._tensorboard = None
        self._interactive = sys.stderr.isatty()
        if not enabled:
            return
        dump = Path(dump_dir)
        dump.mkdir(parents=True, exist_ok=True)
        self.path = dump / METRICS_FILE
        kept = _records_up_to(self.path, initial_step) if resumed and self.path.is_file() else []
        staging = self.path.with_name(METRICS_FILE + ".tmp")
        staging.write_text("".join(line + "\n" for line in kept))
        staging.replace(self.path)
        self._file = open(self.path, "a")
        self._bar = tqdm(total=total_steps, initial=initial_step, desc=run_name, unit="step",
                         disable=not self._interactive, dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("--tensorboard needs the tensorboard package (pip install tensorboard); "
                              "metrics go to metrics.jsonl only", stacklevel=2)
            else:
                self._tensorboard = SummaryWriter(log_dir=str(dump / "tb"))

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar by ``steps`` optimizer steps."""
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (JSON-able, with an int ``step``) to metrics.jsonl and show it."""
        if not self.enabled:
            return
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        shown = {k: _short(v) for k, v in record.items() if k != "step" and v is not None}
        if self._interactive and self._bar is not None:
            self._bar.set_postfix(shown, refresh=True)
        else:
            print(f"step {record['step']} " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        """Flush and close the sinks."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _short(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4g}"
    return value
