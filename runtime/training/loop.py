"""The training loop: micro-batches, gradient reduction, clipping, AdamW, logging, checkpoints."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..checkpointing.commit import check_checkpoint_dir_owned, find_latest_checkpoint
from ..checkpointing.merged import load_merged_checkpoint
from ..checkpointing.rng_state import capture_rng_state, restore_rng_state
from ..checkpointing.sharded import load_checkpoint, resolve_checkpoint, save_checkpoint
from ..data.batch_stream import make_batch_stream
from ..data.copy_batches import CopyBatches
from ..optimizer.grad_reducer import GradReducer, keeps_param_dtype
from ..optimizer.lr_schedule import lr_at
from ..optimizer.zero_adamw import ZeroAdamW, offloads_optimizer
from ..reliability.collective_order import check_collective_order
from ..reliability.failures import StopSignal
from ..reliability.faults import fault_point
from ..reliability.gpu_memory import out_of_memory_guard
from .config import TrainConfig, resolve_dtype, resolve_peak_tflops
from .metrics import MetricsLogger, check_metrics_file, model_flops_utilization, peak_memory_gb

if TYPE_CHECKING:
    from ..distributed import ParallelContext
    from ..module import ParallelModule


@dataclass
class TrainResult:
    """What a call to ``train`` did."""

    start_step: int  # optimizer steps already done when this call began (resumed runs)
    final_step: int  # optimizer steps done when it returned
    skipped_steps: int  # steps skipped for a non-finite gradient norm, over the whole run
    records: list[dict[str, Any]] = field(default_factory=list)  # the logged metric records, in order
    last_checkpoint: Path | None = None
    stopped_by_signal: bool = False  # SIGTERM: stopped (checkpointed) before max_steps


def _compiled_batch_shape(plan: dict) -> tuple[int, int] | None:
    for entry in plan.get("inputs", []):
        if entry.get("name") == "input_ids":
            return int(entry["shape"][0]), int(entry["shape"][1])
    return None


def _check_layout(config: TrainConfig, ctx: ParallelContext, plan: dict) -> int | None:
    """Check the run matches the compile output; return the compiled sequence length."""
    if ctx.world_size != config.runtime_ngpus or ctx.plan_ngpus != config.plan_ngpus:
        raise ValueError(
            f"this job runs {ctx.world_size} processes with plan_ngpus {ctx.plan_ngpus}, but the config says "
            f"--runtime_ngpus {config.runtime_ngpus} --plan_ngpus {config.plan_ngpus}: launch torchrun with "
            f"--nproc_per_node {config.runtime_ngpus} (times nodes) or change the flags"
        )
    shape = _compiled_batch_shape(plan)
    if shape is None:
        return config.sequence_length
    batch, length = shape
    if batch != config.micro_batch_size:
        raise ValueError(f"the compile output was made for micro-batches of {batch} sequences, the config asks for "
                         f"--micro_batch_size {config.micro_batch_size}; recompile or change the flag")
    if config.sequence_length is not None and config.sequence_length != length:
        raise ValueError(f"the compile output was made for sequences of {length} tokens, the config asks for "
                         f"--sequence_length {config.sequence_length}; recompile or change the flag")
    return length


def _global_mean(value: torch.Tensor) -> float:
    # Every rank of a copy holds the same loss, so the world mean is the mean over copies.
    value = value.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return float(value.item())


def _global_max(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def resume_source(config: TrainConfig) -> str | None:
    """What ``config.resume_path`` loads: a step folder or merged file, or None for a fresh start
    (no flag, or ``auto`` with no complete checkpoint in checkpoint_dir yet)."""
    path = config.resume_path
    if path == "auto":
        latest = find_latest_checkpoint(config.checkpoint_dir) if config.checkpoint_dir else None
        return str(latest) if latest is not None else None
    return path or None


def train(
    config: TrainConfig,
    module: ParallelModule,
    ctx: ParallelContext,
    dataset: Any,
    plan: dict,
    *,
    model_config: dict | None = None,
) -> TrainResult:
    """Train ``module`` (this rank's generated module, parameters loaded) until ``config.max_steps``.

    Per optimizer step: ``grad_accumulation_steps`` micro-batches of this copy, each loss
    divided by that count before backward (so the step's loss is their mean); gradients reduced
    over holders and averaged over copies; global-norm clipping; AdamW with the scheduled lr
    (non-finite norm: the step is skipped and counted). Every ``log_interval`` steps a record
    with the global mean loss over the steps since the last record is logged; a checkpoint is
    written every ``checkpoint_interval`` steps and at the end (none when checkpoint_dir is '').
    ``config.resume_path`` resumes from a sharded checkpoint (same plan and world size; bit-exact
    continuation) or a merged file (any plan); ``auto`` with no checkpoint yet is a fresh start
    (the caller initialises the weights: see ``resume_source``). A run that did not resume from
    its checkpoint_dir refuses one holding checkpoints, and a fresh run refuses to append to
    another run's metrics.jsonl (CheckpointError / ValueError naming the way out). SIGTERM on any
    rank stops every rank at the same step boundary after a complete checkpoint. CUDA running out
    of memory raises ``GpuOutOfMemory`` (runtime/reliability/gpu_memory.py): one line with the plan's
    estimate, the measured peaks and what to change. An exception leaves earlier checkpoints intact.
    Call on every rank; returns the same TrainResult values on every rank.
    """
    config.validate()
    sequence_length = _check_layout(config, ctx, plan)
    source = resume_source(config)
    if config.checkpoint_dir:
        resumed_from = resolve_checkpoint(source) if source and not Path(source).is_file() else None
        check_checkpoint_dir_owned(config.checkpoint_dir, resumed_from)
    check_metrics_file(config.dump_dir, resuming=source is not None, replace=config.resume_path == "auto")
    local_params = module.local_parameters()
    with out_of_memory_guard(plan, ctx.device, ctx.rank):  # the optimizer state is allocated here
        optimizer = ZeroAdamW(
            local_params, ctx,
            betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, weight_decay=config.weight_decay,
            zero=config.zero, param_dtype=resolve_dtype(config, ctx.device),
            offload=offloads_optimizer(plan), update_device=config.optimizer_update_device,
        )
    reducer = GradReducer(local_params, ctx,
                          keep_param_dtype=keeps_param_dtype(plan, config.grad_accumulation_steps))
    stream = make_batch_stream(
        dataset, micro_batch_size=config.micro_batch_size, dp_size=ctx.dp_size, copy_index=ctx.copy_index,
        seed=config.seed, device=ctx.device, sequence_length=sequence_length,
    )
    torch.manual_seed(config.seed)
    start_step = _resume(source, config, module, optimizer, stream, ctx, plan)

    peak_tflops = resolve_peak_tflops(config, ctx.device)
    sequence_length = sequence_length or plan.get("model_stats", {}).get("seq_len")
    sequences_per_step = config.global_batch_size
    logger = MetricsLogger(config.dump_dir, enabled=ctx.rank == 0, total_steps=config.max_steps,
                           initial_step=start_step, tensorboard=config.tensorboard, run_name=config.name,
                           resumed=source is not None)
    result = TrainResult(start_step=start_step, final_step=start_step, skipped_steps=optimizer.skipped_steps)
    schedule = {"lr": config.lr, "max_steps": config.max_steps, "warmup_steps": config.warmup_steps,
                "schedule": config.lr_schedule, "min_lr_ratio": config.min_lr_ratio,
                "wsd_decay_ratio": config.wsd_decay_ratio}
    accumulation = config.grad_accumulation_steps
    stop_signal = StopSignal()
    try:
        module.train()
        interval_loss = torch.zeros((), dtype=torch.float32, device=ctx.device)
        interval_steps = 0
        interval_start = time.perf_counter()
        for step in range(start_step, config.max_steps):
            lr = lr_at(step, **schedule)
            with out_of_memory_guard(plan, ctx.device, ctx.rank, step + 1):
                for micro_step in range(accumulation):
                    batch = next(stream)
                    last = micro_step == accumulation - 1
                    with contextlib.nullcontext() if last else reducer.no_sync():
                        loss = module(**batch)  # input_ids, labels (+ position_ids, document_ids when packed)
                        (loss / accumulation).backward()
                    interval_loss += loss.detach().float() / accumulation
                fault_point("train.step", rank=ctx.rank, step=step + 1)
                outcome = optimizer.step(reducer.finish(), lr, config.clip_grad_norm)
            reducer.zero_grad()
            interval_steps += 1
            completed = step + 1
            result.final_step = completed
            result.skipped_steps = optimizer.skipped_steps
            logger.advance()
            stop = stop_signal.should_stop() and completed < config.max_steps
            final = completed == config.max_steps or stop

            if completed % config.log_interval == 0 or final:
                loss_value = _global_mean(interval_loss) / interval_steps
                # The slowest rank sets the pace; the max also makes every rank log the same record.
                elapsed, peak_mem_gb = _global_max(
                    [time.perf_counter() - interval_start, peak_memory_gb(ctx.device)], ctx.device)
                sequences_per_s = interval_steps * sequences_per_step / elapsed
                record = {
                    "step": completed,
                    "loss": loss_value,
                    "grad_norm": outcome.grad_norm,
                    "lr": lr,
                    "tokens_per_s": sequences_per_s * sequence_length if sequence_length else None,
                    "mfu": (model_flops_utilization(sequences_per_s, plan["model_stats"], ctx.world_size,
                                                    peak_tflops, sequence_length)
                            if "model_stats" in plan else None),
                    "peak_mem_gb": peak_mem_gb,
                    "skipped_steps": optimizer.skipped_steps,
                }
                logger.log(record)
                result.records.append(record)
                check_collective_order()  # DIMSHARD_DEBUG_COLLECTIVES=1 only; a no-op otherwise
                interval_loss.zero_()
                interval_steps = 0
                interval_start = time.perf_counter()

            interval_hit = config.checkpoint_interval > 0 and completed % config.checkpoint_interval == 0
            if config.checkpoint_dir and (interval_hit or final):
                result.last_checkpoint = save_checkpoint(
                    config.checkpoint_dir, completed, local_params=local_params, optimizer=optimizer, ctx=ctx,
                    plan=plan, keep_last=config.keep_last_checkpoints, model_config=model_config,
                    trainer_state={"sampler": stream.state_dict(), "skipped_steps": optimizer.skipped_steps,
                                   "consumed_samples": completed * sequences_per_step, "lr": lr,
                                   "config": asdict(config)},
                    rank_state={"rng": capture_rng_state()},
                )
                # Saving is not training time.
                interval_start = time.perf_counter()
            if stop:
                result.stopped_by_signal = True
                where = f"checkpoint {result.last_checkpoint}" if config.checkpoint_dir else "no checkpoint_dir"
                if ctx.rank == 0:
                    print(f"[dimshard] stopped by a signal after step {completed} ({where}); resume with "
                          "--resume_path auto", flush=True)
                break
    finally:
        stop_signal.close()
        logger.close()
        reducer.close()
        if hasattr(stream, "close"):
            stream.close()
    return result


def _resume(
    source: str | None,
    config: TrainConfig,
    module: ParallelModule,
    optimizer: ZeroAdamW,
    stream: CopyBatches,
    ctx: ParallelContext,
    plan: dict,
) -> int:
    """Load ``source`` (see ``resume_source``) if any; return the number of optimizer steps already done."""
    if source is None:
        return 0
    if Path(source).is_file():
        state = load_merged_checkpoint(source, module, optimizer)
        step = int(state.get("step", 0))
        if "sampler" in state:
            stream.load_state_dict(state["sampler"])
        # Per-rank RNG streams do not carry over to another layout; reseed deterministically.
        torch.manual_seed(config.seed + step)
        return step
    state, rank_state = load_checkpoint(source, local_params=module.local_parameters(), optimizer=optimizer,
                                        ctx=ctx, plan=plan)
    stream.load_state_dict(state["sampler"])
    if "rng" in rank_state:
        restore_rng_state(rank_state["rng"])
    return int(state["step"])
