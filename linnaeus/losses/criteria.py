"""Per-rank criteria: thin modules mapping ``(logits (B, C), targets (B,))`` to per-sample losses (B,).

Each holds what it needs from the taxonomy as a buffer, so it follows the loss module to the
batch's device; the math is in ``linnaeus.losses.hierarchy``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linnaeus.losses.hierarchy import (
    hierarchical_cross_entropy,
    soft_cross_entropy,
    soft_label_targets,
    taxonomy_smoothing_targets,
)


class CrossEntropy(nn.Module):
    """Cross-entropy, optionally with uniform label smoothing (as ``F.cross_entropy``)."""

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.float(), targets, reduction="none", label_smoothing=self.label_smoothing
        )


class _AncestorCriterion(nn.Module):
    def __init__(self, ancestors: np.ndarray, null_index: int) -> None:
        super().__init__()
        self.register_buffer("ancestors", torch.as_tensor(ancestors, dtype=torch.long), persistent=False)
        self.null_index = null_index


class TaxonomySmoothedCrossEntropy(_AncestorCriterion):
    """Cross-entropy against taxonomy-aware smoothed targets (true class 1 - alpha)."""

    def __init__(self, ancestors: np.ndarray, null_index: int, *, alpha: float, beta: float) -> None:
        super().__init__(ancestors, null_index)
        self.alpha, self.beta = alpha, beta

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probs = taxonomy_smoothing_targets(self.ancestors, targets, self.alpha, self.beta, self.null_index)
        return soft_cross_entropy(logits, probs)


class SoftLabelCrossEntropy(_AncestorCriterion):
    """Cross-entropy against ``softmax(-beta * distance)`` soft labels."""

    def __init__(self, ancestors: np.ndarray, null_index: int, *, beta: float) -> None:
        super().__init__(ancestors, null_index)
        self.beta = beta

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(
            logits, soft_label_targets(self.ancestors, targets, self.beta, self.null_index)
        )


class HierarchicalCrossEntropy(_AncestorCriterion):
    """Hierarchical cross-entropy along the true path, term weights ``exp(-alpha * height)``."""

    def __init__(self, ancestors: np.ndarray, null_index: int, *, alpha: float) -> None:
        super().__init__(ancestors, null_index)
        self.alpha = alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return hierarchical_cross_entropy(logits, targets, self.ancestors, self.alpha, self.null_index)
