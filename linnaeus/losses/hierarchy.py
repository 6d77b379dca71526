"""Taxonomy-aware targets and losses for one rank, as pure tensor functions.

Every function works from ``ancestors``, the ``(C, L)`` index array of a rank (row c: the class index
of c's ancestor at every rank 0..L-1, the last column c itself; see ``Taxonomy.ancestors``). Distances
to all classes are computed per sample, ``(B, C)``, one rank level at a time, so nothing of size C x C
is ever held in memory, whatever the number of species.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from linnaeus.data.taxonomy import lca_distance_between


def lca_distance(ancestors: torch.Tensor, targets: torch.Tensor, null_index: int) -> torch.Tensor:
    """Tree distance from each target to every class of its rank (``lca_distance_between``).

    ``ancestors`` (C, L), ``targets`` (B,) -> (B, C) int.
    """
    return lca_distance_between(ancestors[targets].unsqueeze(1), ancestors.unsqueeze(0), null_index)


def _null_rows_one_hot(probs: torch.Tensor, targets: torch.Tensor, null_index: int) -> torch.Tensor:
    """Rows whose target is the null class get a one-hot null target (used once null is a class)."""
    is_null = (targets == null_index).unsqueeze(1)  # (B, 1)
    if not is_null.any():
        return probs
    one_hot = F.one_hot(torch.full_like(targets, null_index), probs.shape[1]).to(probs.dtype)
    return torch.where(is_null, one_hot, probs)


def taxonomy_smoothing_targets(
    ancestors: torch.Tensor, targets: torch.Tensor, alpha: float, beta: float, null_index: int
) -> torch.Tensor:
    """Target distributions (B, C): the true class keeps ``1 - alpha``; the other real classes share
    ``alpha`` in proportion to ``exp(-beta * d)``, d the LCA distance to the true class.

    Classes sharing no known ancestor with the target are all at the same distance, so they share
    their part uniformly (at the coarsest rank this is plain uniform smoothing). The null class gets 0.
    """
    num_classes = ancestors.shape[0]
    scores = -beta * lca_distance(ancestors, targets, null_index).float()  # (B, C)
    scores[:, null_index] = float("-inf")
    if num_classes - 1 < 2:  # a single real class: nothing to smooth towards
        probs = F.one_hot(targets, num_classes).float()
        return _null_rows_one_hot(probs, targets, null_index)
    scores.scatter_(1, targets.unsqueeze(1), float("-inf"))
    probs = alpha * torch.softmax(scores, dim=1)
    probs.scatter_(1, targets.unsqueeze(1), 1.0 - alpha)
    return _null_rows_one_hot(probs, targets, null_index)


def soft_label_targets(
    ancestors: torch.Tensor, targets: torch.Tensor, beta: float, null_index: int
) -> torch.Tensor:
    """Soft labels of Bertinetto et al. (2020): ``softmax(-beta * d)`` over the real classes. (B, C)

    ``d`` is the paper's normalised distance, the height of the lowest common ancestor divided by the
    tree height (``lca_distance / (2 L)``, in [0, 1]), so β values from the paper carry over.
    """
    height = 2 * ancestors.shape[1]
    scores = -beta * lca_distance(ancestors, targets, null_index).float() / height
    scores[:, null_index] = float("-inf")
    return _null_rows_one_hot(torch.softmax(scores, dim=1), targets, null_index)


def soft_cross_entropy(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy against target distributions: ``-sum_c q_c log p_c``. (B,)"""
    return -(probs * F.log_softmax(logits.float(), dim=1)).sum(dim=1)


def hierarchical_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ancestors: torch.Tensor, alpha: float, null_index: int
) -> torch.Tensor:
    """Hierarchical cross-entropy (Bertinetto et al. 2020) at the finest rank. (B,)

    ``-sum_l exp(-alpha * depth_l) * log p(node_l | node_{l-1})`` along the true path, depth_l the
    depth of the node below the root (1 at the coarsest rank), as in the authors' implementation: the
    coarse edges weigh most, so a mistake outside the true family costs more than one inside the true
    genus. With alpha = 0 the terms telescope to plain cross-entropy.
    A node's probability is the sum of the softmax probabilities of the finest classes below it. A
    rank where the true path is unknown (null) adds no term: the next known rank conditions on the
    last known ancestor. A null target (once null is a class) gets ``-log p(null)``.
    """
    levels = ancestors.shape[1]
    log_probs = F.log_softmax(logits.float(), dim=1)  # (B, C)
    chain = ancestors[targets]  # (B, L)
    previous = torch.zeros(targets.shape[0], device=logits.device)  # log P(root) = 0
    loss = torch.zeros_like(previous)
    for level in range(levels):
        node = chain[:, level]
        if level == levels - 1:
            log_node = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        else:
            below = ancestors[:, level].unsqueeze(0) == node.unsqueeze(1)  # (B, C), never empty
            log_node = torch.logsumexp(log_probs.masked_fill(~below, float("-inf")), dim=1)
        log_node = torch.where(node != null_index, log_node, previous)
        loss = loss - math.exp(-alpha * (level + 1)) * (log_node - previous)
        previous = log_node
    return torch.where(targets == null_index, -log_probs[:, null_index], loss)
