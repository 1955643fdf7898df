"""dimshard.runtime: what a training loop needs to run a compile output (docs/design.md, "Public API").

- process groups: ``init_parallel`` (from ``plan.json``), ``ParallelContext``, ``destroy_parallel``;
- the model: ``read_plan``, ``load_parallel_module``, ``ParallelModule``, ``LocalParameter``,
  weights from a Hugging Face folder with ``has_weights`` / ``slice_reader``;
- a step: ``GradReducer`` (bucketed gradient reduction), ``ZeroAdamW`` (ZeRO-1 AdamW, fp32
  masters), ``lr_at``;
- checkpoints: ``save_checkpoint``, ``load_checkpoint``, ``find_latest_checkpoint``,
  ``load_merged_checkpoint``, ``merge_checkpoint``, ``capture_rng_state`` / ``restore_rng_state``,
  ``CheckpointError``;
- data and metrics: ``load_token_dataset``, ``MicroBatchStream``, ``MetricsLogger``,
  ``flops_per_sequence``, ``model_flops_utilization``, ``peak_memory_gb``;
- the built-in loop: ``TrainConfig``, ``train``, ``TrainResult``.

Names are imported on first use, so ``import dimshard.runtime.module`` (what generated code
does) loads no more than it did.
"""

from __future__ import annotations

if "." not in __name__:  # imported by its bare name from the repository root: see _shadow_guard.py
    from _shadow_guard import step_aside

    step_aside(__name__, __path__[0])
else:
    import importlib
    from typing import Any

    # exported name -> the module of this package that defines it
    _EXPORTS = {
        "ParallelContext": "distributed", "init_parallel": "distributed", "destroy_parallel": "distributed",
        "ParallelModule": "module", "LocalParameter": "module", "load_parallel_module": "module", "read_plan": "module",
        "has_weights": "checkpointing.pretrained_weights", "slice_reader": "checkpointing.pretrained_weights",
        "GradReducer": "optimizer.grad_reducer", "ZeroAdamW": "optimizer.zero_adamw", "lr_at": "optimizer.lr_schedule",
        "save_checkpoint": "checkpointing.sharded", "load_checkpoint": "checkpointing.sharded",
        "find_latest_checkpoint": "checkpointing.commit", "load_merged_checkpoint": "checkpointing.merged",
        "merge_checkpoint": "checkpointing.merged", "capture_rng_state": "checkpointing.rng_state",
        "restore_rng_state": "checkpointing.rng_state", "CheckpointError": "checkpointing.commit",
        "load_token_dataset": "data.prepared", "MicroBatchStream": "data.prepared",
        "MetricsLogger": "training.metrics", "flops_per_sequence": "training.metrics",
        "model_flops_utilization": "training.metrics", "peak_memory_gb": "training.metrics",
        "TrainConfig": "training.config", "train": "training.loop", "TrainResult": "training.loop",
    }

    __all__ = sorted(_EXPORTS)

    def __getattr__(name: str) -> Any:
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module 'dimshard.runtime' has no attribute '{name}'")
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(_EXPORTS))

