"""Merged checkpoints: one safetensors file of full tensors, loadable under any plan and world size.

``merge_checkpoint`` assembles a sharded checkpoint (sharded.py) into every parameter's full tensor
under its original name (and, with the optimizer, the AdamW moments and fp32 masters), and
``save_merged`` writes them with the metadata as JSON under the key ``dimshard``.
``load_merged_checkpoint`` slices such a file, or any safetensors state dict keyed by original
names, into one rank's shards: this is how a run resumes under another plan or world size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..optimizer.zero_adamw import MASTER_KEY, OPTIMIZER_KEYS
from .commit import TRAINER_STATE_FILE, CheckpointError, fsync_path
from .sharded import FORMAT_VERSION, read_json, resolve_checkpoint, verify_shard

if TYPE_CHECKING:
    from ..module import ParallelModule
    from ..optimizer.zero_adamw import ZeroAdamW

MERGED_FORMAT = "dimshard-merged"


def merge_checkpoint(
    path: str | Path, *, include_optimizer: bool = True, progress: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Assemble the full tensors of a sharded checkpoint; return ``(tensors, metadata)``.

    ``tensors``: every parameter under its original name (in the dtype it was trained in) and,
    with ``include_optimizer``, ``optimizer.exp_avg.<name>``, ``optimizer.exp_avg_sq.<name>`` and
    ``master.<name>`` (fp32; masters exist only when parameters were not fp32). ``metadata``:
    JSON-able ``{"format", "format_version", "step", "trainer_state", "optimizer", "plan"}``.
    ``path`` is a step folder or a checkpoint_dir (its newest complete step). Every shard is
    verified first; raises CheckpointError when one is corrupt or a tensor is not fully covered.
    """
    step_dir = resolve_checkpoint(path)
    advice = "merge another step_<N> folder"
    trainer_state = read_json(step_dir / TRAINER_STATE_FILE, advice)
    plan = read_json(step_dir / "plan.json", advice)
    world_size, plan_ngpus = trainer_state["world_size"], trainer_state["plan_ngpus"]
    ranks = range(world_size) if include_optimizer else range(plan_ngpus)
    metas = {rank: verify_shard(step_dir, rank) for rank in tqdm(ranks, desc="verify shards", disable=not progress)}

    tensors: dict[str, torch.Tensor] = {}
    covered: dict[str, set[tuple]] = {}
    for rank in tqdm(range(plan_ngpus), desc="merge parameters", disable=not progress):
        with safe_open(str(step_dir / metas[rank]["file"]["name"]), framework="pt", device="cpu") as f:
            for entry in metas[rank]["parameters"]:
                name, slices = entry["name"], tuple(tuple(s) for s in entry["slices"])
                if slices in covered.setdefault(name, set()):
                    continue
                value = f.get_tensor(name)
                if name not in tensors:
                    tensors[name] = torch.zeros(entry["full_shape"], dtype=value.dtype)
                tensors[name][tuple(slice(a, b) for a, b in slices)] = value
                covered[name].add(slices)
    for parameter in plan["parameters"]:
        expected = {tuple(tuple(s) for s in shard["slices"]) for shard in parameter["shards"]}
        if covered.get(parameter["name"], set()) != expected:
            raise CheckpointError(f"{step_dir}: the shards of {parameter['name']} in rank*.safetensors do not cover "
                                  "the plan's shards; the checkpoint is incomplete")

    optimizer_meta = dict(metas[0]["optimizer"])
    optimizer_meta.pop("pieces")
    if include_optimizer:
        _merge_optimizer(step_dir, metas, plan, tensors, progress)
    metadata = {"format": MERGED_FORMAT, "format_version": FORMAT_VERSION, "step": trainer_state["step"],
                "trainer_state": trainer_state, "optimizer": optimizer_meta, "plan": plan}
    return tensors, metadata


def _merge_optimizer(step_dir: Path, metas: dict[int, dict], plan: dict, tensors: dict[str, torch.Tensor],
                     progress: bool) -> None:
    # Each shard's pieces are taken from the holder with the lowest unit rank: its dp copies own
    # disjoint ranges that tile the flattened shard (other holders store the same values).
    plan_ngpus = metas[0]["plan_ngpus"]
    first_holder = {(p["name"], tuple(tuple(s) for s in shard["slices"])): min(shard["unit_ranks"])
                    for p in plan["parameters"] for shard in p["shards"]}
    shards: dict[tuple[str, str, tuple], torch.Tensor] = {}
    ranges: dict[tuple[str, str, tuple], list[tuple[int, int]]] = {}
    for rank in tqdm(sorted(metas), desc="merge optimizer", disable=not progress):
        meta = metas[rank]
        keys = OPTIMIZER_KEYS + ((MASTER_KEY,) if meta["optimizer"]["keep_master"] else ())
        with safe_open(str(step_dir / meta["file"]["name"]), framework="pt", device="cpu") as f:
            for piece in meta["optimizer"]["pieces"]:
                slices = tuple(tuple(s) for s in piece["slices"])
                if first_holder.get((piece["name"], slices)) != rank % plan_ngpus:
                    continue
                lo, hi = piece["flat_range"]
                for key in keys:
                    index = (key, piece["name"], slices)
                    if index not in shards:
                        shards[index] = torch.zeros(piece["shape"], dtype=torch.float32)
                    shards[index].view(-1)[lo:hi] = f.get_tensor(f"{key}.{piece['name']}")
                    ranges.setdefault(index, []).append((lo, hi))
    for (key, name, slices), shard in shards.items():
        spans = sorted(ranges[(key, name, slices)])
        position = 0
        for lo, hi in spans:
            if lo != position:
                break
            position = hi
        if position != shard.numel():
            raise CheckpointError(f"{step_dir}: the optimizer pieces of {key}.{name} at {list(slices)} do not cover "
                                  "the shard; a rank file is missing from the checkpoint")
        full_name = f"{key}.{name}"
        if full_name not in tensors:
            tensors[full_name] = torch.zeros(tensors[name].shape, dtype=torch.float32)
        tensors[full_name][tuple(slice(a, b) for a, b in slices)] = shard


def save_merged(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write a merged checkpoint: one safetensors file, metadata as JSON under the key ``dimshard``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging),
              metadata={"format": MERGED_FORMAT, "dimshard": json.dumps(metadata)})
    fsync_path(staging)
    os.replace(staging, path)
    fsync_path(path.parent)


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors checkpoint ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else ''}); it is truncated or corrupt: "
                           "merge it again with tools/ckpt_merger.py, or resume from a step_<N> folder")


def read_merged_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata of a merged file ({} for a plain safetensors state dict); CheckpointError
    when the file is not a readable safetensors file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("dimshard")
        return json.loads(raw) if raw else {}
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise _unreadable(Path(path), error) from None


def load_merged_checkpoint(
    path: str | Path, module: ParallelModule, optimizer: ZeroAdamW | None = None
) -> dict[str, Any]:
    """Load a merged file (or any safetensors state dict keyed by original names) under any plan.

    Slices every full tensor to this rank's shards: parameters into ``module.local_parameters()``
    and, when ``optimizer`` is given, AdamW moments and fp32 masters into its owned pieces
    (missing optimizer tensors start fresh, with a warning). Reads only the needed slices from
    disk. Returns the saved trainer state (``{}`` for a plain state dict). Raises CheckpointError
    naming the tensor when a parameter is missing or its full shape differs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"merged checkpoint {path} does not exist")
    metadata = read_merged_metadata(path)
    try:
        return _load_merged(path, metadata, module, optimizer)
    except (SafetensorError, OSError) as error:
        raise _unreadable(path, error) from None


def _load_merged(path: Path, metadata: dict[str, Any], module: ParallelModule,
                 optimizer: ZeroAdamW | None) -> dict[str, Any]:
    with safe_open(str(path), framework="pt", device="cpu") as f, torch.no_grad():
        stored = set(f.keys())

        def read(key: str, slices: Sequence[Sequence[int]], full_shape: Sequence[int] | None = None):
            if key not in stored:
                return None
            view = f.get_slice(key)
            if full_shape is not None and list(view.get_shape()) != list(full_shape):
                raise CheckpointError(f"{path}: {key} has shape {view.get_shape()}, the plan expects "
                                      f"{list(full_shape)}; the file is for another model")
            return view[tuple(slice(a, b) for a, b in slices)]

        for lp in module.local_parameters():
            value = read(lp.name, lp.slices, lp.full_shape)
            if value is None:
                raise CheckpointError(f"{path} holds no parameter {lp.name}; is it a checkpoint of this model?")
            lp.param.copy_(value)
        if optimizer is not None:
            saved = metadata.get("optimizer", {})
            optimizer.load_full_state(read, int(saved.get("step_count", 0)), int(saved.get("skipped_steps", 0)))
    return metadata.get("trainer_state", {})
