"""The loader's fast paths: torchvision-equal crops and flips, a batch built in one pass with one RNG
save per batch, reused batch memory (in process and across loader workers), channels-last batches."""

from __future__ import annotations

import gc
import io
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from linnaeus.data.buffers import ROW_SHIFT, BatchBuffers
from linnaeus.data.images import BadImageError, H5ImageStore, decode_bytes
from linnaeus.data.transforms import Flip, ResizedCrop, build_train_augment, is_deterministic, seeded_rng
from linnaeus.data.writer import write_images_h5
from tests.test_augment import compose_cfg
from tests.test_prepare_cache import data_for, dataset  # noqa: F401  (the fixture)

CROPS = [
    ((0.08, 1.0), (3 / 4, 4 / 3)),
    ((1.0, 1.0), (1.0, 1.0)),
    ((0.5, 1.0), (1.0, 1.0)),
    ((0.2, 0.2), (2.0, 3.0)),
]


@pytest.mark.parametrize("scale,ratio", CROPS)
@pytest.mark.parametrize("shape", [(3, 28, 28), (3, 224, 224), (3, 300, 260), (3, 40, 90), (3, 90, 40)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_and_flip_give_torchvisions_images_for_the_same_seed(scale, ratio, shape, dtype):
    """Same draws, same kernel: every seed gives the image v2.RandomResizedCrop + flips give, so runs
    stay comparable with the earlier pipeline and the device path (which runs these modules too), and
    from (H, W, C) memory as from (C, H, W). The fixed crop (scale = ratio = 1) draws nothing, so there
    it is compared on its own."""
    image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    image = image if dtype == torch.uint8 else image.float() / 255
    size = 32 if shape[1] < 100 else 224
    flips = scale != (1.0, 1.0) or ratio != (1.0, 1.0)
    theirs = v2.Compose(
        [v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)]
        + ([v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.3)] if flips else [])
    )
    ours = v2.Compose(
        [ResizedCrop(size, scale, ratio)] + ([Flip(0.5, dim=-1), Flip(0.3, dim=-2)] if flips else [])
    )
    hwc = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # (H, W, C) memory, as decoders return it
    for seed in range(40):
        with seeded_rng(seed):
            expected = theirs(image)
        with seeded_rng(seed):
            got = ours(image)
        assert got.shape == (3, size, size) and torch.equal(got, expected), seed
        with seeded_rng(seed):  # the same pixels from (H, W, C) memory, through the fast resize path
            assert torch.equal(ours(hwc), expected), seed


def test_augmentation_none_is_deterministic_and_default_is_not():
    none = build_train_augment(compose_cfg("augmentation=none").augmentation, 32, [0.5] * 3)
    default = build_train_augment(compose_cfg("augmentation=default").augmentation, 32, [0.5] * 3)
    assert is_deterministic(none) and not is_deterministic(default)
    assert is_deterministic(v2.Compose([v2.Resize(37), v2.CenterCrop(32)]))
    assert not is_deterministic(
        v2.Compose([v2.Resize(37), v2.RandomCrop(32)])
    )  # unknown steps count as random
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    state = torch.get_rng_state()
    centre = none(image)
    assert torch.equal(torch.get_rng_state(), state)  # draws nothing
    expected = v2.functional.resize(v2.functional.center_crop(image, [40, 40]), [32, 32], antialias=True)
    assert torch.equal(centre, expected)


@pytest.mark.parametrize("aug", ["default", "none", "strong"])
def test_a_batch_equals_its_samples_one_by_one_and_leaves_the_global_rng_alone(dataset, aug):  # noqa: F811
    _, data = data_for(dataset, f"augmentation={aug}")
    ds = data.train_loader.dataset
    keys = [(int(i), 3) for i in data.train_batches.sampler.indices[:8]]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    batch = ds.__getitems__(keys)
    assert torch.equal(torch.get_rng_state(), state)
    one_by_one = torch.stack([ds[key]["images"] for key in keys])
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(batch["images"], one_by_one)
    assert batch["index"].tolist() == [k for k, _ in keys]
    assert torch.equal(batch["targets"], torch.stack([ds[key]["targets"] for key in keys]))


def test_in_process_buffers_are_reused_only_when_nobody_holds_them():
    buffers = BatchBuffers(slots=2)
    shape = (4, 3, 8, 8)
    first, lease = buffers.take(shape, torch.uint8)
    assert lease is None
    first_ptr = first.data_ptr()
    held, _ = buffers.take(shape, torch.uint8)
    assert held.data_ptr() != first_ptr  # ``first`` is still held
    del first
    again, _ = buffers.take(shape, torch.uint8)
    assert again.data_ptr() == first_ptr  # free again: the same memory
    view = again[1:]
    del again
    blocked, _ = buffers.take(shape, torch.uint8)
    assert blocked.data_ptr() != first_ptr and view.data_ptr() != blocked.data_ptr()  # a view still holds it
    other, _ = buffers.take((2, 3, 8, 8), torch.uint8)
    assert other.shape == (2, 3, 8, 8)
    # a NumPy array over a buffer holds it too
    single = BatchBuffers(slots=1)
    buffer, _ = single.take(shape, torch.uint8)
    array = buffer.numpy()
    del buffer
    assert single.take(shape, torch.uint8)[0].data_ptr() != array.ctypes.data
    pointer = array.ctypes.data
    del array
    assert single.take(shape, torch.uint8)[0].data_ptr() == pointer


def test_a_batch_filled_in_place_never_changes_under_a_consumer_that_keeps_it(dataset):  # noqa: F811
    """The in-process loader keeps every batch a consumer holds intact while it fills the next ones."""
    _, data = data_for(dataset, "augmentation=default")
    data.train_batches.set_epoch(0)
    kept = [batch["images"].clone() for batch in data.train_loader]  # each dropped at once: reused
    held = list(data.train_loader)  # all kept: none may be overwritten
    assert len({b["images"].data_ptr() for b in held}) == len(held)
    for reference, batch in zip(kept, held):
        assert torch.equal(reference, batch["images"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_worker_slots_are_released_when_the_main_process_drops_a_batch(dataset, channels_last):  # noqa: F811
    """Two loader workers write into their shared-memory slots again only after the main process let go
    of the batch there: batches kept for the whole epoch still equal the in-process loader's, and once
    they are dropped every slot is free."""
    _, reference = data_for(dataset, "augmentation=default", batch_size=3)
    _, data = data_for(dataset, "augmentation=default", workers=2, batch_size=3)
    data.train_loader.dataset.buffers = BatchBuffers(workers=2, slots=1, channels_last=channels_last)
    reference.train_loader.dataset.buffers.channels_last = channels_last
    for epoch in range(2):
        reference.train_batches.set_epoch(epoch)
        data.train_batches.set_epoch(epoch)
        expected = [b["images"].clone() for b in reference.train_loader]
        held = list(data.train_loader)  # 6 batches, one slot per worker: fresh memory after the first two
        assert len(held) == 6
        for want, batch in zip(expected, held, strict=True):
            assert torch.equal(batch["images"], want)
            if channels_last:
                assert batch["images"].is_contiguous(memory_format=torch.channels_last)
        busy = data.train_loader.dataset.buffers.busy
        assert busy.sum() > 0
        del held, batch
        gc.collect()
        assert busy.sum() == 0
        # dropped at once, batch after batch: the workers write into their slots again, and every
        # batch still arrives intact (the same epoch again: the same order and images)
        for want, batch in zip(expected, data.train_loader, strict=True):
            assert torch.equal(batch["images"], want)
        del batch
        gc.collect()
        assert busy.sum() == 0


def test_channels_last_batches_prepare_to_the_same_contiguous_floats(dataset):  # noqa: F811
    """The loader's default channels-last batches and contiguous ones hold the same pixels and
    prepare to the same contiguous floats."""
    _, plain = data_for(dataset, "augmentation=none", channels_last=False)
    _, last = data_for(dataset, "augmentation=none")
    for loader in ("train_loader", "val_loader"):
        plain.train_batches.set_epoch(0)
        last.train_batches.set_epoch(0)
        a, b = next(iter(getattr(plain, loader))), next(iter(getattr(last, loader)))
        assert a["images"].is_contiguous() and b["images"].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(a["images"], b["images"])
        pa, pb = plain.prepare(a)["images"], last.prepare(b)["images"]
        assert pb.is_contiguous() and torch.equal(pa, pb)


def test_buffers_travel_to_spawned_workers_without_their_memory():
    buffers = BatchBuffers(workers=2, slots=3)
    buffers.take((2, 3, 4, 4), torch.uint8)
    state = buffers.__getstate__()
    assert state["local"] == [] and state["owned"] == {} and state["busy"] is buffers.busy
    assert buffers.busy.is_shared() and buffers.busy.shape == (6,) and np.all(buffers.busy.numpy() == 0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_worker_batches_arrive_in_slot_memory_mapped_once(dataset, channels_last):  # noqa: F811
    """After a slot's first batch the main process keeps its memory mapped and later batches name only
    the slot: over two epochs every batch (the short last one included, written into the front of a
    slot) lies in one of the 2 x 2 slots, equals the in-process loader's, and its small tensors
    arrived inside the message, not through shared memory."""
    _, reference = data_for(dataset, "augmentation=default", batch_size=3)
    # one batch ahead per worker, and the one the loop holds: two slots each are always enough
    _, data = data_for(dataset, "augmentation=default", "data.prefetch_factor=1", workers=2, batch_size=3)
    for loader in ("train_loader", "val_loader"):
        getattr(data, loader).dataset.buffers = BatchBuffers(workers=2, slots=2, channels_last=channels_last)
        getattr(reference, loader).dataset.buffers.channels_last = channels_last
    for loader in ("train_loader", "val_loader"):
        memory, sizes = set(), []
        for epoch in range(2):
            reference.train_batches.set_epoch(epoch)
            data.train_batches.set_epoch(epoch)
            expected = [(b["images"].clone(), b["targets"].clone()) for b in getattr(reference, loader)]
            batches = iter(getattr(data, loader))
            for images, targets in expected:
                # ``next`` with no batch held (``zip`` would hold the last one while it draws the next)
                batch = next(batches)
                assert torch.equal(batch["images"], images) and torch.equal(batch["targets"], targets)
                assert not batch["targets"].is_shared() and not batch["index"].is_shared()
                memory.add(batch["images"].data_ptr())
                sizes.append(len(images))
                del batch
            assert next(batches, None) is None
        buffers = getattr(data, loader).dataset.buffers
        assert 2 <= len(memory) <= 4 and len(buffers.mapped) <= 4
        assert {ptr for ptr in memory} <= {m.data_ptr() for _, m in buffers.mapped.values()}
        if loader == "val_loader":
            assert sizes[-1] < sizes[0]  # the short last batch came through a slot as well
        gc.collect()
        assert buffers.busy.sum() == 0


def test_a_lease_for_memory_that_never_arrived_is_refused():
    from linnaeus.data.buffers import _watch

    buffers = BatchBuffers(workers=1, slots=1)
    with pytest.raises(RuntimeError, match="never received"):
        _watch(buffers.id, 0, (1, 2), 3, None)
    memory = torch.arange(24, dtype=torch.uint8).view(4, 6)
    rows = _watch(buffers.id, 0, (1, 2), 3, memory)  # the first lease brings the memory
    assert torch.equal(rows, memory[:3]) and rows.data_ptr() == memory.data_ptr()
    with pytest.raises(RuntimeError, match="never received"):
        _watch(buffers.id, 0, (1, 3), 3, None)  # a newer allocation of the slot whose memory is missing
    buffers.busy[0] = 1
    del rows
    gc.collect()
    assert buffers.busy[0] == 0  # dropping the batch released the slot


def test_small_tensors_travel_inside_the_message():
    import pickle

    from linnaeus.data.buffers import Inline, travelling

    targets = torch.arange(64 * 4, dtype=torch.int64).view(64, 4)
    assert travelling(targets) is targets  # in the main process nothing travels
    back = pickle.loads(pickle.dumps(Inline(targets)))
    assert isinstance(back, torch.Tensor) and torch.equal(back, targets) and back.dtype == torch.int64


def test_a_batch_that_fails_in_a_worker_frees_its_slot(dataset):  # noqa: F811
    """A bad image fails its batch in the worker after the slot was taken: the slot is free again,
    and the batches after it (the first ones of a slot whose memory never left included) still come
    through the slots intact."""
    from linnaeus.data.images import BadImageError

    _, reference = data_for(dataset, "augmentation=default", batch_size=3)
    _, data = data_for(dataset, "augmentation=default", "data.prefetch_factor=1", workers=2, batch_size=3)
    ds = data.train_loader.dataset
    ds.buffers = BatchBuffers(workers=2, slots=2)
    reference.train_batches.set_epoch(0)
    data.train_batches.set_epoch(0)
    batches = [(b["images"].clone(), b["index"].clone()) for b in reference.train_loader]
    expected = [images for images, _ in batches]
    bad = int(batches[0][1][1])  # the second image of the first batch
    read = ds._read

    def failing(index: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if index == bad:
            raise BadImageError("damaged on purpose")
        return read(index, out)

    ds._read = failing  # the workers fork with it
    it = iter(data.train_loader)
    with pytest.raises(BadImageError, match="damaged on purpose"):
        next(it)
    rest = [batch["images"].clone() for batch in it]
    assert len(rest) == len(expected) - 1
    for want, got in zip(expected[1:], rest, strict=True):
        assert torch.equal(got, want)
    del it
    gc.collect()
    assert ds.buffers.busy.sum() == 0


def test_a_lease_from_an_unknown_pool_brings_its_memory_in_its_layout():
    from linnaeus.data.buffers import _watch

    memory = torch.arange(2 * 4 * 5 * 3, dtype=torch.uint8).view(2, 4, 5, 3)  # (B, H, W, C)
    batch = _watch(-1, 0, (1, 1), 1, memory, True)
    assert batch.shape == (1, 3, 4, 5) and torch.equal(batch, memory[:1].permute(0, 3, 1, 2))
    assert batch.data_ptr() != memory.data_ptr()  # a copy: nobody here watches that pool's slots
    with pytest.raises(RuntimeError, match="unknown buffer pool arrived without memory"):
        _watch(-1, 0, (1, 1), 1, None, True)


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    """24 images around a 32 px batch: JPEGs of exactly 32 px and of 64 px (1/2 DCT scale: 32 px),
    which the loader decodes straight into channels-last batch rows, and 40 x 36 px JPEGs and 32 px
    PNGs, which it decodes elsewhere and copies."""
    from linnaeus.data.writer import write_images_h5, write_labels_h5
    from tests.test_image_layouts import encode, photo

    root = tmp_path_factory.mktemp("sized")
    identifiers, files = [], []
    for i in range(24):
        kind = i % 4
        shape = [(32, 32), (64, 64), (40, 36), (32, 32)][kind]
        fmt = "PNG" if kind == 3 else "JPEG"
        files.append(encode(photo(*shape, seed=i), fmt, **({"quality": 90} if fmt == "JPEG" else {})))
        identifiers.append(f"img_{i:02d}.{fmt.lower()}")
    write_images_h5(root / "images.h5", identifiers, files)
    species = np.arange(24) % 4
    write_labels_h5(
        root / "labels.h5", identifiers, {"taxa_L20": 10 + species // 2, "taxa_L10": 20 + species}
    )
    return root


def sized_data(root, aug: str, crop_pct: str, workers: int, channels_last: bool):
    from linnaeus.data.loader import build_data

    cfg = compose_cfg(
        "data=h5",
        f"data.labels={root / 'labels.h5'}",
        f"data.images={root / 'images.h5'}",
        "data.image_size=32",
        f"data.val_crop_pct={crop_pct}",
        "data.batch_size=5",
        "data.val_fraction=0.25",
        f"data.num_workers={workers}",
        "data.check_images=false",
        f"augmentation={aug}",
    )
    return build_data(cfg.data, cfg.augmentation, run_dir=None, seed=3, channels_last=channels_last)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("aug", ["none", "default"])
def test_images_decoded_into_channels_last_rows_equal_contiguous_batches(sized, aug, workers, monkeypatch):
    """Channels-last batches, where JPEGs of the row's size are decoded into the row itself, hold
    exactly the images of contiguous batches, where every image is copied in: training (random crops
    read from the row they were decoded into) and validation (resized or not), over two epochs."""
    import simplejpeg

    decode, into_rows = simplejpeg.decode_jpeg, []

    def counting(*args, buffer=None, **kwargs):
        into_rows.append(buffer is not None)
        return decode(*args, buffer=buffer, **kwargs)

    monkeypatch.setattr(simplejpeg, "decode_jpeg", counting)  # seen in this process (workers=0)
    for crop_pct in ("1.0", "0.875"):
        plain = sized_data(sized, aug, crop_pct, workers, channels_last=False)
        last = sized_data(sized, aug, crop_pct, workers, channels_last=True)
        for epoch in range(2):
            for data in (plain, last):
                data.train_batches.set_epoch(epoch)
            for loader in ("train_loader", "val_loader"):
                expected = [b["images"].clone() for b in getattr(plain, loader)]
                got = [b["images"].clone() for b in getattr(last, loader)]
                assert len(got) == len(expected) >= 1
                for a, b in zip(expected, got, strict=True):
                    assert b.is_contiguous(memory_format=torch.channels_last) and torch.equal(a, b)
    if workers == 0:  # half the JPEGs decode to 32 px; the first of each batch sets its shape
        assert 0 < sum(into_rows) < len(into_rows) / 2


@pytest.mark.parametrize("channels, height, width", [(3, 64, 64), (3, 224, 200), (3, 9, 7), (1, 80, 72)])
def test_copy_image_writes_what_torchs_copy_writes_for_every_layout(channels, height, width):
    """``copy_image`` (NumPy's strided copy for large transpositions) leaves a row exactly as
    ``Tensor.copy_`` does: images over (H, W, C) memory, boxes of a larger such image, planar images,
    uint8 and float, into planar rows, channels-last rows and rows of another dtype; the neighbouring
    rows stay as they were."""
    from linnaeus.data.buffers import copy_image

    generator = torch.Generator().manual_seed(channels * height + width)
    pixels = torch.randint(0, 256, (2 * height, 2 * width, channels), dtype=torch.uint8, generator=generator)
    sources = [
        pixels[:height, :width].contiguous().permute(2, 0, 1),  # as decoders return pixels
        pixels[3 : 3 + height, 5 : 5 + width].permute(2, 0, 1),  # a crop box of such an image
        pixels[:height, :width].permute(2, 0, 1).contiguous(),  # planar
    ]
    sources += [source.float() / 255 for source in sources]
    for source in sources:
        for dtype in (torch.uint8, torch.float32):
            for layout in (torch.contiguous_format, torch.channels_last):
                batch = torch.full((3, channels, height, width), 7, dtype=dtype).contiguous(
                    memory_format=layout
                )
                expected = batch.clone()
                expected[1].copy_(source)
                copy_image(batch[1], source)
                assert torch.equal(batch, expected), (source.stride(), dtype, layout)


def test_fill_takes_an_image_written_into_its_row_as_it_is_and_copies_other_views_off_first():
    images = [torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8) for _ in range(4)]

    def sample(k: int, row: torch.Tensor | None) -> torch.Tensor:
        if row is None:
            return images[k]
        row.copy_(images[k])
        return row if k % 2 else row.transpose(1, 2)  # the row itself, or another view of its memory

    for channels_last in (False, True):
        batch = BatchBuffers(channels_last=channels_last).fill(sample, 4)
        assert torch.equal(batch[0], images[0])
        assert torch.equal(batch[1], images[1]) and torch.equal(batch[3], images[3])
        assert torch.equal(batch[2], images[2].transpose(1, 2))


def test_a_store_whose_read_takes_no_row_is_called_without_one(sized):
    """A store without ``decodes_into_rows`` (one written before stores could decode into a batch row)
    is called as ``read(row, identifier)``, also through the crash trace, and its batches are right."""
    from linnaeus.data.faults import install_crash_trace

    class TwoArgumentStore:
        def __init__(self, inner: H5ImageStore) -> None:
            self.inner = inner

        def read(self, row: int, identifier: str) -> torch.Tensor:
            return self.inner.read(row, identifier)

    expected = sized_data(sized, "none", "1.0", 0, channels_last=True)
    data = sized_data(sized, "none", "1.0", 0, channels_last=True)
    taxa = data.train_loader.dataset
    taxa.store = TwoArgumentStore(taxa.store)
    install_crash_trace(taxa)
    for each in (expected, data):
        each.train_batches.set_epoch(0)
    for a, b in zip(expected.train_loader, data.train_loader, strict=True):
        assert torch.equal(a["images"], b["images"])


def _mixed_rows(tmp_path):
    """An images.h5 of one batch's worth of files: which of them decode straight into a 32 px row."""
    from tests.test_image_layouts import encode, photo

    cmyk = io.BytesIO()
    Image.fromarray(photo(32, 32, seed=4)).convert("CMYK").save(cmyk, format="JPEG", quality=95)
    whole = encode(photo(32, 32, seed=5), "JPEG", quality=90)
    files = [
        encode(photo(32, 32, seed=0), "JPEG", quality=90),  # the row's size
        encode(photo(64, 70, seed=1), "JPEG", quality=90),  # 32 x 35 at the 1/2 DCT scale: another size
        encode(photo(64, 64, seed=2), "JPEG", quality=90),  # 32 x 32 at the 1/2 DCT scale
        encode(photo(32, 32, seed=3), "PNG"),
        cmyk.getvalue(),  # CMYK: decoded to RGB as a plain decode does
        whole[: len(whole) // 2],  # cut short: the decoder refuses it, ``read`` says why
        encode(photo(40, 36, seed=6), "JPEG", quality=90),
    ]
    write_images_h5(tmp_path / "images.h5", [f"{i}.img" for i in range(len(files))], files)
    return H5ImageStore(tmp_path / "images.h5").with_min_side(32), files


def test_decode_rows_decodes_each_jpeg_of_the_rows_size_into_its_row_and_only_those(tmp_path):
    store, files = _mixed_rows(tmp_path)
    pixels = np.full((len(files), 32, 32, 3), 7, dtype=np.uint8)
    done = store.decode_rows(list(range(len(files))), pixels)
    assert done == [True, False, True, False, True, False, False]
    for k in (0, 2, 4):  # what a decode of its own gives
        assert np.array_equal(pixels[k], decode_bytes(files[k], 32).permute(1, 2, 0).numpy())
    assert (pixels[[1, 3, 6]] == 7).all()  # another size or format: its row untouched
    with pytest.raises(BadImageError, match="5.img"):
        store.read(5, "5.img")  # what the caller does with a row left undone
    rows = [2, 0]  # any rows, in any order
    again = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    assert store.decode_rows(rows, again) == [True, True]
    assert np.array_equal(again[0], pixels[2]) and np.array_equal(again[1], pixels[0])


def test_decode_rows_puts_each_image_in_the_crash_trace_while_it_decodes(tmp_path, monkeypatch):
    from linnaeus.data import images
    from linnaeus.data.faults import install_crash_trace

    store, files = _mixed_rows(tmp_path)
    holder = SimpleNamespace(store=store)
    (traced,) = install_crash_trace(holder)
    real, seen = images.simplejpeg, []

    class Watching:
        def decode_jpeg(self, data, *args, **kwargs):
            seen.append(traced.slots[-1].tolist())  # the main process's slot, during the decode
            return real.decode_jpeg(data, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(images, "simplejpeg", Watching())
    pixels = np.zeros((len(files), 32, 32, 3), dtype=np.uint8)
    assert traced.decode_rows(list(range(len(files))), pixels)[:3] == [True, False, True]
    # the JPEGs that decode to the row's size, CMYK and the cut one included, each with its row
    assert seen == [[os.getpid(), 0], [os.getpid(), 2], [os.getpid(), 4], [os.getpid(), 5]]
    assert traced.slots[-1, 1] == -1  # none is being decoded now


@pytest.mark.parametrize("channels_last", [True, False])
def test_image_batches_start_off_32_byte_boundaries_and_arrive_so(dataset, channels_last):  # noqa: F811
    """uint8 image batches start ROW_SHIFT bytes past an aligned allocation (libjpeg-turbo decodes
    slower into 32-byte aligned lines), in the main process's buffers, in a worker's shared-memory
    slots and in the batches those arrive as; the pixel lines of a 224 px row then never start on a
    32-byte boundary. Other tensors are allocated as usual."""
    buffers = BatchBuffers(workers=0, channels_last=channels_last)
    for shared in (False, True):
        batch = buffers.empty((4, 3, 224, 224), torch.uint8, shared=shared)
        assert batch.data_ptr() % 64 == ROW_SHIFT and batch.is_shared() is shared
        assert batch.untyped_storage().nbytes() == 4 * 3 * 224 * 224 + ROW_SHIFT
        starts = {batch[k, 0, line].data_ptr() % 32 for k in range(4) for line in range(224)}
        assert starts == {ROW_SHIFT}  # every line of pixels (channels-last) or of one channel
        assert buffers.empty((4, 6), torch.int64, shared=shared).data_ptr() % 64 == 0
    local, _ = buffers.take((4, 3, 24, 24), torch.uint8)
    assert local.data_ptr() % 64 == ROW_SHIFT
    _, data = data_for(dataset, "augmentation=none", workers=2, batch_size=3, channels_last=channels_last)
    data.train_batches.set_epoch(0)
    _, reference = data_for(dataset, "augmentation=none", batch_size=3, channels_last=channels_last)
    reference.train_batches.set_epoch(0)
    for want, batch in zip(reference.train_loader, data.train_loader, strict=True):
        assert batch["images"].data_ptr() % 64 == ROW_SHIFT  # from the slots, as the worker wrote them
        assert want["images"].data_ptr() % 64 == ROW_SHIFT
        assert torch.equal(batch["images"], want["images"])


def test_only_fixed_resized_crops_keep_an_image_of_their_output_size():
    """A row decoded at the batch's size skips the transform only when the transform would return it
    unchanged: fixed resized crops (augmentation=none) of one size, and nothing random or resizing."""
    from linnaeus.data.transforms import Pipeline, keeps_its_output_size

    fixed = ResizedCrop(32, (1.0, 1.0), (1.0, 1.0))
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert fixed(image) is image  # what skipping it relies on
    assert keeps_its_output_size(fixed) and keeps_its_output_size(Pipeline([fixed]))
    assert keeps_its_output_size(Pipeline([fixed, ResizedCrop(32, (1.0, 1.0), (1.0, 1.0))]))
    assert not keeps_its_output_size(Pipeline([fixed, ResizedCrop(24, (1.0, 1.0), (1.0, 1.0))]))
    assert not keeps_its_output_size(ResizedCrop(32, (0.08, 1.0), (0.75, 1.33)))
    assert not keeps_its_output_size(Pipeline([fixed, Flip(0.5, dim=-1)]))
    assert not keeps_its_output_size(v2.Compose([v2.Resize(32), v2.CenterCrop(32)]))  # resizes 32 x 40
    cfg = compose_cfg("augmentation=none")
    assert keeps_its_output_size(build_train_augment(cfg.augmentation, 32, [0.5] * 3))
    cfg = compose_cfg("augmentation=default")
    assert not keeps_its_output_size(build_train_augment(cfg.augmentation, 32, [0.5] * 3))


def test_a_slot_first_used_by_a_short_batch_is_made_for_full_ones():
    """An epoch's short last batch that lands in a slot never used before does not size it: the next
    full batch in that slot reuses its memory (same token, nothing sent again)."""
    buffers = BatchBuffers(workers=1, slots=2)
    _, full = buffers._take_slot(0, (4, 3, 8, 8), torch.uint8)
    _, short = buffers._take_slot(0, (2, 3, 8, 8), torch.uint8)  # slot 0 is busy: a fresh slot 1
    assert (full.slot, short.slot) == (0, 1) and short.count == 2 and short.memory.shape[0] == 4
    buffers.release(1)
    rows, again = buffers._take_slot(0, (4, 3, 8, 8), torch.uint8)
    assert again.slot == 1 and again.token == short.token and again.memory is None
    assert rows.shape == (4, 3, 8, 8) and rows.data_ptr() == short.memory.data_ptr()
