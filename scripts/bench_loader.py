"""Training-loader throughput (images/s): decoding plus per-sample augmentation, no model.

    python scripts/bench_loader.py                       # demo data and a synthetic 224 px JPEG set
    python scripts/bench_loader.py --aug default none strong --workers 0 2 --batches 20
    python scripts/bench_loader.py --compare             # against torchvision's ImageFolder (below)
    python scripts/bench_loader.py --decoders            # PIL vs torchvision decode, DCT downscaling

For each dataset, augmentation option and worker count, builds the real training loader with
``build_data`` (config composed as ``train.py`` would) and times about ``--batches`` batches in the
steady state (``timed_window``: whole rounds of the workers, after each has written every batch buffer
it cycles through once), with one torch thread in the main process (``--threads``), as in each
worker. Timed is the loader alone: uint8 batches, as the trainer moves them to the device, where
``DataBundle.prepare`` normalises them (``--with-prepare`` adds that step on this CPU, as CPU-only
training pays it; ``--compare`` prints its cost per image). Datasets: the built-in demo (48 px PNGs, trained at 32 px) and a
synthetic ``images.h5`` of ``--images`` 224 x 224 JPEGs written to a temporary folder (trained at 224 px).

``--compare`` builds two real-image datasets in a temporary folder and times, for 0 and 2 workers
with the same augmentation: torchvision's ``ImageFolder`` + ``DataLoader`` on the image files (PIL
loader; the same uint8 augmentation, then float conversion and normalisation in the workers, as such
a script does), our hybrid mode (labels.h5 + the same files), our images.h5 in the ``vlen`` and the
``contiguous`` layout, our RAM cache (``data.cache=ram``), and the decode-only limit: one process
that only decodes the same bytes, from memory, with the fastest decoder at hand (torchvision
``decode_image``, and simplejpeg for JPEGs), and for each worker count above one, as many such
processes decoding at once (what that many cores can decode together: the per-core limit with every
core busy, which on a VM is below the one-process limit), and for JPEGs a bare pool of that many
processes decoding into shared-memory batches handed over through a pipe (``bare_pool_rate``: what
any loader built on worker processes could reach); for JPEGs also one process decoding
straight into the rows of a reused batch (what writing batch memory adds), and the microseconds
per image our loader spends besides decoding (one process, the decoder left out: what our own code
costs, whatever the decoder's speed on the day). Datasets: Fashion-MNIST
as a folder tree (``scripts/make_fashion_tree.py``; 28 px grayscale PNGs, trained at 32 px) and
seeded random crops of the photographs that ship inside scikit-image, resized to 224 x 224 and
encoded as JPEG quality 90 (trained at 224 px; ``pip install -e .[bench]``). Our loaders hand
over channels-last batches, as decoders return pixels and as the trainer asks for (its ``prepare``
casts them to contiguous float in one pass); with ``--contiguous``, contiguous (B, 3, H, W) batches,
for which the workers transpose every image. ``--channels-last`` is the default and kept for the
commands of earlier runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from linnaeus.config import register_configs
from linnaeus.data.buffers import ROW_SHIFT, BatchBuffers
from linnaeus.data.images import jpeg_size
from linnaeus.data.loader import build_data
from linnaeus.data.writer import write_images_h5, write_labels_h5

REPO = Path(__file__).resolve().parents[1]


def synthetic_jpegs(out_dir: Path, count: int, size: int = 224, seed: int = 0) -> Path:
    """labels.h5 (4 ranks, no metadata) and images.h5 of ``count`` smooth random JPEGs (quality 90)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size

    def jpeg() -> bytes:
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * xx + b * yy + c + k) for k in range(3)], -1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    identifiers = [f"syn_{i:05d}.jpg" for i in range(count)]
    species = rng.integers(0, 100, count)
    taxa = {
        "taxa_L40": 1000 + species // 50,
        "taxa_L30": 2000 + species // 25,
        "taxa_L20": 3000 + species // 5,
        "taxa_L10": 4000 + species,
    }
    write_images_h5(out_dir / "images.h5", identifiers, (jpeg() for _ in range(count)))
    write_labels_h5(out_dir / "labels.h5", identifiers, taxa)
    return out_dir


def timed_window(loader, batches: int) -> tuple[int, int]:
    """(untimed warm-up batches, timed batches) for ``loader``: the steady state, over whole rounds.

    With W workers, batch k comes from worker k mod W, and the workers run side by side: a window of
    15 batches from 2 workers ends when the 8th batch of one of them arrives, as late as 16 would,
    so it undercounts by 1/16. The timed count is rounded up to a multiple of W. The warm-up (two
    batches, and with workers ``prefetch_factor + 2`` rounds) lets each worker start and write every
    batch buffer it cycles through once: the first write into fresh shared memory takes a page fault
    per 4 KiB (about 3 ms per 224 px batch of 64 here), which a training run pays once, not per batch.
    """
    workers = getattr(loader, "num_workers", 0)
    if workers == 0:
        return 2, batches
    rounds = (getattr(loader, "prefetch_factor", None) or 2) + 2
    return max(2, rounds * workers), whole_rounds(batches, workers)


def whole_rounds(batches: int, workers: int) -> int:
    """``batches`` rounded up to a whole number of rounds of ``workers`` side by side."""
    return -(-batches // workers) * workers


def timed(loader, batches: int, prepare=None, new_epoch=None) -> float:
    """Images/s over about ``batches`` batches of ``loader`` after an untimed warm-up (``timed_window``);
    an epoch's end inside the window (workers idle while the last batches drain) is said on stderr."""
    warm_up, batches = timed_window(loader, batches)
    epoch, it = 0, iter(loader)

    def next_batch():
        nonlocal epoch, it
        try:
            return next(it)
        except StopIteration:
            epoch += 1
            if new_epoch is not None:
                new_epoch(epoch)
            it = iter(loader)
            return next(it)

    for _ in range(warm_up):
        next_batch()
    images, start, first_epoch = 0, time.perf_counter(), epoch
    for _ in range(batches):
        batch = next_batch()
        if prepare is not None:
            batch = prepare(batch)
        images += len(batch["images"] if isinstance(batch, dict) else batch[0])
    rate = images / (time.perf_counter() - start)
    if epoch != first_epoch:
        print(
            f"(the timed window of {batches} batches crossed an epoch's end: more images or fewer --batches "
            "time the steady state alone)",
            file=sys.stderr,
        )
    return rate


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=overrides)


def throughput(
    overrides: list[str], batches: int, with_prepare: bool = False, channels_last: bool = True
) -> tuple[float, int]:
    """(images/s over ``batches`` timed batches, image size) for one composed config."""
    cfg = compose_cfg(overrides)
    data = build_data(cfg.data, cfg.augmentation, run_dir=None, seed=0, channels_last=channels_last)
    data.train_batches.set_epoch(0)
    prepare = data.prepare if with_prepare else None
    rate = timed(data.train_loader, batches, prepare, data.train_batches.set_epoch)
    del data
    return rate, cfg.data.image_size


def prepare_cost(size: int, batch_size: int, channels_last: bool = True, repeats: int = 5) -> float:
    """Microseconds per image ``DataBundle.prepare`` takes on this CPU (uint8 -> normalised contiguous
    float) for batches in the loader's layout."""
    from linnaeus.data.prepare import PrepareBatch

    prepare = PrepareBatch([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    batch = {"images": images}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        prepare(batch)
        best = min(best, time.perf_counter() - start)
    return best / batch_size * 1e6


PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png",
          "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg", "ihc.png"]  # fmt: skip


def photo_tree(root: Path, count: int, size: int = 224, seed: int = 0) -> None:
    """``count`` seeded random crops of scikit-image's photographs, size x size JPEG quality 90, as
    ROOT/<group>/<photo>/<side>/<n>.jpg (3 ranks; the photo is the class)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        raise SystemExit("--compare needs scikit-image's photographs: pip install -e .[bench]")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    photos = [np.asarray(Image.open(folder / name).convert("RGB")) for name in PHOTOS]
    rng = np.random.default_rng(seed)
    for n in range(count):
        k = n % len(photos)
        pixels = photos[k]
        height, width = pixels.shape[:2]
        side = int(min(height, width) * rng.uniform(0.35, 1.0))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = Image.fromarray(pixels[top : top + side, left : left + side]).resize(
            (size, size), Image.LANCZOS
        )
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = root / f"group{k // 3}" / Path(PHOTOS[k]).stem / f"side{n % 2}" / f"{n:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, format="JPEG", quality=90)


def build_variants(tree: Path, out: Path) -> dict[str, list[str]]:
    """Our datasets over the files of ``tree``: the data overrides of each mode."""
    from linnaeus.data.build import main as build_main
    from linnaeus.data.convert import convert

    for extra, name in (([], "h5"), (["--hybrid"], "hybrid")):
        if build_main(["folder", str(tree), "--out", str(out / name), "--workers", "2", *extra]) != 0:
            raise SystemExit(f"building {tree} failed")
    convert(out / "h5" / "images.h5", out / "vlen_images.h5", layout="vlen")
    labels = f"data.labels={out / 'h5' / 'labels.h5'}"
    return {
        "hybrid (files)": ["data=h5", f"data.labels={out / 'hybrid' / 'labels.h5'}", f"data.images={tree}"],
        "images.h5 vlen": ["data=h5", labels, f"data.images={out / 'vlen_images.h5'}"],
        "images.h5 contiguous": ["data=h5", labels, f"data.images={out / 'h5' / 'images.h5'}"],
        "RAM cache": ["data=h5", labels, f"data.images={out / 'h5' / 'images.h5'}", "data.cache=ram"],
    }


def image_folder_rate(tree: Path, cfg, workers: int, batches: int, batch_size: int) -> float:
    """torchvision's ImageFolder + DataLoader with the same uint8 augmentation, normalised in the workers."""
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from linnaeus.data.transforms import build_train_augment

    mean, std = list(cfg.data.mean), list(cfg.data.std)
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            build_train_augment(cfg.augmentation, cfg.data.image_size, mean),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    dataset = ImageFolder(str(tree), transform=transform)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    return timed(loader, batches)


def _decoders(images_h5: Path) -> tuple[list[np.ndarray], dict]:
    """The dataset's bytes (read into memory) and a decode-all call per decoder at hand: torchvision's
    ``decode_image`` for every format, and for JPEGs also simplejpeg (libjpeg-turbo without
    torchvision's wrapping)."""
    import simplejpeg
    from torchvision.io import ImageReadMode, decode_image

    from linnaeus.data.images import H5ImageStore, is_jpeg

    store = H5ImageStore(images_h5)
    files = [np.array(store.read_encoded(r)) for r in range(store.num_rows)]
    tensors = [torch.from_numpy(data) for data in files]
    decoders = {
        "torchvision decode_image": lambda: _each(lambda t: decode_image(t, ImageReadMode.RGB), tensors)
    }
    if all(is_jpeg(data) for data in files):
        decoders["simplejpeg"] = lambda: _each(lambda data: simplejpeg.decode_jpeg(data, "RGB"), files)
        reused: dict[tuple[int, int], np.ndarray] = {}

        def into_reused(data: np.ndarray) -> None:
            width, height = jpeg_size(data)
            if (height, width) not in reused:
                reused[height, width] = shifted_array((height, width, 3), ROW_SHIFT)
            simplejpeg.decode_jpeg(data, "RGB", buffer=reused[height, width])

        decoders["simplejpeg, reused buffer"] = lambda: _each(into_reused, files)
    return files, decoders


def batch_memory(shape: tuple[int, int, int, int]) -> torch.Tensor:
    """A (B, H, W, 3) uint8 batch in shared memory, placed as our loader places its batches."""
    batch, height, width, _ = shape
    return BatchBuffers(channels_last=True).empty((batch, 3, height, width), torch.uint8, True, False)


def shifted_array(shape: tuple[int, ...], shift: int) -> np.ndarray:
    """An uninitialised uint8 array of ``shape`` starting ``shift`` bytes past a 64-byte boundary
    (written once, so that no timing pays its page faults)."""
    size = math.prod(shape)
    raw = np.empty(size + 128, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + shift
    out = raw[start : start + size].reshape(shape)
    out.fill(0)
    return out


def _each(decode, items) -> None:
    """``decode`` every item, dropping each image before the next (as a loader does: the decoder
    reuses warm memory instead of faulting in fresh pages for images kept alive)."""
    for item in items:
        decode(item)


def decode_only_rate(images_h5: Path, repeats: int = 2) -> tuple[float, str]:
    """One process, one thread: decode the dataset's bytes (already in memory) with the fastest
    decoder at hand: (images/s, its name). For JPEGs simplejpeg competes twice, into a fresh array per
    image and into one reused array ``ROW_SHIFT`` bytes past a boundary, since where its output
    lands changes its speed (``linnaeus.data.buffers``): the limit is the better of the two."""
    files, decoders = _decoders(images_h5)
    best = {}
    for _ in range(repeats):
        for name, decode in decoders.items():
            start = time.perf_counter()
            decode()
            best[name] = max(best.get(name, 0.0), len(files) / (time.perf_counter() - start))
    name = max(best, key=best.get)
    return best[name], name


def decode_into_batch_rate(images_h5: Path, batch_size: int, shift: int, repeats: int = 2) -> float:
    """One process: simplejpeg decoding the dataset's JPEGs in order straight into the rows of one
    reused channels-last batch (all of the same size) that starts ``shift`` bytes past a 64-byte
    boundary, nothing else: images/s. The least a loader that hands over batches must do; against
    ``decode_only_rate`` (a decoder writing into the same warm buffer again and again) it shows what
    writing batch memory costs on this machine, and with ``shift`` 0 against ``ROW_SHIFT`` what rows
    on 32-byte boundaries cost the decoder (``linnaeus.data.buffers``)."""
    import simplejpeg

    files, _ = _decoders(images_h5)
    width, height = jpeg_size(files[0])
    batch = shifted_array((batch_size, height, width, 3), shift)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i, data in enumerate(files):
            simplejpeg.decode_jpeg(data, "RGB", buffer=batch[i % batch_size])
        best = max(best, len(files) / (time.perf_counter() - start))
    return best


def _decode_in_parallel(images_h5: Path, decoder: str, repeats: int, start, rates) -> None:
    files, decoders = _decoders(images_h5)
    start.wait()  # all processes decode at the same time
    begin = time.perf_counter()
    for _ in range(repeats):
        decoders[decoder]()
    rates.put(repeats * len(files) / (time.perf_counter() - begin))


class _NoDecode:
    """Stands in for simplejpeg inside ``linnaeus.data.images``: hands back pixels without decoding
    (the batch row it is given, else a reused array of the output size), so that timing a batch
    measures only what our loader does around the decoder."""

    def __init__(self, real) -> None:
        self.real, self.pixels = real, {}

    def decode_jpeg(self, data, colorspace="RGB", buffer=None, min_height=0, min_width=0, **_):
        if buffer is not None:
            return buffer
        height, width = min_height, min_width
        if not height:
            height, width, *_ = self.real.decode_jpeg_header(data)
        return self.pixels.setdefault((height, width), np.zeros((height, width, 3), dtype=np.uint8))

    def __getattr__(self, name):
        return getattr(self.real, name)


def outside_decoder_us(overrides: list[str], channels_last: bool, repeats: int = 5) -> tuple[float, float]:
    """Microseconds per image our loader (one process) spends on a training batch of JPEGs besides
    decoding them: reading the bytes, the transform, writing the batch (the decoder replaced by
    ``_NoDecode``); without and with the crash trace the trainer installs (``install_crash_trace``)."""
    from linnaeus.data import images
    from linnaeus.data.faults import install_crash_trace

    cfg = compose_cfg(overrides)
    data = build_data(cfg.data, cfg.augmentation, run_dir=None, seed=0, channels_last=channels_last)
    data.train_batches.set_epoch(0)
    dataset, keys = data.train_loader.dataset, next(iter(data.train_batches))

    def best_us() -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(10):
                dataset.__getitems__(keys)
            best = min(best, (time.perf_counter() - start) / 10)
        return best / len(keys) * 1e6

    real, images.simplejpeg = images.simplejpeg, _NoDecode(images.simplejpeg)
    try:
        plain = best_us()
        install_crash_trace(dataset)
        return plain, best_us()
    finally:
        images.simplejpeg = real


def _bare_worker(
    images_h5: Path, order: np.ndarray, slots: list[torch.Tensor], free, announce: int, start
) -> None:
    """One process of ``bare_pool_rate``: batches ``order`` (rows per batch) decoded into its slots."""
    import simplejpeg

    from linnaeus.data.images import H5ImageStore

    store = H5ImageStore(images_h5)
    store.read_encoded(0)  # opened and mapped before the start
    views = [slot.numpy() for slot in slots]
    start.wait(timeout=120)
    for n, rows in enumerate(order):
        free.acquire()
        out = views[n % len(views)]
        for k, row in enumerate(rows):
            simplejpeg.decode_jpeg(store.read_encoded(int(row)), "RGB", buffer=out[k])
        os.write(announce, struct.pack("<q", n % len(views)))


def _announced(read: int, child, timeout: float = 120.0) -> int:
    """The slot a bare-pool process announces next; an error when it died or fell silent instead."""
    from multiprocessing.connection import wait

    ready = wait([read, child.sentinel], timeout)
    if read in ready:  # also when it exited since: what it wrote before is there
        return struct.unpack("<q", os.read(read, 8))[0]
    if child.sentinel in ready:
        child.join()
        raise RuntimeError(f"a bare-pool process exited with code {child.exitcode}")
    raise RuntimeError(f"a bare-pool process announced nothing for {timeout:.0f} s")


def bare_pool_rate(images_h5: Path, workers: int, batch_size: int, batches: int, repeats: int = 2) -> float:
    """``workers`` forked processes decoding the JPEGs (simplejpeg, shuffled order) straight into the
    rows of channels-last batches in shared memory (3 per process, freed by the consumer), each batch
    announced with 8 bytes on a pipe; the main process takes the batches in turn. No framework, no
    labels, no transform: images/s over whole rounds after every slot was written once, the processes
    started together and timed for at least 16 rounds (a process that runs ahead fills its free slots
    before the window opens, which a short window would count as speed). What any loader built on
    worker processes and shared memory could reach on this machine."""
    import multiprocessing

    from linnaeus.data.images import H5ImageStore

    store = H5ImageStore(images_h5)
    width, height = jpeg_size(store.read_encoded(0))
    context, slots_per_worker = multiprocessing.get_context("fork"), 3
    warm_up, batches = slots_per_worker * workers, whole_rounds(max(batches, 16 * workers), workers)
    shape = (batch_size, height, width, 3)
    best = 0.0
    for repeat in range(repeats):
        order = np.random.default_rng(repeat).permutation(store.num_rows)
        total = warm_up + batches
        order = np.resize(order, total * batch_size).reshape(total, batch_size)
        slots = [  # laid out as our loader's: channels-last rows ROW_SHIFT bytes into shared memory
            [batch_memory(shape) for _ in range(slots_per_worker)] for _ in range(workers)
        ]
        pipes = [os.pipe() for _ in range(workers)]
        free = [context.Semaphore(slots_per_worker) for _ in range(workers)]
        together = context.Barrier(workers)
        children = [
            context.Process(
                target=_bare_worker,
                args=(images_h5, order[w::workers], slots[w], free[w], pipes[w][1], together),
            )
            for w in range(workers)
        ]
        try:
            for child in children:
                child.start()
            for n in range(total):
                if n == warm_up:
                    start = time.perf_counter()
                w = n % workers
                _announced(pipes[w][0], children[w])  # the batch is in that slot; a consumer takes it
                free[w].release()
            best = max(best, batches * batch_size / (time.perf_counter() - start))
        finally:
            for child in children:
                if child.pid is not None:
                    child.join(timeout=10)
                    if child.is_alive():
                        child.terminate()
                        child.join()
            for read, write in pipes:
                os.close(read)
                os.close(write)
    return best


def parallel_decode_rate(images_h5: Path, decoder: str, processes: int, repeats: int = 2) -> float:
    """``processes`` processes decoding the dataset's bytes at once, each as ``decode_only_rate`` does
    with ``decoder``: their images/s summed. What ``processes`` cores decode together; on a VM, or
    wherever cores share caches and memory bandwidth, less than ``processes`` times one process."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    start, rates = context.Barrier(processes), context.Queue()
    children = [
        context.Process(target=_decode_in_parallel, args=(images_h5, decoder, repeats, start, rates))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    total = sum(rates.get(timeout=600) for _ in children)
    for child in children:
        child.join()
    return total


def compare_decoders(repeats: int = 3) -> None:
    """PIL vs torchvision decode_image vs simplejpeg, and DCT-domain downscaling (PIL's draft, ours
    through simplejpeg), per image size (one thread)."""
    import simplejpeg
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    from linnaeus.data.images import decode_bytes

    def pil(data: bytes, draft: int | None = None) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as img:
            if draft:
                img.draft("RGB", (draft, draft))
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()

    def rate(fn, files) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for data in files:
                fn(data)
            best = min(best, time.perf_counter() - start)
        return len(files) / best

    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        for size, fmt, count in (
            (32, "PNG", 2000),
            (224, "JPEG", 300),
            (448, "JPEG", 100),
            (1024, "JPEG", 30),
        ):
            photo_tree(Path(tmp) / str(size), count, size=size)
            files = [p.read_bytes() for p in sorted((Path(tmp) / str(size)).rglob("*.jpg"))]
            if fmt == "PNG":
                files = [encode_png(f) for f in files]
            tensors = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
            line = {
                "PIL": rate(pil, files),
                "torchvision": rate(lambda t: decode_image(t, mode=ImageReadMode.RGB), tensors),
            }
            if fmt == "JPEG":
                line["simplejpeg"] = rate(lambda d: simplejpeg.decode_jpeg(d, "RGB"), files)
            if size >= 448:  # what the pipeline pays: decode, then resize the short side to what it needs
                need = size // 4 if size >= 1024 else size // 2
                resize = v2.Resize(need, antialias=True)
                full = lambda t, r=resize: r(decode_image(t, mode=ImageReadMode.RGB))  # noqa: E731
                line[f"torchvision + resize to {need}"] = rate(full, tensors)
                line[f"PIL draft + resize to {need}"] = rate(lambda d, n=need, r=resize: r(pil(d, n)), files)
                line[f"decode_bytes(min_side={need}) + resize"] = rate(
                    lambda d, n=need, r=resize: r(decode_bytes(d, n)), files
                )
            shown = ", ".join(f"{k} {v:,.0f}" for k, v in line.items())
            print(f"{size:5d} px {fmt:4s}: {shown} images/s")
    print(f"load average after: {os.getloadavg()}")


def encode_png(jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buffer, format="PNG")
    return buffer.getvalue()


def compare(args) -> None:
    """Every setting timed once per round, rounds interleaved; the best of ``--rounds`` is reported
    (a shared or busy machine only ever makes a setting slower)."""
    print(f"load average before: {os.getloadavg()}")
    best: dict[tuple, float] = {}
    decoders: dict[str, str] = {}  # the fastest decoder of each dataset's decode-only limit
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datasets = compare_datasets(args, tmp)
        modes = {
            name: build_variants(tree, tmp / f"{tree.name}_built") for name, (tree, _) in datasets.items()
        }
        costs = {
            name: prepare_cost(size, args.batch_size, args.channels_last)
            for name, (_, size) in datasets.items()
        }
        for round_ in range(args.rounds):
            for dataset, (tree, size) in datasets.items():
                images_h5 = tmp / f"{tree.name}_built" / "h5" / "images.h5"
                time_limits(args, dataset, images_h5, best, decoders)
                time_loaders(args, dataset, tree, size, modes[dataset], best)
                if decoders[dataset].startswith("simplejpeg"):
                    around = [*modes[dataset]["images.h5 contiguous"], f"data.image_size={size}"]
                    besides = outside_decoder_us(
                        [*around, *loader_overrides(args, "none", 0)], args.channels_last
                    )
                    for key, us in zip([(dataset, "outside decoder"), (dataset, "traced")], besides):
                        best[key] = min(best.get(key, us), us)  # a cost: the least is the best
            print(f"round {round_ + 1} of {args.rounds} done, load average {os.getloadavg()}")
    rows = []
    for dataset in datasets:
        rows.append(report_limits(args, dataset, best, decoders[dataset], costs[dataset]))
        rows.extend(report_loaders(args, dataset, modes[dataset], best))
    print(f"load average after: {os.getloadavg()}")
    print(json.dumps(rows))


def compare_datasets(args, tmp: Path) -> dict[str, tuple[Path, int]]:
    """The ``--datasets`` as folder trees under ``tmp``: name -> (tree, training image size)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from make_fashion_tree import SOURCE, make_tree

    datasets = {}
    if "fashion" in args.datasets and (SOURCE / "train-images-idx3-ubyte.gz").is_file():
        make_tree(tmp / "fashion", args.per_class)
        datasets["Fashion-MNIST (28 px PNG)"] = (tmp / "fashion", 32)
    elif "fashion" in args.datasets:
        print("Fashion-MNIST missing (apt-get install dataset-fashion-mnist): skipped")
    if "photos" in args.datasets:
        photo_tree(tmp / "photos", args.photos)
        datasets["photo crops (224 px JPEG)"] = (tmp / "photos", 224)
    return datasets


def _record(best: dict[tuple, float], key: tuple, rate: float) -> None:
    best[key] = max(best.get(key, 0.0), rate)


def time_limits(args, dataset: str, images_h5: Path, best: dict, decoders: dict) -> None:
    """One round of the decode-only references: one process, into a batch (JPEGs), N at once."""
    rate, decoder = decode_only_rate(images_h5)
    if rate > best.get((dataset, "decode-only"), 0.0):
        decoders[dataset] = decoder
    _record(best, (dataset, "decode-only"), rate)
    if decoder.startswith("simplejpeg"):
        for shift, key in ((ROW_SHIFT, "into batch"), (0, "into aligned batch")):
            _record(best, (dataset, key), decode_into_batch_rate(images_h5, args.batch_size, shift))
    for workers in sorted({w for w in args.workers if w > 1}):
        _record(best, (dataset, "decode-only", workers), parallel_decode_rate(images_h5, decoder, workers))
        if decoder.startswith("simplejpeg"):
            rate = bare_pool_rate(images_h5, workers, args.batch_size, args.batches)
            _record(best, (dataset, "bare pool", workers), rate)


def loader_overrides(args, aug: str, workers: int) -> list[str]:
    """The overrides of one timed setting: augmentation, workers, batch size, ``--extra`` last."""
    return [
        f"augmentation={aug}",
        f"data.num_workers={workers}",
        f"data.batch_size={args.batch_size}",
        "data.check_images=false",
        *args.extra,
    ]


def time_loaders(args, dataset: str, tree: Path, size: int, modes: dict[str, list[str]], best: dict) -> None:
    """One round of ImageFolder and each of our modes, per augmentation and worker count."""
    for aug in args.aug:
        for workers in args.workers:
            common = [f"data.image_size={size}", *loader_overrides(args, aug, workers)]
            cfg = compose_cfg(["data=h5", "data.labels=x", "data.images=x", *common])
            key = (dataset, aug, workers)
            _record(
                best,
                (*key, "ImageFolder"),
                image_folder_rate(tree, cfg, workers, args.batches, args.batch_size),
            )
            for mode, overrides in modes.items():
                rate, _ = throughput(
                    [*overrides, *common], args.batches, args.with_prepare, args.channels_last
                )
                _record(best, (*key, mode), rate)


def report_limits(args, dataset: str, best: dict, decoder: str, prepare_us: float) -> dict:
    """Print the dataset's decode-only references; their JSON row."""
    limit = best[(dataset, "decode-only")]
    parallel = {w: best[(dataset, "decode-only", w)] for w in args.workers if w > 1}
    print(f"{dataset:28s} {'decode-only (1 process)':24s}                {limit:8.0f} images/s ({decoder})")
    if (dataset, "into batch") in best:
        rate = best[(dataset, "into batch")]
        print(
            f"{dataset:28s} {'decoded into a batch':24s}                {rate:8.0f} images/s "
            f"({rate / limit:.2f} of decode-only: what writing batch memory costs here)"
        )
    if (dataset, "into aligned batch") in best:
        rate = best[(dataset, "into aligned batch")]
        print(
            f"{dataset:28s} {'... rows 32-byte aligned':24s}                {rate:8.0f} images/s "
            f"({rate / limit:.2f} of decode-only; ours start {ROW_SHIFT} bytes past)"
        )
    for workers, rate in parallel.items():
        print(
            f"{dataset:28s} {f'decode-only ({workers} at once)':24s}                {rate:8.0f} images/s "
            f"({rate / (limit * workers):.2f} of {workers} x 1 process)"
        )
    bare = {w: best[(dataset, "bare pool", w)] for w in args.workers if (dataset, "bare pool", w) in best}
    for workers, rate in bare.items():
        print(
            f"{dataset:28s} {f'bare pool ({workers} processes)':24s}                {rate:8.0f} images/s "
            f"({rate / (limit * workers):.2f} of decode-only per core: shared-memory batches and a pipe, "
            "no framework)"
        )
    print(
        f"{dataset:28s} DataBundle.prepare on this CPU: {prepare_us:.1f} us per image (on the device in training)"
    )
    outside = best.get((dataset, "outside decoder"))
    if outside is not None:
        print(
            f"{dataset:28s} our loader besides decoding: {outside:.1f} us per image "
            "(images.h5 contiguous, aug=none, one process, decoder left out); "
            f"{best[(dataset, 'traced')]:.1f} with the trainer's crash trace"
        )
    return {
        "dataset": dataset,
        "mode": "decode-only",
        "decoder": decoder,
        "images_s": limit,
        "parallel_images_s": parallel,
        "bare_pool_images_s": bare,
        "into_batch_images_s": best.get((dataset, "into batch")),
        "into_aligned_batch_images_s": best.get((dataset, "into aligned batch")),
        "prepare_us": prepare_us,
        "outside_decoder_us": outside,
        "outside_decoder_traced_us": best.get((dataset, "traced")),
    }


def report_loaders(args, dataset: str, modes: dict[str, list[str]], best: dict) -> list[dict]:
    """Print each loader's images/s against ImageFolder and the decode-only references; their rows."""
    limit = best[(dataset, "decode-only")]
    rows = []
    for aug in args.aug:
        for workers in args.workers:
            base = best[(dataset, aug, workers, "ImageFolder")]
            together = best.get((dataset, "decode-only", workers), limit)  # what that many decode at once
            bare = best.get((dataset, "bare pool", workers))
            for mode in ["ImageFolder", *modes]:
                rate = best[(dataset, aug, workers, mode)]
                per_core = rate / (limit * max(1, workers))
                rows.append(
                    {"dataset": dataset, "mode": mode, "augmentation": aug, "workers": workers,
                     "images_s": rate, "vs_imagefolder": rate / base, "of_decode_only_per_core": per_core,
                     "of_parallel_decode_only": rate / together, "of_bare_pool": bare and rate / bare}
                )  # fmt: skip
                print(
                    f"{dataset:28s} {mode:24s} aug={aug:8s} w={workers}  {rate:8.0f} images/s  "
                    f"x{rate / base:.2f} ImageFolder  {per_core:.2f} of decode-only per core  "
                    f"{rate / together:.2f} of {max(1, workers)} decoding at once"
                    + (f"  {rate / bare:.2f} of the bare pool" if bare else "")
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aug", nargs="+", default=["default", "none"], help="conf/augmentation options")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=2000, help="synthetic JPEGs")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides, e.g. augmentation.device=gpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--with-prepare", action="store_true", help="also time DataBundle.prepare on the CPU")
    parser.add_argument("--compare", action="store_true", help="ImageFolder vs our modes vs decode-only")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument(
        "--channels-last",
        dest="channels_last",
        action="store_true",
        default=True,
        help="our loaders hand over channels-last batches, as the trainer asks for (the default)",
    )
    layout.add_argument(
        "--contiguous",
        dest="channels_last",
        action="store_false",
        help="our loaders hand over contiguous batches (the workers transpose every image)",
    )
    parser.add_argument(
        "--per-class", type=int, default=300, help="--compare: Fashion-MNIST images per class"
    )
    parser.add_argument("--photos", type=int, default=1000, help="--compare: 224 px photo crops")
    parser.add_argument(
        "--datasets",
        nargs="+",
        choices=["fashion", "photos"],
        default=["fashion", "photos"],
        help="--compare",
    )
    parser.add_argument("--rounds", type=int, default=2, help="--compare: rounds; the best is reported")
    parser.add_argument(
        "--decoders", action="store_true", help="PIL vs torchvision decoding, DCT downscaling"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # as in DataLoader workers; more threads only fight over small images
    register_configs()
    if args.decoders:
        compare_decoders()
        return
    if args.compare:
        compare(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        synthetic = synthetic_jpegs(Path(tmp), args.images)
        print(f"wrote {args.images} synthetic 224 px JPEGs in {time.perf_counter() - start:.1f} s")
        datasets = {
            "demo (48 px PNG)": ["data=demo"],
            "synthetic (224 px JPEG)": [
                "data=h5",
                f"data.labels={synthetic / 'labels.h5'}",
                f"data.images={synthetic / 'images.h5'}",
                "data.image_size=224",
            ],
        }
        rows = []
        for dataset, data_overrides in datasets.items():
            for aug in args.aug:
                for workers in args.workers:
                    overrides = [*data_overrides, *loader_overrides(args, aug, workers)]
                    rate, size = throughput(overrides, args.batches, args.with_prepare)
                    rows.append(
                        {
                            "dataset": dataset,
                            "size": size,
                            "augmentation": aug,
                            "workers": workers,
                            "images_s": rate,
                        }
                    )
                    print(
                        f"{dataset:24s} {size:4d} px  augmentation={aug:8s} workers={workers}  {rate:8.0f} images/s"
                    )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
