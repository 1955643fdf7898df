"""One rank of a toy training job, launched like torchrun launches train.py (env:// rendezvous).

    python tests/reliability_worker.py '<json: TrainConfig fields + "dataset" + optional "step_sleep_s">'

Runs tests/test_trainer_toy.py's toy model through ``dimshard.runtime.training.loop.train`` under
``failure_watchdog``, exactly as train.py's run stage does, and prints one ``error: ...`` line
and exits 2 on failure. Faults come from ``DIMSHARD_FAULT`` (see runtime/reliability/faults.py); a
``step_sleep_s`` slows each forward so that a signal can arrive mid-run. Prints
``losses <json list>`` on success.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch.distributed as dist  # noqa: E402
from test_trainer_toy import SEQ, make_module, toy_plan  # noqa: E402

from dimshard.runtime.checkpointing.commit import CheckpointError  # noqa: E402
from dimshard.runtime.data.prepared import load_token_dataset  # noqa: E402
from dimshard.runtime.reliability.failures import exit_after_failure, failure_watchdog  # noqa: E402
from dimshard.runtime.training.config import TrainConfig  # noqa: E402
from dimshard.runtime.training.loop import train  # noqa: E402


def _run(options: dict) -> list[float]:
    dataset_path = options.pop("dataset")
    sleep_s = float(options.pop("step_sleep_s", 0.0))
    config = TrainConfig(**options)
    plan = toy_plan(config.plan_ngpus, config.micro_batch_size)
    ctx, module = make_module(plan)
    if sleep_s:
        forward = module.forward

        def slow_forward(*args, **kwargs):
            time.sleep(sleep_s)
            return forward(*args, **kwargs)

        module.forward = slow_forward
    result = train(config, module, ctx, load_token_dataset(dataset_path, SEQ), plan)
    return [r["loss"] for r in result.records]


def main() -> int:
    """Run one rank; 0 on success, 2 after printing one error line."""
    dist.init_process_group("gloo")
    try:
        with failure_watchdog():
            losses = _run(json.loads(sys.argv[1]))
    except (CheckpointError, OSError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        exit_after_failure(2)  # as train.py: no teardown that could wait for a peer that is gone
    print("losses " + json.dumps(losses), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
