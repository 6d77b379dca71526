"""Selective mixup/cutmix: same-group partners only, exact λ, whole metadata, the configured probability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from linnaeus.augment.mix import (
    NoMix,
    SelectiveMix,
    box_weights,
    build_mixer,
    cutmix_boxes,
    group_ids,
    mix_batch,
    same_group_partners,
)

NULL = 0
# finest-rank classes of a 16-sample batch; 0 = unknown. Same-group neighbour pairs at (0,1), (2,3),
# (14,15); classes 9 and 11 occur once.
GROUPS = [5, 5, 7, 7, 5, 3, 9, 0, 0, 7, 5, 11, 3, 0, 8, 8]


def make_batch(groups: list[int], size: int = 8, index_images: bool = False) -> dict:
    """Targets (B, 2) coarse → fine consistent with the finest class; metadata identifying its source.

    ``index_images``: every pixel of image i is i, so mixing can be read off the pixels.
    """
    gen = torch.Generator().manual_seed(0)
    n = len(groups)
    finest = torch.tensor(groups)
    genus = torch.where(finest == NULL, torch.randint(1, 4, (n,), generator=gen), (finest + 1) // 2)
    if index_images:
        images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, size, size).clone()
    else:
        images = torch.randn(n, 3, size, size, generator=gen)
    return {
        "images": images,
        "targets": torch.stack([genus, finest], 1),
        "meta": {"spatial": torch.randn(n, 3, generator=gen), "temporal": torch.randn(n, 2, generator=gen)},
        "meta_valid": {
            "spatial": torch.rand(n, generator=gen) > 0.3,
            "temporal": torch.rand(n, generator=gen) > 0.5,
        },
    }


def make_mixer(**overrides) -> SelectiveMix:
    args = dict(
        group_column=1,
        null_index=NULL,
        exclude_null=True,
        mixup_alpha=1.0,
        mixup_prob=1.0,
        cutmix_alpha=1.0,
        cutmix_prob=1.0,
        cutmix_minmax=None,
        switch_prob=0.5,
    )
    return SelectiveMix(**{**args, **overrides})


def run(mixer, batch: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return mixer(batch["images"], batch["targets"], batch["meta"], batch["meta_valid"], rng)


@pytest.mark.parametrize("op", ["mixup", "cutmix"])
def test_partners_share_the_group_and_nulls_are_never_mixed(op):
    batch = make_batch(GROUPS)
    on_off = (
        {"mixup_prob": 1.0, "cutmix_prob": 0.0} if op == "mixup" else {"mixup_prob": 0.0, "cutmix_prob": 1.0}
    )
    mixer = make_mixer(**on_off)
    finest = batch["targets"][:, 1]
    images = batch["images"]
    for seed in range(30):
        out = run(mixer, batch, seed)
        partner, lam, mixed = out["partner"], out["lam"], out["lam"] < 1
        assert torch.equal(out["targets_b"], batch["targets"][partner])
        assert torch.equal(batch["targets"][partner], batch["targets"])  # same class, so the whole path
        assert (
            not mixed[finest == NULL].any()
            and (partner[finest == NULL] == torch.nonzero(finest == NULL).flatten()).all()
        )
        assert lam[6] == 1.0 and lam[11] == 1.0  # alone in their class
        assert mixed[finest != NULL].sum() >= 8
        for a, b in ((0, 1), (2, 3), (14, 15)):  # the sampler's neighbours are preferred
            assert partner[a] == (b if mixed[a] else a) and partner[b] == (a if mixed[b] else b)
        if op == "mixup":
            expected = lam.view(-1, 1, 1, 1) * images + (1 - lam.view(-1, 1, 1, 1)) * images[partner]
            assert torch.allclose(out["images"], expected, atol=1e-6)
        else:  # every pixel is the sample's own or its partner's
            own, other = out["images"] == images, out["images"] == images[partner]
            assert (own | other).all()


def test_random_partner_is_any_other_member_of_the_group():
    groups = torch.tensor([4, 2, 4, 3, 4, 2, -1, 4])  # no same-group neighbour pairs
    seen = set()
    for seed in range(200):
        keys = torch.as_tensor(np.random.default_rng(seed).random(8))
        partner = same_group_partners(groups, keys)
        assert (groups[partner] == groups).all()
        assert partner[3] == 3 and partner[6] == 6  # alone in its group / never mixed
        assert (partner[groups == 4] != torch.nonzero(groups == 4).flatten()).all()
        seen.add(int(partner[0]))
    assert seen == {2, 4, 7}


def test_exclude_null_false_mixes_unknowns_only_with_identical_paths():
    targets = torch.tensor([[1, 0], [1, 0], [2, 0], [2, 5], [2, 5]])
    assert group_ids(targets, 1, NULL, exclude_null=True).tolist() == [-1, -1, -1, 5, 5]
    groups = group_ids(targets, 1, NULL, exclude_null=False)
    assert groups[0] == groups[1] and groups[2] not in (groups[0], 5) and groups[3] == groups[4] == 5


def test_metadata_is_taken_whole_from_the_source_with_the_larger_weight():
    batch = make_batch(GROUPS)
    mixer = make_mixer()
    for seed in range(30):
        out = run(mixer, batch, seed)
        source = torch.where(out["lam"] >= 0.5, torch.arange(len(GROUPS)), out["partner"])
        for name in batch["meta"]:
            assert torch.equal(out["meta"][name], batch["meta"][name][source])
            assert torch.equal(out["meta_valid"][name], batch["meta_valid"][name][source])


def test_mixup_with_lambda_one_is_the_identity():
    batch = make_batch(GROUPS)
    args = (batch["images"], batch["targets"], batch["meta"], batch["meta_valid"])
    partner = torch.tensor([1, 0, 3, 2, *range(4, len(GROUPS))])
    out = mix_batch(*args, partner, torch.ones(16, 1, 1, 1))
    assert torch.equal(out["images"], batch["images"])
    assert torch.equal(out["lam"], torch.ones(16))
    for name in batch["meta"]:
        assert torch.equal(out["meta"][name], batch["meta"][name])
        assert torch.equal(out["meta_valid"][name], batch["meta_valid"][name])
    out = mix_batch(*args, partner, torch.full((16, 1, 1, 1), 0.25))  # a quarter own, the rest the partner's
    assert torch.allclose(out["images"][0], 0.25 * batch["images"][0] + 0.75 * batch["images"][1])
    assert torch.equal(out["meta"]["spatial"][0], batch["meta"]["spatial"][1])


@pytest.mark.parametrize("minmax", [None, (0.2, 0.9)])
def test_cutmix_lambda_is_the_kept_area_fraction(minmax):
    batch = make_batch(GROUPS, size=13, index_images=True)
    mixer = make_mixer(mixup_prob=0.0, cutmix_minmax=minmax)
    own = torch.arange(16, dtype=torch.float32).view(-1, 1, 1)
    checked = 0
    for seed in range(40):
        out = run(mixer, batch, seed)
        kept = (out["images"][:, 0] == own).float().mean(dim=(1, 2))
        assert torch.allclose(out["lam"], kept, atol=1e-6)
        checked += int((out["lam"] < 1).sum())
    assert checked > 100
    # boxes clipped at the border: λ is still the exact kept area
    boxes = cutmix_boxes(np.array([0.1, 0.5, 0.9, 0.99]), 10, 7, np.random.default_rng(0))
    area = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) / 70
    weights = box_weights(torch.as_tensor(boxes), 10, 7)
    assert np.allclose(weights.mean(dim=(1, 2, 3)).numpy(), 1 - area)


def within_binomial(count: int, trials: int, p: float) -> bool:
    return abs(count - trials * p) <= 4.5 * math.sqrt(trials * p * (1 - p)) + 1


@pytest.mark.parametrize(
    ("mixup_prob", "cutmix_prob", "switch_prob"),
    [(0.3, 0.0, 0.5), (0.0, 0.6, 0.5), (0.2, 0.8, 0.25), (0.5, 0.5, 0.5)],
)
def test_mixing_frequency_matches_the_configured_per_batch_probability(mixup_prob, cutmix_prob, switch_prob):
    batch = make_batch([1, 1, 2, 2], size=4, index_images=True)
    mixer = make_mixer(mixup_prob=mixup_prob, cutmix_prob=cutmix_prob, switch_prob=switch_prob)
    own = torch.arange(4, dtype=torch.float32).view(-1, 1)
    trials, mixups, cutmixes = 1500, 0, 0
    for step in range(trials):
        out = run(mixer, batch, step)
        mixed = out["lam"] < 1
        if mixed.any():
            keeps_own_pixels = (out["images"][:, 0].flatten(1) == own).any(1)
            cutmixes += int(keeps_own_pixels[mixed].all())
            mixups += int(not keeps_own_pixels[mixed].any())
    expect_cut = switch_prob * cutmix_prob if mixup_prob > 0 else cutmix_prob
    expect_mix = (1 - switch_prob) * mixup_prob if cutmix_prob > 0 else mixup_prob
    assert mixer.batch_prob == pytest.approx(expect_cut + expect_mix)
    assert within_binomial(cutmixes, trials, expect_cut), (cutmixes, expect_cut)
    assert within_binomial(mixups, trials, expect_mix), (mixups, expect_mix)


def test_mixing_is_seeded_and_reproducible():
    batch = make_batch(GROUPS)
    mixer = make_mixer()
    a, b, c = run(mixer, batch, 7), run(mixer, batch, 7), run(mixer, batch, 8)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["lam"], b["lam"])
    assert not torch.equal(a["lam"], c["lam"])


def aug_cfg(**overrides):
    cfg = OmegaConf.create(
        {
            "mixup": {"alpha": 0.8, "prob": 0.0},
            "cutmix": {"alpha": 1.0, "prob": 0.0, "minmax": None},
            "switch_prob": 0.5,
            "group_rank": None,
            "exclude_null": True,
        }
    )
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_build_mixer_is_the_identity_when_off_and_checks_its_keys():
    keys = ["genus", "species"]
    mixer = build_mixer(aug_cfg(), keys, NULL)
    assert isinstance(mixer, NoMix)
    out = mixer(torch.zeros(2, 3, 4, 4), torch.ones(2, 2, dtype=torch.long), {}, {}, np.random.default_rng(0))
    assert (
        out["targets_b"] is None
        and out["lam"] is None
        and torch.equal(out["images"], torch.zeros(2, 3, 4, 4))
    )
    mixer = build_mixer(aug_cfg(**{"mixup.prob": 0.4, "group_rank": "genus"}), keys, NULL)
    assert mixer.group_column == 0 and mixer.batch_prob == pytest.approx(0.4)
    with pytest.raises(ValueError, match="augmentation.group_rank='family'"):
        build_mixer(aug_cfg(**{"mixup.prob": 0.4, "group_rank": "family"}), keys, NULL)
    with pytest.raises(ValueError, match="augmentation.cutmix.prob"):
        build_mixer(aug_cfg(**{"cutmix.prob": 1.5}), keys, NULL)
