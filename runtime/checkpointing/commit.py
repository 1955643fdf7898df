"""The on-disk commit protocol of sharded checkpoints: a complete step is never lost.

Folder states inside a checkpoint_dir:

- ``step_<N>/`` with ``trainer_state.json``: a complete checkpoint (the file is written last);
- ``step_<N>.tmp/``: a save in progress or interrupted; never read, removed by the next save;
- ``step_<N>.replaced/``: a complete step_<N> being replaced by a new save of the same step;
  it counts as step_<N> until the new folder is in place, then it is removed;
- ``step_<N>.deleting/``: a pruned checkpoint on its way out (renamed first, so that a half
  deleted folder never looks complete); never read;
- ``latest``: a one-line file naming the newest complete step, replaced atomically.

A save (see ``sharded.save_checkpoint``) writes every rank's files into ``step_<N>.tmp``
and fsyncs them; once all ranks agree that they succeeded, rank 0 writes trainer_state.json,
fsyncs the folder, renames it to ``step_<N>``, fsyncs the checkpoint_dir, rewrites ``latest``
(write beside, fsync, rename, fsync), and only then prunes old steps. A crash at any point
leaves ``latest`` naming a complete step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..reliability.faults import fault_point

LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_REPLACED_DIR = re.compile(r"^step_(\d+)\.replaced$")
_LEFTOVER_SUFFIXES = (".tmp", ".deleting")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message says what to do."""


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's content (a folder: its entries, i.e. renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` and fsync the file."""
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.match(path.name) or _REPLACED_DIR.match(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoints of ``checkpoint_dir``, oldest step first: ``step_<N>`` folders holding
    trainer_state.json, and a ``step_<N>.replaced`` one whose ``step_<N>`` is not complete."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in root.iterdir():
        step = _step_of(path)
        if step is None or not (path / TRAINER_STATE_FILE).is_file():
            continue
        if step not in found or _STEP_DIR.match(path.name):
            found[step] = path
    return [found[step] for step in sorted(found)]


def find_latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``checkpoint_dir``, or None.

    Normally the one ``latest`` names; after a crash between a step's rename and the update of
    ``latest``, the newer step (complete, since only complete folders are renamed into place).
    """
    found = complete_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def prepare_staging(root: Path, step: int) -> Path:
    """Rank 0, before a save: create ``root``, tidy what interrupted saves left, create and return
    an empty ``step_<step>.tmp``."""
    root.mkdir(parents=True, exist_ok=True)
    for path in root.iterdir():
        if path.name.endswith(_LEFTOVER_SUFFIXES) and path.name.startswith("step_"):
            shutil.rmtree(path)
        elif _REPLACED_DIR.match(path.name):
            original = root / path.name.removesuffix(".replaced")
            if (original / TRAINER_STATE_FILE).is_file():
                shutil.rmtree(path)  # the replacement completed; the old copy is no longer needed
            else:
                if original.exists():
                    shutil.rmtree(original)
                os.replace(path, original)  # a replacement was cut short: put the complete step back
    staging = root / f"step_{step}.tmp"
    staging.mkdir()
    fsync_path(root)
    return staging


def _write_latest(root: Path, name: str) -> None:
    pointer = root / f"{LATEST_FILE}.tmp"
    with open(pointer, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, root / LATEST_FILE)
    fsync_path(root)


def commit_staging(root: Path, staging: Path, step: int, keep_last: int) -> Path:
    """Rank 0, once every rank's files are in ``staging`` and trainer_state.json was written last:
    make it ``step_<step>``, point ``latest`` at it, then prune to the newest ``keep_last``."""
    fsync_path(staging)  # every rank fsynced its own files; the folder's entries are rank 0's to flush
    fault_point("save.staged", step=step)
    final = root / f"step_{step}"
    replaced = root / f"step_{step}.replaced"
    if final.exists():
        os.replace(final, replaced)
        fsync_path(root)
    os.replace(staging, final)
    fsync_path(root)
    fault_point("save.renamed", step=step)
    _write_latest(root, final.name)
    fault_point("save.latest", step=step)
    if replaced.exists():
        shutil.rmtree(replaced)
    for old in complete_checkpoints(root)[:-keep_last]:
        if old != final:
            doomed = old.with_name(old.name.removesuffix(".replaced") + ".deleting")
            os.replace(old, doomed)
            fsync_path(root)
            shutil.rmtree(doomed)
    fault_point("save.pruned", step=step)
    return final


def check_checkpoint_dir_owned(checkpoint_dir: str | Path, resumed_from: Path | None) -> None:
    """Refuse (CheckpointError) to let a run write into a checkpoint_dir holding checkpoints it did
    not write: allowed only when the folder has none, or the run resumed from one of them."""
    root = Path(checkpoint_dir)
    found = complete_checkpoints(root)
    if not found:
        return
    if resumed_from is not None and Path(resumed_from).resolve().parent == root.resolve():
        return
    names = ", ".join(p.name for p in found[-3:])
    raise CheckpointError(
        f"--checkpoint_dir {root} already holds checkpoints of another run ({names}); this run would "
        f"overwrite and prune them. Pass --resume_path auto to continue that run, another --name, or "
        f"another --checkpoint_dir"
    )
