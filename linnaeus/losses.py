"""Per-rank classification losses combined over ranks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, null_index: int, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy over the samples whose label is known; 0 (with a graph) when none is."""
    known = targets != null_index
    if not known.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known].float(), targets[known], label_smoothing=label_smoothing)


class MultiTaskLoss(nn.Module):
    """Weighted sum over ranks of the null-masked cross-entropy."""

    def __init__(
        self,
        num_tasks: int,
        null_index: int,
        task_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        weights = [1.0] * num_tasks if task_weights is None else [float(w) for w in task_weights]
        if len(weights) != num_tasks:
            raise ValueError(f"loss.task_weights has {len(weights)} values but there are {num_tasks} ranks")
        self.register_buffer("task_weights", torch.tensor(weights), persistent=False)
        self.null_index = null_index
        self.label_smoothing = label_smoothing

    def forward(self, logits: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the total loss and the (T,) per-rank losses (detached)."""
        per_task = torch.stack(
            [
                masked_cross_entropy(out, targets[:, t], self.null_index, self.label_smoothing)
                for t, out in enumerate(logits)
            ]
        )
        return (per_task * self.task_weights).sum(), per_task.detach()


def build_loss(loss_cfg, num_tasks: int, null_index: int) -> MultiTaskLoss:
    if loss_cfg.taxonomy_smoothing.enabled:
        raise ValueError(
            "loss.taxonomy_smoothing.enabled=true is not available in this version; use loss.label_smoothing"
        )
    return MultiTaskLoss(num_tasks, null_index, loss_cfg.task_weights, loss_cfg.label_smoothing)
