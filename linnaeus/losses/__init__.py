"""Losses: per-rank criteria (cross-entropy, taxonomy-aware smoothing, soft labels, hierarchical
cross-entropy), combined over ranks with null masking, mixed targets, class weights and task weights
(static or GradNorm).

The one interface, for the trainer and the mixing code alike::

    loss_fn = build_loss(cfg.loss, taxonomy, class_counts, total_steps=...)
    total, per_task = loss_fn(logits, targets)                   # logits: list of (B, C_t)
    total, per_task = loss_fn(logits, targets, targets_b, lam)   # mixed pairs, lam (B,)
"""

from linnaeus.losses.build import LOSS_NAMES, build_loss
from linnaeus.losses.multitask import MultiTaskLoss

__all__ = ["LOSS_NAMES", "MultiTaskLoss", "build_loss"]
