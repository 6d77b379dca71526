"""Validation metrics accumulated over batches and reduced across ranks."""

from __future__ import annotations

import torch

from linnaeus.data.taxonomy import Taxonomy
from linnaeus.dist import all_reduce_sum

ECE_BINS = 15
HDIST_K = 5


def predictions(logits: torch.Tensor, null_index: int, k: int = 1) -> torch.Tensor:
    """Top-k class indices, never predicting the null class. (B, k)"""
    masked = logits.float().clone()
    masked[:, null_index] = float("-inf")
    return masked.topk(min(k, masked.shape[1] - 1), dim=1).indices


def calibration_bins(
    logits: torch.Tensor, targets: torch.Tensor, null_index: int, num_bins: int = ECE_BINS
) -> torch.Tensor:
    """Per confidence bin: samples, summed confidence, correct top-1 (3, num_bins), known labels only.

    Confidence is the top-1 probability of the softmax over the real classes (null excluded, as it is
    never predicted).
    """
    known = targets != null_index
    masked = logits[known].float().clone()
    masked[:, null_index] = float("-inf")
    confidence, top1 = torch.softmax(masked, dim=1).max(dim=1)
    confidence = torch.nan_to_num(confidence, nan=0.0)  # non-finite logits: no confidence, no crash
    correct = (top1 == targets[known]).double()
    bins = (confidence * num_bins).long().clamp_(min=0, max=num_bins - 1)
    out = torch.zeros(3, num_bins, dtype=torch.float64, device=logits.device)
    out[0].index_add_(0, bins, torch.ones_like(correct))
    out[1].index_add_(0, bins, confidence.double())
    out[2].index_add_(0, bins, correct)
    return out


def expected_calibration_error(bins: torch.Tensor) -> float:
    """ECE from ``calibration_bins``: sum over bins of (share of samples) x |accuracy - confidence|."""
    count, confidence, correct = bins.double()
    total = count.sum()
    if total == 0:
        return float("nan")
    return ((correct - confidence).abs().sum() / total).item()  # n_b/N * |acc_b - conf_b|, summed


def consistent_predictions(top1: list[torch.Tensor], taxonomy: Taxonomy) -> torch.Tensor:
    """(B,) bool: the top-1 class at every rank is the tree parent of the top-1 at the next finer rank.

    A class whose parent is unknown (null) agrees with any prediction above it.
    """
    ok = torch.ones_like(top1[0], dtype=torch.bool)
    for t in range(1, len(top1)):
        parents = torch.as_tensor(taxonomy.parents[t], device=top1[t].device)[top1[t]]
        ok &= (parents == top1[t - 1]) | (parents == taxonomy.null_index)
    return ok


class MetricAccumulator:
    """Counts for top-1/top-5 per rank, chain accuracy, mistake severity and the hierarchy metrics.

    - top-k per rank: over samples whose label at that rank is known.
    - chain accuracy: share of fully labelled samples whose top-1 is right at every rank.
    - mistake severity: mean tree distance (through the lowest common ancestor) between the
      wrong top-1 prediction and the truth at the finest rank.
    - ``hdist@5``: mean tree distance between each of the top-5 predictions at the finest rank and
      the truth (Bertinetto et al. 2020), over samples with a known finest label.
    - ``ece``: expected calibration error of the finest rank's top-1 (15 equal-width bins).
    - ``consistency``: share of samples whose top-1 predictions at adjacent ranks agree with the tree.

    All are sums of counts, reduced across ranks in ``compute``.
    """

    def __init__(self, taxonomy: Taxonomy, device: torch.device) -> None:
        self.taxonomy = taxonomy
        t = taxonomy.num_tasks
        # rows: top1 correct, top5 correct, known count (per task); then chain hits, chain count,
        # mistakes, summed mistake distance, sample-weighted loss sum, loss samples; then summed top-k distance, top-k
        # count, consistent samples, samples; then the calibration bins (3 x ECE_BINS)
        self.counts = torch.zeros(3 * t + 10 + 3 * ECE_BINS, dtype=torch.float64, device=device)

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
            # weighted by samples: a short last batch counts for what it holds
            self.counts[base + 4] += loss.detach().double() * targets.shape[0]
            self.counts[base + 5] += targets.shape[0]
        labelled = targets[:, finest] != null
        top_k = predictions(logits[finest][labelled], null, k=HDIST_K)  # (N, k)
        self.counts[base + 6] += tax.distance(finest, top_k, targets[labelled, finest : finest + 1]).sum()
        self.counts[base + 7] += top_k.numel()
        top1_per_rank = [predictions(out, null, k=1)[:, 0] for out in logits]
        self.counts[base + 8] += consistent_predictions(top1_per_rank, tax).sum()
        self.counts[base + 9] += targets.shape[0]
        self.counts[base + 10 :] += calibration_bins(logits[finest], targets[:, finest], null).flatten()

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
        out[f"hdist@{HDIST_K}"] = ratio(counts[base + 6], counts[base + 7])
        out["ece"] = expected_calibration_error(torch.tensor(counts[base + 10 :]).view(3, ECE_BINS))
        out["consistency"] = ratio(counts[base + 8], counts[base + 9])
        return out
