"""Per-class counts behind the per-class tables and confusion plots, accumulated on the device.

A dense confusion matrix is ``C x C``: 800 MB of int64 at 10,000 species. ``ConfusionCounts`` keeps,
per rank, only the (true, predicted) pairs that occur, as sorted keys ``true * C + predicted`` with a
count each, so memory grows with the number of distinct pairs (at most the number of samples), not
with ``C^2``. New keys are buffered and merged (``torch.unique``) once the buffer is large, so an update
costs no host synchronisation. Alongside: top-5 hits per true class and the calibration bins of every
rank. Only samples whose label at a rank is known count at that rank, as in ``MetricAccumulator``, and
predictions never name the null class (``linnaeus.metrics.predictions``).

It is a collector for ``linnaeus.evaluation.evaluate(..., collect={"val": counts})``: ``update`` sees
every batch of that view and ``reduce`` (called by ``evaluate`` on every rank) sums the counts of all
ranks, after which ``result()`` gives numpy arrays for ``linnaeus.reports``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from linnaeus.data.taxonomy import Taxonomy
from linnaeus.metrics import ECE_BINS, calibration_bins, predictions

TOP_K = 5
MERGE_AT = 1 << 20  # buffered keys per rank before they are merged into the unique pairs


@dataclass
class RankConfusion:
    """The reduced counts of one rank (task), as numpy arrays."""

    task_key: str
    num_classes: int  # the null class included
    true: np.ndarray  # (K,) true class of each distinct pair
    pred: np.ndarray  # (K,) predicted class
    count: np.ndarray  # (K,) samples with that pair
    top5_hits: np.ndarray  # (C,) samples of each true class with the truth among the top 5
    calibration: np.ndarray  # (3, ECE_BINS): samples, summed confidence, correct top-1 per bin

    def support(self) -> np.ndarray:
        """(C,) samples per true class."""
        return np.bincount(self.true, weights=self.count, minlength=self.num_classes).astype(np.int64)

    def predicted(self) -> np.ndarray:
        """(C,) samples predicted as each class (among samples with a known label)."""
        return np.bincount(self.pred, weights=self.count, minlength=self.num_classes).astype(np.int64)

    def correct(self) -> np.ndarray:
        """(C,) correct top-1 predictions per true class."""
        hit = self.true == self.pred
        return np.bincount(self.true[hit], weights=self.count[hit], minlength=self.num_classes).astype(
            np.int64
        )

    def dense(self) -> np.ndarray:
        """The full (C, C) matrix, rows = truth; only for ranks with few classes."""
        out = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        np.add.at(out, (self.true, self.pred), self.count)
        return out


class ConfusionCounts:
    """Sparse confusion pairs, top-5 hits and calibration bins per rank (see the module docstring)."""

    def __init__(self, taxonomy: Taxonomy, device: torch.device | str) -> None:
        self.task_keys = list(taxonomy.task_keys)
        self.num_classes = list(taxonomy.num_classes)
        self.null = taxonomy.null_index
        device = torch.device(device)
        t = len(self.num_classes)
        self.keys = [torch.zeros(0, dtype=torch.int64, device=device) for _ in range(t)]
        self.counts = [torch.zeros(0, dtype=torch.int64, device=device) for _ in range(t)]
        self.pending: list[list[torch.Tensor]] = [[] for _ in range(t)]
        self.pending_size = [0] * t
        self.top5 = [torch.zeros(c, dtype=torch.int64, device=device) for c in self.num_classes]
        self.bins = [torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device) for _ in range(t)]

    @torch.no_grad()
    def update(self, logits: list[torch.Tensor], targets: torch.Tensor) -> None:
        for t, out in enumerate(logits):
            c = self.num_classes[t]
            known = targets[:, t] != self.null
            true = targets[known, t]
            top = predictions(out[known], self.null, k=TOP_K)  # (N, k); column 0 is the top-1
            self.pending[t].append(true * c + top[:, 0])
            self.pending_size[t] += true.shape[0]
            hit5 = (top == true[:, None]).any(dim=1)
            self.top5[t] += torch.bincount(true[hit5], minlength=c)
            self.bins[t] += calibration_bins(out, targets[:, t], self.null)
            if self.pending_size[t] >= MERGE_AT:
                self._merge(t)

    def _merge(self, t: int) -> None:
        if not self.pending[t]:
            return
        new = torch.cat(self.pending[t])
        keys = torch.cat([self.keys[t], new])
        counts = torch.cat([self.counts[t], torch.ones_like(new)])
        self.keys[t], self.counts[t] = _sum_by_key(keys, counts)
        self.pending[t], self.pending_size[t] = [], 0

    def reduce(self) -> None:
        """Sum the counts of every process (a no-op without ``torch.distributed``); call on all ranks."""
        for t in range(len(self.num_classes)):
            self._merge(t)
        if not (dist.is_available() and dist.is_initialized()):
            return
        for t in range(len(self.num_classes)):
            dist.all_reduce(self.top5[t])
            dist.all_reduce(self.bins[t])
            # every rank holds a different set of pairs: gather them all, then merge
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.keys[t].cpu(), self.counts[t].cpu()))
            device = self.keys[t].device
            keys = torch.cat([k for k, _ in gathered]).to(device)
            counts = torch.cat([n for _, n in gathered]).to(device)
            self.keys[t], self.counts[t] = _sum_by_key(keys, counts)

    def result(self) -> list[RankConfusion]:
        """The counts per rank as numpy arrays (after ``reduce`` when several processes evaluated)."""
        out = []
        for t, key in enumerate(self.task_keys):
            self._merge(t)
            c = self.num_classes[t]
            keys = self.keys[t].cpu().numpy()
            out.append(
                RankConfusion(
                    task_key=key,
                    num_classes=c,
                    true=keys // c,
                    pred=keys % c,
                    count=self.counts[t].cpu().numpy(),
                    top5_hits=self.top5[t].cpu().numpy(),
                    calibration=self.bins[t].cpu().numpy(),
                )
            )
        return out


def _sum_by_key(keys: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique keys and the summed count of each."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    return unique, torch.zeros_like(unique).index_add_(0, inverse, counts)
