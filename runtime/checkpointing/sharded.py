"""Sharded checkpoints: every rank writes its own shard file and reads it back under the same plan.

Layout of one checkpoint, ``<checkpoint_dir>/step_<N>/``:

- ``plan.json``: copy of the compile output's manifest;
- ``rank<g>.safetensors``: global rank g's tensors: its parameter shards keyed by original name
  (written by copy 0 only, the other copies hold the same values) and its optimizer pieces
  (``optimizer.exp_avg.<name>``, ``optimizer.exp_avg_sq.<name>``, ``master.<name>``, see
  ``runtime/optimizer/zero_adamw.py``);
- ``rank<g>.json``: that file's byte size and sha256, which tensors it holds and where they sit in
  the full tensors, the optimizer metadata and the rank's RNG states;
- ``trainer_state.json``: step, data position, skipped steps, world layout, run config;
- ``config.json``: the model's Hugging Face config when the trainer was given one.

A checkpoint becomes visible only when complete: ranks write into ``step_<N>.tmp``, and once
every rank's files are on disk rank 0 renames it to ``step_<N>`` and atomically rewrites the
``latest`` pointer file (commit.py has the protocol). A crash at any point leaves earlier
checkpoints untouched. Only safetensors and JSON are read back (no pickle); a file that does not
parse is a CheckpointError naming it. Under another plan or world size a checkpoint loads merged
(merged.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..optimizer.zero_adamw import MASTER_KEY, OPTIMIZER_KEYS
from ..reliability.failures import agree_on_errors
from ..reliability.faults import fault_point
from .commit import (
    TRAINER_STATE_FILE,
    CheckpointError,
    commit_staging,
    find_latest_checkpoint,
    fsync_path,
    prepare_staging,
    write_json,
)

if TYPE_CHECKING:
    from ..distributed import ParallelContext
    from ..module import LocalParameter
    from ..optimizer.zero_adamw import ZeroAdamW

FORMAT_VERSION = 1

# ----------------------------------------------------------------------------------------------
# finding checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete step folder meant by ``path``: a ``step_<N>`` folder itself, or the newest in a
    checkpoint_dir. Raises CheckpointError saying what was found instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / TRAINER_STATE_FILE).is_file():
        return path
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"{path} is an incomplete checkpoint (a save was interrupted); use a step_<N> folder")
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no complete checkpoint (step_<N> folder with {TRAINER_STATE_FILE}) in {path}")
    return latest


# ----------------------------------------------------------------------------------------------
# saving


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    *,
    local_params: Sequence[LocalParameter],
    optimizer: ZeroAdamW,
    ctx: ParallelContext,
    plan: dict,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any] | None = None,
    keep_last: int = 2,
    model_config: dict | None = None,
) -> Path:
    """Collectively write checkpoint ``step_<step>`` and return its folder; call on every rank.

    ``trainer_state`` (JSON-able, same on every rank) goes to trainer_state.json;
    ``rank_state`` (JSON-able, per rank, e.g. RNG states) to rank<g>.json. On return the folder
    is complete on every rank, ``latest`` names it, and only the newest ``keep_last`` complete
    checkpoints remain. The commit follows commit.py: a crash at any point leaves the
    previous complete step in place and named by ``latest``. When writing fails on any rank (a
    full disk, ...), every rank raises CheckpointError with that rank's error and nothing is
    committed.
    """
    root = Path(checkpoint_dir)
    staging = root / f"step_{step}.tmp"
    error = ""
    if ctx.rank == 0:
        try:
            prepare_staging(root, step)
        except OSError as failure:
            error = f"cannot create {staging}: {failure}"
    agree_on_errors(error, CheckpointError)
    try:
        _write_rank_files(staging, step, local_params, optimizer, ctx, plan, rank_state)
        fault_point("save.written", rank=ctx.rank, step=step)
    except OSError as failure:
        error = (f"writing checkpoint step {step} into {staging} failed: {failure}; the previous checkpoint in "
                 f"{root} is intact: free space (or fix the folder) and resume with --resume_path auto")
    agree_on_errors(error, CheckpointError)
    final = root / f"step_{step}"
    if ctx.rank == 0:
        try:
            if model_config is not None:
                write_json(staging / "config.json", model_config)
            write_json(staging / "plan.json", plan)
            # Written last by rank 0: its presence marks a folder as a checkpoint.
            write_json(staging / TRAINER_STATE_FILE, {
                "format_version": FORMAT_VERSION, "step": step, "world_size": ctx.world_size,
                "plan_ngpus": ctx.plan_ngpus, "dp_size": ctx.dp_size, "plan_fingerprint": plan.get("fingerprint"),
                **trainer_state,
            })
            commit_staging(root, staging, step, keep_last)
        except OSError as failure:
            error = (f"committing checkpoint step {step} in {root} failed: {failure}; `latest` still names the "
                     "previous complete step: free space (or fix the folder) and resume with --resume_path auto")
    agree_on_errors(error, CheckpointError)
    return final


def _write_rank_files(staging: Path, step: int, local_params: Sequence[LocalParameter], optimizer: ZeroAdamW,
                      ctx: ParallelContext, plan: dict, rank_state: dict[str, Any] | None) -> None:
    """This rank's shard file and its json (size, sha256, tensor index, optimizer meta), fsynced."""
    tensors: dict[str, torch.Tensor] = {}
    parameters = []
    if ctx.copy_index == 0:
        for lp in local_params:
            tensors[lp.name] = lp.param.detach()
            parameters.append({"name": lp.name, "slices": [list(s) for s in lp.slices],
                               "full_shape": list(lp.full_shape)})
    optimizer_tensors, optimizer_meta = optimizer.state_dict()
    tensors.update(optimizer_tensors)
    shard_file = staging / f"rank{ctx.rank}.safetensors"
    fault_point("save.shard", rank=ctx.rank, step=step)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(shard_file),
              metadata={"format": "dimshard-shard", "rank": str(ctx.rank), "step": str(step)})
    fsync_path(shard_file)
    write_json(staging / f"rank{ctx.rank}.json", {
        "format_version": FORMAT_VERSION,
        "step": step,
        "rank": ctx.rank,
        "unit_rank": ctx.unit_rank,
        "copy_index": ctx.copy_index,
        "world_size": ctx.world_size,
        "plan_ngpus": ctx.plan_ngpus,
        "plan_fingerprint": plan.get("fingerprint"),
        "file": {"name": shard_file.name, "bytes": shard_file.stat().st_size, "sha256": _sha256(shard_file)},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                    for k, v in tensors.items()},
        "parameters": parameters,
        "optimizer": optimizer_meta,
        "rank_state": rank_state or {},
    })


# ----------------------------------------------------------------------------------------------
# loading (same plan and world size)


def verify_shard(step_dir: Path, rank: int, check_sha256: bool = True) -> dict:
    """Read ``rank<rank>.json`` and check that ``rank<rank>.safetensors`` is whole; return the json.

    Raises CheckpointError naming the file when it is missing, truncated or altered.
    """
    meta_file = step_dir / f"rank{rank}.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file} is missing: checkpoint {step_dir} is incomplete; resume from another "
                              f"step_<N> folder in {step_dir.parent}")
    meta = read_json(meta_file, f"resume from another step_<N> folder in {step_dir.parent}")
    try:
        shard_file = step_dir / meta["file"]["name"]
        written, digest = int(meta["file"]["bytes"]), str(meta["file"]["sha256"])
        absent = [key for key in ("optimizer", "parameters") if key not in meta]
    except (KeyError, TypeError, ValueError) as error:
        absent = [str(error)]
    if absent:
        raise CheckpointError(f"{meta_file} is partial or corrupt (no valid {', '.join(absent)}); checkpoint "
                              f"{step_dir} cannot be used: resume from another step_<N> folder in {step_dir.parent}")
    advice = (f"the checkpoint {step_dir} cannot be used: resume from an earlier step_<N> folder in "
              f"{step_dir.parent} (pass it to --resume_path), or restore the file from a copy")
    if not shard_file.is_file():
        raise CheckpointError(f"checkpoint shard {shard_file} is missing; {advice}")
    size = shard_file.stat().st_size
    if size != written:
        raise CheckpointError(f"checkpoint shard {shard_file} is truncated or corrupt: it has {size} bytes, "
                              f"{written} were written; {advice}")
    if check_sha256 and _sha256(shard_file) != digest:
        raise CheckpointError(f"checkpoint shard {shard_file} is corrupt: its sha256 differs from the one "
                              f"recorded when it was written; {advice}")
    return meta


def _verify_everywhere(step_dir: Path, ranks: Sequence[int], ctx: ParallelContext) -> dict[int, dict]:
    # Every rank must fail together: a rank raising alone would leave the others blocked in the
    # next collective.
    metas, error = {}, ""
    try:
        for rank in ranks:
            metas[rank] = verify_shard(step_dir, rank)
    except (CheckpointError, KeyError, TypeError) as failure:
        error = str(failure) if isinstance(failure, CheckpointError) else (
            f"{step_dir}: a rank*.json lacks {failure}; the checkpoint is corrupt: resume from another step_<N>")
    agree_on_errors(error, CheckpointError)
    return metas


def read_json(path: Path, advice: str) -> Any:
    """``path`` parsed as JSON; CheckpointError naming the file (and ``advice``) when it is not."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is unreadable or not valid JSON ({error}); the checkpoint is corrupt: "
                              f"{advice}") from None


def load_checkpoint(
    path: str | Path,
    *,
    local_params: Sequence[LocalParameter],
    optimizer: ZeroAdamW,
    ctx: ParallelContext,
    plan: dict,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a sharded checkpoint written under the same plan and world size; call on every rank.

    Fills the local parameter shards and the optimizer state, and returns
    ``(trainer_state, rank_state)`` as saved. Raises CheckpointError when the checkpoint is
    incomplete, a shard is truncated or corrupt, or the plan / world size differ (then the
    message says to merge it with tools/ckpt_merger.py and resume from the merged file).
    """
    step_dir = resolve_checkpoint(path)
    trainer_state = read_json(step_dir / TRAINER_STATE_FILE, f"resume from another step_<N> folder in "
                                                            f"{step_dir.parent}")
    saved_plan_fingerprint = trainer_state.get("plan_fingerprint")
    if (trainer_state["world_size"] != ctx.world_size or trainer_state["plan_ngpus"] != ctx.plan_ngpus
            or saved_plan_fingerprint != plan.get("fingerprint")):
        raise CheckpointError(
            f"checkpoint {step_dir} was written by {trainer_state['world_size']} processes with plan_ngpus "
            f"{trainer_state['plan_ngpus']} and plan {saved_plan_fingerprint}; this run has {ctx.world_size} "
            f"processes, plan_ngpus {ctx.plan_ngpus} and plan {plan.get('fingerprint')}. A sharded checkpoint "
            f"loads only under the same layout: merge it with `python tools/ckpt_merger.py --ckpt_dir {step_dir} "
            f"--output_fname merged.safetensors` and pass --resume_path merged.safetensors"
        )
    # Parameters come from copy 0's file of this unit rank (global rank == unit rank).
    metas = _verify_everywhere(step_dir, sorted({ctx.rank, ctx.unit_rank}), ctx)
    # Whatever fails on one rank fails on every rank, so that none is left in a later collective.
    error, rank_state = "", {}
    try:
        rank_state = _load_verified(step_dir, metas, local_params, optimizer, ctx)
    except (CheckpointError, OSError, ValueError, KeyError, RuntimeError) as failure:
        error = str(failure) if isinstance(failure, CheckpointError) else (
            f"loading {step_dir} failed: {type(failure).__name__}: {failure}; resume from another step_<N> "
            f"folder in {step_dir.parent}")
    agree_on_errors(error, CheckpointError)
    return trainer_state, rank_state


def _load_verified(step_dir: Path, metas: dict[int, dict], local_params: Sequence[LocalParameter],
                   optimizer: ZeroAdamW, ctx: ParallelContext) -> dict[str, Any]:
    with torch.no_grad():
        param_file = step_dir / metas[ctx.unit_rank]["file"]["name"]
        with safe_open(str(param_file), framework="pt", device="cpu") as f:
            stored = set(f.keys())
            for lp in local_params:
                if lp.name not in stored:
                    raise CheckpointError(f"{param_file} holds no tensor {lp.name}; the checkpoint does not match "
                                          "this compile output")
                value = f.get_tensor(lp.name)
                if tuple(value.shape) != tuple(lp.param.shape):
                    raise CheckpointError(f"{param_file}: {lp.name} has shape {list(value.shape)}, this rank's shard "
                                          f"is {list(lp.param.shape)}; the checkpoint does not match this plan")
                lp.param.copy_(value)
        own = metas[ctx.rank]
        own_file = step_dir / own["file"]["name"]
        with safe_open(str(own_file), framework="pt", device="cpu") as f:
            wanted = [k for k in f.keys() if k.startswith(OPTIMIZER_KEYS) or k.startswith(MASTER_KEY + ".")]
            tensors = {k: f.get_tensor(k) for k in wanted}
        try:
            optimizer.load_state_dict(tensors, own["optimizer"])
        except ValueError as error:
            raise CheckpointError(f"{own_file}: {error}") from None
    return own.get("rank_state", {})
