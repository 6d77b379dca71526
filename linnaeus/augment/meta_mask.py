"""Metadata masking during training: hide metadata so the model learns to classify without it.

For every training sample, independently: with probability ``full_prob`` every maskable component is
masked; otherwise each maskable component is masked with probability ``partial_prob`` on its own. So a
component is masked with probability ``full + (1 - full)·partial``. Maskable components are
``data.meta_mask.components`` (null = all). A masked component has zero values and validity False,
exactly like missing metadata, which the model handles with its learned "missing" embedding.

Both probabilities are multiplied by a schedule factor, a pure function of the step:
``constant`` (1), ``linear`` (1 at step 0 → ``end_factor`` at the last step) or ``step`` (1 before
``step_fraction`` of training, ``end_factor`` after); results are clipped to [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

SCHEDULES = ("constant", "linear", "step")


def schedule_factor(
    step: int, total_steps: int, *, name: str, end_factor: float, step_fraction: float
) -> float:
    """The multiplier of both masking probabilities at ``step`` of ``total_steps``."""
    if name == "constant":
        return 1.0
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if name == "linear":
        return 1.0 + (end_factor - 1.0) * progress
    if name == "step":
        return 1.0 if progress < step_fraction else end_factor
    raise ValueError(f"data.meta_mask.schedule={name!r}; valid schedules: {', '.join(SCHEDULES)}")


def mask_components(
    meta: dict[str, torch.Tensor], meta_valid: dict[str, torch.Tensor], masked: dict[str, torch.Tensor]
) -> tuple[dict, dict]:
    """Zero the values and clear the validity of ``masked[name]`` (B,) bool rows of each named component."""
    meta, meta_valid = dict(meta), dict(meta_valid)
    for name, rows in masked.items():
        meta[name] = torch.where(rows.view(-1, 1), torch.zeros_like(meta[name]), meta[name])
        meta_valid[name] = meta_valid[name] & ~rows
    return meta, meta_valid


def draw_masks(
    batch: int, names: list[str], full_prob: float, partial_prob: float, rng: np.random.Generator
) -> np.ndarray:
    """(B, C) bool: which component of which sample to mask."""
    full = rng.random((batch, 1)) < full_prob
    partial = rng.random((batch, len(names))) < partial_prob
    return full | partial


class NoMetaMask:
    """Masking off: metadata unchanged."""

    def __call__(self, meta, meta_valid, step: int, rng: np.random.Generator) -> tuple[dict, dict]:
        return meta, meta_valid

    def __repr__(self) -> str:
        return "no metadata masking"


class MetaMask:
    """Full and partial metadata masking with scheduled probabilities."""

    def __init__(
        self,
        *,
        components: list[str],
        full_prob: float,
        partial_prob: float,
        schedule: str,
        end_factor: float,
        step_fraction: float,
        total_steps: int,
    ) -> None:
        self.components, self.full_prob, self.partial_prob = components, full_prob, partial_prob
        self.schedule = dict(name=schedule, end_factor=end_factor, step_fraction=step_fraction)
        self.total_steps = total_steps

    def probabilities(self, step: int) -> tuple[float, float]:
        """(full, partial) masking probabilities at ``step``."""
        factor = schedule_factor(step, self.total_steps, **self.schedule)
        return min(max(self.full_prob * factor, 0.0), 1.0), min(max(self.partial_prob * factor, 0.0), 1.0)

    def __call__(self, meta, meta_valid, step: int, rng: np.random.Generator) -> tuple[dict, dict]:
        batch = next(iter(meta_valid.values())).shape[0]
        full, partial = self.probabilities(step)
        draws = torch.as_tensor(draw_masks(batch, self.components, full, partial, rng))
        device = next(iter(meta_valid.values())).device
        masked = {name: draws[:, i].to(device, non_blocking=True) for i, name in enumerate(self.components)}
        return mask_components(meta, meta_valid, masked)

    def __repr__(self) -> str:
        s = self.schedule
        shape = "" if s["name"] == "constant" else f" × {s['name']} schedule to {s['end_factor']}"
        if s["name"] == "step":
            shape += f" at {s['step_fraction']:.0%} of training"
        return f"metadata masking of {self.components}: full p={self.full_prob}, partial p={self.partial_prob}{shape}"


def build_meta_mask(mask_cfg, meta_components: list[str], total_steps: int) -> MetaMask | NoMetaMask:
    """``MetaMask`` from the ``data.meta_mask`` node, or ``NoMetaMask`` when nothing is ever masked."""
    for key in ("full_prob", "partial_prob"):
        if not 0.0 <= mask_cfg[key] <= 1.0:
            raise ValueError(f"data.meta_mask.{key} must be in [0, 1], got {mask_cfg[key]}")
    # an unknown schedule name fails even when masking is off
    schedule_factor(
        0,
        total_steps,
        name=mask_cfg.schedule,
        end_factor=mask_cfg.end_factor,
        step_fraction=mask_cfg.step_fraction,
    )
    names = list(meta_components) if mask_cfg.components is None else list(mask_cfg.components)
    unknown = sorted(set(names) - set(meta_components))
    if unknown:
        raise ValueError(
            f"data.meta_mask.components: {unknown} not in this dataset's metadata {list(meta_components)}"
        )
    if not names or (mask_cfg.full_prob == 0 and mask_cfg.partial_prob == 0):
        return NoMetaMask()
    return MetaMask(
        components=names,
        full_prob=mask_cfg.full_prob,
        partial_prob=mask_cfg.partial_prob,
        schedule=mask_cfg.schedule,
        end_factor=mask_cfg.end_factor,
        step_fraction=mask_cfg.step_fraction,
        total_steps=total_steps,
    )
