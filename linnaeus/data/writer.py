"""Writing ``labels.h5`` and ``images.h5`` in the schema the reader expects (see README, "Data").

Files are written to a temporary name next to the target and renamed into place, so an interrupted
build never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from linnaeus.data.encodings import (
    DEFAULT_ELEVATION_SCALES,
    encode_elevation,
    encode_spatial,
    encode_temporal,
)


@dataclass
class TaxonRow:
    taxon_id: int
    level: int
    parent_id: int  # 0 at the coarsest rank
    name: str


@dataclass
class RawMetadata:
    """Raw observation values, one per row; NaN (or empty date strings) where unknown."""

    lat: np.ndarray | None = None
    lon: np.ndarray | None = None
    day_of_year: np.ndarray | None = None
    hour: np.ndarray | None = None
    elevation: np.ndarray | None = None
    dates: list[str] | None = None
    elevation_scales: tuple[float, ...] = field(default=DEFAULT_ELEVATION_SCALES)


@contextmanager
def atomic_h5(path: Path):
    """An h5py file opened for writing under a temporary name, renamed to ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as h5:
            yield h5
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _strings(h5: h5py.Group, key: str, values: Iterable[str]) -> None:
    h5.create_dataset(key, data=np.array(list(values), dtype=object), dtype=h5py.string_dtype())


def write_labels_h5(
    path: str | Path,
    identifiers: list[str],
    taxa: dict[str, np.ndarray],
    *,
    taxonomy: list[TaxonRow] | None = None,
    raw: RawMetadata | None = None,
    split: np.ndarray | None = None,
    config: dict | None = None,
) -> dict[str, int]:
    """Write a labels file; returns the number of valid rows per metadata component.

    Args:
        identifiers: image file names (hybrid mode) or keys into ``images.h5``.
        taxa: ``taxa_L<level>`` -> (N,) taxon ids, 0 for unknown.
        taxonomy: every taxon with its level, parent and name (written as the ``taxonomy`` group).
        raw: raw metadata; each component present here is encoded with a validity mask.
        split: optional (N,) 0 = train, 1 = validation, to fix the split in the file.
        config: how the file was made (stored as JSON in ``metadata.attrs["config_json"]``).
    """
    n = len(identifiers)
    valid_counts: dict[str, int] = {}
    with atomic_h5(Path(path)) as h5:
        _strings(h5, "img_identifiers", identifiers)
        for key, ids in taxa.items():
            ids = np.asarray(ids)
            if ids.shape != (n,):
                raise ValueError(f"{key} has shape {ids.shape}, expected ({n},)")
            h5.create_dataset(key, data=ids.astype(np.uint32))
        if raw is not None:
            components = {}
            if raw.lat is not None and raw.lon is not None:
                components["spatial"] = encode_spatial(raw.lat, raw.lon)
                h5.create_dataset("raw_lat", data=np.asarray(raw.lat, dtype=np.float32))
                h5.create_dataset("raw_lon", data=np.asarray(raw.lon, dtype=np.float32))
            if raw.day_of_year is not None:
                components["temporal"] = encode_temporal(raw.day_of_year, raw.hour)
            if raw.dates is not None:
                _strings(h5, "raw_date_observed", raw.dates)
            if raw.elevation is not None:
                values, valid = encode_elevation(raw.elevation, raw.elevation_scales)
                components["elevation_main"] = (values, valid)
                h5.create_dataset("raw_elevation", data=np.asarray(raw.elevation, dtype=np.float32))
            for name, (values, valid) in components.items():
                ds = h5.create_dataset(name, data=values)
                if name.startswith("elevation_"):
                    ds.attrs["scales"] = np.asarray(raw.elevation_scales, dtype=np.float32)
                h5.create_dataset(f"validity/{name}", data=valid)
                valid_counts[name] = int(valid.sum())
        if taxonomy:
            group = h5.create_group("taxonomy")
            group.create_dataset("taxon_id", data=np.array([t.taxon_id for t in taxonomy], dtype=np.uint32))
            group.create_dataset("level", data=np.array([t.level for t in taxonomy], dtype=np.uint32))
            group.create_dataset("parent_id", data=np.array([t.parent_id for t in taxonomy], dtype=np.uint32))
            _strings(group, "name", [t.name for t in taxonomy])
        if split is not None:
            h5.create_dataset("split", data=np.asarray(split, dtype=np.uint8))
        h5.create_group("metadata").attrs["config_json"] = json.dumps(config or {}, sort_keys=True)
    return valid_counts


IMAGE_LAYOUTS = ("contiguous", "vlen")
_WRITE_BLOCK = 64 << 20  # bytes gathered before one HDF5 write


def write_images_h5(
    path: str | Path,
    identifiers: list[str] | None,
    images: Iterable[bytes | np.ndarray],
    *,
    layout: str = "contiguous",
) -> None:
    """Write encoded image bytes, one row per identifier, in the identifiers' order.

    ``layout="contiguous"`` (the default): dataset ``images`` (total_bytes,) uint8, contiguous (no chunks,
    no compression), the files back to back, and ``offsets`` (N + 1,) int64, row i being
    ``images[offsets[i]:offsets[i + 1]]``; readers memory-map it (see ``linnaeus.data.images``).
    ``layout="vlen"``: ``images`` (N,) variable-length uint8, as earlier versions wrote.
    ``identifiers=None`` writes no ``img_identifiers`` (rows then match the labels file by position).
    Images may come from a generator: contiguous bytes are spooled to a temporary file next to
    ``path`` first (their total size fixes the dataset's shape), so memory use stays bounded.
    """
    if layout not in IMAGE_LAYOUTS:
        raise ValueError(f"layout must be one of {IMAGE_LAYOUTS}, got {layout!r}")
    path = Path(path)
    n = None if identifiers is None else len(identifiers)
    with atomic_h5(path) as h5:
        if identifiers is not None:
            _strings(h5, "img_identifiers", identifiers)
        if layout == "vlen":
            rows = list(images) if n is None else images
            size = len(rows) if n is None else n
            ds = h5.create_dataset("images", (size,), dtype=h5py.vlen_dtype(np.uint8))
            count = 0
            for i, data in enumerate(rows):
                if i >= size:
                    raise ValueError(f"more images than the {n} identifiers")
                ds[i] = np.frombuffer(data, dtype=np.uint8)
                count += 1
        else:
            with tempfile.TemporaryFile(dir=path.parent, prefix=f".{path.name}.bytes-") as spool:
                offsets = [0]
                for data in images:
                    offsets.append(offsets[-1] + spool.write(memoryview(data).cast("B")))
                count = len(offsets) - 1
                if n is not None and count > n:
                    raise ValueError(f"more images than the {n} identifiers")
                ds = h5.create_dataset("images", (offsets[-1],), dtype=np.uint8)  # contiguous
                spool.seek(0)
                for start in range(0, offsets[-1], _WRITE_BLOCK):
                    block = np.frombuffer(spool.read(_WRITE_BLOCK), dtype=np.uint8)
                    ds[start : start + len(block)] = block
                h5.create_dataset("offsets", data=np.asarray(offsets, dtype=np.int64))
            ds.attrs["layout"] = "contiguous"
        if n is not None and count != n:
            raise ValueError(f"got {count} images for {n} identifiers")
