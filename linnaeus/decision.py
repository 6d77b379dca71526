"""Probabilities that agree along the tree, and the hierarchical decision made from them.

Independent heads (one softmax per rank) need not agree: the genus head may favour a genus that the
species head puts little mass under. ``tree_probabilities`` turns the per-rank softmaxes into one
distribution per rank that is consistent along the tree, in one of two ways:

- ``finest`` (default): the finest head's distribution, summed up the tree: a genus's probability is
  the sum of its species' probabilities, a family's the sum of its genera's, and so on. With a
  hierarchical-softmax head these are the model's own marginals. A class with no descendant at the
  finest rank gets 0; mass of finest classes whose parent is unknown stays at the null index.
- ``chain``: the chain rule with every head: ``p(order) * p(family | order) * ...``, where
  ``p(c | parent)`` is rank t's head renormalised over the parent's children. Coarse heads (trained on
  more labels per class) count too; mass of a class with no children stays at that class, so a
  rank's total can be below 1 (the rest is "a taxon below it the model does not know").

``hierarchical_decision`` walks from the coarsest rank down, taking at each rank the most probable
child of the class chosen above, and stops before the first rank whose choice is below ``threshold``.
Since a child never has more probability than its parent, the decision names the finest confident
rank, and every rank above it is confident and on the same path.
"""

from __future__ import annotations

import torch

from linnaeus.data.taxonomy import Taxonomy

METHODS = ("finest", "chain")


def class_probabilities(logits: list[torch.Tensor], null_index: int) -> list[torch.Tensor]:
    """Softmax of every rank over its real classes; the null class gets probability 0. (B, C_t) each."""
    out = []
    for rank_logits in logits:
        masked = rank_logits.float().clone()
        masked[:, null_index] = float("-inf")
        out.append(torch.softmax(masked, dim=1))
    return out


def _sum_by_parent(probs: torch.Tensor, parents: torch.Tensor, num_parents: int) -> torch.Tensor:
    """(B, C_t) -> (B, C_{t-1}): each parent's summed child probability."""
    out = torch.zeros(probs.shape[0], num_parents, dtype=probs.dtype, device=probs.device)
    return out.index_add_(1, parents, probs)


def tree_probabilities(
    probs: list[torch.Tensor], taxonomy: Taxonomy, method: str = "finest"
) -> list[torch.Tensor]:
    """Per-rank probabilities (``class_probabilities``) -> probabilities consistent along the tree."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    device, null = probs[0].device, taxonomy.null_index
    parents = [None] + [torch.as_tensor(p, device=device) for p in taxonomy.parents[1:]]
    num_tasks = len(probs)
    if method == "finest":
        out = [None] * num_tasks
        out[-1] = probs[-1]
        for t in range(num_tasks - 1, 0, -1):
            out[t - 1] = _sum_by_parent(out[t], parents[t], probs[t - 1].shape[1])
        return out
    out = [probs[0]]
    for t in range(1, num_tasks):
        siblings = _sum_by_parent(probs[t], parents[t], probs[t - 1].shape[1])  # (B, C_{t-1})
        total = siblings[:, parents[t]]  # (B, C_t): the summed probability of each class's siblings
        conditional = torch.where(total > 0, probs[t] / total.clamp_min(1e-30), torch.zeros_like(total))
        above = out[t - 1].clone()
        above[:, null] = 0.0  # below an unknown parent there is nothing to condition on
        out.append(above[:, parents[t]] * conditional)
    return out


def hierarchical_decision(
    tree_probs: list[torch.Tensor], taxonomy: Taxonomy, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The finest rank whose choice passes ``threshold``, walking down the tree from the coarsest rank.

    Returns ``(rank, path, path_probs)``: ``rank`` (B,) the task index of the decision (-1 when even
    the coarsest rank is below the threshold); ``path`` (B, T) the class chosen at every rank (the
    most probable child of the class above; the null index where the class above has no children);
    ``path_probs`` (B, T) their probabilities.
    """
    null = taxonomy.null_index
    device = tree_probs[0].device
    path, path_probs = [], []
    chosen = None
    for t, probs in enumerate(tree_probs):
        candidates = probs.clone()
        candidates[:, null] = -1.0
        if chosen is not None:
            parents = torch.as_tensor(taxonomy.parents[t], device=device)
            is_child = parents[None, :] == chosen[:, None]  # (B, C_t)
            candidates = torch.where(is_child, candidates, torch.full_like(candidates, -1.0))
        stopped = None if chosen is None else chosen == null  # the path ended above: nothing below it
        best, chosen = candidates.max(dim=1)
        none = best < 0  # no child under the class above (or nothing but the null class)
        if stopped is not None:
            none |= stopped
        chosen = torch.where(none, torch.full_like(chosen, null), chosen)
        path.append(chosen)
        path_probs.append(torch.where(none, torch.zeros_like(best), best))
    path_t, probs_t = torch.stack(path, dim=1), torch.stack(path_probs, dim=1)
    confident = (probs_t >= threshold) & (path_t != null)
    passed = confident.int().cumprod(dim=1).bool()  # a prefix of the ranks
    rank = passed.sum(dim=1) - 1
    return rank, path_t, probs_t
