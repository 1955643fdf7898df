"""Training configuration: one dataclass field per command-line flag.

Each field carries ``metadata={"help": ...}`` (and ``"choices"`` where the value is an enum), from
which the shared CLI helper generates ``--<field>`` flags. Fields typed ``X | None`` accept
``None`` (the flag left out) with the meaning given in their help.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..optimizer.lr_schedule import SCHEDULES

# Dense bf16 peak of one GPU, TFLOP/s (docs/design.md, "Measuring: MFU").
_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


# Every output of a run lives under this folder by default; {name} is replaced by the run name.
RUN_DIR = "./runs/{name}"


# --offload values (planner/plan/offload_plan.py's OFFLOAD_MODES).
OFFLOAD_CHOICES = ("auto", "none", "optimizer", "activations", "all")


def _help(text: str, choices: tuple[str, ...] | None = None) -> dict:
    return {"help": text} if choices is None else {"help": text, "choices": choices}


@dataclass
class TrainConfig:
    """Everything a training run is configured by; see each field's ``help``."""

    name: str = field(
        default="dimshard",
        metadata=_help("run name: log lines, TensorBoard, and the default output folder ./runs/<name>/ "
                       "(compile output, checkpoints, metrics)"),
    )
    run_mode: str = field(
        default="run",
        metadata=_help("compile: only write the compile output; run: compile if needed, then train",
                       ("compile", "run")),
    )
    model_id: str = field(default="", metadata=_help("local model directory (or hub id) to train"))
    dataset_path: str = field(
        default="", metadata=_help("dataset folder written by datasets.save_to_disk with an input_ids column")
    )
    plan_ngpus: int = field(default=1, metadata=_help("GPUs in one partitioned copy of the model (scale unit)"))
    runtime_ngpus: int = field(
        default=1, metadata=_help("total GPUs (world size); a multiple of plan_ngpus, the copies are data parallel")
    )
    policy: str = field(default="tp", metadata=_help("partition policy name (dp, tp, tp_sp, auto, or a user policy)"))
    resume_path: str | None = field(
        default=None,
        metadata=_help("resume from a sharded checkpoint folder (checkpoint_dir or one step_<N>), a merged "
                       "checkpoint file, or 'auto' for the newest checkpoint in checkpoint_dir (none yet: a fresh "
                       "start, as preemptible jobs want)"),
    )
    micro_batch_size: int = field(default=1, metadata=_help("sequences per micro-batch per model copy"))
    grad_accumulation_steps: int = field(default=1, metadata=_help("micro-batches accumulated per optimizer step"))
    max_steps: int = field(default=100, metadata=_help("optimizer steps to train for (total, including resumed ones)"))
    lr: float = field(default=1e-5, metadata=_help("peak learning rate"))
    min_lr_ratio: float = field(default=0.1, metadata=_help("final learning rate as a fraction of lr"))
    warmup_steps: int = field(default=0, metadata=_help("linear warmup steps"))
    lr_schedule: str = field(default="cosine", metadata=_help("learning-rate decay after warmup", SCHEDULES))
    wsd_decay_ratio: float = field(
        default=0.1, metadata=_help("wsd schedule: fraction of post-warmup steps spent decaying")
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (never applied to 1-D parameters)"))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1"))
    adam_beta2: float = field(default=0.95, metadata=_help("AdamW beta2"))
    adam_eps: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    clip_grad_norm: float = field(default=1.0, metadata=_help("clip the global gradient norm to this; <= 0 disables"))
    seed: int = field(default=0, metadata=_help("seed for data order and torch RNGs"))
    dtype: str = field(
        default="auto",
        metadata=_help("parameter/compute dtype; auto = bf16 on GPU, fp32 on CPU (master weights stay fp32)",
                       ("auto", "bf16", "fp32")),
    )
    checkpoint_dir: str = field(
        default=f"{RUN_DIR}/checkpoints",
        metadata=_help("where sharded checkpoints are written ('' disables checkpointing); {name} is the run "
                       "name; a run without --resume_path refuses a folder that already holds checkpoints"),
    )
    checkpoint_interval: int = field(
        default=0, metadata=_help("save every this many steps (0: only at the end); always saves at the end")
    )
    keep_last_checkpoints: int = field(default=2, metadata=_help("complete checkpoints kept; older ones deleted"))
    log_interval: int = field(default=1, metadata=_help("log metrics every this many steps"))
    dump_dir: str = field(
        default=RUN_DIR, metadata=_help("folder for metrics.jsonl and TensorBoard events; {name} is the run name")
    )
    tensorboard: bool = field(default=False, metadata=_help("also write TensorBoard events to dump_dir/tb"))
    sequence_length: int | None = field(
        default=None, metadata=_help("tokens per sequence; default: the dataset's sequence length")
    )
    compile_dir: str = field(
        default=f"{RUN_DIR}/compile",
        metadata=_help("folder holding plan.json and gencode/ from the compile stage; {name} is the run name"),
    )
    memory_budget_gb: float | None = field(
        default=None, metadata=_help("per-GPU memory budget (GB) for the auto policy; default: this GPU's memory "
                                     "(the hardware profile's when compiling without it) less the margin measured on "
                                     "that GPU (planner/cost/budgets.py)")
    )
    recompute: str = field(
        default="auto", metadata=_help("activation recompute: auto (planner decides), none, or layer",
                                       ("auto", "none", "layer"))
    )
    peak_tflops: float | None = field(
        default=None,
        metadata=_help("per-GPU dense peak TFLOP/s for MFU; default: 989 on H100/H200, none on CPU "
                       "(MFU reported as null); <= 0 disables MFU"),
    )
    zero: bool = field(default=True, metadata=_help("shard optimizer state across data-parallel copies (ZeRO-1)"))
    offload: str = field(
        default="auto",
        metadata=_help("CPU offload: auto (the auto policy prices it; other policies offload nothing), none, "
                       "optimizer (AdamW fp32 state in host memory), activations (recomputed layers' inputs in "
                       "host memory) or all", OFFLOAD_CHOICES),
    )
    host_memory_budget_gb: float | None = field(
        default=None,
        metadata=_help("per-rank host-memory budget (GB) for offloaded state; default: this machine's RAM less the "
                       "measured margin for the OS, shared by its GPUs, less what a training process holds itself "
                       "(planner/cost/budgets.py), or the hardware profile's host RAM when compiling without GPUs"),
    )
    optimizer_update_device: str = field(
        default="auto",
        metadata=_help("where an offloaded AdamW update runs: cpu, gpu (state streamed through the GPU in "
                       "chunks) or auto (the faster of both, timed at start)", ("auto", "cpu", "gpu")),
    )
    # Data spec (runtime/data/spec.py): instead of --dataset_path, stream, mix, tokenize and pack sources.
    data_sources: str = field(
        default="",
        metadata=_help("comma-separated data sources instead of --dataset_path: hub dataset names or local "
                       "files/folders/globs (.jsonl, .json, .parquet, .txt = one document per file, .csv, "
                       ".arrow), tokenized and packed on the fly; needs --sequence_length"),
    )
    data_probs: str = field(
        default="", metadata=_help("mixing probabilities, one per data source, comma-separated, e.g. 0.7,0.3 "
                                   "(normalised; default: equal)")
    )
    data_configs: str = field(
        default="", metadata=_help("hub dataset config per data source, comma-separated (empty entry: none)")
    )
    data_splits: str = field(
        default="", metadata=_help("split per data source, comma-separated (default train; local files are "
                                   "always train)")
    )
    data_text_columns: str = field(
        default="", metadata=_help("text column per data source, comma-separated (default text)")
    )
    data_streaming: bool = field(
        default=False, metadata=_help("stream the data sources (datasets IterableDataset) instead of making a "
                                      "local Arrow copy first")
    )
    data_shuffle_buffer: int = field(
        default=10000, metadata=_help("documents in the shuffle buffer of each streamed source (0: stream "
                                      "order); non-streamed sources are fully shuffled per epoch")
    )
    data_workers: int = field(
        default=1, metadata=_help("tokenizer worker processes of the data loader (0: tokenize in the loader "
                                  "thread); the token stream does not depend on it")
    )
    data_prefetch: int = field(
        default=4, metadata=_help("micro-batches the data loader keeps ready ahead of the training loop")
    )
    tokenizer: str = field(
        default="", metadata=_help("tokenizer folder or hub id for --data_sources; default: --model_id")
    )
    document_masking: bool = field(
        default=False,
        metadata=_help("with --data_sources: positions restart at each packed document, attention and the "
                       "loss never cross a document boundary (the batch carries position_ids/document_ids)"),
    )

    def __post_init__(self) -> None:
        # Expanded once, here, so that every consumer sees the same folders.
        for key in ("checkpoint_dir", "dump_dir", "compile_dir"):
            value = getattr(self, key, None)
            if isinstance(value, str) and "{name}" in value:
                setattr(self, key, value.replace("{name}", self.name))

    def validate(self) -> None:
        """Raise ValueError naming the flag when a value is out of range or inconsistent."""
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
              f"--name must be a folder name (no '/'), got {self.name!r}")
        check(self.plan_ngpus >= 1, f"--plan_ngpus must be >= 1, got {self.plan_ngpus}")
        check(self.runtime_ngpus % self.plan_ngpus == 0 and self.runtime_ngpus >= self.plan_ngpus,
              f"--runtime_ngpus ({self.runtime_ngpus}) must be a positive multiple of --plan_ngpus "
              f"({self.plan_ngpus})")
        check(self.micro_batch_size >= 1, "--micro_batch_size must be >= 1")
        check(self.grad_accumulation_steps >= 1, "--grad_accumulation_steps must be >= 1")
        check(self.max_steps >= 1, "--max_steps must be >= 1")
        check(self.warmup_steps >= 0, "--warmup_steps must be >= 0")
        check(self.lr_schedule in SCHEDULES, f"--lr_schedule must be one of {SCHEDULES}")
        check(0.0 <= self.min_lr_ratio <= 1.0, "--min_lr_ratio must lie in [0, 1]")
        check(0.0 <= self.wsd_decay_ratio <= 1.0, "--wsd_decay_ratio must lie in [0, 1]")
        check(self.dtype in ("auto", "bf16", "fp32"), "--dtype must be auto, bf16 or fp32")
        check(self.run_mode in ("compile", "run"), "--run_mode must be compile or run")
        check(self.recompute in ("auto", "none", "layer"), "--recompute must be auto, none or layer")
        check(self.offload in OFFLOAD_CHOICES, f"--offload must be one of {', '.join(OFFLOAD_CHOICES)}")
        check(self.host_memory_budget_gb is None or self.host_memory_budget_gb > 0,
              "--host_memory_budget_gb must be > 0")
        check(self.optimizer_update_device in ("auto", "cpu", "gpu"), "--optimizer_update_device must be auto, cpu or gpu")
        check(self.log_interval >= 1, "--log_interval must be >= 1")
        check(self.checkpoint_interval >= 0, "--checkpoint_interval must be >= 0")
        check(self.keep_last_checkpoints >= 1, "--keep_last_checkpoints must be >= 1")
        check(self.sequence_length is None or self.sequence_length >= 1, "--sequence_length must be >= 1")
        check(not (self.data_sources and self.dataset_path),
              "give either --dataset_path (a prepared folder) or --data_sources (a data spec), not both")
        check(not self.document_masking or bool(self.data_sources),
              "--document_masking needs --data_sources (a prepared --dataset_path holds no document boundaries)")
        check(self.data_workers >= 0, "--data_workers must be >= 0")
        check(self.data_prefetch >= 1, "--data_prefetch must be >= 1")
        check(self.data_shuffle_buffer >= 0, "--data_shuffle_buffer must be >= 0")

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over all data-parallel copies."""
        return self.micro_batch_size * self.grad_accumulation_steps * (self.runtime_ngpus // self.plan_ngpus)


def resolve_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The parameter dtype ``config.dtype`` means on ``device`` (auto: bf16 on CUDA, fp32 otherwise)."""
    if config.dtype == "bf16":
        return torch.bfloat16
    if config.dtype == "fp32":
        return torch.float32
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_peak_tflops(config: TrainConfig, device: torch.device) -> float | None:
    """Per-GPU peak TFLOP/s used for MFU, or None when unknown (CPU, unlisted GPU) or disabled (<= 0)."""
    if config.peak_tflops is not None:
        return config.peak_tflops if config.peak_tflops > 0 else None
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None
