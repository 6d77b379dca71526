"""Shared fixtures: small real HDF5 datasets and a session-wide demo dataset cache."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def png_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_h5_dataset(
    directory: Path,
    taxa: dict[str, list[int]],
    *,
    identifiers: list[str] | None = None,
    images: list[bytes] | None = None,
    spatial: np.ndarray | None = None,
    validity: dict[str, np.ndarray] | None = None,
    taxonomy: list[tuple[int, int, int, str]] | None = None,
) -> Path:
    """Write labels.h5 (+ images.h5 of solid-colour PNGs) with raw h5py, as any writer might."""
    directory.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(taxa.values())))
    identifiers = identifiers or [f"img_{i:04d}.png" for i in range(n)]
    with h5py.File(directory / "labels.h5", "w") as h5:
        h5.create_dataset(
            "img_identifiers", data=np.array(identifiers, dtype=object), dtype=h5py.string_dtype()
        )
        for key, values in taxa.items():
            h5.create_dataset(key, data=np.asarray(values, dtype=np.uint32))
        if spatial is not None:
            h5.create_dataset("spatial", data=spatial.astype(np.float32))
        for name, valid in (validity or {}).items():
            h5.create_dataset(f"validity/{name}", data=valid.astype(bool))
        if taxonomy is not None:
            ids, levels, parents, names = zip(*taxonomy)
            h5.create_dataset("taxonomy/taxon_id", data=np.array(ids, dtype=np.uint32))
            h5.create_dataset("taxonomy/level", data=np.array(levels, dtype=np.uint32))
            h5.create_dataset("taxonomy/parent_id", data=np.array(parents, dtype=np.uint32))
            h5.create_dataset("taxonomy/name", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
    if images is None:
        rng = np.random.default_rng(0)
        images = [png_bytes(tuple(int(c) for c in rng.integers(0, 255, 3))) for _ in range(n)]
    with h5py.File(directory / "images.h5", "w") as h5:
        h5.create_dataset(
            "img_identifiers", data=np.array(identifiers, dtype=object), dtype=h5py.string_dtype()
        )
        ds = h5.create_dataset("images", (n,), dtype=h5py.vlen_dtype(np.uint8))
        for i, data in enumerate(images):
            ds[i] = np.frombuffer(data, dtype=np.uint8)
    return directory


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """One demo dataset for the whole test session (LINNAEUS_CACHE points the configs at it)."""
    from linnaeus.data.demo import ensure_demo_dataset

    cache = Path(os.environ.get("LINNAEUS_TEST_CACHE", tmp_path_factory.mktemp("cache")))
    ensure_demo_dataset(cache)
    os.environ["LINNAEUS_CACHE"] = str(cache)
    return cache


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs mounted for the test (a real full disk); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
        )
    except OSError:
        proc = None
    if proc is None or proc.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
