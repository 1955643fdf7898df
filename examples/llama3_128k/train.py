"""Train a Hugging Face causal LM (Llama-3-8B at 128K tokens, or a mini model) with dimshard.

Compile stage (one process, no GPU needed):
    python train.py --run_mode compile --model_id <model dir> --dataset_path <data> --plan_ngpus 8 --runtime_ngpus 8
Run stage (compiles first when no matching compile output exists):
    torchrun --nproc_per_node 8 train.py --model_id <model dir> --dataset_path <data> --plan_ngpus 8 --runtime_ngpus 8

The loss is the next-token cross-entropy computed by dimshard.kernels.chunk_linear_cross_entropy,
registered with the annotation ``b l d^, n^ d^, b l -> b l``: the planner may split batch and
sequence, and no process ever holds the [tokens, vocabulary] logits.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from dimshard.cli import UserInputError, parse_dataclass_args
from dimshard.runtime.training.config import TrainConfig

if TYPE_CHECKING:
    from dimshard.planner.cost.budgets import MemoryBudget
    from dimshard.runtime.distributed import ParallelContext
    from dimshard.runtime.training.loop import TrainResult


@dataclass
class TrainArgs(TrainConfig):
    """The trainer's flags plus what this example adds."""

    loss_chunk_size: int = field(
        default=0, metadata={"help": "tokens per chunk of the chunked cross-entropy; 0: automatic (640 MiB of "
                                     "logits, 2560 tokens at Llama-3's vocabulary in bf16)"}
    )
    fused_kernels: str = field(
        default="auto", metadata={"help": "trace RMSNorm/SwiGLU/rotary as fused kernels: auto (on for GPU), on, off",
                                  "choices": ("auto", "on", "off")}
    )
    hw_profile: str = field(
        default="", metadata={"help": "cost-model hardware profile for the planner: h100, h200, cpu or a JSON file "
                                      "from `python -m dimshard.planner.cost.profile_hw`; default: the visible GPU's, "
                                      "else $DIMSHARD_HW_PROFILE, else h100"}
    )
    init_seed: int = field(
        default=0, metadata={"help": "seed for random weights when --model_id holds a config but no weights"}
    )
    fp8: str = field(
        default="off", metadata={"help": "FP8 products of linear layers: off, auto (the planner prices each against "
                                         "bf16 from the hardware profile), all (every eligible linear); weights "
                                         "and checkpoints keep their dtype (docs/design.md, \"FP8\")",
                                 "choices": ("off", "auto", "all")}
    )
    fp8_recipe: str = field(
        default="tensorwise", metadata={"help": "FP8 scaling recipe: tensorwise (e5m2 gradients), rowwise, or "
                                                "rowwise_gw_hp (weight gradient in high precision)",
                                        "choices": ("tensorwise", "rowwise", "rowwise_gw_hp")}
    )

    def validate(self) -> None:
        """The trainer's checks plus this example's flags."""
        super().validate()
        if self.loss_chunk_size < 0:
            raise ValueError(f"--loss_chunk_size must be >= 0 (0: automatic), got {self.loss_chunk_size}")


def _log(message: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"[dimshard] {message}", flush=True)


def _param_dtype(args: TrainArgs, for_gpu: bool) -> torch.dtype:
    if args.dtype == "bf16" or (args.dtype == "auto" and for_gpu):
        return torch.bfloat16
    return torch.float32


def _sequence_length(args: TrainArgs) -> int:
    if args.sequence_length is not None:
        return args.sequence_length
    if args.data_sources:
        raise UserInputError("--data_sources packs sequences on the fly: give their length with --sequence_length")
    if not args.dataset_path:
        raise UserInputError("give --dataset_path (its sequence length is used) or --sequence_length")
    return len(_open_dataset(args.dataset_path)[0]["input_ids"])


def _open_dataset(path: str, sequence_length: int | None = None):
    """The packed dataset at ``path``; a missing, partial or corrupt one is a UserInputError."""
    from dimshard.runtime.data.prepared import load_token_dataset

    try:
        return load_token_dataset(path, sequence_length)
    except (OSError, ValueError, RuntimeError) as error:
        if type(error) in (ValueError, FileNotFoundError):  # load_token_dataset's own: they say what to do
            raise UserInputError(_one_line(error)) from None
        # pyarrow's or json's: a truncated .arrow file, a corrupt state.json or dataset_info.json
        raise UserInputError(_one_line(f"--dataset_path {path} cannot be read ({type(error).__name__}: {error}); it "
                                       "is partial or corrupt: re-create it with bookcorpus.py")) from None


def _data_spec(args: TrainArgs, check: bool = False):
    """The DataSpec of ``--data_sources`` (None without); ``check`` opens every source and the tokenizer
    first and raises a one-line DataSpecError (a UserInputError) for what does not fit the model."""
    from dimshard.runtime.data.spec import check_data_spec, spec_from_config

    spec = spec_from_config(args)
    if spec is not None and check:
        from dimshard.planner.graph.hf import load_config

        vocab_size = getattr(load_config(args.model_id), "vocab_size", None) if args.model_id else None
        check_data_spec(spec, vocab_size, dp_size=args.runtime_ngpus // args.plan_ngpus)
    return spec


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _compile_inputs(args: TrainArgs, sequence_length: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(args.micro_batch_size, sequence_length, dtype=torch.long)
    if args.document_masking:  # packed documents: the loader's batches carry these too (runtime/data/packed_loader.py)
        return {"input_ids": ids, "labels": ids.clone(), "position_ids": ids.clone(), "document_ids": ids.clone()}
    return {"input_ids": ids, "labels": ids.clone()}


def _policy_options(args: TrainArgs) -> tuple[dict, MemoryBudget]:
    """The policy's options (data-parallel copies, ZeRO, micro-batches per step) and the per-GPU memory budget.

    The budget (a ``planner.cost.budgets.MemoryBudget``: GB and where they came from) is
    ``--memory_budget_gb``, or for ``--policy auto`` this GPU's memory (the hardware profile's
    when compiling without a GPU) less the profile's measured margin (``planner/cost/budgets.py``);
    other policies get no budget (the report still shows their memory). Only ``auto`` depends on
    the data-parallel degree, so only its compile output is tied to ``--runtime_ngpus``.
    """
    from dimshard.planner.cost.budgets import MemoryBudget, default_gpu_budget
    from dimshard.planner.cost.hardware import load_hw_profile

    # Gradient buffers depend on it (planner/plan/gradient_buffers.py), whatever the policy.
    options: dict = {"grad_accumulation_steps": args.grad_accumulation_steps}
    if args.policy == "auto":
        # The search weighs ZeRO-1's sharded optimizer state; other plans stay valid for any runtime_ngpus.
        options.update(dp_size=args.runtime_ngpus // args.plan_ngpus, zero=args.zero)
    if args.offload != "auto":  # forced on any policy; under auto the auto policy prices it
        options["offload"] = args.offload
    if args.host_memory_budget_gb is not None:  # else the planner's default: this machine's (or profile's) RAM
        options["host_memory_budget_gb"] = args.host_memory_budget_gb
    if args.memory_budget_gb is not None:
        return options, MemoryBudget(args.memory_budget_gb, "--memory_budget_gb")
    if args.policy == "auto":
        return options, default_gpu_budget(load_hw_profile(args.hw_profile or None))
    return options, MemoryBudget(None, f"none: policy {args.policy} plans no memory (--memory_budget_gb not given)")


def _compile_request(args: TrainArgs, for_gpu: bool) -> tuple:
    """What to compile: ``(model on meta, example inputs, CompileConfig bound to them)``."""
    from dimshard.planner import CompileConfig
    from dimshard.planner.graph.hf import build_on_meta, load_config

    if not args.model_id:
        raise UserInputError("--model_id is required: a Hugging Face model folder (config.json, weights)")
    if not Path(args.model_id).exists() and Path(args.model_id).is_absolute():
        raise UserInputError(f"--model_id {args.model_id} does not exist")
    model = build_on_meta(load_config(args.model_id))
    inputs = _compile_inputs(args, _sequence_length(args))
    options, budget = _policy_options(args)
    config = CompileConfig(
        plan_ngpus=args.plan_ngpus, policy=args.policy, policy_options=options, memory_budget_gb=budget.gb,
        memory_budget_source=budget.source,
        recompute="none" if args.recompute == "auto" and args.policy != "auto" else args.recompute,
        param_dtype=_param_dtype(args, for_gpu),
        fused_kernels=args.fused_kernels == "on" or (args.fused_kernels == "auto" and for_gpu),
        loss="chunked_cross_entropy", loss_chunk_size=args.loss_chunk_size, hw_profile=args.hw_profile or None,
        fp8=args.fp8, fp8_recipe=args.fp8_recipe,
    )
    return model, inputs, config.for_model(model, inputs)


def compile_stage(args: TrainArgs, for_gpu: bool) -> Path:
    """Write the compile output for ``args`` into ``args.compile_dir`` and print where it is."""
    from dimshard.planner import compile_model

    model, inputs, config = _compile_request(args, for_gpu)
    start = time.perf_counter()
    result = compile_model(model, inputs, args.compile_dir, config)
    _log(f"compiled {len(result.graph.ops)} ops under policy '{result.plan.name}' on mesh "
         f"{dict(zip(result.plan.mesh.axis_names, result.plan.mesh.shape))} in {time.perf_counter() - start:.1f}s "
         f"-> {args.compile_dir}")
    report = Path(args.compile_dir) / "plan_report.md"
    if report.is_file():
        print(report.read_text())
    return Path(args.compile_dir)


def compile_is_current(args: TrainArgs, for_gpu: bool) -> tuple[bool, str]:
    """Whether ``args.compile_dir`` holds a compile output of exactly this config; if not, what changed."""
    from dimshard.planner import compile_status

    *_, config = _compile_request(args, for_gpu)
    return compile_status(args.compile_dir, config)


def _init_weights(module: object, args: TrainArgs, plan: dict) -> None:
    """Load weights from the model folder, or draw them (seeded per parameter) when it has none.

    A folder is read the way transformers' from_pretrained reads it: each parameter under the key
    ``plan`` (plan.json) records for it (``checkpoint_name``: GPT-NeoX's ``lm_head`` is ``embed_out`` on
    disk), and the persistent buffers it holds (Gemma 4's ``layer_scalar``) over the compile
    output's values.
    """
    from safetensors import SafetensorError

    from dimshard.runtime.checkpointing.pretrained_weights import (
        has_weights,
        plan_checkpoint_names,
        read_buffers,
        slice_reader,
    )
    from dimshard.runtime.module import take_slice

    if has_weights(args.model_id):
        try:
            module.load_full_state_dict(slice_reader(args.model_id, plan_checkpoint_names(plan)))
            module.load_buffers(read_buffers(args.model_id, plan), strict=False)
        except (KeyError, ValueError, OSError, RuntimeError, SafetensorError) as error:
            raise UserInputError(_one_line(
                f"cannot load the weights in --model_id {args.model_id} ({type(error).__name__}: {error}); they "
                "are missing, truncated or of another model: save the model again with save_pretrained")) from None
        return
    _log(f"{args.model_id} holds no weights: initializing randomly (seed {args.init_seed})")
    from dimshard.planner.graph.hf import load_config

    std = float(getattr(load_config(args.model_id), "initializer_range", 0.02))
    device = module.device
    with torch.no_grad():
        for lp in module.local_parameters():
            if len(lp.full_shape) == 1:
                # Norm weights 1, biases (attention, MLP, LayerNorm, output head: Qwen, Phi, GPT-NeoX) 0.
                lp.param.fill_(0.0 if lp.name.endswith("bias") else 1.0)
                continue
            # The same full tensor on every rank, sliced: shards of one parameter stay consistent.
            gen = torch.Generator(device=device)
            gen.manual_seed(args.init_seed * 1_000_003 + sum(map(ord, lp.name)) * 7919 + len(lp.name))
            full = torch.randn(lp.full_shape, generator=gen, device=device, dtype=torch.float32) * std
            lp.param.copy_(take_slice(full, lp.slices))


def run_stage(args: TrainArgs) -> None:
    """Under torchrun (or one plain process): compile if needed, load, train, checkpoint."""
    from dimshard.runtime.distributed import destroy_parallel
    from dimshard.runtime.reliability.failures import failure_watchdog
    from dimshard.runtime.reliability.gpu_memory import enable_expandable_segments

    enable_expandable_segments()  # before CUDA starts in this rank (planner/cost/budgets.py measured with it)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.runtime_ngpus:
        raise UserInputError(f"--runtime_ngpus is {args.runtime_ngpus} but {world} processes were launched: "
                             f"use torchrun --nproc_per_node {args.runtime_ngpus} (on several nodes: --nnodes times "
                             f"--nproc_per_node = {args.runtime_ngpus}), or change --runtime_ngpus")
    if not args.data_sources and (not args.dataset_path or not Path(args.dataset_path).exists()):
        raise UserInputError(f"--dataset_path {args.dataset_path!r} does not exist: prepare it with bookcorpus.py")
    use_gpu = torch.cuda.is_available()
    backend = "nccl" if use_gpu else "gloo"
    if not dist.is_initialized():
        kwargs = {}
        if use_gpu:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            kwargs["device_id"] = torch.device("cuda", local_rank)
        if world == 1 and "MASTER_ADDR" not in os.environ:
            kwargs["store"] = dist.HashStore()
            kwargs.update(rank=0, world_size=1)
        dist.init_process_group(backend, **kwargs)
    failed = False
    try:
        # From here on, a failure on one rank ends every rank with its message (no rank waits
        # in a collective for a peer that is gone).
        with failure_watchdog():
            _train_under_torchrun(args, use_gpu)
    except BaseException:
        failed = True
        raise
    finally:
        if not failed or world == 1:  # a failed multi-rank job exits without tearing down (main)
            destroy_parallel()


def _train_under_torchrun(args: TrainArgs, use_gpu: bool) -> None:
    """Every rank: compile (rank 0, when needed), load or initialise the weights, train."""
    from dimshard.runtime.distributed import init_parallel
    from dimshard.runtime.module import read_plan
    from dimshard.runtime.node_layout import spans_nodes
    from dimshard.runtime.reliability.gpu_memory import GpuOutOfMemory, out_of_memory_guard

    if dist.get_rank() == 0:
        current, why = compile_is_current(args, use_gpu)
        if not current:
            _log(f"{why}: compiling")
            compile_stage(args, use_gpu)
        else:
            _log(f"reusing the compile output in {args.compile_dir}")
    dist.barrier()
    try:
        plan = read_plan(args.compile_dir)
    except FileNotFoundError:
        if dist.get_rank() == 0 or not spans_nodes(dist.get_world_size()):
            raise
        raise UserInputError(f"--compile_dir {args.compile_dir} holds no plan.json on {socket.gethostname()}, though "
                             "rank 0 has one there: every node must read the one compile output: put it on a file "
                             "system all nodes share (examples/llama3_128k/README.md, \"Several nodes\")") from None
    ctx = init_parallel(plan)
    try:
        with out_of_memory_guard(plan, ctx.device, ctx.rank):  # loading allocates too; steps say their number
            result = _load_and_train(args, plan, ctx)
    except GpuOutOfMemory as error:  # its one line says what to change, like a user error's
        raise UserInputError(str(error)) from None
    _log(f"done: steps {result.start_step}..{result.final_step}, skipped {result.skipped_steps}, "
         f"checkpoint {result.last_checkpoint}")


def _load_and_train(args: TrainArgs, plan: dict, ctx: ParallelContext) -> TrainResult:
    """Load this rank's module, initialise or resume it, train; returns the trainer's TrainResult."""
    from dimshard.planner.graph.hf import load_config
    from dimshard.runtime.checkpointing.shared_folder import check_shared_checkpoints
    from dimshard.runtime.module import load_parallel_module
    from dimshard.runtime.training.loop import resume_source, train

    config = TrainConfig(**{k: v for k, v in asdict(args).items() if k in TrainConfig.__dataclass_fields__})
    source = resume_source(config)
    if ctx.nodes > 1:  # nodes that saw different checkpoint folders would commit or resume different steps
        check_shared_checkpoints(config.checkpoint_dir, source, ctx.rank, ctx.world_size)
    module = load_parallel_module(args.compile_dir, ctx)
    if source is None:  # a fresh start, also for --resume_path auto without a checkpoint
        _init_weights(module, args, plan)
    dataset = _data_spec(args) or _open_dataset(args.dataset_path, plan["model_stats"]["seq_len"])
    model_config = load_config(args.model_id).to_dict()
    return train(config, module, ctx, dataset, plan, model_config=model_config)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, then compile or run; user errors print one line and exit with status 2."""
    from dimshard.planner import CodegenError, TraceError
    from dimshard.runtime.checkpointing.commit import CheckpointError
    from dimshard.runtime.reliability.failures import PeerFailure

    args = parse_dataclass_args(TrainArgs, argv)
    try:
        args.validate()
        _data_spec(args, check=True)  # a bad data spec fails here, before any compile or GPU work
        if args.run_mode == "compile":
            compile_stage(args, for_gpu=args.dtype == "bf16" or torch.cuda.is_available())
        else:
            run_stage(args)
    except (UserInputError, ValueError, OSError, CheckpointError, PeerFailure, TraceError, CodegenError) as e:
        # Bad flags or files, a full disk, a corrupt checkpoint, a model with an op dimshard has no
        # rule for (the planner's errors are ValueErrors, TraceError and CodegenError): what went
        # wrong and what to do. Anything else is a bug of ours and keeps its traceback.
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    if code and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from dimshard.runtime.reliability.failures import exit_after_failure

        exit_after_failure(code)  # the other ranks were told (failure_watchdog); no teardown
    sys.exit(code)
