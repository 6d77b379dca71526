"""Learning-rate schedules as pure functions of the optimizer step."""

from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_fraction: float) -> int:
    if warmup_steps is not None:
        return max(0, int(warmup_steps))
    return int(round(warmup_fraction * total_steps))


def lr_multiplier(
    step: int, *, total_steps: int, warmup_steps: int, name: str = "cosine", min_ratio: float = 0.0
) -> float:
    """Factor applied to every group's base LR at optimizer step ``step`` (0-based).

    Linear warmup from ~0 to 1 over ``warmup_steps``, then ``cosine`` or ``linear`` decay to
    ``min_ratio`` at ``total_steps``, or ``constant``.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if name == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if name == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif name == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"scheduler.name must be cosine, linear or constant, got {name!r}")
    return min_ratio + (1.0 - min_ratio) * shape
