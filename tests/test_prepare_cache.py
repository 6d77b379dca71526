"""uint8 batches and ``DataBundle.prepare``, decoding on the device (data.decode=gpu, CPU fallback) and
the shared RAM cache (data.cache=ram), on real HDF5 datasets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import linnaeus.data.prepare as prepare_module
from linnaeus.data.cache import CachePart, build_ram_cache
from linnaeus.data.images import BadImageError, H5ImageStore
from linnaeus.data.labels import DatasetError
from linnaeus.data.loader import build_data
from linnaeus.data.prepare import EncodedImages, PrepareBatch
from linnaeus.data.transforms import (
    Flip,
    Pipeline,
    build_eval_transform,
    build_train_augment,
    normalize_images,
    quantize_images,
    sample_seed,
    seeded_rng,
)
from linnaeus.data.writer import write_images_h5, write_labels_h5
from tests.test_augment import compose_cfg
from tests.test_image_layouts import encode, photo

N = 24
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """24 photos-like images, JPEG and PNG, 40-63 px, two ranks."""
    root = tmp_path_factory.mktemp("data")
    identifiers, files = [], []
    for i in range(N):
        fmt = "PNG" if i % 3 == 0 else "JPEG"
        array = photo(40 + i, 63 - i // 2, seed=i)
        files.append(encode(array, fmt, **({"quality": 90} if fmt == "JPEG" else {})))
        identifiers.append(f"img_{i:02d}.{fmt.lower()}")
    write_images_h5(root / "images.h5", identifiers, files)
    species = np.arange(N) % 4
    write_labels_h5(
        root / "labels.h5", identifiers, {"taxa_L20": 10 + species // 2, "taxa_L10": 20 + species}
    )
    return root


def data_for(dataset, *overrides: str, workers: int = 0, batch_size: int = 8, channels_last: bool = True):
    cfg = compose_cfg(
        "data=h5",
        f"data.labels={dataset / 'labels.h5'}",
        f"data.images={dataset / 'images.h5'}",
        "data.image_size=32",
        "data.val_crop_pct=0.875",  # validation resizes to 37 px, the default load size for 32 px
        f"data.batch_size={batch_size}",
        "data.val_fraction=0.25",
        f"data.num_workers={workers}",
        "data.check_images=false",
        *overrides,
    )
    return cfg, build_data(cfg.data, cfg.augmentation, run_dir=None, seed=5, channels_last=channels_last)


def first_train_batch(data, epoch: int = 0) -> dict:
    data.train_batches.set_epoch(epoch)
    return next(iter(data.train_loader))


@pytest.mark.parametrize("channels_last", [True, False])
def test_uint8_batches_and_prepare_equal_the_float_pipeline(dataset, channels_last):
    """The loader hands over uint8 (channels-last by default); prepare normalises on the device to
    contiguous float32: the same numbers as normalising per sample in the worker (the previous
    pipeline)."""
    cfg, data = data_for(dataset, "augmentation=default", channels_last=channels_last)
    store = H5ImageStore(dataset / "images.h5")
    batch = first_train_batch(data)
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape == (8, 3, 32, 32)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert batch["images"].is_contiguous(memory_format=layout)
    assert batch["images"].is_contiguous() is not channels_last
    prepared = data.prepare(batch)
    assert prepared["images"].dtype == torch.float32 and prepared["images"].is_contiguous()
    float_pipeline = v2.Compose(
        [
            build_train_augment(cfg.augmentation, 32, MEAN),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    ds = data.train_loader.dataset
    expected = []
    for index in batch["index"].tolist():
        image = store.read(int(ds.image_rows[index]), str(ds.identifiers[index]))
        with seeded_rng(sample_seed(5, 0, index)):
            expected.append(float_pipeline(image))
    torch.testing.assert_close(prepared["images"], torch.stack(expected), rtol=0, atol=1e-6)

    val = next(iter(data.val_loader))
    assert val["images"].dtype == torch.uint8 and val["images"].shape[1:] == (3, 32, 32)
    eval_float = build_eval_transform(32, MEAN, STD, crop_pct=0.875)
    expected = [
        eval_float(store.read(int(ds.image_rows[i]), str(ds.identifiers[i]))) for i in val["index"].tolist()
    ]
    assert val["images"].is_contiguous(memory_format=layout)
    torch.testing.assert_close(data.prepare(val)["images"], torch.stack(expected), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="expects the loader's uint8 images, got torch.float32"):
        data.prepare(prepared)  # once per batch


@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (3, 8, 6), (2, 4, 3, 5, 5)])
def test_normalize_images_is_the_exact_formula_in_any_layout_and_quantize_inverts_it(shape):
    """(x / 255 - mean) / std in float64, to float32 precision, whatever the input's memory layout
    (contiguous, channels-last, a crop view); the output is contiguous; every uint8 level of every
    channel comes back exactly through ``quantize_images``."""
    generator = torch.Generator().manual_seed(len(shape))
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    mean_t = torch.tensor(MEAN, dtype=torch.float64).view(-1, 1, 1)
    std_t = torch.tensor(STD, dtype=torch.float64).view(-1, 1, 1)
    expected = (images.double() / 255 - mean_t) / std_t
    hwc = images.movedim(-3, -1).contiguous().movedim(-1, -3)  # (..., H, W, 3) memory
    wide = torch.zeros((*shape[:-1], shape[-1] + 4), dtype=torch.uint8)
    wide[..., 2 : 2 + shape[-1]] = images
    for layout in (images, hwc, wide[..., 2 : 2 + shape[-1]]):
        out = normalize_images(layout, MEAN, STD)
        assert out.dtype == torch.float32 and out.shape == shape and out.is_contiguous()
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
    levels = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(3, 16, 16)
    assert torch.equal(quantize_images(normalize_images(levels, MEAN, STD), MEAN, STD), levels)


@pytest.fixture
def jpeg_calls(monkeypatch) -> list[int]:
    """Records how many files each torchvision.io.decode_jpeg call received."""
    calls: list[int] = []
    real = prepare_module.decode_jpeg

    def spy(files, **kwargs):
        calls.append(len(files) if isinstance(files, list) else 1)
        return real(files, **kwargs)

    monkeypatch.setattr(prepare_module, "decode_jpeg", spy)
    return calls


def test_gpu_decode_path_falls_back_to_cpu_for_png_and_equals_the_cpu_path(dataset, jpeg_calls):
    """data.decode=gpu on a CPU machine: the batch is moved to "cpu" instead of "cuda", which runs the
    same code (one batched decode_jpeg call, PNGs through the CPU decoder)."""
    gpu_args = ("augmentation=default", "augmentation.device=gpu", "data.decode=gpu")
    _, on_device = data_for(dataset, *gpu_args, workers=2)  # EncodedImages cross the worker boundary
    _, in_workers = data_for(dataset, "augmentation=default", "augmentation.device=gpu")
    for loader in ("train_loader", "val_loader"):
        if loader == "train_loader":
            encoded, decoded = first_train_batch(on_device), first_train_batch(in_workers)
        else:
            encoded, decoded = next(iter(on_device.val_loader)), next(iter(in_workers.val_loader))
        images = encoded["images"]
        assert isinstance(images, EncodedImages)
        assert torch.equal(encoded["index"], decoded["index"])
        pngs = sum(not prepare_module.is_jpeg(f) for f in images.files())
        assert 0 < pngs < len(images)
        jpeg_calls.clear()
        got = on_device.prepare({**encoded, "images": images.to("cpu", non_blocking=True)})
        assert jpeg_calls == [len(images) - pngs]  # one call for every JPEG of the batch
        expected = in_workers.prepare(decoded)
        assert got["images"].shape == expected["images"].shape
        assert torch.equal(got["images"], expected["images"]), loader


def test_gpu_decode_names_a_bad_image_and_checks_its_settings(dataset):
    good = encode(photo(20, 20, 0), "JPEG", quality=90)
    packed = EncodedImages.pack(
        [np.frombuffer(good, np.uint8), np.frombuffer(b"\xff\xd8\xff broken", np.uint8)],
        ["a.jpg", "b.jpg"],
        16,
        16,
    )
    with pytest.raises(BadImageError, match="image 'b.jpg': cannot decode"):
        PrepareBatch(MEAN, STD)({"images": packed})
    with pytest.raises(ValueError, match="data.decode=gpu decodes on the device.*augmentation.device=gpu"):
        data_for(dataset, "data.decode=gpu")
    with pytest.raises(ValueError, match="data.cache=ram holds decoded images"):
        data_for(dataset, "data.decode=gpu", "augmentation.device=gpu", "data.cache=ram")


@pytest.mark.parametrize("channels_last", [False, True])
def test_ram_cache_gives_the_same_images_as_no_cache(dataset, tmp_path, channels_last):
    """Cached images equal decoded ones, in contiguous batches and in channels-last ones (GPU
    training), whatever the cache's own (L, L, 3) layout."""
    args = ("augmentation=default", "augmentation.device=gpu")  # workers load 37 px squares, the cache size
    _, plain = data_for(dataset, *args)
    _, cached = data_for(
        dataset,
        *args,
        f"data.ram_cache_dir={tmp_path}",
        "data.cache=ram",
        workers=2,
        channels_last=channels_last,
    )
    num_train, num_val = cached.num_train, cached.num_val
    sizes = sorted(f.stat().st_size for f in tmp_path.glob("linnaeus-cache-*.u8"))
    # one array per split, every image once: training at the load size, validation as it is cropped
    assert sizes == sorted([num_train * 3 * 37 * 37, num_val * 3 * 32 * 32]) and num_train + num_val == N
    assert not list(tmp_path.glob(".*tmp*"))
    for epoch in (0, 1):
        a, b = first_train_batch(plain, epoch), first_train_batch(cached, epoch)
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["images"], b["images"])
        assert b["images"].is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
    a, b = next(iter(plain.val_loader)), next(iter(cached.val_loader))
    assert torch.equal(a["images"], b["images"])
    image = cached.train_loader.dataset.store.read(int(cached.train_loader.dataset.store.rows[0]), "")
    assert image.shape == (3, 37, 37) and image.permute(1, 2, 0).is_contiguous()  # a view of the file

    class Unreadable(H5ImageStore):
        def read(self, row, identifier):
            raise AssertionError("another local rank decoded an image")

    # another rank of the node maps the filled arrays without decoding anything
    ds, val = cached.train_loader.dataset, cached.val_loader.dataset
    parts = [  # the rows are the label rows here
        CachePart(ds.store.rows, ds.identifiers[ds.store.rows], 37, 37),
        CachePart(val.store.rows, val.identifiers[val.store.rows], 37, 32),
    ]
    other = build_ram_cache(Unreadable(dataset / "images.h5"), parts, directory=tmp_path, local_rank=1)
    assert [o.file for o in other] == [ds.store.file, val.store.file]
    for mine, theirs in zip(other, (ds.store, val.store)):
        for row in theirs.rows.tolist():
            assert torch.equal(mine.read(row, ""), theirs.read(row, ""))


@pytest.mark.parametrize("workers", [0, 2])
def test_ram_cache_holds_a_fixed_crop_as_it_crops_and_trains_on_the_same_pixels(dataset, tmp_path, workers):
    """With the fixed crop of ``augmentation=none`` (augmenting on the CPU) the cache holds each
    training image's centre square at the training size, as the crop makes it: every training and
    validation batch equals the uncached loader's, the training array is 32 px (not the 37 px load
    size) and its images come back untouched by the crop. An explicit ``augmentation.load_size``
    still sets the cached size."""
    _, plain = data_for(dataset, "augmentation=none")
    _, cached = data_for(
        dataset, "augmentation=none", "data.cache=ram", f"data.ram_cache_dir={tmp_path}", workers=workers
    )
    sizes = sorted(f.stat().st_size for f in tmp_path.glob("linnaeus-cache-*.u8"))
    assert sizes == sorted([cached.num_train * 3 * 32 * 32, cached.num_val * 3 * 32 * 32])
    for epoch in (0, 1):
        plain.train_batches.set_epoch(epoch)
        cached.train_batches.set_epoch(epoch)
        pairs = list(zip(plain.train_loader, cached.train_loader, strict=True))
        assert len(pairs) == 2
        for a, b in pairs:
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["images"], b["images"])
    for a, b in zip(plain.val_loader, cached.val_loader, strict=True):
        assert torch.equal(a["images"], b["images"])
    train = cached.train_loader.dataset
    image = train.store.read(int(train.store.rows[0]), "")
    assert train._apply(image) is image  # the crop has nothing left to do

    explicit = tmp_path / "explicit"
    explicit.mkdir()
    _, sized = data_for(
        dataset,
        "augmentation=none",
        "augmentation.load_size=37",
        "data.cache=ram",
        f"data.ram_cache_dir={explicit}",
    )
    sizes = sorted(f.stat().st_size for f in explicit.glob("linnaeus-cache-*.u8"))
    assert sizes == sorted([sized.num_train * 3 * 37 * 37, sized.num_val * 3 * 32 * 32])


def test_a_transform_set_after_construction_is_the_one_applied_and_seeded(dataset):
    _, data = data_for(dataset, "augmentation=none")
    train = data.train_loader.dataset
    keys = [(i, 0) for i in range(4)]
    before = train.__getitems__(keys)["images"].clone()
    train.transform = Pipeline([train.transform, Flip(1.0, dim=-1)])  # the crop to 32 px, then a flip
    assert train.seeded and torch.equal(train.__getitems__(keys)["images"], before.flip(-1))


def test_ram_cache_memory_budget_error(dataset, tmp_path):
    store = H5ImageStore(dataset / "images.h5")
    ids = np.array([f"{i}" for i in range(N)], dtype=object)
    parts = [CachePart(np.arange(18), ids[:18], 37, 37), CachePart(np.arange(18, N), ids[18:], 37, 32)]
    with pytest.raises(DatasetError) as err:
        build_ram_cache(store, parts, directory=tmp_path, available=50_000)
    message = str(err.value)
    assert "\n" not in message
    needed = 18 * 3 * 37 * 37 + 6 * 3 * 32 * 32
    assert (
        f"data.cache=ram needs {needed:,} bytes (0.00 GiB) for 18 images of 3 x 37 x 37 and 6 images"
        in message
    )
    assert "only 50,000 bytes (0.00 GiB) are available" in message and "data.cache=none" in message
    assert list(tmp_path.iterdir()) == []  # nothing written


FILL_UNDER_STOP_HANDLERS = """
import sys
import numpy as np
from pathlib import Path
from linnaeus.data.cache import CachePart, build_ram_cache
from linnaeus.data.images import H5ImageStore
from linnaeus.signals import StopSignals
StopSignals().install()  # as the trainer does before it builds its data
store, out = H5ImageStore(sys.argv[1]), Path(sys.argv[2])
ids = np.array([str(i) for i in range(24)], dtype=object)
for round in range(int(sys.argv[3])):
    folder = out / str(round)
    folder.mkdir()
    build_ram_cache(store, [CachePart(np.arange(24), ids, 37, 32)], directory=folder, workers=2)
print("filled")
"""


def test_ram_cache_fill_finishes_under_the_trainers_stop_handlers(dataset, tmp_path):
    """The fill pool's workers inherit the trainer's SIGTERM handler (it only records the signal);
    stopping the pool must not wait on a worker that ignored its SIGTERM."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FILL_UNDER_STOP_HANDLERS, str(dataset / "images.h5"), str(tmp_path), "12"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the pool's workers too, which hold the pipes open
        proc.communicate()
        pytest.fail("filling the RAM cache hung")
    assert proc.returncode == 0 and out.strip() == "filled", err[-2000:]


ADOPT = """
import sys, logging
import numpy as np
from pathlib import Path
from linnaeus.data.cache import CachePart, build_ram_cache
from linnaeus.data.images import H5ImageStore
logging.basicConfig(level=logging.INFO, format="%(message)s")
ids = np.array([str(i) for i in range(24)], dtype=object)
[cache] = build_ram_cache(H5ImageStore(sys.argv[1]), [CachePart(np.arange(24), ids, 37, 32)], directory=Path(sys.argv[2]))
print(cache.file)
"""


def test_a_killed_runs_cache_is_reused_and_deleted_by_the_next_run_a_live_ones_is_kept(dataset, tmp_path):
    def run() -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", ADOPT, str(dataset / "images.h5"), str(tmp_path)]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)

    first = run()
    cache = Path(first.stdout.strip())
    assert not cache.exists()  # the run that filled it deleted it when it exited
    # a run killed before it could delete its cache: a complete file whose owner is gone
    proc = subprocess.Popen(
        [sys.executable, "-c", ADOPT + "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
        + [str(dataset / "images.h5"), str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and cache.exists()
    content = cache.read_bytes()
    second = run()
    assert "left by a run that has exited; this run deletes it" in second.stderr
    assert "decoding" not in second.stderr  # reused, not decoded again
    assert not cache.exists() and not Path(f"{cache}.owner").exists()
    # a live owner's cache is used and left to its owner
    proc = subprocess.Popen(
        [sys.executable, "-c", ADOPT + "import time; print('ready', flush=True); time.sleep(60)"]
        + [str(dataset / "images.h5"), str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == str(cache)
        assert proc.stdout.readline().strip() == "ready"
        assert cache.read_bytes() == content
        third = run()
        assert "filled by another run" in third.stderr and cache.exists()
    finally:
        proc.kill()
        proc.wait()


def test_config_groups_compose_with_the_new_keys():
    cfg = compose_cfg("data=h5", "data.labels=x", "data.images=y")
    assert (cfg.data.decode, cfg.data.cache, cfg.data.ram_cache_dir) == ("cpu", "none", "/dev/shm")
    assert cfg.data.prefetch_factor >= 2
