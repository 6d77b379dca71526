import math

import numpy as np
import pytest
import torch

from linnaeus.data.taxonomy import Taxonomy
from linnaeus.metrics import MetricAccumulator
from linnaeus.schedule import lr_multiplier


def test_warmup_then_cosine_is_a_pure_function_of_step():
    kw = dict(total_steps=110, warmup_steps=10, min_ratio=0.1)
    values = [lr_multiplier(s, **kw) for s in range(110)]
    assert values[0] == pytest.approx(1 / 11)
    assert values[9] == pytest.approx(10 / 11)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr_multiplier(110, **kw) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert lr_multiplier(60, name="linear", **kw) == pytest.approx(0.55)
    assert lr_multiplier(60, name="constant", **kw) == 1.0


def tiny_taxonomy() -> Taxonomy:
    # genus A (1) -> species 1, 2; genus B (2) -> species 3
    return Taxonomy(
        ["taxa_L20", "taxa_L10"],
        [np.array([0, 1, 2]), np.array([0, 10, 11, 20])],
        [["?", "A", "B"], ["?", "a1", "a2", "b1"]],
        [None, np.array([0, 1, 1, 2])],
    )


def one_hot_logits(indices, classes):
    logits = torch.full((len(indices), classes), -5.0)
    logits[torch.arange(len(indices)), torch.tensor(indices)] = 5.0
    return logits


def test_metrics_top1_chain_and_mistake_severity():
    tax = tiny_taxonomy()
    targets = torch.tensor([[1, 1], [1, 2], [2, 3], [1, 0]])  # last sample: species unknown
    genus_pred = one_hot_logits([1, 1, 1, 1], 3)  # third wrong
    species_pred = one_hot_logits([1, 1, 3, 2], 4)  # second wrong (sibling, distance 2)
    acc = MetricAccumulator(tax, torch.device("cpu"))
    acc.update([genus_pred, species_pred], targets)
    m = acc.compute()
    assert m["top1/taxa_L20"] == pytest.approx(3 / 4)
    assert m["top1/taxa_L10"] == pytest.approx(2 / 3)  # the null-labelled sample does not count
    assert m["top5/taxa_L10"] == 1.0
    assert m["chain_accuracy"] == pytest.approx(1 / 3)  # of the 3 fully labelled, only the first is all right
    assert m["mistake_severity"] == pytest.approx(2.0)
    # a prediction in the other genus is a worse mistake
    acc = MetricAccumulator(tax, torch.device("cpu"))
    acc.update([genus_pred, one_hot_logits([3, 3, 3, 1], 4)], targets)
    assert acc.compute()["mistake_severity"] == pytest.approx(4.0)


def test_null_class_is_never_predicted():
    tax = tiny_taxonomy()
    logits = one_hot_logits([0, 0], 4)  # the null logit is the largest
    logits[:, 2] = 1.0
    acc = MetricAccumulator(tax, torch.device("cpu"))
    acc.update([one_hot_logits([1, 1], 3), logits], torch.tensor([[1, 2], [1, 2]]))
    assert acc.compute()["top1/taxa_L10"] == 1.0
    assert math.isnan(MetricAccumulator(tax, torch.device("cpu")).compute()["top1/taxa_L10"])
