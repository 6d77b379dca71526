"""scripts/bench_loader.py's timed window: the steady state, over whole rounds of the workers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench_loader import timed, timed_window  # noqa: E402


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
    ],
)
def test_the_window_is_whole_rounds_after_every_buffer_was_written(workers, prefetch, asked, expected):
    assert timed_window(_Batches(workers, prefetch, 100), asked) == expected


def test_timed_draws_the_warm_up_and_counts_only_the_timed_images():
    loader = _Batches(num_workers=2, prefetch_factor=2, epoch_batches=100, size=4)
    rate = timed(loader, 15)
    assert loader.drawn == 8 + 16 and loader.epochs == 1 and rate > 0


def test_an_epoch_end_inside_the_window_starts_the_next_epoch_and_is_said(capsys):
    loader, epochs = _Batches(num_workers=2, prefetch_factor=2, epoch_batches=10), []
    timed(loader, 6, new_epoch=epochs.append)  # 8 warm-up, then 2 left in the epoch and 4 in the next
    assert loader.drawn == 8 + 6 and epochs == [1] and loader.epochs == 2
    assert "crossed an epoch's end" in capsys.readouterr().err
    loader = _Batches(num_workers=0, prefetch_factor=None, epoch_batches=10)
    timed(loader, 5)
    assert "crossed" not in capsys.readouterr().err
