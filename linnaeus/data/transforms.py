"""Per-image preprocessing: random training augmentation and deterministic evaluation preprocessing."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.transforms import v2


def build_train_transform(
    aug_cfg, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    """Random resized crop, flips and optional colour jitter on a (3, H, W) uint8 tensor."""
    steps: list = [
        v2.RandomResizedCrop(
            image_size, scale=tuple(aug_cfg.scale), ratio=tuple(aug_cfg.ratio), antialias=True
        ),
    ]
    if aug_cfg.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug_cfg.hflip))
    if aug_cfg.vflip > 0:
        steps.append(v2.RandomVerticalFlip(aug_cfg.vflip))
    if aug_cfg.color_jitter > 0:
        s = aug_cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def build_eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0
) -> v2.Compose:
    """Resize the short side to image_size / crop_pct, centre-crop, normalise; no randomness."""
    resize = math.floor(image_size / crop_pct + 0.5)
    return v2.Compose(
        [
            v2.Resize(resize, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
