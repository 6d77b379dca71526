"""Batch samplers: coverage and padding across ranks, determinism, grouping invariants, resume."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from linnaeus.data.samplers import GroupedBatchSampler, RandomBatchSampler

BATCH = 8
KINDS = ["random", "strict-group", "mixed-pairs"]


def make_data() -> tuple[np.ndarray, np.ndarray]:
    """Dataset positions (deliberately not 0..n-1) and groups with sizes 1..13, plus unlabelled samples."""
    sizes = [13, 9, 7, 6, 5, 4, 3, 2, 1, 1]
    groups = np.concatenate([np.full(s, g) for g, s in enumerate(sizes)] + [np.full(11, -1)])
    rng = np.random.default_rng(0)
    groups = groups[rng.permutation(len(groups))]
    indices = np.sort(rng.choice(10_000, size=len(groups), replace=False))
    return indices, groups


def build(kind: str, rank: int = 0, world_size: int = 1, seed: int = 7, batch_size: int = BATCH):
    indices, groups = make_data()
    if kind == "random":
        return RandomBatchSampler(indices, batch_size, seed=seed, rank=rank, world_size=world_size)
    return GroupedBatchSampler(
        indices, groups, batch_size, mode=kind, seed=seed, rank=rank, world_size=world_size
    )


def epoch_batches(sampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def global_batch_count(kind: str, groups: np.ndarray, batch_size: int = BATCH) -> int:
    """Reference count of batches in one epoch's plan, before padding across ranks."""
    sizes = Counter(groups.tolist())
    if kind == "strict-group":
        return sum(math.ceil(s / batch_size) for s in sizes.values())
    num_pairs = sum(s // 2 for g, s in sizes.items() if g >= 0)
    return max(math.ceil(len(groups) / batch_size), math.ceil(num_pairs / (batch_size // 2)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_cover_every_sample_and_overlap_only_by_padding(kind: str, world_size: int) -> None:
    indices, groups = make_data()
    n = len(indices)
    per_rank = []
    for rank in range(world_size):
        sampler = build(kind, rank, world_size)
        batches = epoch_batches(sampler, 2)
        assert len(batches) == len(sampler)
        assert max(len(b) for b in batches) <= BATCH
        assert min(len(b) for b in batches) >= 1
        per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1

    counts = Counter(i for batches in per_rank for b in batches for i in b)
    assert set(counts) == set(indices.tolist())
    assert max(counts.values()) <= 2  # the plan is longer than world_size, so padding never repeats twice
    extra = sum(counts.values()) - n
    if kind == "random":
        assert len(per_rank[0]) == math.ceil(math.ceil(n / world_size) / BATCH)
        assert extra == (-n) % world_size
    else:
        num_batches = global_batch_count(kind, groups)
        assert len(per_rank[0]) == math.ceil(num_batches / world_size)
        # padding repeats whole batches: (-num_batches) % world_size of them, nothing else overlaps
        all_batches = Counter(tuple(b) for batches in per_rank for b in batches)
        repeated = [b for b, c in all_batches.items() if c == 2]
        assert len(all_batches) == num_batches
        assert len(repeated) == (-num_batches) % world_size
        assert extra == sum(len(b) for b in repeated)


@pytest.mark.parametrize("kind", KINDS)
def test_len_is_constant_and_matches_iteration_every_epoch(kind: str) -> None:
    sampler = build(kind, rank=1, world_size=3)
    assert [len(epoch_batches(sampler, e)) for e in range(6)] == [len(sampler)] * 6


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_and_epoch_repeat_other_epochs_and_seeds_differ(kind: str) -> None:
    first = epoch_batches(build(kind, seed=3), 4)
    assert epoch_batches(build(kind, seed=3), 4) == first
    assert epoch_batches(build(kind, seed=3), 5) != first
    assert epoch_batches(build(kind, seed=4), 4) != first


def test_random_order_is_a_shuffled_permutation() -> None:
    indices = np.arange(1000)
    sampler = RandomBatchSampler(indices, 32, seed=0)
    order = np.concatenate(epoch_batches(sampler, 0))
    assert np.array_equal(np.sort(order), indices)
    assert not np.array_equal(order, indices)
    # position and value of a uniform permutation are uncorrelated (sd of r is ~0.03 here)
    assert abs(np.corrcoef(order, indices)[0, 1]) < 0.15
    # ascending neighbours are about half of all neighbours in a random order
    assert 0.45 < np.mean(np.diff(order) > 0) < 0.55


def test_random_without_shuffle_deals_positions_round_robin() -> None:
    indices = np.arange(100, 110)
    shares = [
        sum(epoch_batches(RandomBatchSampler(indices, 2, seed=0, rank=r, world_size=3, shuffle=False), 0), [])
        for r in range(3)
    ]
    # 10 samples over 3 ranks: two samples of padding, the first two of the plan
    assert shares == [[100, 103, 106, 109], [101, 104, 107, 100], [102, 105, 108, 101]]


def test_tiny_plans_are_padded_cyclically() -> None:
    shares = [
        sum(epoch_batches(RandomBatchSampler(np.array([5]), 4, seed=0, rank=r, world_size=3), 0), [])
        for r in range(3)
    ]
    assert shares == [[5], [5], [5]]
    grouped = [
        epoch_batches(
            GroupedBatchSampler(
                np.array([5, 6]), np.array([0, 0]), 4, mode="strict-group", seed=0, rank=r, world_size=3
            ),
            0,
        )
        for r in range(3)
    ]
    assert [len(b) for b in grouped] == [1, 1, 1]
    assert all(sorted(b[0]) == [5, 6] for b in grouped)


def test_strict_group_batches_hold_one_group() -> None:
    indices, groups = make_data()
    group_of = dict(zip(indices.tolist(), groups.tolist()))
    batches = epoch_batches(build("strict-group"), 1)
    assert all(len({group_of[i] for i in b}) == 1 for b in batches)
    assert len(batches) == global_batch_count("strict-group", groups)
    # the unlabelled samples are trained on, in batches of their own
    unlabelled = [i for b in batches if group_of[b[0]] == -1 for i in b]
    assert sorted(unlabelled) == sorted(indices[groups == -1].tolist())
    singletons = [g for g, s in Counter(groups.tolist()).items() if s == 1]
    assert sum(1 for b in batches if group_of[b[0]] in singletons) == len(singletons) == 2


@pytest.mark.parametrize("world_size", [1, 2])
def test_strict_group_batch_order_is_shuffled_every_epoch_and_shared_by_ranks(world_size: int) -> None:
    indices, groups = make_data()
    group_of = dict(zip(indices.tolist(), groups.tolist()))
    orders = []
    for epoch in range(3):
        per_rank = [
            epoch_batches(build("strict-group", rank, world_size), epoch) for rank in range(world_size)
        ]
        # rank r holds batches r, r + W, ... of one global order: interleave them back
        merged = [b for batches in zip(*per_rank) for b in batches]
        orders.append([group_of[b[0]] for b in merged])
    for order in orders:
        first_seen = list(dict.fromkeys(order))
        assert first_seen != sorted(first_seen)  # not class 0's batches, then class 1's, ...
        # a group's batches are spread over the epoch, not all in one run
        runs = sum(1 for a, b in zip(order, order[1:]) if a != b) + 1
        assert runs > len(first_seen)
    assert orders[0] != orders[1] != orders[2]


def split_pairs(batch: list[int], group_of: dict[int, int]) -> tuple[list[tuple[int, int]], list[int]]:
    """Leading same-group pairs at (2i, 2i + 1), then the singletons."""
    k = 0
    while k + 1 < len(batch) and group_of[batch[k]] >= 0 and group_of[batch[k]] == group_of[batch[k + 1]]:
        k += 2
    return [(batch[i], batch[i + 1]) for i in range(0, k, 2)], batch[k:]


@pytest.mark.parametrize("batch_size", [2, 5, 8])
def test_mixed_pairs_structure(batch_size: int) -> None:
    indices, groups = make_data()
    group_of = dict(zip(indices.tolist(), groups.tolist()))
    sizes = Counter(groups.tolist())
    for epoch in range(3):
        batches = epoch_batches(build("mixed-pairs", batch_size=batch_size), epoch)
        assert len(batches) == global_batch_count("mixed-pairs", groups, batch_size)
        assert max(map(len, batches)) <= batch_size
        assert max(map(len, batches)) - min(map(len, batches)) <= 2
        pairs, singles = [], []
        for b in batches:
            p, s = split_pairs(b, group_of)
            pairs += p
            singles += s
        assert sorted([i for p in pairs for i in p] + singles) == sorted(indices.tolist())
        assert len(pairs) == sum(s // 2 for g, s in sizes.items() if g >= 0)
        # singletons: every unlabelled sample plus one leftover per odd-sized group
        single_groups = Counter(group_of[i] for i in singles)
        assert single_groups[-1] == sizes[-1]
        assert {g for g in single_groups if g >= 0} == {g for g, s in sizes.items() if g >= 0 and s % 2}
        assert all(c == 1 for g, c in single_groups.items() if g >= 0)


def test_mixed_pairs_pairing_changes_between_epochs() -> None:
    indices, groups = make_data()
    group_of = dict(zip(indices.tolist(), groups.tolist()))
    sampler = build("mixed-pairs")
    pairings = [
        {frozenset(p) for b in epoch_batches(sampler, e) for p in split_pairs(b, group_of)[0]}
        for e in range(2)
    ]
    assert pairings[0] != pairings[1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("epoch", [0, 3])
def test_resume_yields_the_tail_then_full_epochs(kind: str, epoch: int) -> None:
    reference = build(kind, rank=1, world_size=2)
    full = epoch_batches(reference, epoch)
    following = epoch_batches(reference, epoch + 1)
    n = len(reference)
    for start in [0, 1, n // 2, n]:
        sampler = build(kind, rank=1, world_size=2)
        sampler.load_state_dict({"epoch": epoch, "start_batch": start})
        assert sampler.state_dict() == {"epoch": epoch, "start_batch": start}
        sampler.set_epoch(epoch)
        assert list(sampler) == full[start:]
        assert sampler.state_dict() == {"epoch": epoch, "start_batch": n}
        assert list(sampler) == full  # the skip applies once
        assert epoch_batches(sampler, epoch + 1) == following


def test_resume_for_another_epoch_is_dropped_by_set_epoch() -> None:
    sampler = build("random")
    full = epoch_batches(build("random"), 1)
    sampler.load_state_dict({"epoch": 0, "start_batch": 2})
    assert epoch_batches(sampler, 1) == full
    assert sampler.state_dict() == {"epoch": 1, "start_batch": len(full)}


def test_invalid_arguments_raise() -> None:
    indices, groups = make_data()
    with pytest.raises(ValueError, match="strict-group, mixed-pairs"):
        GroupedBatchSampler(indices, groups, 4, mode="pairs", seed=0)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        GroupedBatchSampler(indices, groups, 1, mode="mixed-pairs", seed=0)
    with pytest.raises(ValueError, match="one per index"):
        GroupedBatchSampler(indices, groups[:-1], 4, mode="strict-group", seed=0)
    with pytest.raises(ValueError, match="-1 for no group"):
        GroupedBatchSampler(indices, groups - 2, 4, mode="strict-group", seed=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        RandomBatchSampler(indices, 0, seed=0)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        RandomBatchSampler(indices, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="non-empty"):
        RandomBatchSampler(np.array([], dtype=np.int64), 4, seed=0)
    sampler = RandomBatchSampler(indices, 4, seed=0)
    with pytest.raises(ValueError, match="start_batch"):
        sampler.load_state_dict({"epoch": 0, "start_batch": len(sampler) + 1})
