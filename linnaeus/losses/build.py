"""From the ``loss`` config node to the loss module."""

from __future__ import annotations

import numpy as np
from torch import nn

from linnaeus.data.taxonomy import Taxonomy
from linnaeus.losses.criteria import (
    CrossEntropy,
    HierarchicalCrossEntropy,
    SoftLabelCrossEntropy,
    TaxonomySmoothedCrossEntropy,
)
from linnaeus.losses.gradnorm import GradNorm
from linnaeus.losses.multitask import (
    MultiTaskLoss,
    StaticTaskWeights,
    class_weights_from_counts,
    null_start_step,
)

LOSS_NAMES = ("ce", "soft_labels", "hxe")


def build_loss(
    loss_cfg,
    taxonomy: Taxonomy,
    class_counts: list[np.ndarray] | None = None,
    *,
    total_steps: int | None = None,
) -> MultiTaskLoss:
    """The multi-rank loss described by ``loss_cfg``.

    ``loss.name`` picks the finest rank's criterion (``ce``, ``soft_labels``, ``hxe``); coarser ranks
    use cross-entropy, taxonomy-smoothed when ``loss.taxonomy_smoothing`` is on (``enabled=true`` or
    ``alpha > 0``). ``class_counts`` (training samples per class, per rank) feed the class weights;
    ``total_steps`` resolves a fractional ``loss.null.include_after``.
    """
    if loss_cfg.name not in LOSS_NAMES:
        raise ValueError(f"loss.name must be one of {list(LOSS_NAMES)}, got {loss_cfg.name!r}")
    return MultiTaskLoss(
        rank_criteria(loss_cfg, taxonomy),
        taxonomy.null_index,
        task_weights=task_weights_for(loss_cfg, taxonomy.num_tasks),
        class_weights=class_weights_for(loss_cfg, class_counts, taxonomy.null_index),
        null_from_step=null_start_step(loss_cfg.null.include_after, total_steps),
    )


def rank_criteria(loss_cfg, taxonomy: Taxonomy) -> list[nn.Module]:
    """One criterion per rank, coarse -> fine (``build_loss``)."""
    num_tasks, null = taxonomy.num_tasks, taxonomy.null_index
    smoothing = loss_cfg.taxonomy_smoothing
    use_smoothing = smoothing.enabled or smoothing.alpha > 0
    if use_smoothing and not 0 < smoothing.alpha < 1:
        raise ValueError(
            "loss.taxonomy_smoothing is enabled but loss.taxonomy_smoothing.alpha is "
            f"{smoothing.alpha}; set it in (0, 1), e.g. loss.taxonomy_smoothing.alpha=0.1"
        )
    if use_smoothing and loss_cfg.label_smoothing > 0:
        raise ValueError("use either loss.label_smoothing or loss.taxonomy_smoothing, not both")

    def rank_criterion(t: int) -> nn.Module:
        if use_smoothing:
            return TaxonomySmoothedCrossEntropy(
                taxonomy.ancestors[t], null, alpha=smoothing.alpha, beta=smoothing.beta
            )
        return CrossEntropy(label_smoothing=loss_cfg.label_smoothing)

    criteria = [rank_criterion(t) for t in range(num_tasks - 1)]
    finest = taxonomy.ancestors[num_tasks - 1]
    if loss_cfg.name == "soft_labels":
        criteria.append(SoftLabelCrossEntropy(finest, null, beta=loss_cfg.soft_labels.beta))
    elif loss_cfg.name == "hxe":
        criteria.append(HierarchicalCrossEntropy(finest, null, alpha=loss_cfg.hxe.alpha))
    else:
        criteria.append(rank_criterion(num_tasks - 1))
    return criteria


def task_weights_for(loss_cfg, num_tasks: int) -> GradNorm | StaticTaskWeights:
    """GradNorm (``loss.gradnorm.enabled``) or the fixed ``loss.task_weights`` (1 each by default)."""
    gradnorm = loss_cfg.gradnorm
    if gradnorm.enabled:
        if loss_cfg.task_weights is not None:
            raise ValueError("loss.task_weights and loss.gradnorm.enabled=true exclude each other")
        return GradNorm(num_tasks, alpha=gradnorm.alpha, lr=gradnorm.lr, update_every=gradnorm.update_every)
    weights = [1.0] * num_tasks if loss_cfg.task_weights is None else list(loss_cfg.task_weights)
    if len(weights) != num_tasks:
        raise ValueError(f"loss.task_weights has {len(weights)} values but there are {num_tasks} ranks")
    return StaticTaskWeights(weights)


def class_weights_for(loss_cfg, class_counts: list[np.ndarray] | None, null: int | None):
    """Per-rank class weights from the training class counts (``loss.class_weights``), or None."""
    if not loss_cfg.class_weights.enabled:
        return None
    if class_counts is None:
        raise ValueError("loss.class_weights.enabled=true needs the training class counts")
    return [class_weights_from_counts(counts, loss_cfg.class_weights.power, null) for counts in class_counts]
