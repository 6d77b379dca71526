"""Learning-rate schedules as pure functions of the optimizer step.

Every schedule is ``lr_multiplier(step, ...)``: the factor applied to each parameter group's base LR
(times the group's own ``lr_scale``) at optimizer step ``step`` (0-based). Nothing is stateful, so a
resumed run recomputes exactly the LR an uninterrupted one used.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from linnaeus.errors import ConfigError

SCHEDULES = ("cosine", "linear", "constant", "step", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_fraction: float) -> int:
    if warmup_steps is not None:
        return max(0, int(warmup_steps))
    return int(round(warmup_fraction * total_steps))


def resolve_steps(value: float, total_steps: int) -> int:
    """A step count given as steps (>= 1) or as a fraction of the run (< 1)."""
    return int(round(value * total_steps)) if 0 <= value < 1 else int(value)


def decay_shape(progress: float, shape: str) -> float:
    """1 at progress 0, 0 at progress 1, along ``linear``, ``cosine`` or ``1-sqrt`` (Hägele et al. 2024)."""
    progress = min(1.0, max(0.0, progress))
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    raise ConfigError(f"decay shape must be one of {', '.join(DECAY_SHAPES)}, got {shape!r}")


def lr_multiplier(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    name: str = "cosine",
    min_ratio: float = 0.0,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
    decay_fraction: float = 0.2,
    decay_shape_name: str = "linear",
) -> float:
    """Linear warm-up from ~0 to 1 over ``warmup_steps``, then:

    - ``cosine`` / ``linear``: decay to ``min_ratio`` at ``total_steps``;
    - ``constant``: 1;
    - ``step``: multiply by ``gamma`` at every milestone passed (steps, or fractions of the run when < 1);
    - ``wsd`` (warm-up, stable, decay): 1 until the last ``decay_fraction`` of the run, then down to
      ``min_ratio`` along ``decay_shape_name`` (linear, cosine or 1-sqrt).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if name == "constant":
        return 1.0
    if name == "step":
        bounds = sorted(resolve_steps(m, total_steps) for m in milestones)
        return gamma ** bisect.bisect_right(bounds, step)
    if name == "wsd":
        decay_steps = max(1, int(round(decay_fraction * total_steps)))
        decay_start = max(warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        shape = decay_shape((step - decay_start) / max(1, total_steps - decay_start), decay_shape_name)
        return min_ratio + (1.0 - min_ratio) * shape
    if name in ("cosine", "linear"):
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * decay_shape(progress, name)
    raise ConfigError(f"scheduler.name must be one of {', '.join(SCHEDULES)}, got {name!r}")


def build_lr_schedule(scheduler_cfg, total_steps: int):
    """The ``scheduler`` config node as a function ``step -> multiplier``."""
    warmup = warmup_steps_for(total_steps, scheduler_cfg.warmup_steps, scheduler_cfg.warmup_fraction)
    if scheduler_cfg.name not in SCHEDULES:
        raise ConfigError(f"scheduler.name must be one of {', '.join(SCHEDULES)}, got {scheduler_cfg.name!r}")
    if scheduler_cfg.decay_shape not in DECAY_SHAPES:
        raise ConfigError(
            f"scheduler.decay_shape must be one of {', '.join(DECAY_SHAPES)}, got {scheduler_cfg.decay_shape!r}"
        )
    kwargs = dict(
        total_steps=total_steps,
        warmup_steps=warmup,
        name=scheduler_cfg.name,
        min_ratio=scheduler_cfg.min_lr_ratio,
        milestones=list(scheduler_cfg.milestones),
        gamma=scheduler_cfg.gamma,
        decay_fraction=scheduler_cfg.decay_fraction,
        decay_shape_name=scheduler_cfg.decay_shape,
    )

    def schedule(step: int) -> float:
        return lr_multiplier(step, **kwargs)

    schedule.warmup_steps = warmup  # type: ignore[attr-defined]
    return schedule
