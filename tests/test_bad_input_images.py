"""Damaged images never hang or crash the checks: `verify`, the start-up check and the training loader
name the file; plus `verify` on bad dataset folders (one-line errors, reports written)."""

from __future__ import annotations

import io
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from linnaeus.config import register_configs
from linnaeus.data.check import apply_bad_image_policy, find_bad_images
from linnaeus.data.dataset import TaxonDataset
from linnaeus.data.faults import TracedStore, describe_worker_crash, install_crash_trace, is_worker_crash
from linnaeus.data.images import FolderImageStore
from linnaeus.data.labels import DatasetError
from tests.bad_input_helpers import (
    assert_user_error,
    checksums,
    crashing_png,
    decoder_crashes,
    png,
    run_module,
)
from tests.conftest import REPO, write_h5_dataset

VERIFY = "linnaeus.data.verify"
N = 12
CRASH_AT = (3, 10)


def test_fixture_crashes_the_native_decoder_but_not_pil():
    data = crashing_png()
    assert len(data) < 200
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        assert image.size == (8, 8)  # PIL reads it: a PIL-only check would pass it
    assert decoder_crashes(data)


def _taxa(n: int) -> dict[str, list[int]]:
    return {"taxa_L20": [1 + i % 2 for i in range(n)], "taxa_L10": [3 + i % 4 for i in range(n)]}


@pytest.fixture
def crash_dataset(tmp_path) -> Path:
    images = [crashing_png() if i in CRASH_AT else png((8, 8), (i * 20, 50, 50)) for i in range(N)]
    return write_h5_dataset(tmp_path / "ds", _taxa(N), images=images)


@pytest.fixture
def crash_folder(tmp_path) -> tuple[FolderImageStore, np.ndarray]:
    folder = tmp_path / "images"
    folder.mkdir()
    identifiers = []
    for i in range(100):
        name = f"{i:03d}.png"
        (folder / name).write_bytes(crashing_png() if i in (5, 50, 99) else png((8, 8), (i, 2, 3)))
        identifiers.append(name)
    (folder / "040.png").write_bytes(b"not an image")
    return FolderImageStore(folder), np.array(identifiers, dtype=object)


# ---------------------------------------------------------------------- isolation of crashes and hangs
@pytest.mark.parametrize("workers", [1, 2])
def test_check_names_every_image_that_crashes_the_decoder(crash_folder, workers):
    store, identifiers = crash_folder
    start = time.monotonic()
    bad = find_bad_images(store, identifiers, np.arange(len(identifiers)), workers=workers)
    assert time.monotonic() - start < 60
    assert sorted(bad) == [5, 40, 50, 99]
    for position in (5, 50, 99):
        assert bad[position] == (
            f"image '{position:03d}.png' ({store.root / f'{position:03d}.png'}): the decoder crashed "
            "(killed by signal SIGSEGV); the file is damaged"
        )
    assert "cannot decode image" in bad[40]
    keep = apply_bad_image_policy(bad, identifiers, policy="drop", max_count=10, max_fraction=0.1)
    assert keep.sum() == 96 and not keep[[5, 40, 50, 99]].any()


class _SlowStore(FolderImageStore):
    """Hangs on one image and aborts on another (stand-ins for a decoder stuck in a loop or a C abort)."""

    def read(self, row: int, identifier: str):
        if identifier == "010.png":
            time.sleep(3600)
        if identifier == "020.png":
            os.abort()
        return super().read(row, identifier)


def test_check_survives_a_hanging_and_an_aborting_decoder(crash_folder):
    store, identifiers = crash_folder
    slow = _SlowStore(store.root)
    start = time.monotonic()
    bad = find_bad_images(slow, identifiers[:30], np.arange(30), workers=2, timeout=2)
    assert time.monotonic() - start < 60
    assert sorted(bad) == [5, 10, 20]
    assert "made no progress for 2 s (killed)" in bad[10]
    assert "crashed (killed by signal SIGABRT)" in bad[20]


def test_startup_check_drops_or_names_crashing_images(crash_dataset, tmp_path):
    from hydra import compose, initialize_config_dir

    from linnaeus.data.loader import build_data

    register_configs()
    overrides = [
        "data=h5", f"data.labels={crash_dataset / 'labels.h5'}", f"data.images={crash_dataset / 'images.h5'}",
        "data.num_workers=2", "data.check_images=true", "data.val_fraction=0.25", "data.image_size=8",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        strict = compose("config", overrides=overrides)
        drop = compose("config", overrides=[*overrides, "data.bad_images=drop", "data.max_bad_fraction=0.5"])
    with pytest.raises(DatasetError, match="img_0003.png") as err:
        build_data(strict.data, strict.augmentation, run_dir=tmp_path, seed=0)
    assert "crashed (killed by signal SIGSEGV)" in str(err.value)
    data = build_data(drop.data, drop.augmentation, run_dir=tmp_path, seed=0)
    assert data.num_train + data.num_val == N - len(CRASH_AT)
    report = json.loads((tmp_path / "image_check.json").read_text())
    assert [r["identifier"] for r in report["bad_images"]] == ["img_0003.png", "img_0010.png"]


# ---------------------------------------------------------------------- a worker dies during training
def _dataset(store, identifiers) -> TaxonDataset:
    n = len(identifiers)
    return TaxonDataset(
        store, identifiers, np.arange(n), np.zeros((n, 1), dtype=np.int64), {}, {},
        transform=lambda image: image[:, :4, :4].float(),
    )  # fmt: skip


def test_worker_crash_names_the_image_being_decoded(crash_folder):
    store, identifiers = crash_folder
    dataset = _dataset(store, identifiers[:20])
    install_crash_trace(dataset)
    loader = DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=lambda batch: len(batch))
    batches = iter(loader)
    crash = None
    try:
        for _ in batches:
            pass
    except RuntimeError as err:
        crash = err
    finally:  # a dead worker left registered makes torch raise again at the next SIGCHLD
        batches._shutdown_workers()
        del batches
    assert crash is not None and is_worker_crash(crash)
    message = describe_worker_crash(crash, dataset)
    assert f"while decoding image '005.png' ({store.root / '005.png'}), which is probably damaged" in message
    assert "python -m linnaeus.data.verify DIR" in message and "data.bad_images=drop" in message
    assert "\n" not in message


class _TablePeek:
    """A store whose read returns (its process id, its worker id, the trace table during the read)."""

    traced: TracedStore | None = None

    def read(self, row, identifier, *out):
        info = get_worker_info()
        return os.getpid(), -1 if info is None else info.id, self.traced.slots.clone()


class _ReadEach(Dataset):
    def __init__(self, store, n: int) -> None:
        self.store, self.n = store, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.store.read(index, f"x{index}")


def _traced_peek() -> TracedStore:
    peek = _TablePeek()
    peek.traced = TracedStore(peek, torch.full((5, 2), -1, dtype=torch.int64).share_memory_())
    return peek.traced


def _assert_each_read_was_traced(seen: list, rows: range) -> None:
    """Each read saw, in its process's slot, that process's pid and the row it was reading."""
    assert len(seen) == len(rows)
    for row, (pid, worker, table) in zip(rows, seen):
        slot = len(table) - 1 if worker < 0 else min(worker, len(table) - 2)
        assert table[slot].tolist() == [pid, row]


@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_crash_trace_holds_each_process_pid_and_the_row_it_is_reading(workers, persistent):
    traced = _traced_peek()
    before = traced.read(0, "x0")  # the main process reads first (as the first-batch preview does)
    assert before[1] == -1 and before[2][-1].tolist() == [os.getpid(), 0]
    loader = DataLoader(
        _ReadEach(traced, 12), batch_size=None, num_workers=workers, persistent_workers=persistent
    )
    epochs = [list(loader), list(loader)]
    pids = []
    for seen in epochs:
        _assert_each_read_was_traced(seen, range(12))
        pids.append({pid for pid, _, _ in seen})
        assert len(pids[-1]) == max(1, workers)
        assert (os.getpid() in pids[-1]) == (workers == 0)  # workers claim slots of their own
    assert (pids[0] == pids[1]) == (workers == 0 or persistent)  # new workers claim again
    assert (traced.slots[:, 1] == -1).all()  # after the reads, no row is marked


def test_crash_trace_names_the_reader_when_two_loaders_share_a_slot():
    """Two loaders over one store: each one's worker 0 uses slot 0, alternately."""
    traced = _traced_peek()
    first, second = (
        DataLoader(_ReadEach(traced, 4), batch_size=None, num_workers=1, persistent_workers=True)
        for _ in range(2)
    )
    epochs = [list(first), list(second), list(first)]  # the first loader's worker reads again last
    for seen in epochs:
        _assert_each_read_was_traced(seen, range(4))
    pids = [{pid for pid, _, _ in seen} for seen in epochs]
    assert pids[0] == pids[2] != pids[1] and all(len(p) == 1 for p in pids)


def test_crash_trace_travels_without_its_process_view():
    traced = _traced_peek()
    traced.read(3, "x3")  # claims the main process's slot
    assert traced._pid == os.getpid() and traced._table is not None
    copy = pickle.loads(pickle.dumps(traced))
    assert copy._pid == -1 and copy._table is None and copy._slot == -1
    pid, worker, table = copy.read(4, "x4")
    assert worker == -1 and table[-1].tolist() == [pid, 4] and copy.slots[-1, 1] == -1


def test_worker_crash_without_a_trace_lists_the_batch():
    identifiers = np.array([f"x{i}.jpg" for i in range(30)], dtype=object)
    dataset = _dataset(FolderImageStore(REPO), identifiers)
    err = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Segmentation fault. ")
    message = describe_worker_crash(err, dataset, batch_indices=[[(i, 0) for i in range(10)], [(20, 0)]])
    assert message.startswith("a data-loading worker (pid 4242) was killed by signal: Segmentation fault")
    assert "x0.jpg, x1.jpg" in message and "and 3 more" in message and "linnaeus.data.verify" in message


@pytest.mark.parametrize(
    "text, hint",
    [
        ("DataLoader worker (pid 7) is killed by signal: Killed. ", "out-of-memory killer"),
        ("DataLoader worker (pid 7) is killed by signal: Bus error. It is possible ...", "shared memory"),
        ("DataLoader worker (pid(s) 7, 8) exited unexpectedly", "linnaeus.data.verify"),
    ],
)
def test_worker_crash_causes(text, hint):
    err = RuntimeError(text)
    assert is_worker_crash(err)
    assert hint in describe_worker_crash(err, _dataset(FolderImageStore(REPO), np.array(["a"], dtype=object)))


def test_other_runtime_errors_are_not_worker_crashes():
    assert not is_worker_crash(RuntimeError("CUDA out of memory"))
    assert not is_worker_crash(ValueError("DataLoader worker (pid 1) exited unexpectedly"))


# ---------------------------------------------------------------------- verify
def test_verify_names_crashing_images_and_writes_its_report(crash_dataset):
    before = checksums(crash_dataset)
    proc = run_module(VERIFY, crash_dataset, "--workers", "2", timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "2 of 12 images are missing or undecodable" in proc.stderr
    report = json.loads((crash_dataset / "verify_report.json").read_text())
    assert [b["identifier"] for b in report["bad_images"]] == ["img_0003.png", "img_0010.png"]
    assert all("crashed (killed by signal SIGSEGV)" in b["reason"] for b in report["bad_images"])
    after = checksums(crash_dataset)
    after.pop("verify_report.json")
    assert after == before  # verify reads; it never changes the data


def test_verify_reports_repeated_rows(tmp_path):
    identifiers = ["a.png", "b.png", "a.png", "c.png", "a.png", "b.png"]
    directory = write_h5_dataset(tmp_path / "ds", _taxa(6), identifiers=identifiers)
    proc = run_module(VERIFY, directory, "--workers", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "3 rows repeat an image already listed (e.g. a.png (3 rows), b.png (2 rows))" in proc.stderr
    report = json.loads((directory / "verify_report.json").read_text())
    assert report["duplicate_identifiers"] == {"count": 3, "examples": ["a.png (3 rows)", "b.png (2 rows)"]}


def test_verify_reports_a_rank_without_labels(tmp_path):
    directory = write_h5_dataset(tmp_path / "ds", {"taxa_L20": [0, 0, 0], "taxa_L10": [3, 4, 5]})
    proc = run_module(VERIFY, directory, "--workers", "1")
    assert proc.returncode == 1
    assert "rank(s) taxa_L20 have no known label in any row" in proc.stderr
    assert "data.task_keys=[taxa_L10]" in proc.stderr


def test_verify_reports_a_truncated_labels_file(tmp_path):
    directory = write_h5_dataset(tmp_path / "ds", _taxa(4))
    data = (directory / "labels.h5").read_bytes()
    (directory / "labels.h5").write_bytes(data[: len(data) // 3])
    proc = run_module(VERIFY, directory, "--workers", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "is not a readable HDF5 file" in proc.stderr
    assert json.loads((directory / "verify_report.json").read_text())["ok"] is False


def test_verify_bad_invocations_are_one_line(tmp_path):
    directory = write_h5_dataset(tmp_path / "ds", _taxa(4))
    cases = [
        ([tmp_path / "nowhere"], ["dataset folder not found", "nowhere", "linnaeus.data.build"]),
        ([directory / "labels.h5"], ["is a file; give the folder holding labels.h5"]),
        ([directory, "--workers", "0"], ["--workers 0"]),
        ([directory, "--workers", "many"], ["invalid int value: 'many'"]),
        ([directory, "--images", tmp_path / "none.h5"], ["--images", "no such file or folder"]),
        (
            [directory, "--report", tmp_path / "no" / "dir" / "r.json"],
            ["cannot write the report", "--report PATH"],
        ),
    ]
    for args, fragments in cases:
        assert_user_error(run_module(VERIFY, *args), *fragments)
    assert not (tmp_path / "nowhere").exists()


def test_verify_finds_a_hybrid_datasets_image_folder(tmp_path):
    """Without --images, a labels file built in hybrid mode points verify at its image folder."""
    from linnaeus.data.writer import write_labels_h5

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png((8, 8), (i * 60, 0, 0)))
    directory = tmp_path / "ds"
    write_labels_h5(directory / "labels.h5", ["0.png", "1.png", "2.png"], {"taxa_L10": np.array([1, 2, 2])},
                    config={"images": str(folder)})  # fmt: skip
    proc = run_module(VERIFY, directory, "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((directory / "verify_report.json").read_text())["images"] == str(folder)
