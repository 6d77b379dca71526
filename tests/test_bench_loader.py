"""scripts/bench_loader.py: its timed window (the steady state, over whole rounds of the workers)
and its bare-pool reference."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linnaeus.data.writer import write_images_h5

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_loader", REPO / "scripts" / "bench_loader.py")
bench_loader = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_loader)
timed, timed_window = bench_loader.timed, bench_loader.timed_window


class _Batches:
    """Stands in for a DataLoader: ``epoch_batches`` batches of ``size`` images per epoch, counting
    the batches drawn."""

    def __init__(self, num_workers: int, prefetch_factor: int | None, epoch_batches: int, size: int = 4):
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.epoch_batches, self.size, self.drawn, self.epochs = epoch_batches, size, 0, 0

    def __iter__(self):
        self.epochs += 1
        for _ in range(self.epoch_batches):
            self.drawn += 1
            yield {"images": [0] * self.size}


@pytest.mark.parametrize(
    ("workers", "prefetch", "asked", "expected"),
    [
        (0, None, 15, (2, 15)),  # one process: nothing to round, two batches to start up
        (2, 2, 15, (8, 16)),  # 15 from 2 workers would end as late as 16: 16 timed
        (2, 2, 16, (8, 16)),
        (3, 2, 16, (12, 18)),
        (2, 4, 5, (12, 6)),  # prefetch_factor + 2 rounds of warm-up: every buffer written once
        (1, 2, 7, (4, 7)),
        (2, None, 15, (8, 16)),  # no prefetch_factor known: PyTorch's default of 2
    ],
)
def test_the_window_is_whole_rounds_after_every_buffer_was_written(workers, prefetch, asked, expected):
    assert timed_window(_Batches(workers, prefetch, 100), asked) == expected


class _Clock:
    """``time.perf_counter`` that moves on by one second per call."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_timed_draws_the_warm_up_and_counts_only_the_timed_images(monkeypatch):
    monkeypatch.setattr(bench_loader.time, "perf_counter", _Clock())
    loader = _Batches(num_workers=2, prefetch_factor=2, epoch_batches=100, size=4)
    rate = timed(loader, 15)  # the clock is read at the window's start and end: one second apart
    assert loader.drawn == 8 + 16 and loader.epochs == 1 and rate == 16 * 4


def test_an_epoch_end_inside_the_window_starts_the_next_epoch_and_is_said(capsys):
    loader, epochs = _Batches(num_workers=2, prefetch_factor=2, epoch_batches=10), []
    timed(loader, 6, new_epoch=epochs.append)  # 8 warm-up, then 2 left in the epoch and 4 in the next
    assert loader.drawn == 8 + 6 and epochs == [1] and loader.epochs == 2
    assert "crossed an epoch's end" in capsys.readouterr().err
    loader = _Batches(num_workers=0, prefetch_factor=None, epoch_batches=10)
    timed(loader, 5)
    assert "crossed" not in capsys.readouterr().err


def _jpeg(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_the_bare_pool_times_whole_rounds_of_at_least_16(tmp_path, monkeypatch):
    path = tmp_path / "images.h5"
    write_images_h5(path, [f"{i}.jpg" for i in range(12)], [_jpeg(i) for i in range(12)])
    monkeypatch.setattr(bench_loader.time, "perf_counter", _Clock())  # one second per window
    rate = bench_loader.bare_pool_rate(path, workers=2, batch_size=4, batches=3, repeats=1)
    assert rate == 16 * 2 * 4  # 16 rounds of 2 batches of 4 images, each announced by its process
    rate = bench_loader.bare_pool_rate(path, workers=3, batch_size=4, batches=50, repeats=1)
    assert rate == 17 * 3 * 4  # 50 batches: rounded up to 17 rounds of 3


def test_a_bare_pool_process_that_fails_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "images.h5"
    png = io.BytesIO()
    Image.new("RGB", (24, 24)).save(png, format="PNG")  # simplejpeg cannot decode it
    write_images_h5(path, [f"{i}" for i in range(8)], [_jpeg(0), *[png.getvalue()] * 7])
    with pytest.raises(RuntimeError, match="exited with code 1"):
        bench_loader.bare_pool_rate(path, workers=2, batch_size=4, batches=2, repeats=1)


def test_decode_references_place_their_output_as_stated(tmp_path, monkeypatch):
    """``shifted_array`` starts where it says; the bare pool's slots are placed as our loader's
    batches; decoding into a batch at either placement gives a rate, and the decode-only reference
    offers simplejpeg into a fresh array and into a reused one."""
    for shift in (0, 8, 16, 48):
        array = bench_loader.shifted_array((3, 5, 7), shift)
        assert array.ctypes.data % 64 == shift and array.shape == (3, 5, 7) and not array.any()
    memory = bench_loader.batch_memory((2, 24, 24, 3))
    assert memory.shape == (2, 24, 24, 3) and memory.is_shared()
    assert memory.data_ptr() % 64 == bench_loader.ROW_SHIFT
    path = tmp_path / "images.h5"
    write_images_h5(path, [f"{i}.jpg" for i in range(6)], [_jpeg(i) for i in range(6)])
    files, decoders = bench_loader._decoders(path)
    assert len(files) == 6 and {"simplejpeg", "simplejpeg, reused buffer"} <= set(decoders)
    monkeypatch.setattr(bench_loader.time, "perf_counter", _Clock())  # one second per timing
    rate, name = bench_loader.decode_only_rate(path, repeats=1)  # each decoder over all 6 files
    assert rate == 6 and name in decoders
    for shift in (0, bench_loader.ROW_SHIFT):  # all 6 images, into a batch of 4 rows, in one second
        assert bench_loader.decode_into_batch_rate(path, batch_size=4, shift=shift, repeats=1) == 6
