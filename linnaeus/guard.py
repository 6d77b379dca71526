"""Non-finite numbers in the step: detected on the device, acted on where the host looks anyway.

Policy (``train.max_bad_steps``):

- ``0`` (default): ``WatchGuard`` adds "loss or gradient norm is not finite" to an on-device counter
  every step, with no host sync. The loop reads it whenever it logs, validates or checkpoints; a bad
  count stops the run with ``TrainingDiverged`` before anything is saved, so checkpoints only ever
  hold finite weights and a rerun resumes from the last good one.
- ``N > 0``: ``SkipGuard`` checks every step on the host (one sync per step) and skips the update of
  a bad step (no optimizer step, gradients dropped); the run stops once more than N steps were bad.

With fp16 the gradient scaler already skips steps whose gradients overflow, so only the loss is
watched there.
"""

from __future__ import annotations

import torch

from linnaeus.errors import ConfigError, UserError


class TrainingDiverged(UserError):
    """The loss or the gradients stopped being finite numbers."""


ADVICE = (
    "try a lower optimizer.lr, train.grad_clip (e.g. 1.0), a longer warm-up (scheduler.warmup_steps), "
    "train.precision=32 or bf16 instead of fp16, or train.max_bad_steps=N to skip up to N isolated bad steps"
)


class WatchGuard:
    def __init__(self, device: torch.device, check_grad_norm: bool = True) -> None:
        self.bad = torch.zeros((), dtype=torch.int64, device=device)
        self.check_grad_norm = check_grad_norm
        self.skipped = 0

    def _is_bad(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        bad = ~torch.isfinite(loss)
        if self.check_grad_norm:
            bad = bad | ~torch.isfinite(grad_norm)
        return bad

    def allows(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether the optimizer may step; records a bad step on the device, never syncs."""
        self.bad += self._is_bad(loss, grad_norm)
        return True

    def reset(self) -> None:
        self.bad.zero_()


class SkipGuard(WatchGuard):
    def __init__(self, device: torch.device, max_bad_steps: int, check_grad_norm: bool = True) -> None:
        super().__init__(device, check_grad_norm)
        self.max_bad_steps = max_bad_steps

    def allows(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        if not bool(self._is_bad(loss, grad_norm)):  # the host sync this policy pays for
            return True
        self.skipped += 1
        if self.skipped > self.max_bad_steps:
            self.bad += 1  # reported by the loop at its next look
        return False


def build_guard(max_bad_steps: int, device: torch.device, check_grad_norm: bool = True) -> WatchGuard:
    if max_bad_steps < 0:
        raise ConfigError(f"train.max_bad_steps must be >= 0, got {max_bad_steps}")
    if max_bad_steps == 0:
        return WatchGuard(device, check_grad_norm)
    return SkipGuard(device, max_bad_steps, check_grad_norm)
