"""Start-up image check: find missing and undecodable images (in parallel) and apply the policy."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np

from linnaeus.data.images import BadImageError, FolderImageStore, H5ImageStore
from linnaeus.data.isolate import Crashed, isolated_map
from linnaeus.data.labels import DatasetError
from linnaeus.errors import OutputError, describe_write_error

log = logging.getLogger(__name__)


def _where(store: H5ImageStore | FolderImageStore, row: int, identifier: str) -> str:
    if isinstance(store, FolderImageStore):
        return str(store.path_of(identifier))
    return f"row {row} of {store.path}"


def _check_one(store: H5ImageStore | FolderImageStore, item: tuple[int, int, str]) -> str | None:
    """Decode one image with the loader's own decoder; the problem, or None when it is fine."""
    _, row, identifier = item
    try:
        store.read(row, identifier)
    except BadImageError as err:
        return str(err)
    return None


def find_bad_images(
    store: H5ImageStore | FolderImageStore,
    identifiers: np.ndarray,
    rows: np.ndarray,
    missing: np.ndarray | None = None,
    workers: int = 2,
    timeout: float = 300.0,
) -> dict[int, str]:
    """Decode every image once; return {position: reason} for those that fail.

    ``missing`` marks identifiers that have no row in the images file at all. Images are decoded in
    child processes (``isolated_map``): an image that crashes or hangs the native decoder is
    reported by name, and the check goes on with the others.
    """
    bad: dict[int, str] = {}
    if missing is not None:
        for position in np.flatnonzero(missing):
            bad[int(position)] = (
                f"image {identifiers[position]!r} has no entry in {getattr(store, 'path', store)}"
            )
    todo = [(int(p), int(rows[p]), str(identifiers[p])) for p in range(len(identifiers)) if int(p) not in bad]
    chunk_size = max(1, min(256, len(todo) // max(1, workers * 4) + 1))
    workers = max(1, min(workers, (len(todo) + 63) // 64))  # a process per 64 images at most
    results = isolated_map(
        partial(_check_one, store), todo, workers=workers, chunk_size=chunk_size, timeout=timeout
    )
    crashed = 0
    for index, result in results:
        position, row, identifier = todo[index]
        if isinstance(result, Crashed):
            bad[position] = (
                f"image {identifier!r} ({_where(store, row, identifier)}): {result.reason}; the file is damaged"
            )
            crashed += 1
        elif result is not None:
            bad[position] = result
    if crashed:
        log.warning("%d image(s) crashed or hung the image decoder; they are listed as bad", crashed)
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
        try:
            Path(report_path).write_text(json.dumps(report, indent=1))
        except OSError as err:
            raise OutputError(describe_write_error(err, report_path, "the image check report")) from err
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
