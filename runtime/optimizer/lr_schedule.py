"""Learning-rate schedules: linear warmup followed by cosine, linear, constant or WSD decay.

Pure functions of the optimizer step, so a resumed run recomputes the same rate from the step
count alone and no scheduler state has to be checkpointed.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def lr_at(
    step: int,
    *,
    lr: float,
    max_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
    wsd_decay_ratio: float = 0.1,
) -> float:
    """Learning rate for the 0-based optimizer step ``step``.

    Promises:
    - warmup (``step < warmup_steps``): ``lr * (step + 1) / warmup_steps``, so the first step
      already moves the weights and step ``warmup_steps - 1`` uses the full ``lr``;
    - after warmup, with ``progress`` going linearly from 0 at step ``warmup_steps`` to 1 at the
      last step ``max_steps - 1`` (clamped to [0, 1] beyond it), and ``min_lr = lr * min_lr_ratio``:
      ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2``;
      ``linear``: ``lr - (lr - min_lr) * progress``;
      ``constant``: ``lr``;
      ``wsd`` (warmup-stable-decay): ``lr`` until the last ``wsd_decay_ratio`` fraction of the
      post-warmup steps, then linear decay to ``min_lr`` at the last step;
    - the result always lies in ``[min_lr, lr]`` after warmup and in ``(0, lr]`` during it.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    if not 0.0 <= wsd_decay_ratio <= 1.0:
        raise ValueError(f"wsd_decay_ratio must lie in [0, 1], got {wsd_decay_ratio}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = lr * min_lr_ratio
    decay_steps = max_steps - 1 - warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    # wsd: the decay phase is the final wsd_decay_ratio of the post-warmup progress.
    stable_until = 1.0 - wsd_decay_ratio
    if progress <= stable_until or wsd_decay_ratio == 0.0:
        return lr
    return lr - (lr - min_lr) * (progress - stable_until) / wsd_decay_ratio
