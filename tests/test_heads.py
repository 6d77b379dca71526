"""Heads: hierarchical softmax sums and consistency, conditional routing, gradients to every level, and the
per-task head selection through build_model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from linnaeus.data.taxonomy import Taxonomy
from linnaeus.models import build_model
from linnaeus.models.heads import (
    ConditionalClassifierHead,
    HierarchicalSoftmaxHead,
    LinearHead,
    build_heads,
    grouped_log_softmax,
    route,
)
from linnaeus.models.heads.conditional import HARD_EPS
from tests.test_models import META_DIMS, NUM_CLASSES, load_cfg

FEATURES = 16


def make_parents(num_classes: list[int]) -> list[np.ndarray | None]:
    """A tree over ``num_classes``: real classes spread over the coarser real classes, the null class under
    null, and the last class of the finest rank an orphan (its parent unknown: null)."""
    parents: list[np.ndarray | None] = [None]
    for coarse, fine in zip(num_classes[:-1], num_classes[1:]):
        parent = np.array([0] + [1 + (i % (coarse - 1)) for i in range(fine - 1)])
        parents.append(parent)
    parents[-1][-1] = 0
    return parents


def make_taxonomy(num_classes: list[int], offset: int = 0) -> Taxonomy:
    keys = ["taxa_L40", "taxa_L30", "taxa_L20", "taxa_L10"][: len(num_classes)]
    ids = [np.arange(n) * (1 if i == 0 else 100 + offset) for i, n in enumerate(num_classes)]
    names = [[f"{k}_{i}" for i in range(n)] for k, n in zip(keys, num_classes)]
    return Taxonomy(keys, ids, names, make_parents(num_classes))


PARENTS = make_parents(NUM_CLASSES)


def confident_heads(kind: str, seed: int = 0, **kwargs) -> torch.nn.ModuleList:
    """Heads with large weights, so predictions are peaked (as after training)."""
    torch.manual_seed(seed)
    heads = build_heads(FEATURES, NUM_CLASSES, parents=PARENTS, head=kind, **kwargs)
    with torch.no_grad():
        for head in heads:
            head.fc.weight.mul_(150.0)
    return heads


def test_grouped_log_softmax_matches_a_per_group_loop_and_survives_extreme_scores():
    g = torch.Generator().manual_seed(0)
    groups = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0])
    scores = torch.randn(3, 8, generator=g) * 5
    scores[0, 4] = 1e4  # another group's huge score must not underflow group 0
    out = grouped_log_softmax(scores, groups, 3)
    for group in range(3):
        members = groups == group
        assert torch.allclose(out[:, members], F.log_softmax(scores[:, members], dim=1), atol=1e-5)
    assert torch.isfinite(out).all()


def test_hsoftmax_coarse_probabilities_are_sums_of_children_including_the_null_leaves():
    heads = confident_heads("hsoftmax")
    features = torch.randn(64, FEATURES)
    log_probs = heads(features)
    for t, lp in enumerate(log_probs):
        assert lp.shape == (64, NUM_CLASSES[t])
        assert torch.allclose(lp.exp().sum(dim=1), torch.ones(64), atol=1e-5)
    for t in range(1, len(NUM_CLASSES)):
        real, null_leaves = heads[t].tree_log_probs(features, log_probs[t - 1])
        children = torch.zeros(64, NUM_CLASSES[t - 1]).index_add(
            1, torch.as_tensor(PARENTS[t][1:]), real.exp()
        )
        assert torch.allclose(children + null_leaves.exp(), log_probs[t - 1].exp(), atol=1e-5)
        assert torch.allclose(log_probs[t][:, 0].exp(), null_leaves.exp().sum(dim=1), atol=1e-5)
        # every real class is at most as likely as its parent (orphans: their parent is null)
        parent_probs = log_probs[t - 1].exp()[:, PARENTS[t][1:]]
        assert (log_probs[t].exp()[:, 1:] <= parent_probs + 1e-6).all()


def ancestor_agreement(log_probs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows whose finest prediction is a real class with p > 1/2: (rows, does every coarser argmax equal
    the predicted class's ancestor). The walk stops at a null ancestor (an orphan's unknown parent): null at
    rank t collects the null leaves of every coarser class, so it has no single ancestor above it."""
    probs = [lp.softmax(dim=1) for lp in log_probs]
    best, pred = probs[-1].max(dim=1)
    rows = (best > 0.5) & (pred != 0)
    agree = torch.ones_like(rows)
    node, known = pred, torch.ones_like(rows)
    for t in range(len(probs) - 1, 0, -1):
        node = torch.as_tensor(PARENTS[t])[node]
        agree &= (probs[t - 1].argmax(dim=1) == node) | ~known
        known &= node != 0
    return rows, agree


def test_hsoftmax_predictions_are_consistent_across_ranks_and_linear_ones_are_not():
    features = torch.randn(512, FEATURES, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rows, agree = ancestor_agreement(confident_heads("hsoftmax")(features))
        linear_rows, linear_agree = ancestor_agreement(confident_heads("linear")(features))
    assert rows.sum() > 100 and linear_rows.sum() > 100
    assert agree[rows].all()  # p(ancestor) >= p(class) > 1/2, so the ancestor is every rank's argmax
    assert linear_agree[linear_rows].float().mean() < 0.5  # independent heads disagree with the tree


def test_conditional_head_differs_from_linear_and_routes_the_coarse_prediction():
    torch.manual_seed(0)
    features = torch.randn(8, FEATURES)
    conditional = build_heads(FEATURES, NUM_CLASSES, parents=PARENTS, head="conditional", routing="hard")
    linear = build_heads(FEATURES, NUM_CLASSES, parents=PARENTS, head="linear")
    for lin, cond in zip(linear, conditional):
        lin.fc.load_state_dict(cond.fc.state_dict())
    with torch.no_grad():
        out, ref = conditional(features), linear(features)
    assert torch.equal(out[0], ref[0])  # the coarsest rank has nothing to condition on
    for t in range(1, len(NUM_CLASSES)):
        # hard routing: children of the predicted parent (and null) keep their logits, the others get log(eps)
        chosen = out[t - 1].argmax(dim=1, keepdim=True)
        is_child = torch.as_tensor(PARENTS[t])[None, :] == chosen
        is_child[:, 0] = True
        expected = torch.where(is_child, 0.0, float(np.log(HARD_EPS)))
        assert torch.allclose(out[t] - ref[t], expected, atol=1e-4)


def test_routing_modes_soft_gumbel_hard_with_temperature():
    torch.manual_seed(0)
    logits = torch.randn(4, 6)
    probs, log_probs = route(logits, "soft", 2.0, training=True)
    assert torch.allclose(probs, torch.softmax(logits / 2.0, dim=1)) and torch.allclose(
        log_probs.exp(), probs
    )
    sample_a, _ = route(logits, "gumbel", 0.5, training=True)
    sample_b, _ = route(logits, "gumbel", 0.5, training=True)
    assert not torch.allclose(sample_a, sample_b) and torch.allclose(sample_a.sum(1), torch.ones(4))
    assert torch.equal(route(logits, "gumbel", 0.5, training=False)[0], route(logits, "soft", 0.5, False)[0])
    hard, _ = route(logits.requires_grad_(), "hard", 1.0, training=True)
    assert torch.allclose(hard.detach(), F.one_hot(logits.argmax(1), 6).float(), atol=1e-6)
    (hard * torch.arange(6.0)).sum().backward()  # straight-through: the soft distribution's gradient
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="soft"):
        route(logits, "bogus", 1.0, training=True)


@pytest.mark.parametrize(
    "kind, routing",
    [("hsoftmax", "soft"), ("conditional", "soft"), ("conditional", "gumbel"), ("conditional", "hard")],
)
def test_finest_loss_reaches_every_level(kind, routing):
    heads = build_heads(FEATURES, NUM_CLASSES, parents=PARENTS, head=kind, routing=routing).train()
    torch.manual_seed(0)
    logits = heads(torch.randn(8, FEATURES))
    F.cross_entropy(logits[-1], torch.arange(8) % NUM_CLASSES[-1]).backward()
    for t, head in enumerate(heads):
        assert head.fc.weight.grad is not None and head.fc.weight.grad.abs().sum() > 0, t
    if kind == "conditional":
        assert all(heads[t].context.grad.abs().sum() > 0 for t in range(1, len(NUM_CLASSES)))

    linear = build_heads(FEATURES, NUM_CLASSES, head="linear")
    F.cross_entropy(linear(torch.randn(8, FEATURES))[-1], torch.zeros(8, dtype=torch.long)).backward()
    assert linear[0].fc.weight.grad is None  # independent heads: no path from the finest loss


def test_head_per_task_by_task_key_index_or_list_through_build_model():
    taxonomy = make_taxonomy(NUM_CLASSES)

    def kinds(**overrides) -> list[type]:
        model = build_model(load_cfg(**overrides), NUM_CLASSES, META_DIMS, taxonomy)
        return [type(head) for head in model.heads]

    assert kinds(head_per_task={"taxa_L10": "hsoftmax"}) == [LinearHead] * 3 + [HierarchicalSoftmaxHead]
    assert kinds(head="conditional", head_per_task={0: "linear", -1: "hsoftmax"}) == [
        LinearHead,
        ConditionalClassifierHead,
        ConditionalClassifierHead,
        HierarchicalSoftmaxHead,
    ]
    assert kinds(head_per_task=["linear", "hsoftmax", "conditional", "linear"])[1:3] == [
        HierarchicalSoftmaxHead,
        ConditionalClassifierHead,
    ]
    with pytest.raises(ValueError, match="model.head_per_task.taxa_L99"):
        kinds(head_per_task={"taxa_L99": "hsoftmax"})
    with pytest.raises(ValueError, match="taxonomy"):
        build_model(load_cfg(head="hsoftmax"), NUM_CLASSES, META_DIMS)  # parent maps needed
    with pytest.raises(ValueError, match="conditional"):
        build_model(load_cfg(head="softmaxx"), NUM_CLASSES, META_DIMS, taxonomy)


@pytest.mark.parametrize("kind", ["conditional", "hsoftmax"])
def test_model_with_hierarchical_heads_trains_every_parameter(kind):
    torch.manual_seed(0)
    cfg = OmegaConf.merge(load_cfg(), {"head": kind})
    model = build_model(cfg, NUM_CLASSES, META_DIMS, make_taxonomy(NUM_CLASSES)).train()
    logits = model(torch.randn(2, 3, 32, 32))
    assert [tuple(t.shape) for t in logits] == [(2, n) for n in NUM_CLASSES]
    sum(F.cross_entropy(t, torch.tensor([1, 2])) for t in logits).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
