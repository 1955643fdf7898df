"""Test-only fault injection: crash or fail on purpose at named points of a run.

Set ``DIMSHARD_FAULT`` to ``<action>@<point>`` with optional ``:rank=<r>`` and ``:step=<n>``
filters (several faults separated by ``,``), for example::

    DIMSHARD_FAULT="crash@save.renamed:step=4"        # rank 0 dies right after the rename of step_4
    DIMSHARD_FAULT="enospc@save.shard:rank=1:step=2"  # rank 1's shard write of step_2 hits a full disk
    DIMSHARD_FAULT="raise@train.step:rank=1:step=3"   # rank 1 raises during optimizer step 3

Actions: ``crash`` (``os._exit(17)``: a killed process, no cleanup), ``enospc`` (raise
``OSError(ENOSPC)``), ``raise`` (raise RuntimeError). Points are listed in POINTS. Without the
variable (every normal run) ``fault_point`` returns at once: nothing is ever injected.
"""

from __future__ import annotations

import errno
import os

ENV_VAR = "DIMSHARD_FAULT"
CRASH_EXIT_CODE = 17
POINTS = (
    "train.step",  # inside an optimizer step, after the micro-batches' backward
    "save.shard",  # writing this rank's shard file into step_<N>.tmp
    "save.written",  # after this rank's shard and json are on disk, before the ranks agree
    "save.staged",  # rank 0: step_<N>.tmp complete (trainer_state.json written), before the rename
    "save.renamed",  # rank 0: renamed to step_<N>, before `latest` is updated
    "save.latest",  # rank 0: `latest` names step_<N>, before older checkpoints are pruned
    "save.pruned",  # rank 0: pruning done, before the ranks leave the save
)


def fault_point(point: str, *, rank: int = 0, step: int | None = None) -> None:
    """Inject the fault ``DIMSHARD_FAULT`` asks for at ``point`` on ``rank`` at ``step``, if any."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    for fault in spec.split(","):
        action, _, rest = fault.strip().partition("@")
        where, *filters = rest.split(":")
        if where != point:
            continue
        wanted = dict(f.split("=", 1) for f in filters if "=" in f)
        if int(wanted.get("rank", 0)) != rank:
            continue
        if "step" in wanted and (step is None or int(wanted["step"]) != step):
            continue
        message = f"injected fault {action}@{point} on rank {rank} at step {step} ({ENV_VAR})"
        if action == "crash":
            os._exit(CRASH_EXIT_CODE)
        if action == "enospc":
            raise OSError(errno.ENOSPC, f"No space left on device ({message})")
        if action == "raise":
            raise RuntimeError(message)
        raise ValueError(f"{ENV_VAR}: unknown action {action!r} in {fault!r}; use crash, enospc or raise")
