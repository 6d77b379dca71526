"""Validation metrics accumulated over batches and reduced across ranks."""

from __future__ import annotations

import torch

from linnaeus.data.taxonomy import Taxonomy
from linnaeus.dist import all_reduce_sum


def predictions(logits: torch.Tensor, null_index: int, k: int = 1) -> torch.Tensor:
    """Top-k class indices, never predicting the null class. (B, k)"""
    masked = logits.float().clone()
    masked[:, null_index] = float("-inf")
    return masked.topk(min(k, masked.shape[1] - 1), dim=1).indices


class MetricAccumulator:
    """Counts for top-1/top-5 per rank, chain accuracy and mistake severity.

    - top-k per rank: over samples whose label at that rank is known.
    - chain accuracy: share of fully labelled samples whose top-1 is right at every rank.
    - mistake severity: mean tree distance (through the lowest common ancestor) between the
      wrong top-1 prediction and the truth at the finest rank.
    """

    def __init__(self, taxonomy: Taxonomy, device: torch.device) -> None:
        self.taxonomy = taxonomy
        t = taxonomy.num_tasks
        # rows: top1 correct, top5 correct, known count (per task); then chain hits, chain count,
        # mistakes, summed mistake distance, loss sum, loss batches
        self.counts = torch.zeros(3 * t + 6, dtype=torch.float64, device=device)

    def update(
        self, logits: list[torch.Tensor], targets: torch.Tensor, loss: torch.Tensor | None = None
    ) -> None:
        tax, t_count, null = self.taxonomy, self.taxonomy.num_tasks, self.taxonomy.null_index
        all_right = torch.ones(targets.shape[0], dtype=torch.bool, device=targets.device)
        fully_known = (targets != null).all(dim=1)
        for t, out in enumerate(logits):
            known = targets[:, t] != null
            top = predictions(out, null, k=5)
            hit1 = top[:, 0] == targets[:, t]
            hit5 = (top == targets[:, t : t + 1]).any(dim=1)
            self.counts[t] += (hit1 & known).sum()
            self.counts[t_count + t] += (hit5 & known).sum()
            self.counts[2 * t_count + t] += known.sum()
            all_right &= hit1
        base = 3 * t_count
        self.counts[base] += (all_right & fully_known).sum()
        self.counts[base + 1] += fully_known.sum()
        finest = t_count - 1
        top1 = predictions(logits[finest], null, k=1)[:, 0]
        wrong = (top1 != targets[:, finest]) & (targets[:, finest] != null)
        if wrong.any():
            self.counts[base + 2] += wrong.sum()
            self.counts[base + 3] += tax.distance(finest, top1[wrong], targets[wrong, finest]).sum()
        if loss is not None:
            self.counts[base + 4] += loss.detach().double()
            self.counts[base + 5] += 1

    def compute(self) -> dict[str, float]:
        counts = all_reduce_sum(self.counts.clone()).tolist()
        t_count = self.taxonomy.num_tasks
        out: dict[str, float] = {}

        def ratio(a: float, b: float) -> float:
            return a / b if b > 0 else float("nan")

        for t, key in enumerate(self.taxonomy.task_keys):
            out[f"top1/{key}"] = ratio(counts[t], counts[2 * t_count + t])
            out[f"top5/{key}"] = ratio(counts[t_count + t], counts[2 * t_count + t])
        base = 3 * t_count
        out["chain_accuracy"] = ratio(counts[base], counts[base + 1])
        out["mistake_severity"] = ratio(counts[base + 3], counts[base + 2])
        if counts[base + 5] > 0:
            out["loss"] = counts[base + 4] / counts[base + 5]
        return out
