"""When a DataLoader worker dies: name the image it was reading and say how to find and fix it.

A damaged image can crash the native decoder (a segmentation fault in libpng), which kills the worker
process; PyTorch then raises ``RuntimeError: DataLoader worker (pid 123) is killed by signal:
Segmentation fault`` in the training loop, without saying which file. ``install_crash_trace`` makes
every dataset record, in shared memory, which image each worker is decoding, so
``describe_worker_crash`` can name it.

    install_crash_trace(data.train_loader.dataset, data.val_loader.dataset)
    try:
        ...the loop, validation included...
    except RuntimeError as err:
        if not is_worker_crash(err):
            raise
        datasets = [data.train_loader.dataset, data.val_loader.dataset]
        raise WorkerCrashError(describe_worker_crash(err, datasets)) from None
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from linnaeus.errors import UserError

CRASH_PATTERN = re.compile(
    r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (exited unexpectedly|is killed by signal)"
)
MAX_SLOTS = 256  # worker ids at or above this share the last slot
VERIFY_HINT = (
    "find every damaged image with `python -m linnaeus.data.verify DIR` (it names each file), or keep "
    "data.check_images=true with data.bad_images=drop so the start-up check leaves them out"
)


class WorkerCrashError(UserError):
    """A data-loading worker died; the message names the image it was reading when known."""


class TracedStore:
    """An image store that records, per worker, the row being decoded (in shared memory).

    The trace runs around every image of every training run, so it costs well under a microsecond:
    each process finds its slot once and then writes its pid and the row through a NumPy view of the
    shared table (a tensor's ``__setitem__`` takes ~1.5 us; three per image doubled the loader's own
    cost per image besides decoding). The pid goes in with every row, as two processes can share a
    slot (two loaders' workers of the same id over one store, or worker ids past ``MAX_SLOTS``).
    """

    def __init__(self, store: Any, slots: torch.Tensor) -> None:
        self.inner = store
        self.slots = slots  # (MAX_SLOTS + 1, 2) int64: pid, row (-1 when idle); last = main process
        self._pid, self._slot, self._table = -1, -1, None  # this process's, once it has read (``_own_table``)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_pid=-1, _slot=-1, _table=None)  # the view is of this process's mapping
        return state

    def _own_table(self) -> np.ndarray:
        """The NumPy view of the table, with ``_slot`` and ``_pid`` this process's (found once per process)."""
        if self._pid == os.getpid():
            return self._table
        info = get_worker_info()
        self._table = self.slots.numpy()
        self._slot = len(self._table) - 1 if info is None else min(info.id, len(self._table) - 2)
        self._pid = os.getpid()
        return self._table

    def _traced(self, method: str, row: int, identifier: str, *args):
        table = self._own_table()
        slot = self._slot
        table[slot, 0] = self._pid
        table[slot, 1] = row
        result = getattr(self.inner, method)(row, identifier, *args)
        table[slot, 1] = -1
        return result

    def read(self, row: int, identifier: str, *out: torch.Tensor):
        return self._traced("read", row, identifier, *out)  # the batch row only when the caller gives one

    def read_encoded(self, row: int, identifier: str):
        return self._traced("read_encoded", row, identifier)

    def decode_rows(self, rows: list[int], pixels: np.ndarray) -> list[bool]:
        """The wrapped store's ``decode_rows``, each image's row in the trace while it is decoded."""
        decode = getattr(self.inner, "decode_rows", None)
        if decode is None:
            return [False] * len(rows)
        table = self._own_table()
        return decode(rows, pixels, trace=(table, self._slot, self._pid))

    def __getattr__(self, name: str):  # path, root, rows_for, ... of the wrapped store
        if name in ("inner", "slots") or name.startswith("_"):  # its own (e.g. while being unpickled)
            raise AttributeError(name)
        return getattr(self.inner, name)


def install_crash_trace(*datasets: Any) -> list[TracedStore]:
    """Wrap each dataset's ``store`` in a ``TracedStore``; call before the loaders start their workers."""
    traced = []
    for dataset in datasets:
        store = getattr(dataset, "store", None)
        if store is None or isinstance(store, TracedStore):
            continue
        slots = torch.full((MAX_SLOTS + 1, 2), -1, dtype=torch.int64).share_memory_()
        dataset.store = TracedStore(store, slots)
        traced.append(dataset.store)
    return traced


def is_worker_crash(err: BaseException) -> bool:
    """True for PyTorch's "DataLoader worker ... exited unexpectedly / is killed by signal" errors."""
    return isinstance(err, RuntimeError) and CRASH_PATTERN.search(str(err)) is not None


def _identifier_of_row(dataset: Any, row: int) -> str | None:
    rows = getattr(dataset, "image_rows", None)
    identifiers = getattr(dataset, "identifiers", None)
    if rows is None or identifiers is None:
        return None
    hits = np.flatnonzero(np.asarray(rows) == row)
    return str(identifiers[hits[0]]) if len(hits) else None


def _flat_indices(batch_indices: Iterable) -> list[int]:
    """Indices from ints, ``(index, epoch)`` pairs or lists of either."""
    out: list[int] = []
    for item in batch_indices:
        if isinstance(item, tuple) and len(item) == 2 and all(isinstance(v, (int, np.integer)) for v in item):
            out.append(int(item[0]))
        elif isinstance(item, (list, tuple)):
            out.extend(_flat_indices(item))
        else:
            out.append(int(item))
    return out


def _where(store: Any, row: int, identifier: str | None) -> str:
    if hasattr(store, "path_of") and identifier is not None:
        return str(store.path_of(identifier))
    path = getattr(store, "path", None)
    return f"row {row} of {path}" if path is not None else f"row {row}"


def _cause(text: str) -> tuple[str, str]:
    """What killed the worker, and the likely fix for that kind of death."""
    signal = re.search(r"killed by signal: ([^.]*)", text)
    name = signal.group(1).strip() if signal else ""
    cause = f"was killed by signal: {name}" if signal else "exited unexpectedly"
    if name.lower() == "killed":  # SIGKILL: almost always the out-of-memory killer
        return (
            cause,
            "this is usually the out-of-memory killer: lower data.num_workers or data.batch_size, or give the job more memory",
        )
    if name.lower() == "bus error":
        return cause, "the workers ran out of shared memory (/dev/shm); enlarge it or lower data.num_workers"
    return cause, VERIFY_HINT


def describe_worker_crash(
    err: BaseException, dataset: Any, batch_indices: Sequence | None = None, max_listed: int = 8
) -> str:
    """One line: which worker died, how, which image it was decoding (or which batch), and what to do.

    ``dataset`` is the loader's dataset, or a list of datasets (training and validation) when it is
    not known which loader failed; with ``install_crash_trace`` applied the exact image is named.
    ``batch_indices`` are indices into the (first) dataset of the batches in flight, listed when the
    exact image is not known.
    """
    text = str(err)
    match = CRASH_PATTERN.search(text)
    pids = [int(p) for p in re.findall(r"\d+", match.group(1))] if match else []
    cause, fix = _cause(text)
    datasets = list(dataset) if isinstance(dataset, (list, tuple)) else [dataset]
    dataset = datasets[0]
    culprits = []
    for candidate in datasets:
        store = getattr(candidate, "store", None)
        if not isinstance(store, TracedStore):
            continue
        for pid, row in store.slots.tolist():
            if row >= 0 and (not pids or pid in pids):
                identifier = _identifier_of_row(candidate, row)
                culprits.append(f"{identifier!r} ({_where(store.inner, row, identifier)})")
    who = f"a data-loading worker (pid {', '.join(map(str, pids))})" if pids else "a data-loading worker"
    if culprits:
        what = f"while decoding image {', '.join(culprits)}, which is probably damaged"
    elif batch_indices is not None:
        indices = _flat_indices(batch_indices)
        names = [str(dataset.identifiers[i]) for i in indices[:max_listed]]
        more = f" and {len(indices) - max_listed} more" if len(indices) > max_listed else ""
        what = f"while loading one of the images {', '.join(names)}{more}"
    else:
        what = "while loading a batch"
    return f"{who} {cause} {what}; {fix}"
