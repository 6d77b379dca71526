"""Seeded, stratified train/validation split, persisted so a resumed or re-run job reuses it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from linnaeus.data.labels import DatasetError


def stratified_split(strata: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..N-1 so each stratum (e.g. species index) keeps about ``val_fraction`` in val.

    A stratum with a single sample stays in train; any stratum with two or more puts at least
    one sample in validation when ``val_fraction > 0``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        rng.shuffle(members)
        n_val = int(round(val_fraction * len(members)))
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val.append(members[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    train_mask = np.ones(len(strata), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


def load_or_make_split(
    path: Path | None,
    identifiers: np.ndarray,
    strata: np.ndarray,
    val_fraction: float,
    seed: int,
    presplit: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Train/val positions: from ``path`` when it exists, else from the file's split or a fresh split.

    The persisted file stores validation identifiers, so it stays valid when rows are reordered;
    it is rejected when it names identifiers the dataset no longer has.
    """
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        position = {name: i for i, name in enumerate(identifiers.tolist())}
        unknown = [name for name in saved["val_identifiers"] if name not in position]
        if unknown:
            raise DatasetError(
                f"{path} lists {len(unknown)} validation images that are not in the dataset (e.g. {unknown[:3]}); "
                "the dataset changed since this run started. Start a new run (another name= or output directory)."
            )
        val_idx = np.sort(np.array([position[name] for name in saved["val_identifiers"]], dtype=np.int64))
        mask = np.ones(len(identifiers), dtype=bool)
        mask[val_idx] = False
        return np.flatnonzero(mask), val_idx
    if presplit is not None:
        train_idx, val_idx = np.flatnonzero(presplit == 0), np.flatnonzero(presplit == 1)
        source = "file"
    else:
        train_idx, val_idx = stratified_split(strata, val_fraction, seed)
        source = "stratified"
    if path is not None:
        record = {
            "source": source,
            "val_fraction": val_fraction,
            "seed": seed,
            "train": int(len(train_idx)),
            "val": int(len(val_idx)),
            "val_identifiers": identifiers[val_idx].tolist(),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
    return train_idx, val_idx
