"""Per-rank losses combined over ranks: null masking, mixed targets, class and task weights."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``sum(weights * losses) / sum(counts)``; 0 (still in the graph) when nothing counts.

    ``counts`` is how much each sample counts (0 for an unknown label, lam for one side of a mixed
    pair); ``weights`` is that times the sample's class weight. Dividing by the counts, not the
    weights, keeps class weights with mean 1 over the training set from changing the loss scale.
    Entries with zero weight never reach the sum, so a non-finite loss there does no harm.
    """
    terms = torch.where(weights != 0, weights * losses, torch.zeros_like(losses))
    total = counts.sum()
    return terms.sum() / torch.where(total > 0, total, torch.ones_like(total))


def class_weights_from_counts(counts: np.ndarray, power: float, null_index: int) -> np.ndarray:
    """Inverse-frequency class weights ``count ** -power``, scaled to mean 1 over the training samples.

    ``counts`` (C,) are the training samples per class, the null class included; the null class and
    classes absent from the training split get weight 1.
    """
    counts = np.asarray(counts, dtype=np.float64)
    real = np.arange(len(counts)) != null_index
    seen = real & (counts > 0)
    weights = np.ones(len(counts))
    if seen.any():
        raw = counts[seen] ** -power
        weights[seen] = raw * counts[seen].sum() / (raw * counts[seen]).sum()
    return weights


def null_start_step(include_after: float | None, total_steps: int | None) -> int | None:
    """The optimizer step from which the null class is trained as a class; None = never.

    ``include_after`` below 1 is a fraction of the total steps, otherwise a step count.
    """
    if include_after is None:
        return None
    if include_after < 0:
        raise ValueError(f"loss.null.include_after must be >= 0 or null, got {include_after}")
    if include_after >= 1:
        if include_after != int(include_after):
            raise ValueError(f"loss.null.include_after={include_after}: a step count must be a whole number")
        return int(include_after)
    if total_steps is None:
        raise ValueError("loss.null.include_after as a fraction needs the total number of steps")
    return round(include_after * total_steps)


class StaticTaskWeights(nn.Module):
    """Fixed task weights; ``update`` does nothing."""

    def __init__(self, weights: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor([float(w) for w in weights]), persistent=False)

    def update(self, step: int, task_losses: torch.Tensor | None, shared_params: list, **kwargs) -> bool:
        return False


class MultiTaskLoss(nn.Module):
    """Weighted sum over ranks of per-rank criteria, with null masking and mixed targets.

    ``forward(logits, targets, targets_b=None, lam=None)``: ``logits`` one (B, C_t) tensor per rank,
    ``targets`` (B, T). With ``targets_b`` and ``lam`` (B,) (mixing), a sample's loss at a rank is
    ``lam * L(targets) + (1 - lam) * L(targets_b)``, each side dropped where its label is unknown.
    Returns the total loss and the (T,) per-rank losses, detached.
    """

    def __init__(
        self,
        criteria: Sequence[nn.Module],
        null_index: int,
        *,
        task_weights: nn.Module,
        class_weights: Sequence[np.ndarray] | None = None,
        null_from_step: int | None = None,
    ) -> None:
        super().__init__()
        self.criteria = nn.ModuleList(criteria)
        self.task_weights = task_weights
        self.null_index = null_index
        self.null_from_step = null_from_step
        self.include_null = null_from_step == 0
        self.class_weights = None
        if class_weights is not None:
            for t, w in enumerate(class_weights):
                self.register_buffer(
                    f"class_weights_{t}", torch.as_tensor(w, dtype=torch.float32), persistent=False
                )
            self.class_weights = [f"class_weights_{t}" for t in range(len(class_weights))]
        self.last_task_losses: torch.Tensor | None = None  # with their graph, for GradNorm

    def set_step(self, step: int) -> None:
        """Called at every optimizer step: switches the null class in at ``null_from_step``."""
        self.include_null = self.null_from_step is not None and step >= self.null_from_step

    def _side(self, t: int, logits: torch.Tensor, targets: torch.Tensor, share: torch.Tensor):
        """Per-sample losses, weights and counts of one side of the batch at rank t."""
        counts = share if self.include_null else share * (targets != self.null_index)
        weights = counts
        if self.class_weights is not None:  # the one place where class weights apply
            weights = counts * getattr(self, self.class_weights[t])[targets]
        return self.criteria[t](logits, targets), weights, counts

    def forward(
        self,
        logits: list[torch.Tensor],
        targets: torch.Tensor,
        targets_b: torch.Tensor | None = None,
        lam: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (targets_b is None) != (lam is None):
            raise ValueError("pass targets_b and lam together (mixed targets) or neither")
        if len(logits) != len(self.criteria):
            raise ValueError(f"got logits for {len(logits)} ranks, the loss has {len(self.criteria)}")
        ones = torch.ones(targets.shape[0], device=targets.device)
        lam = None if lam is None else torch.as_tensor(lam, dtype=torch.float32, device=targets.device) * ones
        per_task = []
        for t, out in enumerate(logits):
            loss, weight, count = self._side(t, out, targets[:, t], ones if lam is None else lam)
            if targets_b is not None:
                loss_b, weight_b, count_b = self._side(t, out, targets_b[:, t], 1.0 - lam)
                loss, weight, count = (
                    torch.cat(pair) for pair in ((loss, loss_b), (weight, weight_b), (count, count_b))
                )
            per_task.append(weighted_mean(loss, weight, count))
        per_task = torch.stack(per_task)
        self.last_task_losses = per_task
        # a copy: GradNorm changes its weights in place before this graph's backward
        total = (self.task_weights.weights.detach().clone() * per_task).sum()
        return total, per_task.detach()

    def current_task_weights(self) -> torch.Tensor:
        return self.task_weights.weights.detach()

    def update_task_weights(self, step: int, shared_params: list[nn.Parameter], **kwargs) -> bool:
        """Let the task weighting learn from the last forward (GradNorm); call before ``backward``.

        Returns whether the weights changed.
        """
        return self.task_weights.update(step, self.last_task_losses, shared_params, **kwargs)
