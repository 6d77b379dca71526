"""Selective mixup and cutmix: a sample is only ever mixed with a sample of the same group.

The group is a sample's class at one rank (``augmentation.group_rank``, default the finest), so both
sources of a mixed image lie on one taxonomic path and every rank's target is mixed with the same λ.
The functions are pure tensor maths on whatever device holds the batch; ``SelectiveMix`` is the thin
object the trainer builds once, and ``NoMix`` the identity it builds when mixing is off.

Semantics, decided once here:

- **Partners.** A sample's partner is its neighbour when it sits in a same-group pair at batch
  positions (2i, 2i+1), as the ``mixed-pairs`` sampler lays batches out; otherwise a random other
  sample of its group in the batch. Samples with no partner stay unmixed (λ = 1). Samples whose label
  at the group rank is unknown are never mixed (``exclude_null=true``); with ``exclude_null=false``
  they may be mixed with a sample whose labels are identical at every rank.
- **Probability, per batch.** Each batch draws one op. With both ops enabled, cutmix is chosen with
  probability ``switch_prob``, mixup otherwise, and the chosen op is applied with its own ``prob``;
  so a batch is mixed with probability ``switch_prob·cutmix.prob + (1 - switch_prob)·mixup.prob``
  (exactly ``prob`` when both probs are equal, as in timm). With one op enabled, a batch is mixed with
  that op's ``prob``. In a mixed batch every sample that has a partner is mixed, each with its own λ.
- **λ.** Mixup: λ ~ Beta(α, α) per sample. Cutmix: a box per sample of area (1 - λ) with λ ~ Beta(α, α)
  (or side fractions uniform in ``minmax``), clipped to the image; the returned λ is the kept area
  fraction, so it is exact after clipping.
- **Metadata** is never blended: each component (values and validity) is taken whole from the source
  with the larger weight (the sample itself when λ ≥ 0.5, else its partner).

Randomness comes from a NumPy generator the caller seeds per step (NumPy, because torch's Beta sampler
takes no generator); the few numbers drawn are moved to the batch's device.
"""

from __future__ import annotations

import numpy as np
import torch

NONE, MIXUP, CUTMIX = 0, 1, 2


def group_ids(targets: torch.Tensor, column: int, null_index: int, exclude_null: bool) -> torch.Tensor:
    """(B,) group of each sample at rank ``column``; -1 for samples that must not be mixed."""
    groups = targets[:, column]
    known = groups != null_index
    if exclude_null:
        return torch.where(known, groups, -1)
    # unknown at the group rank: a group per full label path, numbered after every known class
    _, path = torch.unique(targets, dim=0, return_inverse=True)
    return torch.where(known, groups, targets.max() + 1 + path)


def same_group_partners(groups: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(B,) index of each sample's partner in the batch; a sample's own index when it has none.

    ``groups`` (B,) with -1 for samples never mixed; ``keys`` (B,) random floats that pick the random
    partner: within a group, samples sorted by key each take the next one cyclically.
    """
    n = groups.numel()
    pos = torch.arange(n, device=groups.device)
    order = torch.argsort(keys)
    order = order[torch.sort(groups[order], stable=True).indices]  # by group, then by key
    sorted_groups = groups[order]
    first = torch.ones(n, dtype=torch.bool, device=groups.device)
    first[1:] = sorted_groups[1:] != sorted_groups[:-1]
    last = torch.ones(n, dtype=torch.bool, device=groups.device)
    last[:-1] = first[1:]
    start = torch.where(first, pos, 0).cummax(0).values
    end = torch.where(last, pos, n).flip(0).cummin(0).values.flip(0)
    size = end - start + 1
    partner_sorted = order[start + (pos - start + 1) % size]
    partner = torch.empty_like(pos)
    partner[order] = partner_sorted
    has_mate = torch.empty_like(first)
    has_mate[order] = size > 1
    partner = torch.where(has_mate & (groups >= 0), partner, pos)

    # prefer the neighbour of a same-group pair at (2i, 2i+1)
    even = pos[0 : n - 1 : 2]
    odd = even + 1
    paired = (groups[even] == groups[odd]) & (groups[even] >= 0)
    partner[even] = torch.where(paired, odd, partner[even])
    partner[odd] = torch.where(paired, even, partner[odd])
    return partner


def cutmix_boxes(
    lam: np.ndarray, height: int, width: int, rng: np.random.Generator, minmax: tuple | None = None
) -> np.ndarray:
    """(B, 4) boxes ``(top, bottom, left, right)``, clipped, cut out of each image.

    Area (1 - λ) centred at a uniform point, or with side fractions uniform in ``minmax``.
    """
    n = len(lam)
    if minmax is not None:
        box_h = (rng.uniform(minmax[0], minmax[1], n) * height).astype(int)
        box_w = (rng.uniform(minmax[0], minmax[1], n) * width).astype(int)
        top, left = rng.integers(0, height - box_h + 1), rng.integers(0, width - box_w + 1)
        return np.stack([top, top + box_h, left, left + box_w], axis=1)
    cut = np.sqrt(1.0 - lam)
    box_h, box_w = (cut * height).astype(int), (cut * width).astype(int)
    cy, cx = rng.integers(0, height, n), rng.integers(0, width, n)
    return np.stack(
        [
            np.clip(cy - box_h // 2, 0, height),
            np.clip(cy + box_h - box_h // 2, 0, height),
            np.clip(cx - box_w // 2, 0, width),
            np.clip(cx + box_w - box_w // 2, 0, width),
        ],
        axis=1,
    )


def box_weights(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 1, H, W) weight of each sample's own pixels: 0 inside its box, 1 outside."""
    rows = torch.arange(height, device=boxes.device).view(1, height, 1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, width)
    top, bottom, left, right = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return (~inside).float().unsqueeze(1)


def mix_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    meta: dict[str, torch.Tensor],
    meta_valid: dict[str, torch.Tensor],
    partner: torch.Tensor,
    weights: torch.Tensor,
) -> dict:
    """Mix every sample with ``images[partner]`` using its own-pixel ``weights`` (B, 1, H|1, W|1).

    Returns the mixed ``images``, ``targets_b`` = the partners' targets, ``lam`` (B,) = the mean
    weight (the share of the sample's own target), metadata taken per component from the source with
    the larger weight, and ``partner``.
    """
    weights = weights.to(images.dtype)
    mixed = weights * images + (1 - weights) * images[partner]
    lam = weights.mean(dim=(1, 2, 3)).float()  # (B,)
    own = lam >= 0.5
    return {
        "images": mixed,
        "targets_b": targets[partner],
        "lam": lam,
        "meta": {k: torch.where(own.view(-1, 1), v, v[partner]) for k, v in meta.items()},
        "meta_valid": {k: torch.where(own, v, v[partner]) for k, v in meta_valid.items()},
        "partner": partner,
    }


class NoMix:
    """Mixing off: the batch unchanged, no second target."""

    def __call__(self, images, targets, meta, meta_valid, rng: np.random.Generator) -> dict:
        return {
            "images": images,
            "targets_b": None,
            "lam": None,
            "meta": meta,
            "meta_valid": meta_valid,
            "partner": None,
        }

    def __repr__(self) -> str:
        return "no mixing"


class SelectiveMix:
    """Selective mixup/cutmix with the semantics in the module docstring."""

    def __init__(
        self,
        *,
        group_column: int,
        group_key: str = "",
        null_index: int,
        exclude_null: bool,
        mixup_alpha: float,
        mixup_prob: float,
        cutmix_alpha: float,
        cutmix_prob: float,
        cutmix_minmax: tuple[float, float] | None,
        switch_prob: float,
    ) -> None:
        self.group_column, self.null_index, self.exclude_null = group_column, null_index, exclude_null
        self.group_key = group_key or f"rank {group_column}"
        self.mixup_alpha, self.cutmix_alpha, self.cutmix_minmax = mixup_alpha, cutmix_alpha, cutmix_minmax
        self.mixup_prob = mixup_prob if mixup_alpha > 0 else 0.0
        self.cutmix_prob = cutmix_prob if (cutmix_alpha > 0 or cutmix_minmax is not None) else 0.0
        self.switch_prob = (
            switch_prob if (self.mixup_prob > 0 and self.cutmix_prob > 0) else float(self.cutmix_prob > 0)
        )

    @property
    def batch_prob(self) -> float:
        """The probability that a batch is mixed."""
        return self.switch_prob * self.cutmix_prob + (1 - self.switch_prob) * self.mixup_prob

    def choose_op(self, rng: np.random.Generator) -> int:
        op = CUTMIX if rng.random() < self.switch_prob else MIXUP
        prob = self.cutmix_prob if op == CUTMIX else self.mixup_prob
        return op if rng.random() < prob else NONE

    def __call__(self, images, targets, meta, meta_valid, rng: np.random.Generator) -> dict:
        batch, _, height, width = images.shape
        device = images.device
        op = self.choose_op(rng)
        keys = torch.as_tensor(rng.random(batch), device=device)
        groups = group_ids(targets, self.group_column, self.null_index, self.exclude_null)
        partner = same_group_partners(groups, keys)
        mixed = partner != torch.arange(batch, device=device)
        if op == MIXUP:
            lam = torch.as_tensor(rng.beta(self.mixup_alpha, self.mixup_alpha, batch), device=device)
            weights = lam.view(-1, 1, 1, 1)
        elif op == CUTMIX:
            alpha = self.cutmix_alpha if self.cutmix_alpha > 0 else 1.0
            boxes = cutmix_boxes(rng.beta(alpha, alpha, batch), height, width, rng, self.cutmix_minmax)
            weights = box_weights(torch.as_tensor(boxes, device=device), height, width)
        else:
            weights = torch.ones(batch, 1, 1, 1, device=device)
        weights = torch.where(mixed.view(-1, 1, 1, 1), weights, torch.ones_like(weights))
        partner = torch.where(weights.flatten(1).amin(1) < 1, partner, torch.arange(batch, device=device))
        return mix_batch(images, targets, meta, meta_valid, partner, weights)

    def __repr__(self) -> str:
        mix = f"mixup α={self.mixup_alpha} p={self.mixup_prob}, cutmix α={self.cutmix_alpha} p={self.cutmix_prob}"
        minmax = f" minmax={list(self.cutmix_minmax)}" if self.cutmix_minmax is not None else ""
        return (
            f"selective {mix}{minmax}, switch={self.switch_prob} → batch mixed with p={self.batch_prob:.3g} "
            f"(groups: {self.group_key} classes, exclude_null={self.exclude_null})"
        )


def build_mixer(aug_cfg, task_keys: list[str], null_index: int) -> SelectiveMix | NoMix:
    """``SelectiveMix`` from the ``augmentation`` node, or ``NoMix`` when both probabilities are 0."""
    for key, value in (
        ("mixup.prob", aug_cfg.mixup.prob),
        ("cutmix.prob", aug_cfg.cutmix.prob),
        ("switch_prob", aug_cfg.switch_prob),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"augmentation.{key} must be in [0, 1], got {value}")
    group_key = aug_cfg.group_rank or task_keys[-1]
    if group_key not in task_keys:
        raise ValueError(f"augmentation.group_rank={group_key!r} is not one of the tasks {task_keys}")
    minmax = aug_cfg.cutmix.minmax
    if minmax is not None and not (len(minmax) == 2 and 0 < minmax[0] <= minmax[1] <= 1):
        raise ValueError(
            f"augmentation.cutmix.minmax must be [low, high] with 0 < low <= high <= 1, got {minmax}"
        )
    mixer = SelectiveMix(
        group_column=task_keys.index(group_key),
        group_key=group_key,
        null_index=null_index,
        exclude_null=aug_cfg.exclude_null,
        mixup_alpha=aug_cfg.mixup.alpha,
        mixup_prob=aug_cfg.mixup.prob,
        cutmix_alpha=aug_cfg.cutmix.alpha,
        cutmix_prob=aug_cfg.cutmix.prob,
        cutmix_minmax=tuple(minmax) if minmax is not None else None,
        switch_prob=aug_cfg.switch_prob,
    )
    return mixer if mixer.batch_prob > 0 else NoMix()
