"""Reading ``labels.h5``: identifiers, taxon ids per rank, metadata components and their validity.

Both our own files and files written for the predecessor project load. Everything is read into
memory as numpy arrays once, in the main process; images are read lazily elsewhere.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from linnaeus.errors import UserError

TAXA_PATTERN = re.compile(r"^taxa_L(\d+)$")
BUILD_HINT = "Build a dataset with `python -m linnaeus.data.build folder|csv ...` (see README)."


class DatasetError(UserError, ValueError):
    """A dataset file is missing, malformed or inconsistent; the message says what and how to fix it."""


@dataclass
class LabelTable:
    """The in-memory content of one ``labels.h5``."""

    path: Path
    identifiers: np.ndarray  # (N,) object array of str
    task_keys: list[str]  # coarse -> fine
    taxa: np.ndarray  # (N, T) int64 taxon ids, 0 = unknown
    meta: dict[str, np.ndarray] = field(default_factory=dict)  # component -> (N, D) float32
    meta_valid: dict[str, np.ndarray] = field(default_factory=dict)  # component -> (N,) bool
    taxonomy: dict[str, np.ndarray] | None = None  # taxon_id, level, parent_id, name
    split: np.ndarray | None = None  # (N,) uint8: 0 train, 1 val
    config: dict | None = None

    def __len__(self) -> int:
        return len(self.identifiers)

    @property
    def meta_dims(self) -> dict[str, int]:
        return {name: values.shape[1] for name, values in self.meta.items()}

    def subset(self, keep: np.ndarray) -> LabelTable:
        """Rows where ``keep`` is True (used to drop offending rows on request)."""
        return LabelTable(
            path=self.path,
            identifiers=self.identifiers[keep],
            task_keys=self.task_keys,
            taxa=self.taxa[keep],
            meta={k: v[keep] for k, v in self.meta.items()},
            meta_valid={k: v[keep] for k, v in self.meta_valid.items()},
            taxonomy=self.taxonomy,
            split=None if self.split is None else self.split[keep],
            config=self.config,
        )


def level_of(task_key: str) -> int:
    match = TAXA_PATTERN.match(task_key)
    if match is None:
        raise DatasetError(f"task key {task_key!r} is not of the form taxa_L<level>, e.g. taxa_L10")
    return int(match.group(1))


def _decode_strings(values: np.ndarray) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
    return out


def _read_1d(h5: h5py.File, key: str, n: int, path: Path) -> np.ndarray:
    data = h5[key]
    if not isinstance(data, h5py.Dataset):
        raise DatasetError(f"{path}: '{key}' must be a dataset, found a group")
    if data.ndim != 1:
        raise DatasetError(f"{path}: dataset '{key}' has shape {data.shape}; expected ({n},)")
    if data.shape[0] != n:
        raise DatasetError(
            f"{path}: dataset '{key}' has {data.shape[0]} rows but 'img_identifiers' has {n}; "
            "every dataset must have one row per image. Rebuild the file or fix the writer."
        )
    return data[()]


def _fallback_validity(values: np.ndarray) -> np.ndarray:
    """Validity for files without a ``validity`` group: finite and not all zeros.

    Every encoding we use lies on a circle or sphere, so an all-zero row cannot be a real value
    (latitude 0, longitude 0 encodes as (1, 0, 0)).
    """
    return np.isfinite(values).all(axis=1) & (np.abs(values).sum(axis=1) > 0)


def _open_labels(path: Path) -> h5py.File:
    """The labels file opened for reading, or an error that says how to make one."""
    if not path.is_file():
        raise DatasetError(
            f"labels file not found: {path}. Set data.labels to a labels.h5 file. {BUILD_HINT}"
        )
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(f"{path} is not a readable HDF5 file ({err}). Rebuild it. {BUILD_HINT}") from err


def _read_identifiers(h5: h5py.File, path: Path) -> np.ndarray:
    """The ``img_identifiers`` dataset as an (N,) object array of str."""
    if "img_identifiers" not in h5:
        raise DatasetError(f"{path}: required dataset 'img_identifiers' is missing. {BUILD_HINT}")
    ids_ds = h5["img_identifiers"]
    if ids_ds.ndim != 1:
        raise DatasetError(f"{path}: 'img_identifiers' has shape {ids_ds.shape}; expected (N,)")
    return _decode_strings(ids_ds[()])


def _select_task_keys(h5: h5py.File, task_keys: list[str] | None, path: Path) -> list[str]:
    """The ranks to read, coarse -> fine: those asked for, else every ``taxa_L*`` dataset in the file."""
    available = sorted((k for k in h5.keys() if TAXA_PATTERN.match(k)), key=level_of, reverse=True)
    if not available:
        raise DatasetError(
            f"{path}: no taxa_L<level> datasets found (e.g. taxa_L10 for species). {BUILD_HINT}"
        )
    if task_keys is None:
        return available
    missing = [k for k in task_keys if k not in available]
    if missing:
        raise DatasetError(
            f"{path}: data.task_keys asks for {missing}, which the file does not have; "
            f"available ranks: {available}"
        )
    return sorted(task_keys, key=level_of, reverse=True)


def _read_taxa(h5: h5py.File, task_keys: list[str], n: int, path: Path) -> np.ndarray:
    """The (N, T) int64 taxon ids of ``task_keys``, checked to be non-negative integers."""
    columns = []
    for key in task_keys:
        column = _read_1d(h5, key, n, path)
        if not np.issubdtype(column.dtype, np.integer):
            raise DatasetError(f"{path}: '{key}' has dtype {column.dtype}; taxon ids must be integers")
        if (column < 0).any():
            raise DatasetError(f"{path}: '{key}' holds negative taxon ids; 0 marks unknown, ids are > 0")
        columns.append(column.astype(np.int64))
    return np.stack(columns, axis=1)


def _select_meta_components(h5: h5py.File, meta_components: list[str] | None, path: Path) -> list[str]:
    """The metadata components to read: those asked for, else every one in the file."""
    names = [k for k in h5.keys() if k in ("spatial", "temporal") or k.startswith("elevation_")]
    if meta_components is None:
        return names
    missing = [k for k in meta_components if k not in names]
    if missing:
        raise DatasetError(
            f"{path}: data.meta_components asks for {missing}, which the file does not have; "
            f"available components: {sorted(names)}"
        )
    return list(meta_components)


def _read_component(h5: h5py.File, name: str, n: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One metadata component's (N, D) float32 values, zeroed where invalid, and its (N,) validity."""
    values = h5[name]
    if values.ndim != 2 or values.shape[0] != n:
        raise DatasetError(
            f"{path}: metadata '{name}' has shape {values.shape}; expected ({n}, D) with one row per image"
        )
    array = values[()].astype(np.float32)
    expected_width = {"spatial": (3,), "temporal": (2, 4)}.get(name)
    if expected_width is not None and array.shape[1] not in expected_width:
        raise DatasetError(f"{path}: '{name}' has {array.shape[1]} columns; expected one of {expected_width}")
    if "validity" in h5 and name in h5["validity"]:
        valid = _read_1d(h5["validity"], name, n, path).astype(bool)
        valid &= np.isfinite(array).all(axis=1)
    else:
        valid = _fallback_validity(array)
    array[~valid] = 0.0
    return array, valid


def _read_taxonomy(h5: h5py.File, path: Path) -> dict[str, np.ndarray]:
    """The ``taxonomy`` group: taxon_id, level and parent_id as int64, name as str."""
    group = h5["taxonomy"]
    needed = ("taxon_id", "level", "parent_id", "name")
    absent = [k for k in needed if k not in group]
    if absent:
        raise DatasetError(f"{path}: group 'taxonomy' lacks {absent}; it needs {list(needed)}")
    m = group["taxon_id"].shape[0]
    taxonomy = {k: group[k][()] for k in needed}
    bad = [k for k in needed if taxonomy[k].shape != (m,)]
    if bad:
        raise DatasetError(f"{path}: taxonomy datasets {bad} do not have {m} rows like 'taxon_id'")
    taxonomy["name"] = _decode_strings(taxonomy["name"])
    for key in ("taxon_id", "level", "parent_id"):
        taxonomy[key] = taxonomy[key].astype(np.int64)
    return taxonomy


def _read_config(h5: h5py.File) -> dict | None:
    """The build config stored as JSON in ``metadata``'s attributes; None when absent or unreadable."""
    if "metadata" in h5 and "config_json" in h5["metadata"].attrs:
        try:
            return json.loads(h5["metadata"].attrs["config_json"])
        except (TypeError, ValueError):
            return None
    return None


def read_labels(
    path: str | Path,
    task_keys: list[str] | None = None,
    meta_components: list[str] | None = None,
) -> LabelTable:
    """Read a labels file.

    Args:
        path: the ``labels.h5`` file.
        task_keys: ranks to use (``taxa_L*`` names); default every rank in the file. Returned
            ordered coarse -> fine whatever the order given.
        meta_components: metadata components to load; default all (``spatial``, ``temporal``,
            ``elevation_*``); an empty list loads none.
    """
    path = Path(path)
    with _open_labels(path) as h5:
        identifiers = _read_identifiers(h5, path)
        n = len(identifiers)
        task_keys = _select_task_keys(h5, task_keys, path)
        taxa = _read_taxa(h5, task_keys, n, path)
        meta, meta_valid = {}, {}
        for name in _select_meta_components(h5, meta_components, path):
            meta[name], meta_valid[name] = _read_component(h5, name, n, path)
        taxonomy = _read_taxonomy(h5, path) if "taxonomy" in h5 else None
        split = _read_1d(h5, "split", n, path).astype(np.uint8) if "split" in h5 else None
        config = _read_config(h5)
    return LabelTable(path, identifiers, list(task_keys), taxa, meta, meta_valid, taxonomy, split, config)
