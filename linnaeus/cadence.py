"""When the loop logs, validates, checkpoints and stops: plain data and pure functions, tested alone.

``Cadence.after_step`` answers, for the step just taken, which of the four things to do; the loop
does them in that order. Early stopping is a small state object that reads validation metrics.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from linnaeus.errors import ConfigError


@dataclass(frozen=True)
class Actions:
    log: bool = False
    validate: bool = False
    save: bool = False
    stop: bool = False

    @property
    def any(self) -> bool:
        return self.log or self.validate or self.save or self.stop


@dataclass(frozen=True)
class Cadence:
    total_steps: int
    log_every: int
    val_every: int  # steps; 0 = at the end of every epoch
    save_every: int

    def after_step(
        self, step: int, *, end_of_epoch: bool, stop_requested: bool = False, save_due: bool = False
    ) -> Actions:
        """What to do after optimizer step ``step`` (1-based count of steps taken).

        ``stop_requested``: a signal asked the run to stop (it checkpoints and stops, no validation);
        ``save_due``: a time-based checkpoint is due (``checkpoint.every_minutes``).
        """
        finished = step >= self.total_steps
        validate = finished or (
            self.val_every > 0 and step % self.val_every == 0 or self.val_every == 0 and end_of_epoch
        )
        return Actions(
            # a stop writes no extra row: the open window is saved and the resumed run logs it on time
            log=finished or step % self.log_every == 0,
            validate=validate and not stop_requested,
            save=validate
            or finished
            or end_of_epoch
            or step % self.save_every == 0
            or stop_requested
            or save_due,
            stop=finished or stop_requested,
        )


@dataclass
class EarlyStopping:
    """Stops when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` validations.

    ``monitor=None`` never stops. The state is saved in every checkpoint, so a resumed run keeps its
    count.
    """

    monitor: str | None = None
    mode: str = "max"
    patience: int = 5
    min_delta: float = 0.0
    best: float | None = None
    best_step: int = 0
    bad_validations: int = 0
    stopped: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"train.early_stop.mode must be max or min, got {self.mode!r}")
        if self.patience < 1:
            raise ConfigError(f"train.early_stop.patience must be >= 1, got {self.patience}")

    def update(self, metrics: dict, step: int) -> bool:
        """Record one validation; True when the run should stop now."""
        if self.monitor is None:
            return False
        if self.monitor not in metrics:
            known = ", ".join(sorted(k for k in metrics if k.startswith("val")))
            raise KeyError(
                f"train.early_stop.monitor={self.monitor!r} is not a validation metric; known: {known}"
            )
        value = metrics[self.monitor]
        sign = 1.0 if self.mode == "max" else -1.0
        improved = math.isfinite(value) and (self.best is None or sign * (value - self.best) > self.min_delta)
        if improved:
            self.best, self.best_step, self.bad_validations = value, step, 0
        else:
            self.bad_validations += 1
        self.stopped = self.bad_validations >= self.patience
        return self.stopped

    def describe(self, step: int) -> str:
        return (
            f"early stopping at step {step}: {self.monitor} has not improved by more than {self.min_delta} "
            f"for {self.bad_validations} validations (best {self.best:.4f} at step {self.best_step})"
        )

    def state_dict(self) -> dict:
        return {
            k: v for k, v in asdict(self).items() if k in ("best", "best_step", "bad_validations", "stopped")
        }

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
