"""One checkpoint folder for every node: what a job over several nodes checks before it trains.

Rank 0 commits a checkpoint by renaming the folder every rank wrote its shard files into
(commit.py), and every rank resumes from the step that ``latest`` names: both need one folder
that every node reads and writes, on a shared file system (NFS, Lustre, GPFS, ...). With a path
local to each node rank 0 would find the other nodes' shards missing at the first save, and a
``--resume_path auto`` could resume the nodes from different steps, so the launch stops first.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..reliability.failures import agree_on_errors
from .commit import CheckpointError

SHARED = "a file system every node shares (NFS, Lustre, ...)"


def _node() -> str:
    """This rank's node: torchrun's node rank and the host name (two launches on one host differ in the first)."""
    node = os.environ.get("GROUP_RANK")
    return f"{'node ' + node + ', ' if node is not None else ''}host {socket.gethostname()}"


def check_shared_checkpoints(checkpoint_dir: str, resume: str | None, rank: int, world_size: int) -> None:
    """Collective on the default group: raise CheckpointError on every rank unless every rank sees the
    probe file rank 0 writes into ``checkpoint_dir`` (created if missing; '' skips this part) and every
    rank resumes from the same existing ``resume`` (a step folder or merged file; None: a fresh start).

    Call it on every rank of a job whose ranks may not share a file system (a launch over several
    nodes); the probe file is removed before it returns.
    """
    if checkpoint_dir:
        _check_probe(Path(checkpoint_dir), rank)
    places: list[Any] = [None] * world_size
    dist.all_gather_object(places, (resume, resume is None or Path(resume).exists(), _node()))
    for other, (source, exists, node) in enumerate(places):
        if source != places[0][0]:
            raise CheckpointError(
                f"the ranks would resume from different checkpoints (rank 0: {places[0][0] or 'a fresh start'}; "
                f"rank {other} on {node}: {source or 'a fresh start'}): --checkpoint_dir must be one folder on "
                f"{SHARED}")
        if not exists:
            raise CheckpointError(f"rank {other} on {node} cannot see --resume_path {source}: put it on {SHARED}, "
                                  "or copy it to the same path on every node")


def _check_probe(root: Path, rank: int) -> None:
    name, error = "", ""
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            name = f".dimshard_shared_probe.{uuid.uuid4().hex}"
            (root / name).write_text(socket.gethostname())
        except OSError as failure:
            error = f"cannot write into --checkpoint_dir {root}: {failure}"
    agree_on_errors(error, CheckpointError)
    names = [name]
    dist.broadcast_object_list(names, src=0)
    probe = root / names[0]
    try:
        seen = probe.is_file()
        agree_on_errors("" if seen else (
            f"{probe}, which rank 0 just wrote into --checkpoint_dir, is not there on {_node()}: the checkpoint "
            f"folder must be one folder on {SHARED}, because rank 0 commits the shard files every rank writes "
            "there"), CheckpointError)
    finally:
        if rank == 0:
            probe.unlink(missing_ok=True)
