"""``data.cache=ram``: every image decoded once, at the size its loader uses, into shared uint8 arrays.

One array per split: training images (N, 3, L, L) at the load size L (``augmentation.load_size``,
default image_size / 0.875; with a fixed crop, ``augmentation=none``, the centre square at the
training size, exactly as the crop makes it, so that no step resizes), validation images
(M, 3, S, S) exactly as validation crops them, each
image stored (L, L, 3) as decoders return pixels: the training crop's resize then takes the fast uint8
path (84 us against 216 us for a 256 -> 224 px resize from (3, L, L) memory on a 2-core VM), and a
channels-last batch (training on a GPU) is written with a plain copy. Each is a file under ``data.ram_cache_dir`` (default ``/dev/shm``, i.e. memory), named by a key of the images
source (path, size, modification time), the rows and the geometry. Local rank 0 of a node checks the
memory budget for both, fills each file (in ``data.num_workers`` processes, each writing its share in
place) under a temporary name and renames it; the node's other ranks wait for the name and map it. So a node decodes every image once and holds one copy, shared by its ranks and all
their loader workers (a memory map of a tmpfs file: the page cache is the array). A complete file
with the same key is used as it is (the key covers the source's size and modification time, so its
content is what a fill would write). The file's owner, the rank that filled it (its pid is in
``<file>.owner``), deletes it when it exits; processes that mapped it keep their mapping until they
exit. A run that finds a complete file whose owner is gone (killed before it could delete it) adopts
it and deletes it in turn, so a killed run's cache does not hold memory for good.
"""

from __future__ import annotations

import atexit
import glob
import hashlib
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from linnaeus.data.images import FolderImageStore, H5ImageStore, map_file
from linnaeus.data.labels import DatasetError
from linnaeus.data.transforms import ResizedCrop, build_resize_crop
from linnaeus.rundir import pid_alive

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: (L, L, 3) per image
WAIT_GRACE_S = 120.0  # a waiting rank gives up when no rank has started filling after this long


def cache_key(
    store: H5ImageStore | FolderImageStore,
    rows: np.ndarray,
    identifiers: list[str],
    resize: int,
    crop: int,
    square: bool = False,
) -> str:
    """A name for the cached array of these rows of this source at this geometry."""
    source = Path(store.root if isinstance(store, FolderImageStore) else store.path).resolve()
    stat = source.stat()
    text = f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{resize}|{crop}|v{CACHE_VERSION}{'|square' * square}"
    digest = hashlib.sha256(text.encode())
    digest.update(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
    digest.update("\0".join(identifiers).encode())
    return digest.hexdigest()[:24]


def available_bytes(directory: Path) -> int:
    """Free space in ``directory`` and, for memory-backed folders, free memory: the smaller of the two."""
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return min(free, int(line.split()[1]) * 1024)
    except OSError:
        pass
    return free


def check_budget(needed: int, available: int, what: str, directory: Path) -> None:
    """Fail with one line naming both numbers when the cache does not fit."""
    if needed > available:
        raise DatasetError(
            f"data.cache=ram needs {needed:,} bytes ({needed / 2**30:.2f} GiB) for {what}, but only "
            f"{available:,} bytes ({available / 2**30:.2f} GiB) are available in {directory} and free memory; "
            "use data.cache=none, a smaller data.image_size or augmentation.load_size, or point "
            "data.ram_cache_dir at a larger memory-backed folder"
        )


@dataclass(frozen=True)
class CachePart:
    """Rows of a store to cache, each resized (short side) to ``resize`` and centre-cropped to ``crop``;
    with ``square``, each image's centre square resized to ``crop`` (what the fixed training crop,
    ``ResizedCrop`` with scale = ratio = (1, 1), makes of it; decoded for a short side of ``resize``)."""

    image_rows: np.ndarray
    identifiers: np.ndarray
    resize: int
    crop: int
    square: bool = False

    def load(self):
        """The transform that makes a decoded image what this part caches."""
        if self.square:
            return ResizedCrop(self.crop, (1.0, 1.0), (1.0, 1.0))
        return build_resize_crop(self.resize, self.crop)


class RamImageStore:
    """Decoded (3, L, L) uint8 images from the cache file; ``read`` returns a view over the image's
    (L, L, 3) memory in a private (copy-on-write) map of it."""

    encoded = False
    min_side = None

    def __init__(self, file: Path, rows: np.ndarray, size: int, source: Path) -> None:
        self.file, self.rows, self.size, self.path = Path(file), rows, size, source  # size: of the square
        self._images: np.ndarray | None = None
        self._pid = -1

    def with_min_side(self, min_side: int | None) -> RamImageStore:
        return self  # decoded already

    def _array(self) -> np.ndarray:
        if self._pid != os.getpid():
            shape = (len(self.rows), self.size, self.size, 3)
            self._images = map_file(self.file, 0, int(np.prod(shape)), private=True).reshape(shape)
            self._pid = os.getpid()
        return self._images

    def read(self, row: int, identifier: str) -> torch.Tensor:
        return torch.from_numpy(self._array()[int(np.searchsorted(self.rows, row))]).permute(2, 0, 1)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None, "_pid": -1}


_FILL: dict = {}


def _fill_init(
    store, rows: np.ndarray, identifiers: list[str], part: CachePart, file: str, is_worker: bool
) -> None:
    if is_worker:
        torch.set_num_threads(1)  # one decoding process per core
        # the trainer's stop handlers only record a signal; the pool stops its workers with SIGTERM
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    shape = (len(rows), part.crop, part.crop, 3)
    _FILL.update(store=store, rows=rows, identifiers=identifiers, load=part.load())
    _FILL["images"] = np.memmap(file, dtype=np.uint8, mode="r+", shape=shape)


def _fill_range(bounds: tuple[int, int]) -> int:
    store, rows, identifiers, load, images = (
        _FILL[k] for k in ("store", "rows", "identifiers", "load", "images")
    )
    for slot in range(*bounds):
        images[slot] = load(store.read(int(rows[slot]), identifiers[slot])).permute(1, 2, 0).numpy()
    images.flush()
    return bounds[1] - bounds[0]


def _fill(store, rows: np.ndarray, identifiers: list[str], part: CachePart, file: Path, workers: int) -> None:
    count = len(rows)
    with open(file, "wb") as f:
        f.truncate(count * 3 * part.crop * part.crop)
    chunk = max(1, min(512, count // max(1, 4 * workers) + 1))
    ranges = [(start, min(count, start + chunk)) for start in range(0, count, chunk)]
    args = (store, rows, identifiers, part, str(file), workers > 1)
    started, done = time.perf_counter(), 0
    if workers <= 1:
        _fill_init(*args)
        results = map(_fill_range, ranges)
        pool = None
    else:
        pool = mp.get_context("fork").Pool(workers, initializer=_fill_init, initargs=args)
        results = pool.imap_unordered(_fill_range, ranges)
    try:
        for n in results:
            done += n
        if pool is not None:
            pool.close()  # every range is done: the workers exit on their own
    finally:
        if pool is not None:
            pool.terminate()  # no-op after close(); stops the workers after an error
            pool.join()
        _FILL.clear()
    log.info("data.cache=ram: decoded %d images in %.1f s", done, time.perf_counter() - started)


def build_ram_cache(
    store: H5ImageStore | FolderImageStore,
    parts: list[CachePart],
    *,
    directory: str | Path = "/dev/shm",
    workers: int = 1,
    local_rank: int = 0,
    available: int | None = None,
    timeout: float = 6 * 3600.0,
) -> list[RamImageStore]:
    """Each part's rows of ``store`` decoded, resized and centre-cropped, in shared memory (one file each).

    The budget is checked once for every part not cached yet, before anything is decoded.
    ``available``: bytes the check may use (default: ``available_bytes(directory)``).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"data.ram_cache_dir={directory} is not a folder; point it at a memory-backed one")
    source = Path(store.root if isinstance(store, FolderImageStore) else store.path)
    plans = []
    for part in parts:
        rows, first = np.unique(np.asarray(part.image_rows, dtype=np.int64), return_index=True)
        names = [str(part.identifiers[i]) for i in first]
        key = cache_key(store, rows, names, part.resize, part.crop, part.square)
        final = directory / f"linnaeus-cache-{key}.u8"
        needed = len(rows) * 3 * part.crop * part.crop
        plans.append((part, rows, names, final, needed, final.is_file() and final.stat().st_size == needed))
    if local_rank == 0:
        todo = [p for p in plans if not p[5]]
        what = " and ".join(f"{len(rows)} images of 3 x {part.crop} x {part.crop}" for part, rows, *_ in todo)
        room = available_bytes(directory) if available is None else available
        check_budget(sum(p[4] for p in todo), room, what, directory)
    caches = []
    for part, rows, names, final, needed, present in plans:
        if needed == 0:  # e.g. no validation split
            pass
        elif local_rank != 0:
            _wait_for(final, needed, timeout)
        elif not present:
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            log.info(
                "data.cache=ram: decoding %d images at %d px into %s (%.2f GiB)",
                len(rows), part.crop, final, needed / 2**30,
            )  # fmt: skip
            try:
                _fill(store.with_min_side(part.resize), rows, names, part, tmp, workers)
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
            _own(final)
        elif _owner_alive(final):
            log.info("data.cache=ram: using %s, filled by another run", final)
        else:
            log.info("data.cache=ram: using %s, left by a run that has exited; this run deletes it", final)
            _own(final)
        caches.append(RamImageStore(final, rows, part.crop, source))
    return caches


def _owner_file(final: Path) -> Path:
    return final.with_name(final.name + ".owner")


def _owner_alive(final: Path) -> bool:
    try:
        pid = int(_owner_file(final).read_text())
    except (OSError, ValueError):
        return False
    return pid_alive(pid)


def _own(final: Path) -> None:
    """Record this process as the owner of ``final``, which it deletes when it exits."""
    _owner_file(final).write_text(str(os.getpid()))
    atexit.register(_owner_file(final).unlink, missing_ok=True)
    atexit.register(final.unlink, missing_ok=True)


def _wait_for(final: Path, needed: int, timeout: float) -> None:
    """Wait until local rank 0 has renamed the filled cache into place."""
    started = time.monotonic()
    while not (final.is_file() and final.stat().st_size == needed):
        waited = time.monotonic() - started
        filling = glob.glob(str(final.with_name(f".{final.name}.tmp-*")))
        if waited > timeout or (waited > WAIT_GRACE_S and not filling):
            raise DatasetError(
                f"data.cache=ram: waited {waited:.0f} s for local rank 0 to fill {final}, which "
                f"{'is still filling' if filling else 'has not started'}; check that rank's log"
            )
        time.sleep(0.5)
