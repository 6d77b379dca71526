"""Hierarchical softmax head: one rank's probabilities factorised along the taxonomy tree.

``p(child) = p(parent) * p(child | parent)``, the conditional being a softmax over the parent's children only
(siblings compete, cousins do not). The parent distribution is the coarser rank's output (its softmax, so
it can come from any head; with hsoftmax at every rank the whole tree is factorised top-down).

Null class: ``null`` at rank ``t`` means "identified down to rank ``t - 1`` but not further", which can
happen below any coarser class, so every coarser class ``g`` gets its own null leaf among its children:

    p_t(s)    = p_{t-1}(parent(s)) * q(s | parent(s))            for every real class s
    p_t(null) = sum_g p_{t-1}(g) * q(null | g)                    (g over all coarser classes, null included)

Hence ``p_{t-1}(g) = sum of g's real children + g's null leaf`` exactly, every rank sums to one, and a
confident fine prediction implies its ancestors: ``p_{t-1}(parent(s)) >= p_t(s)``. The output is
``log p`` (valid logits: ``softmax(log p) = p``), so cross-entropy and metrics work unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linnaeus.data.taxonomy import NULL_INDEX
from linnaeus.models.heads.parents import parent_index
from linnaeus.models.layers import init_weights

# The output puts the null class first and the real classes after it, in their own order.
assert NULL_INDEX == 0, "HierarchicalSoftmaxHead assumes the null class is index 0"


def grouped_log_softmax(scores: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Log-softmax of ``scores`` ``(B, L)`` within each group: ``groups`` ``(L,)`` gives each column's group.

    Every group must be non-empty. Stabilised by each group's own maximum, so groups with very different
    score ranges neither underflow nor overflow.
    """
    index = groups.expand_as(scores)
    group_max = scores.new_full((scores.shape[0], num_groups), float("-inf"))
    group_max = group_max.scatter_reduce(1, index, scores.detach(), reduce="amax")
    shifted = scores - group_max.gather(1, index)
    sums = torch.zeros_like(group_max).scatter_add(1, index, shifted.exp())
    return shifted - sums.log().gather(1, index)


class HierarchicalSoftmaxHead(nn.Module):
    """Log-probabilities ``(B, C)`` of one rank: coarsest rank a plain softmax, finer ranks tree-factorised.

    One score per real class plus one per coarser class (its null leaf); ``parents`` ``(C,)`` maps each class
    to its parent among ``parent_classes`` (the null class's own entry is not used).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        parents: np.ndarray | None = None,
        parent_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.is_root = parents is None
        if self.is_root:
            self.fc = nn.Linear(in_dim, num_classes)
        else:
            real_parents = parent_index(parents, num_classes, parent_classes)[1:]  # (C - 1,)
            groups = torch.cat([real_parents, torch.arange(parent_classes)])  # real classes, then null leaves
            self.register_buffer("real_parents", real_parents, persistent=False)
            self.register_buffer("groups", groups, persistent=False)
            self.parent_classes = parent_classes
            self.fc = nn.Linear(in_dim, num_classes - 1 + parent_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self.fc)

    def tree_log_probs(
        self, features: torch.Tensor, previous: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p of the real classes (B, C - 1), log p of each coarser class's null leaf (B, P))``."""
        scores = self.fc(features).float()
        log_cond = grouped_log_softmax(scores, self.groups, self.parent_classes)
        log_parent = F.log_softmax(previous.float(), dim=-1)  # (B, P); a no-op if already log-probs
        real = log_parent[:, self.real_parents] + log_cond[:, : self.num_classes - 1]
        null_leaves = log_parent + log_cond[:, self.num_classes - 1 :]
        return real, null_leaves

    def forward(self, features: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """``features`` ``(B, F)``, coarser rank's output ``(B, P)`` -> ``log p`` ``(B, C)``."""
        if self.is_root:
            return F.log_softmax(self.fc(features).float(), dim=-1)
        if previous is None:
            raise ValueError(
                "a hierarchical softmax head below the coarsest rank needs the coarser rank's output"
            )
        real, null_leaves = self.tree_log_probs(features, previous)
        return torch.cat([null_leaves.logsumexp(dim=-1, keepdim=True), real], dim=-1)
