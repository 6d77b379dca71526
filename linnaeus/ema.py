"""Exponential moving average of the model weights (timm's ``ModelEmaV3``), or nothing.

The trainer builds ``WeightEMA`` when ``train.ema.decay`` is set and ``NoEMA`` otherwise, so the
step calls ``ema.update(model, step)`` either way and never checks a flag.
"""

from __future__ import annotations

import torch
from timm.utils import ModelEmaV3
from torch import nn

from linnaeus.errors import ConfigError


class NoEMA:
    module = None

    def update(self, model: nn.Module, step: int) -> None:
        pass

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state) -> None:
        pass


class WeightEMA(NoEMA):
    """EMA of every parameter and buffer, updated every ``every`` optimizer steps.

    With ``warmup`` the decay ramps up as ``1 - (1 + step / gamma) ** -power`` (capped at ``decay``),
    so early, fast-changing weights are not averaged over a long window. The decay depends only on
    the step, so a resumed run continues exactly.
    """

    def __init__(
        self, model: nn.Module, *, decay: float, warmup: bool, warmup_power: float, every: int
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"train.ema.decay must lie in (0, 1), got {decay}")
        if every < 1:
            raise ConfigError(f"train.ema.every must be >= 1, got {every}")
        self.every = every
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=warmup, warmup_power=warmup_power)
        self.module = self.ema.module
        for param in self.module.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """``step``: optimizer steps taken so far (>= 1)."""
        if step % self.every == 0:
            self.ema.update(model, step=step // self.every)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            raise ConfigError("the checkpoint holds no EMA weights but train.ema.decay is set now")
        self.module.load_state_dict(state)


def build_ema(ema_cfg, model: nn.Module) -> NoEMA:
    if ema_cfg.decay is None:
        return NoEMA()
    return WeightEMA(
        model,
        decay=ema_cfg.decay,
        warmup=ema_cfg.warmup,
        warmup_power=ema_cfg.warmup_power,
        every=ema_cfg.every,
    )
