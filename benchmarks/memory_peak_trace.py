"""What is alive at a training step's memory peak: train_mfu.py's run under the CUDA allocator's history.

    python benchmarks/memory_peak_trace.py [--top 40] -- <benchmarks/train_mfu.py flags>

Records every allocation of the run (``torch.cuda.memory._record_memory_history`` with Python
stacks), replays the trace to find the moment the allocated bytes peaked, and prints the blocks
alive then, largest first, each with the generated-code or dimshard line that allocated it and
the autograd phase (forward or backward) it was allocated in. It is how the cost model's memory
estimate (planner/cost/model.py) is checked op by op against a run: train_mfu's JSON line (its
``est_*`` fields) is printed first. Needs a CUDA GPU; recording slows the run, so time nothing here.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_mfu  # noqa: E402  (a sibling script)

GIB = 2**30
_OURS = ("gencode", "dimshard", "kernels", "runtime", "planner")


def _where(frames: list[dict]) -> str:
    """The innermost frame in generated code or dimshard, else the innermost Python frame."""
    for f in frames:
        name = f.get("filename", "")
        if any(part in name for part in _OURS) and "memory_peak_trace" not in name:
            return f"{Path(name).name}:{f.get('line')} {f.get('name')}"
    return f"{Path(frames[0]['filename']).name}:{frames[0].get('line')}" if frames else "?"


def _backward(frames: list[dict]) -> bool:
    # ``Tensor.backward`` or a custom op's ``backward`` is on the stack (a forward ``Function.apply`` is not).
    return any(f.get("name") in ("backward", "_engine_run_backward") for f in frames)


def peak_blocks(trace: list[dict]) -> tuple[int, dict[int, dict], dict | None]:
    """Replay one device's trace: (peak allocated bytes, blocks alive at the peak by address, the peak's alloc)."""
    alive: dict[int, dict] = {}
    current = peak = 0
    at_peak: dict[int, dict] = {}
    peak_event = None
    for event in trace:
        action = event["action"]
        if action == "alloc":
            alive[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, at_peak, peak_event = current, dict(alive), event
        elif action == "free_completed" and event["addr"] in alive:  # when the allocated bytes drop
            current -= alive.pop(event["addr"])["size"]
    return peak, at_peak, peak_event


def main(argv: list[str] | None = None) -> None:
    """Run train_mfu.py's benchmark with the allocator's history on; print the blocks alive at the peak."""
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--top", type=int, default=40, help="how many of the largest live blocks to print")
    args = parser.parse_args(ours)
    if not torch.cuda.is_available():
        raise SystemExit("error: memory_peak_trace.py needs a CUDA GPU (it reads the CUDA allocator's history)")
    torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=2_000_000)
    train_mfu.main(theirs)
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    peak, blocks, event = peak_blocks(trace)
    print(f"peak allocated {peak / GIB:.2f} GiB in {len(blocks)} blocks (torch.cuda.max_memory_allocated "
          f"{torch.cuda.max_memory_allocated() / GIB:.2f} GiB)")
    if event is not None:
        print(f"the allocation that made the peak: {event['size'] / GIB:.3f} GiB at {_where(event['frames'])}")
    groups: Counter = Counter()
    counts: Counter = Counter()
    for block in blocks.values():
        key = (("backward" if _backward(block["frames"]) else "forward"), _where(block["frames"]))
        groups[key] += block["size"]
        counts[key] += 1
    print(f"{'GiB':>8} {'n':>4}  phase     allocated at")
    for (phase, where), size in groups.most_common(args.top):
        print(f"{size / GIB:8.3f} {counts[(phase, where)]:4d}  {phase:8}  {where}")


if __name__ == "__main__":
    main()
