"""Epoch-seeded batch samplers: plain random, and grouped by class (``strict-group``, ``mixed-pairs``).

Both are batch samplers for ``DataLoader(batch_sampler=...)`` and are iterated in the main process.
Every rank rebuilds the same global epoch plan from ``np.random.default_rng([seed, epoch])``, so no
communication is needed; rank ``r`` then takes its disjoint share. Every sample is in every epoch's
plan. To give all ranks the same number of batches (DDP needs it), the plan is padded by repeating
its own beginning:

- ``RandomBatchSampler`` pads *samples*: ``(-n) % world_size`` samples, the first ones of the epoch's
  permutation, then rank ``r`` takes positions ``r::world_size`` and cuts them into batches.
- ``GroupedBatchSampler`` pads *batches*: ``(-num_batches) % world_size`` batches, the first ones of
  the epoch's shuffled batch list, then rank ``r`` takes batches ``r::world_size``.

Padding is repeated cyclically when the plan is shorter than ``world_size``. Batches are never
dropped; the last batch of a rank may be smaller than ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

GROUP_MODES = ("strict-group", "mixed-pairs")


def _check_common(indices: np.ndarray, batch_size: int, seed: int, rank: int, world_size: int) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or len(indices) == 0:
        raise ValueError(f"indices must be a non-empty 1-D array, got shape {indices.shape}")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {indices.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return indices


class _EpochSampler:
    """Epoch and resume bookkeeping shared by both samplers; subclasses build one rank's batches."""

    def __init__(
        self, indices: np.ndarray, batch_size: int, *, seed: int, rank: int, world_size: int
    ) -> None:
        self.indices = _check_common(indices, batch_size, seed, rank, world_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self._skip = 0  # batches the next __iter__ of self.epoch skips (one-shot)
        self._position = 0  # batches of self.epoch handed out so far, skipped ones included

    def _rank_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        """This rank's batches for one epoch, as arrays of positions into ``indices``."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan the next ``__iter__`` yields; a pending resume survives only
        when ``epoch`` is the resumed one."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self._skip = 0
            self._position = 0
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        """``{"epoch", "start_batch"}``: the current epoch and how many of its batches were handed out.

        The DataLoader prefetches, so mid-epoch this runs ahead of the batches actually trained on;
        a trainer checkpointing mid-epoch should store its own count of consumed batches.
        """
        return {"epoch": self.epoch, "start_batch": self._position}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next ``__iter__`` of ``state["epoch"]`` skips its first ``start_batch`` batches."""
        epoch, start = int(state["epoch"]), int(state["start_batch"])
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start <= len(self):
            raise ValueError(
                f"start_batch={start} is outside 0..{len(self)} (batches per epoch on this rank); "
                "did the dataset, batch size or world size change since the checkpoint?"
            )
        self.epoch = epoch
        self._skip = start
        self._position = start

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches(np.random.default_rng([self.seed, self.epoch]))
        start, self._skip = self._skip, 0
        for position in range(start, len(batches)):
            self._position = position + 1
            yield self.indices[batches[position]].tolist()


class RandomBatchSampler(_EpochSampler):
    """Uniformly shuffled batches (or the given order with ``shuffle=False``), split across ranks."""

    def __init__(
        self,
        indices: np.ndarray,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        super().__init__(indices, batch_size, seed=seed, rank=rank, world_size=world_size)
        self.shuffle = shuffle
        self._share = -(-len(self.indices) // self.world_size)  # samples per rank after padding

    def __len__(self) -> int:
        return -(-self._share // self.batch_size)

    def _rank_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        n = len(self.indices)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        order = order[np.arange(self._share * self.world_size) % n]  # pad with the first samples
        share = order[self.rank :: self.world_size]
        return [share[i : i + self.batch_size] for i in range(0, len(share), self.batch_size)]


class GroupedBatchSampler(_EpochSampler):
    """Batches built from groups (e.g. the classes of one rank); group ``-1`` means "no group".

    ``strict-group``: every batch holds one group. Each group is shuffled and cut into batches of at
    most ``batch_size``; the ``-1`` samples form a group of their own, so they are still trained on.

    ``mixed-pairs``: batches are made of same-group pairs. Each group is shuffled and its consecutive
    members paired; an odd leftover member and every ``-1`` sample are singletons. A batch lists its
    pairs first, at positions ``(2i, 2i + 1)``, then its singletons, so a mixing step can pair
    neighbours. Pairs and singletons are shuffled and spread evenly over the fewest batches that hold
    them, ``max(ceil(n / batch_size), ceil(num_pairs / (batch_size // 2)))``: unlike greedy packing in
    shuffled order, this count does not change between epochs (the trainer sizes its schedule from
    ``len()``), and batch sizes differ by at most 2.

    In both modes the batch list is shuffled globally and dealt round-robin over ranks.
    """

    def __init__(
        self,
        indices: np.ndarray,
        groups: np.ndarray,
        batch_size: int,
        *,
        mode: str,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(indices, batch_size, seed=seed, rank=rank, world_size=world_size)
        if mode not in GROUP_MODES:
            raise ValueError(f"unknown grouped sampler mode {mode!r}; valid modes: {', '.join(GROUP_MODES)}")
        groups = np.asarray(groups)
        if groups.shape != self.indices.shape:
            raise ValueError(f"groups has shape {groups.shape}, expected one per index {self.indices.shape}")
        if not np.issubdtype(groups.dtype, np.integer) or groups.min() < -1:
            raise ValueError("groups must be integer group ids >= 0, or -1 for no group")
        if mode == "mixed-pairs" and self.batch_size < 2:
            raise ValueError(f"mixed-pairs needs batch_size >= 2 to hold a pair, got {batch_size}")
        self.groups = groups.astype(np.int64)
        self.mode = mode

        _, sizes = np.unique(self.groups, return_counts=True)
        if mode == "strict-group":
            self._num_batches = int(np.sum(-(-sizes // self.batch_size)))
        else:
            self._pairs_per_batch, self._singles_per_batch = self._pack_plan()
            self._num_batches = len(self._pairs_per_batch)

    def __len__(self) -> int:
        return -(-self._num_batches // self.world_size)

    def _pack_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """Pairs and singletons per batch for mixed-pairs; depends only on the group sizes."""
        labelled = self.groups[self.groups >= 0]
        num_pairs = int(np.sum(np.bincount(labelled) // 2)) if len(labelled) else 0
        num_singles = len(self.groups) - 2 * num_pairs
        half = self.batch_size // 2
        num_batches = max(-(-len(self.groups) // self.batch_size), -(-num_pairs // half))

        pairs = np.full(num_batches, num_pairs // num_batches, dtype=np.int64)
        pairs[: num_pairs % num_batches] += 1
        # water-fill singletons: raise the smallest batches first, capped at batch_size
        taken = 2 * pairs
        for level in range(int(taken.min()), self.batch_size + 1):
            singles = np.clip(level - taken, 0, self.batch_size - taken)
            if singles.sum() >= num_singles:
                break
        at_level = np.flatnonzero((taken + singles == level) & (singles > 0))
        singles[at_level[: singles.sum() - num_singles]] -= 1
        return pairs, singles

    def _global_batches(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's batches in plan order, as a flat position array and batch boundaries."""
        n = len(self.groups)
        by_group = np.lexsort((rng.random(n), self.groups))  # grouped, random order within a group
        sorted_groups = self.groups[by_group]
        starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
        sizes = np.diff(np.r_[starts, n])
        within = np.arange(n) - np.repeat(starts, sizes)  # rank of each sample inside its group

        if self.mode == "strict-group":
            first_batch = np.cumsum(np.r_[0, -(-sizes // self.batch_size)])[:-1]
            batch_of = np.repeat(first_batch, sizes) + within // self.batch_size
            bounds = np.r_[0, np.cumsum(np.bincount(batch_of, minlength=self._num_batches))]
            return by_group, bounds

        paired = (sorted_groups >= 0) & (within < np.repeat(sizes - sizes % 2, sizes))
        pairs = by_group[paired].reshape(-1, 2)  # (num_pairs, 2), members of one group
        singles = by_group[~paired]
        pairs = pairs[rng.permutation(len(pairs))]
        singles = singles[rng.permutation(len(singles))]
        batch_ids = np.arange(self._num_batches)
        owner = np.r_[
            np.repeat(np.repeat(batch_ids, self._pairs_per_batch), 2),
            np.repeat(batch_ids, self._singles_per_batch),
        ]
        # a stable sort keeps each batch's pairs (adjacent, in order) ahead of its singletons
        flat = np.r_[pairs.ravel(), singles][np.argsort(owner, kind="stable")]
        bounds = np.r_[0, np.cumsum(2 * self._pairs_per_batch + self._singles_per_batch)]
        return flat, bounds

    def _rank_batches(self, rng: np.random.Generator) -> list[np.ndarray]:
        flat, bounds = self._global_batches(rng)
        # a fresh batch order every epoch, the same on every rank (one seed per epoch)
        order = rng.permutation(self._num_batches)
        order = order[np.arange(len(self) * self.world_size) % self._num_batches]  # pad with first batches
        return [flat[bounds[b] : bounds[b + 1]] for b in order[self.rank :: self.world_size]]
