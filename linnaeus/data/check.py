"""Start-up image check: find missing and undecodable images (in parallel) and apply the policy."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from pathlib import Path

import numpy as np

from linnaeus.data.images import BadImageError, FolderImageStore, H5ImageStore
from linnaeus.data.labels import DatasetError

log = logging.getLogger(__name__)

_STORE: H5ImageStore | FolderImageStore | None = None


def _init_worker(store: H5ImageStore | FolderImageStore) -> None:
    global _STORE
    _STORE = store


def _check_chunk(chunk: list[tuple[int, int, str]]) -> list[tuple[int, str]]:
    bad = []
    for position, row, identifier in chunk:
        try:
            _STORE.read(row, identifier)
        except BadImageError as err:
            bad.append((position, str(err)))
    return bad


def find_bad_images(
    store: H5ImageStore | FolderImageStore,
    identifiers: np.ndarray,
    rows: np.ndarray,
    missing: np.ndarray | None = None,
    workers: int = 2,
) -> dict[int, str]:
    """Decode every image once; return {position: reason} for those that fail.

    ``missing`` marks identifiers that have no row in the images file at all.
    """
    bad: dict[int, str] = {}
    if missing is not None:
        for position in np.flatnonzero(missing):
            bad[int(position)] = (
                f"image {identifiers[position]!r} has no entry in {getattr(store, 'path', store)}"
            )
    todo = [(int(p), int(rows[p]), str(identifiers[p])) for p in range(len(identifiers)) if int(p) not in bad]
    chunk_size = max(1, min(256, len(todo) // max(1, workers * 4) + 1))
    chunks = [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]
    if workers <= 1 or len(todo) < 64:
        _init_worker(store)
        results = map(_check_chunk, chunks)
        for found in results:
            bad.update(found)
    else:
        with mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(store,)) as pool:
            for found in pool.imap_unordered(_check_chunk, chunks):
                bad.update(found)
    return dict(sorted(bad.items()))


def apply_bad_image_policy(
    bad: dict[int, str],
    identifiers: np.ndarray,
    *,
    policy: str,
    max_count: int,
    max_fraction: float,
    report_path: str | Path | None = None,
) -> np.ndarray:
    """Write the JSON report; raise or return a keep-mask according to ``policy`` (error | drop)."""
    n = len(identifiers)
    fraction = len(bad) / max(1, n)
    report = {
        "images": n,
        "bad": len(bad),
        "bad_fraction": fraction,
        "policy": policy,
        "bad_images": [{"identifier": str(identifiers[p]), "reason": reason} for p, reason in bad.items()],
    }
    if report_path is not None:
        Path(report_path).write_text(json.dumps(report, indent=1))
    keep = np.ones(n, dtype=bool)
    if not bad:
        return keep
    listed = "\n".join(f"  - {r['reason']}" for r in report["bad_images"][:20])
    more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
    where = f" (full list in {report_path})" if report_path else ""
    if policy == "error":
        raise DatasetError(
            f"{len(bad)} of {n} images are missing or undecodable{where}:\n{listed}{more}\n"
            "Fix or remove them (python -m linnaeus.data.verify DIR lists them), or set data.bad_images=drop "
            "to train without them."
        )
    if policy != "drop":
        raise ValueError(f"data.bad_images must be 'error' or 'drop', got {policy!r}")
    if len(bad) > max_count or fraction > max_fraction:
        raise DatasetError(
            f"{len(bad)} of {n} images ({fraction:.2%}) are missing or undecodable{where}, above the limits "
            f"data.max_bad_images={max_count} / data.max_bad_fraction={max_fraction}; this looks like a broken "
            f"dataset rather than a few bad files:\n{listed}{more}"
        )
    keep[list(bad)] = False
    log.warning("dropping %d missing or undecodable images%s", len(bad), where)
    return keep
