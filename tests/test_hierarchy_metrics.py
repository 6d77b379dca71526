"""Hierarchy metrics against hand-computed values: hdist@5, ECE, consistency."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from linnaeus.data.taxonomy import Taxonomy
from linnaeus.metrics import (
    MetricAccumulator,
    calibration_bins,
    consistent_predictions,
    expected_calibration_error,
)


def two_genera() -> Taxonomy:
    """genus A (1) > a1..a4 (1-4); genus B (2) > b1..b3 (5-7)."""
    return Taxonomy(
        ["taxa_L20", "taxa_L10"],
        [np.array([0, 1, 2]), np.arange(8)],
        [["?", "A", "B"], ["?", "a1", "a2", "a3", "a4", "b1", "b2", "b3"]],
        [None, np.array([0, 1, 1, 1, 1, 2, 2, 2])],
    )


def ranked_logits(order: list[int], classes: int = 8) -> torch.Tensor:
    """Logits whose top predictions are ``order``, best first (the null class lowest)."""
    logits = torch.full((classes,), -10.0)
    for rank, c in enumerate(order):
        logits[c] = 5.0 - rank
    return logits


def test_hdist_at_5_by_hand():
    tax = two_genera()
    species = torch.stack(
        [
            ranked_logits([1, 2, 3, 5, 6, 4, 7]),  # truth a1: distances 0, 2, 2, 4, 4 -> 12 / 5
            ranked_logits([5, 1, 2, 3, 4]),  # truth a1: 4, 0, 2, 2, 2 -> 10 / 5
            ranked_logits([1, 2, 3, 4, 5]),  # truth unknown: not counted
        ]
    )
    genus = torch.stack([ranked_logits([1, 2], 3)] * 3)
    acc = MetricAccumulator(tax, torch.device("cpu"))
    acc.update([genus, species], torch.tensor([[1, 1], [1, 1], [1, 0]]))
    assert acc.compute()["hdist@5"] == pytest.approx(22 / 10)


def test_expected_calibration_error_by_hand():
    # top-1 probabilities 0.9 (right), 0.65 (wrong), 0.62 (right) over two real classes
    probs = torch.tensor([[0.0, 0.9, 0.1], [0.0, 0.65, 0.35], [0.0, 0.62, 0.38], [0.0, 0.5, 0.5]])
    logits = torch.log(probs.clamp_min(1e-30))
    targets = torch.tensor([1, 2, 1, 0])  # the last sample's label is unknown: not counted
    bins = calibration_bins(logits, targets, null_index=0)
    assert bins[0].sum() == 3 and bins[0, 13] == 1 and bins[0, 9] == 2  # 0.9 * 15 = 13.5; 0.6x * 15 = 9.x
    # bin 13: |1 - 0.9|; bin 9: accuracy 1/2, confidence 0.635
    want = (1 / 3) * abs(1 - 0.9) + (2 / 3) * abs(0.5 - 0.635)
    assert expected_calibration_error(bins) == pytest.approx(want)
    assert math.isnan(expected_calibration_error(torch.zeros(3, 15)))


def test_consistency_by_hand():
    tax = two_genera()
    genus = torch.tensor([1, 2, 1, 2])
    species = torch.tensor([2, 1, 7, 6])  # a2 in A: yes; a1 in B: no; b3 in A: no; b2 in B: yes
    assert consistent_predictions([genus, species], tax).tolist() == [True, False, False, True]
    # a class whose parent is unknown agrees with any genus
    orphan = Taxonomy(tax.task_keys, tax.class_ids, tax.names, [None, np.array([0, 1, 1, 1, 1, 2, 2, 0])])
    assert consistent_predictions([genus, torch.tensor([7, 7, 7, 7])], orphan).all()


def test_accumulator_reports_the_hierarchy_metrics_summed_over_batches():
    tax = two_genera()
    genus = torch.stack([ranked_logits([1, 2], 3), ranked_logits([2, 1], 3), ranked_logits([2, 1], 3)])
    species = torch.stack(
        [ranked_logits([1, 2, 3, 4, 5]), ranked_logits([1, 2, 3, 4, 5]), ranked_logits([6, 5, 7, 1, 2])]
    )
    targets = torch.tensor([[1, 1], [1, 1], [2, 6]])
    whole = MetricAccumulator(tax, torch.device("cpu"))
    whole.update([genus, species], targets)
    split = MetricAccumulator(tax, torch.device("cpu"))
    split.update([genus[:1], species[:1]], targets[:1])
    split.update([genus[1:], species[1:]], targets[1:])
    a, b = whole.compute(), split.compute()
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], nan_ok=True) for k in a)
    assert a["consistency"] == pytest.approx(2 / 3)  # the second sample predicts genus B over a1
    # distances: (0 + 2 + 2 + 2 + 4) twice for truth a1, (0 + 2 + 2 + 4 + 4) for truth b2
    assert a["hdist@5"] == pytest.approx((10 + 10 + 12) / 15)
    # every finest top-1 is right; confidences are softmax(5, 4, 3, 2, 1, -10, -10): 1 - conf each
    top = torch.softmax(torch.tensor([5.0, 4, 3, 2, 1, -10, -10]), 0)[0].item()
    assert a["ece"] == pytest.approx(1 - top)
