"""Losses: taxonomy-aware smoothing, soft labels, HXE, null masking, mixing, class weights, GradNorm."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from linnaeus.checkpoint import load_checkpoint
from linnaeus.config import register_configs
from linnaeus.data.taxonomy import Taxonomy
from linnaeus.logger import read_metrics
from linnaeus.losses import build_loss
from linnaeus.losses.gradnorm import GradNorm, gradnorm_loss
from linnaeus.losses.hierarchy import (
    hierarchical_cross_entropy,
    lca_distance,
    soft_label_targets,
    taxonomy_smoothing_targets,
)
from linnaeus.losses.multitask import class_weights_from_counts, null_start_step, weighted_mean
from tests.conftest import REPO

E = math.exp


def toy_taxonomy() -> Taxonomy:
    """order O1 (1) > genus G1 (1) > species s1 (1), s2 (2); O1 > G2 (2) > s3 (3); O2 (2) > G3 (3) > s4 (4)."""
    return Taxonomy(
        ["taxa_L30", "taxa_L20", "taxa_L10"],
        [np.array([0, 1, 2]), np.array([0, 11, 12, 13]), np.array([0, 21, 22, 23, 24])],
        [["?", "O1", "O2"], ["?", "G1", "G2", "G3"], ["?", "s1", "s2", "s3", "s4"]],
        [None, np.array([0, 1, 1, 2]), np.array([0, 1, 1, 2, 3])],
    )


def synthetic_taxonomy(num_species: int, branching: int = 10, seed: int = 0) -> Taxonomy:
    """Four ranks; every class has a random parent among ~num/branching classes of the rank above."""
    rng = np.random.default_rng(seed)
    sizes = [max(2, num_species // branching**k) for k in (3, 2, 1, 0)]
    parents = [None]
    for t in range(1, 4):
        parents.append(np.concatenate([[0], rng.integers(1, sizes[t - 1] + 1, sizes[t])]))
    return Taxonomy(
        [f"taxa_L{40 - 10 * t}" for t in range(4)],
        [np.arange(n + 1) for n in sizes],
        [["?"] + [str(i) for i in range(1, n + 1)] for n in sizes],
        parents,
    )


def loss_config(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides)).loss


def random_batch(tax: Taxonomy, batch: int, seed: int = 0, null_share: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    species = torch.randint(1, tax.num_classes[-1], (batch,), generator=gen)
    targets = torch.as_tensor(tax.ancestors[-1])[species]  # (B, T), consistent with the tree
    targets[torch.rand(targets.shape, generator=gen) < null_share] = tax.null_index
    logits = [torch.randn(batch, n, generator=gen, requires_grad=True) for n in tax.num_classes]
    return logits, targets


LOSS_OPTIONS = sorted(p.stem for p in (REPO / "conf" / "loss").glob("*.yaml"))


@pytest.mark.parametrize("name", LOSS_OPTIONS)
def test_every_loss_option_composes_and_builds(name):
    cfg = loss_config(f"loss={name}")
    assert cfg.name == name
    tax = toy_taxonomy()
    logits, targets = random_batch(tax, 4)
    total, per_task = build_loss(cfg, tax)(logits, targets)
    assert per_task.shape == (3,) and torch.isfinite(total) and total.item() > 0
    assert total.item() == pytest.approx(per_task.sum().item(), rel=1e-6)


def test_a_mistyped_loss_key_fails_with_its_name():
    with pytest.raises(Exception, match="gradnrom"):
        loss_config("loss.gradnrom.enabled=true")


# ---------------------------------------------------------------------- distances and targets
def test_lca_distance_matches_the_taxonomy_and_treats_null_ancestors_as_unshared():
    tax = synthetic_taxonomy(500)
    targets = torch.arange(1, 40)
    for t in range(tax.num_tasks):
        anc = torch.as_tensor(tax.ancestors[t])
        classes = torch.arange(1, tax.num_classes[t])
        got = lca_distance(anc, targets % (tax.num_classes[t] - 1) + 1, 0)[:, 1:]
        want = tax.distance(t, (targets % (tax.num_classes[t] - 1) + 1)[:, None], classes[None, :])
        assert torch.equal(got.long(), want)
    # s1 -> s1, s2 (sibling), s3 (same order), s4 (nothing shared)
    d = lca_distance(torch.as_tensor(toy_taxonomy().ancestors[2]), torch.tensor([1]), 0)
    assert d[0, 1:].tolist() == [0, 2, 4, 6]
    # species under an unknown genus: their null ancestors are not a shared ancestor
    anc = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 3]])  # (C, L): classes 1 and 2 have a null parent
    assert lca_distance(anc, torch.tensor([1]), 0)[0].tolist() == [4, 0, 4, 4]


def test_taxonomy_smoothing_by_hand_on_the_toy_tree():
    anc = torch.as_tensor(toy_taxonomy().ancestors[2])
    q = taxonomy_smoothing_targets(anc, torch.tensor([1, 3]), alpha=0.1, beta=1.0, null_index=0)
    z = E(-2) + E(-4) + E(-6)
    assert q[0].tolist() == pytest.approx([0.0, 0.9, 0.1 * E(-2) / z, 0.1 * E(-4) / z, 0.1 * E(-6) / z])
    z3 = 2 * E(-4) + E(-6)  # s3: s1 and s2 share the order only, s4 nothing
    assert q[1].tolist() == pytest.approx([0.0, 0.1 * E(-4) / z3, 0.1 * E(-4) / z3, 0.9, 0.1 * E(-6) / z3])
    # coarsest rank: uniform over the other classes
    q0 = taxonomy_smoothing_targets(
        torch.as_tensor(toy_taxonomy().ancestors[0]), torch.tensor([1]), 0.2, 5.0, 0
    )
    assert q0[0].tolist() == pytest.approx([0.0, 0.8, 0.2])


def test_taxonomy_smoothing_invariants_on_a_large_tree():
    tax = synthetic_taxonomy(2000)
    anc = torch.as_tensor(tax.ancestors[3])
    targets = torch.randint(1, tax.num_classes[3], (16,))
    q = taxonomy_smoothing_targets(anc, targets, alpha=0.1, beta=1.0, null_index=0)
    assert torch.allclose(q.sum(1), torch.ones(16))
    assert torch.allclose(q[torch.arange(16), targets], torch.full((16,), 0.9))
    assert (q[:, 0] == 0).all()
    d = lca_distance(anc, targets, 0)
    for row in range(16):  # a closer class always gets more mass than a farther one
        others = torch.ones(q.shape[1], dtype=torch.bool)
        others[0] = others[targets[row]] = False
        sibling, distant = (d[row] == 2) & others, d[row] == 8
        if sibling.any():
            assert q[row][sibling].min() > q[row][distant].max()


def test_no_dense_class_by_class_matrix_for_10k_species():
    tax = synthetic_taxonomy(10_000)
    anc = torch.as_tensor(tax.ancestors[3])
    start = time.perf_counter()
    q = taxonomy_smoothing_targets(anc, torch.randint(1, 10_001, (8,)), 0.1, 1.0, 0)
    assert time.perf_counter() - start < 0.5  # a 10k x 10k matrix alone would take longer and 400 MB
    assert q.shape == (8, 10_001)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["loss.taxonomy_smoothing.alpha=1.5"],
            r"set it in \(0, 1\), e.g. loss.taxonomy_smoothing.alpha=0.1",
        ),
        (["loss.taxonomy_smoothing.alpha=0.1", "loss.label_smoothing=0.1"], "either loss.label_smoothing or"),
        (["loss.task_weights=[1.0,2.0]"], "loss.task_weights has 2 values but there are 3 ranks"),
        (["loss.task_weights=[1.0,1.0,1.0]", "loss.gradnorm.enabled=true"], "exclude each other"),
        (["loss.class_weights.enabled=true"], "needs the training class counts"),
    ],
)
def test_contradictory_loss_settings_are_refused_naming_the_keys(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_loss(loss_config(*overrides), toy_taxonomy())


def test_alpha_zero_is_plain_cross_entropy():
    tax = toy_taxonomy()
    logits, targets = random_batch(tax, 6)
    smoothed = build_loss(
        loss_config("loss.taxonomy_smoothing.enabled=true", "loss.taxonomy_smoothing.alpha=1e-12"), tax
    )
    total, per_task = smoothed(logits, targets)
    plain = [F.cross_entropy(out, targets[:, t]) for t, out in enumerate(logits)]
    assert torch.allclose(per_task, torch.stack(plain), atol=1e-6)
    assert torch.allclose(total, sum(plain), atol=1e-5)
    total_ce, _ = build_loss(loss_config(), tax)(logits, targets)
    assert torch.allclose(total_ce, sum(plain))
    q = taxonomy_smoothing_targets(torch.as_tensor(tax.ancestors[2]), targets[:, 2], 0.0, 1.0, 0)
    assert torch.equal(q, F.one_hot(targets[:, 2], 5).float())


def test_alpha_alone_turns_taxonomy_smoothing_on_and_enabled_without_alpha_fails():
    tax = toy_taxonomy()
    logits, targets = random_batch(tax, 4)
    on = build_loss(loss_config("loss.taxonomy_smoothing.alpha=0.1"), tax)
    anc = torch.as_tensor(tax.ancestors[2])
    q = taxonomy_smoothing_targets(anc, targets[:, 2], 0.1, 1.0, 0)
    want = -(q * F.log_softmax(logits[2], 1)).sum(1).mean()
    assert torch.allclose(on(logits, targets)[1][2], want)
    with pytest.raises(ValueError, match="alpha"):
        build_loss(loss_config("loss.taxonomy_smoothing.enabled=true"), tax)
    with pytest.raises(ValueError, match="loss.name"):
        build_loss(loss_config("loss.name=focal"), tax)


def test_soft_labels_by_hand():
    anc = torch.as_tensor(toy_taxonomy().ancestors[2])
    q = soft_label_targets(anc, torch.tensor([1]), beta=1.0, null_index=0)
    # the paper's distance: LCA height / tree height = hops / (2 x 3 ranks): 0, 1/3, 2/3, 1
    z = 1 + E(-1 / 3) + E(-2 / 3) + E(-1)
    assert q[0].tolist() == pytest.approx([0.0, 1 / z, E(-1 / 3) / z, E(-2 / 3) / z, E(-1) / z])
    # beta = 30 from the paper: a sibling keeps e^-10 of the true class's mass, whatever the depth
    q30 = soft_label_targets(anc, torch.tensor([1]), beta=30.0, null_index=0)
    assert (q30[0, 2] / q30[0, 1]).item() == pytest.approx(E(-10), rel=1e-4)
    tax = toy_taxonomy()
    logits, targets = random_batch(tax, 3)
    loss_fn = build_loss(loss_config("loss=soft_labels", "loss.soft_labels.beta=1.0"), tax)
    _, per_task = loss_fn(logits, targets)
    q = soft_label_targets(anc, targets[:, 2], 1.0, 0)
    assert torch.allclose(per_task[2], -(q * F.log_softmax(logits[2], 1)).sum(1).mean())
    assert torch.allclose(per_task[0], F.cross_entropy(logits[0], targets[:, 0]))  # coarser: plain CE


def test_hierarchical_cross_entropy_by_hand():
    anc = torch.as_tensor(toy_taxonomy().ancestors[2])
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5, -1.0]])
    p = torch.softmax(logits, 1)[0].tolist()
    species, genus, order = p[1], p[1] + p[2], p[1] + p[2] + p[3]
    alpha = 0.5
    # each edge of the true path weighted by exp(-alpha * its depth below the root): order 1, genus 2, species 3
    want = -(
        E(-3 * alpha) * math.log(species / genus)
        + E(-2 * alpha) * math.log(genus / order)
        + E(-alpha) * math.log(order)
    )
    got = hierarchical_cross_entropy(logits, torch.tensor([1]), anc, alpha, 0)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # target s4 (O2 > G3 > s4): its genus and order hold s4 alone
    got4 = hierarchical_cross_entropy(logits, torch.tensor([4]), anc, alpha, 0)
    assert got4.item() == pytest.approx(-E(-alpha) * math.log(p[4]), rel=1e-5)
    # alpha = 0 telescopes to plain cross-entropy
    targets = torch.tensor([1, 2, 3, 4])
    many = torch.randn(4, 5)
    assert torch.allclose(
        hierarchical_cross_entropy(many, targets, anc, 0.0, 0),
        F.cross_entropy(many, targets, reduction="none"),
    )


def half_mass_logits(true: int, other: int, classes: int = 5) -> torch.Tensor:
    """Logits of a prediction with half of the mass on ``true`` and half on ``other``."""
    probs = torch.full((1, classes), 1e-9)
    probs[0, true] = probs[0, other] = 0.5
    return probs.log()


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 2.0])
def test_hxe_makes_far_mistakes_cost_more_than_near_ones(alpha):
    # toy tree: s1, s2 siblings in G1; s3 in G2 (same order O1); s4 in another order
    anc = torch.as_tensor(toy_taxonomy().ancestors[2])
    target = torch.tensor([1])
    cost = {
        other: hierarchical_cross_entropy(half_mass_logits(1, other), target, anc, alpha, 0).item()
        for other in (2, 3, 4)
    }
    assert cost[2] < cost[3] < cost[4]  # sibling < same order, other genus < other order
    # the distance-weighted property holds against cross-entropy too: CE is blind to where the mass goes
    ce = [F.cross_entropy(half_mass_logits(1, other), target).item() for other in (2, 3, 4)]
    assert max(ce) - min(ce) < 1e-6


def test_soft_label_distance_matches_taxonomy_distance_normalised():
    tax = synthetic_taxonomy(300)
    anc = torch.as_tensor(tax.ancestors[3])
    targets = torch.arange(1, 30)
    q = soft_label_targets(anc, targets, beta=4.0, null_index=0)
    d = tax.distance(3, targets[:, None], torch.arange(tax.num_classes[3])[None, :]).float() / (2 * 4)
    want = torch.softmax(-4.0 * d[:, 1:], dim=1)
    assert torch.allclose(q[:, 1:], want, atol=1e-6)


def test_taxonomy_distance_and_lca_distance_agree_with_unknown_ancestors():
    # family F1 > (unknown genus) > species a, b; F1 > genus G1 > c; family F2 > G2 > d
    tax = Taxonomy(
        ["taxa_L30", "taxa_L20", "taxa_L10"],
        [np.array([0, 1, 2]), np.array([0, 11, 12]), np.array([0, 21, 22, 23, 24])],
        [["?", "F1", "F2"], ["?", "G1", "G2"], ["?", "a", "b", "c", "d"]],
        [None, np.array([0, 1, 2]), np.array([0, 0, 0, 1, 2])],
    )
    anc = torch.as_tensor(tax.ancestors[2])
    pairs = torch.cartesian_prod(torch.arange(1, 5), torch.arange(1, 5))
    by_taxonomy = tax.distance(2, pairs[:, 0], pairs[:, 1])
    by_loss = lca_distance(anc, pairs[:, 0], 0)[torch.arange(len(pairs)), pairs[:, 1]]
    assert torch.equal(by_taxonomy.long(), by_loss.long())
    a, b = torch.tensor([1]), torch.tensor([2])
    # a and b hang below an unknown genus, so no known ancestor is recorded for them: an unknown
    # ancestor is never shared, and they are as far apart as the tree allows (before: 2, "siblings")
    assert tax.ancestors[2][1].tolist()[:2] == [0, 0]
    assert tax.distance(2, a, b).item() == 6
    assert tax.distance(2, torch.tensor([3]), torch.tensor([4])).item() == 6  # different families
    assert tax.distance(2, torch.tensor([3]), torch.tensor([3])).item() == 0


def test_hxe_loss_config_acts_on_the_finest_rank_only():
    tax = toy_taxonomy()
    logits, targets = random_batch(tax, 5)
    _, per_task = build_loss(loss_config("loss=hxe", "loss.hxe.alpha=0.3"), tax)(logits, targets)
    anc = torch.as_tensor(tax.ancestors[2])
    assert torch.allclose(
        per_task[2], hierarchical_cross_entropy(logits[2], targets[:, 2], anc, 0.3, 0).mean()
    )
    assert torch.allclose(per_task[1], F.cross_entropy(logits[1], targets[:, 1]))


# ---------------------------------------------------------------------- null, mixing, class weights
@pytest.mark.parametrize(
    "overrides",
    [(), ("loss.taxonomy_smoothing.alpha=0.1",), ("loss=soft_labels",), ("loss=hxe",)],
    ids=["ce", "smoothing", "soft_labels", "hxe"],
)
def test_null_rows_contribute_nothing_and_mixing_with_lam_one_is_unmixed(overrides):
    tax = toy_taxonomy()
    loss_fn = build_loss(loss_config(*overrides), tax)
    logits, targets = random_batch(tax, 8, null_share=0.3)
    targets[0] = 0  # a fully unknown sample
    total, per_task = loss_fn(logits, targets)
    total.backward()
    assert (logits[2].grad[targets[:, 2] == 0] == 0).all()  # null rows get no gradient
    known = targets[:, 2] != 0
    _, subset = loss_fn([out[known] for out in logits], targets[known])
    assert torch.allclose(per_task[2], subset[2])
    targets_b = targets.flip(0)
    mixed_total, mixed = loss_fn(logits, targets, targets_b, torch.ones(8))
    assert torch.allclose(mixed, per_task) and torch.allclose(mixed_total, total)
    _, other = loss_fn(logits, targets_b, targets, torch.ones(8))
    assert torch.allclose(loss_fn(logits, targets, targets_b, torch.zeros(8))[1], other)


def test_mixed_pair_is_the_lam_weighted_per_sample_loss_with_null_per_side():
    tax = toy_taxonomy()
    loss_fn = build_loss(loss_config(), tax)
    logits = [torch.randn(2, n) for n in tax.num_classes]
    a = torch.tensor([[1, 1, 1], [2, 3, 4]])
    b = torch.tensor([[1, 2, 3], [1, 0, 0]])  # second sample: side b unknown below the order
    lam = torch.tensor([0.7, 0.4])
    _, per_task = loss_fn(logits, a, b, lam)
    ce = [F.cross_entropy(logits[2], t, reduction="none") for t in (a[:, 2], b[:, 2])]
    want = (0.7 * ce[0][0] + 0.3 * ce[1][0] + 0.4 * ce[0][1]) / (0.7 + 0.3 + 0.4)
    assert per_task[2].item() == pytest.approx(want.item(), rel=1e-5)
    assert weighted_mean(torch.tensor([float("nan")]), torch.zeros(1), torch.zeros(1)).item() == 0.0


def test_class_weights_are_normalised_and_applied_once():
    counts = np.array([50, 10, 30, 60])  # null first
    w = class_weights_from_counts(counts, power=1.0, null_index=0)
    assert w[0] == 1.0
    assert (counts[1:] * w[1:]).sum() / counts[1:].sum() == pytest.approx(1.0)
    assert w[1] > w[2] > w[3] and w[1] / w[3] == pytest.approx(6.0)
    assert class_weights_from_counts(counts, 0.0, 0).tolist() == [1.0, 1.0, 1.0, 1.0]
    tax = toy_taxonomy()
    class_counts = [np.array([0, 30, 10]), np.array([0, 20, 10, 10]), np.array([5, 10, 10, 10, 10])]
    loss_fn = build_loss(
        loss_config("loss.class_weights.enabled=true", "loss.class_weights.power=1"), tax, class_counts
    )
    logits, targets = random_batch(tax, 6)
    _, per_task = loss_fn(logits, targets)
    w0 = torch.as_tensor(class_weights_from_counts(class_counts[0], 1.0, 0), dtype=torch.float32)
    ce0 = F.cross_entropy(logits[0], targets[:, 0], reduction="none")
    assert torch.allclose(per_task[0], (w0[targets[:, 0]] * ce0).mean())
    assert torch.allclose(per_task[2], F.cross_entropy(logits[2], targets[:, 2]))  # balanced: all weights 1


def test_null_class_schedule_switches_at_the_configured_step():
    assert null_start_step(None, 100) is None
    assert null_start_step(0.25, 100) == 25
    assert null_start_step(7, None) == 7
    with pytest.raises(ValueError, match="fraction"):
        null_start_step(0.5, None)
    tax = toy_taxonomy()
    loss_fn = build_loss(loss_config("loss.null.include_after=0.5"), tax, total_steps=6)
    logits, targets = random_batch(tax, 8, null_share=0.4)
    known = targets[:, 1] != 0
    masked = F.cross_entropy(logits[1][known], targets[known, 1])
    for step, want in ((0, masked), (2, masked), (3, F.cross_entropy(logits[1], targets[:, 1]))):
        loss_fn.set_step(step)
        assert torch.allclose(loss_fn(logits, targets)[1][1], want), step


# ---------------------------------------------------------------------- GradNorm
def test_gradnorm_loss_pulls_norms_towards_the_relative_training_rates():
    weights = torch.ones(2, requires_grad=True)
    loss = gradnorm_loss(weights, torch.tensor([1.0, 1.0]), torch.tensor([0.2, 1.0]), alpha=1.0)
    (grad,) = torch.autograd.grad(loss, weights)
    # mean G = 1, r = (1/3, 5/3): |1 - 1/3| + |1 - 5/3|
    assert loss.item() == pytest.approx(4 / 3)
    assert grad[0] > 0 > grad[1]  # gradient descent lowers the fast task's weight


def test_gradnorm_moves_weights_towards_the_slower_task_and_keeps_their_sum():
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 4)
    heads = torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in range(2))
    x = torch.randn(64, 4)
    y = [3 * x[:, :1], torch.sin(3 * x[:, 1:2]) * 2]  # task 0 is linear: learned fast; task 1 is not
    params = list(shared.parameters()) + list(heads.parameters())
    opt = torch.optim.SGD(params, lr=0.05)
    gradnorm = GradNorm(2, alpha=1.5, lr=0.05, update_every=1)
    for step in range(60):
        z = shared(x)
        losses = torch.stack([F.mse_loss(h(z), t) for h, t in zip(heads, y)])
        assert gradnorm.update(step, losses, list(shared.parameters()))
        opt.zero_grad()
        (gradnorm.weights.detach().clone() * losses).sum().backward()
        opt.step()
        assert gradnorm.weights.sum().item() == pytest.approx(2.0, abs=1e-5)
    ratios = losses.detach() / gradnorm.initial_losses
    assert ratios[0] < ratios[1]  # task 0 did learn faster
    assert gradnorm.weights[1] > 1.2 > 0.8 > gradnorm.weights[0]
    # the state (weights, initial losses, Adam moments) round-trips through a state_dict
    again = GradNorm(2, alpha=1.5, lr=0.05, update_every=1)
    again.load_state_dict(gradnorm.state_dict())
    assert torch.equal(again.weights, gradnorm.weights)
    assert torch.equal(again.initial_losses, gradnorm.initial_losses)
    assert again.optimizer.state_dict()["state"][0]["step"] == 60


def test_gradnorm_updates_only_every_n_steps():
    gradnorm = GradNorm(2, alpha=1.0, lr=0.1, update_every=3)
    w = torch.nn.Parameter(torch.ones(2))
    ran = [gradnorm.update(s, torch.stack([(w**2).sum(), 3 * w.sum()]), [w]) for s in range(6)]
    assert ran == [True, False, False, True, False, False]


# ---------------------------------------------------------------------- the real command line
FAST = ["debug=fast", "model=mformer_xs", "logger.wandb.mode=disabled", "logger.plots=false"]


def run_train(run_dir: Path, *overrides: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, "train.py", *FAST, f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.parametrize(
    "overrides",
    [
        ("loss.taxonomy_smoothing.enabled=true", "loss.taxonomy_smoothing.alpha=0.1"),
        ("loss=soft_labels",),
        ("loss=hxe",),
        ("loss.gradnorm.enabled=true",),
    ],
    ids=["taxonomy_smoothing", "soft_labels", "hxe", "gradnorm"],
)
def test_cli_runs_each_loss(tmp_path, demo_cache, overrides):
    run_train(tmp_path / "run", *overrides)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] > 0 for r in train)
    val = [r for r in records if "val/hdist@5" in r][-1]
    assert val["step"] == 6 and math.isfinite(val["val/loss"])
    weights = [[v for k, v in r.items() if k.startswith("train/task_weight/")] for r in train]
    assert all(len(w) == 4 and sum(w) == pytest.approx(4.0, abs=1e-4) for w in weights)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints/last.pt")
    if "loss.gradnorm.enabled=true" in overrides:
        assert any(abs(v - 1.0) > 1e-4 for v in weights[-1])  # the weights moved
        assert ckpt["loss"]["task_weights.weights"].tolist() == pytest.approx(weights[-1], abs=1e-6)
        # resuming from step 3 restores the weights, their Adam state and initial losses: same end state
        resumed = tmp_path / "resumed"
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copy(tmp_path / "run" / "checkpoints/step_00000003.pt", resumed / "checkpoints")
        shutil.copy(tmp_path / "run" / "split.json", resumed)
        run_train(resumed, *overrides)
        again = load_checkpoint(resumed / "checkpoints/last.pt")
        assert again["train_state"]["step"] == 6
        assert all(torch.equal(again["loss"][k], v) for k, v in ckpt["loss"].items() if torch.is_tensor(v))
        assert all(torch.equal(again["model"][k], v) for k, v in ckpt["model"].items())
    else:
        assert all(w == [1.0] * 4 for w in weights)


class TwoTaskToy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Linear(4, 4)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.shared(x)
        return [head(z) for head in self.heads]


def _ddp_gradnorm_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(TwoTaskToy())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gradnorm = GradNorm(2, alpha=1.5, lr=0.05, update_every=2)
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(rank))  # each rank its own data
    y = [3 * x[:, :1], torch.sin(3 * x[:, 1:2]) * (1 + rank)]
    for step in range(10):
        losses = torch.stack([F.mse_loss(out, t) for out, t in zip(model(x), y)])
        gradnorm.update(step, losses, list(model.module.shared.parameters()))
        opt.zero_grad()
        (gradnorm.weights.detach().clone() * losses).sum().backward()
        opt.step()
    weights = [torch.zeros(2) for _ in range(world)]
    dist.all_gather(weights, gradnorm.weights.detach())
    params = [torch.zeros(4) for _ in range(world)]
    dist.all_gather(params, model.module.shared.bias.detach())
    torch.save({"weights": weights, "params": params}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_gradnorm_with_ddp_gives_every_rank_the_same_weights(tmp_path):
    torch.multiprocessing.spawn(
        _ddp_gradnorm_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    out = torch.load(tmp_path / "rank0.pt")
    w0, w1 = out["weights"]
    assert torch.equal(w0, w1) and (w0 - 1).abs().max() > 0.05  # moved, identically on both ranks
    assert w0.sum().item() == pytest.approx(2.0, abs=1e-5)
    assert torch.equal(*out["params"])  # DDP still synchronised the model after autograd.grad


@pytest.mark.slow
def test_gradnorm_cli_under_two_process_ddp(tmp_path, demo_cache):
    run = tmp_path / "ddp"
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    proc = run_train(run, "loss.gradnorm.enabled=true", launcher=launcher)
    assert proc.returncode == 0  # torchrun returns 0 only when both ranks finished
    final = load_checkpoint(run / "checkpoints/last.pt")
    assert final["train_state"]["step"] == 6
    weights = final["loss"]["task_weights.weights"]
    assert weights.sum().item() == pytest.approx(4.0, abs=1e-5) and (weights - 1).abs().max() > 1e-4
    train = [r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    logged = [train[-1][f"train/task_weight/{k}"] for k in final["taxonomy"]["task_keys"]]
    assert logged == pytest.approx(weights.tolist(), abs=1e-6)
