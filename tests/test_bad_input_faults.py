"""Faults while writing: a full disk under checkpoints, metrics and datasets gives one line with the
path and the free space, keeps what was saved before and leaves no temporary file; a damaged demo
cache is regenerated."""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path

import h5py
import pytest
import torch

from linnaeus.checkpoint import CheckpointError, load_checkpoint, load_latest, save_checkpoint
from linnaeus.data import build as build_module
from linnaeus.data import demo as demo_module
from linnaeus.errors import OutputError, UserError
from linnaeus.logger import RunLogger, read_metrics
from tests.bad_input_helpers import checksums, leftovers, png


def _state(size: int = 16) -> dict:
    return {"model": {"w": torch.arange(size, dtype=torch.float32)}, "train_state": {"step": 1}}


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---------------------------------------------------------------------- checkpoints
def test_checkpoint_on_a_full_disk(tiny_disk):
    ckpt_dir = tiny_disk / "checkpoints"
    save_checkpoint(_state(), ckpt_dir, step=1, keep_last=3)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(_state(400_000), ckpt_dir, step=2, keep_last=3)  # 1.6 MB on a 1 MB disk
    message = str(err.value)
    assert message.startswith(
        f"cannot write checkpoint {ckpt_dir / 'step_00000002.pt'}: no space left on the device ("
    )
    assert (
        "free there)" in message and "the previous checkpoints are intact" in message and "\n" not in message
    )
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.pt", "step_00000001.pt"]  # no temporary file
    state, path = load_latest(ckpt_dir)
    assert path.name == "last.pt" and torch.equal(state["model"]["w"], torch.arange(16, dtype=torch.float32))


@pytest.mark.parametrize("where", ["torch.save", "fsync"])
def test_checkpoint_write_failure_is_clean(tmp_path, monkeypatch, where):
    save_checkpoint(_state(), tmp_path, step=1, keep_last=3)
    before = checksums(tmp_path)
    if where == "torch.save":
        monkeypatch.setattr(torch, "save", _enospc)
    else:
        monkeypatch.setattr("linnaeus.checkpoint.os.fsync", _enospc)
    with pytest.raises(CheckpointError, match="no space left on the device") as err:
        save_checkpoint(_state(), tmp_path, step=2, keep_last=3)
    assert isinstance(err.value, UserError)
    assert checksums(tmp_path) == before and leftovers(tmp_path) == []
    assert load_checkpoint(tmp_path / "last.pt")["train_state"]["step"] == 1


def test_torch_write_errors_are_recognised(tmp_path, monkeypatch):
    """torch.save reports a failed file write as a RuntimeError, not an OSError."""

    def fail(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed"
        )

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step_00000003.pt: \[enforce fail"):
        save_checkpoint(_state(), tmp_path, step=3, keep_last=3)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- metrics
def _logger(run_dir: Path) -> RunLogger:
    from omegaconf import OmegaConf

    wandb_cfg = OmegaConf.create(
        {"mode": "disabled", "project": "x", "entity": None, "group": None, "tags": []}
    )
    return RunLogger(run_dir, config={}, wandb_cfg=wandb_cfg, make_plots=False)


def test_metrics_on_a_full_disk(tiny_disk):
    logger = _logger(tiny_disk)
    logger.log({"train/loss": 1.0}, step=1, epoch=0)
    filler = tiny_disk / "filler"
    with pytest.raises(OSError):
        with open(filler, "wb") as handle:  # fill the disk to the last byte
            while True:
                handle.write(b"\0" * 65536)
    with pytest.raises(OutputError) as err:
        for step in range(2, 2000):
            logger.log({f"train/loss/{k}": 1.0 for k in range(50)}, step=step, epoch=0)
    message = str(err.value)
    assert f"cannot write metrics {tiny_disk / 'metrics.jsonl'}: no space left on the device" in message
    assert "the same command resumes from the last checkpoint" in message
    records = read_metrics(tiny_disk / "metrics.jsonl")  # whole lines only, the first one kept
    assert records[0] == {"step": 1, "epoch": 0, "train/loss": 1.0}
    assert (tiny_disk / "metrics.jsonl").read_text().endswith("\n")


# ---------------------------------------------------------------------- datasets
@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "root"
    for i, ident in enumerate(["O/G/s1/a.png", "O/G/s1/b.png", "O/G/s2/c.png"]):
        (root / ident).parent.mkdir(parents=True, exist_ok=True)
        (root / ident).write_bytes(png((8 + i, 8)))
    return root


@pytest.mark.parametrize("fault", ["enospc", "interrupt"])
def test_build_fault_while_writing_keeps_the_old_dataset(tree, tmp_path, monkeypatch, capsys, fault):
    out = tmp_path / "ds"
    assert build_module.main(["folder", str(tree), "--out", str(out), "--workers", "1"]) == 0
    before = checksums(out)
    real = build_module.write_labels_h5

    def failing(*args, **kwargs):
        real(*args, **kwargs)  # the file is complete: the fault comes after real work was written
        if fault == "interrupt":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))

    monkeypatch.setattr(build_module, "write_labels_h5", failing)
    capsys.readouterr()
    code = build_module.main(["folder", str(tree), "--out", str(out), "--workers", "1", "--force"])
    err = capsys.readouterr().err.strip()
    assert checksums(out) == before and leftovers(tmp_path) == []
    if fault == "interrupt":
        assert code == 130 and err == f"error: interrupted; {out} was not changed"
    else:
        assert code == 1 and err.startswith(
            f"error: cannot write the dataset {out / 'labels.h5'}: no space left"
        )
        assert err.endswith(f"; {out} was not changed") and "free there" in err


# ---------------------------------------------------------------------- the demo cache
@pytest.fixture
def small_demo(monkeypatch):
    """The demo generator at 3 images per species, so regenerating it in a test is quick."""
    real = demo_module.generate_demo_dataset
    monkeypatch.setattr(
        demo_module, "generate_demo_dataset", lambda out, seed=0: real(out, seed, images_per_species=3)
    )


@pytest.mark.parametrize("damage", ["truncated_images", "truncated_labels", "missing_images", "empty_labels"])
def test_damaged_demo_cache_is_regenerated(tmp_path, small_demo, caplog, damage):
    folder = demo_module.ensure_demo_dataset(tmp_path)
    good = checksums(folder)
    target = folder / ("images.h5" if "images" in damage else "labels.h5")
    if damage.startswith("truncated"):
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif damage == "missing_images":
        target.unlink()
    else:
        target.write_bytes(b"")
    assert demo_module.demo_damage(folder) is not None
    with caplog.at_level(logging.WARNING):
        again = demo_module.ensure_demo_dataset(tmp_path)
    assert again == folder and demo_module.demo_damage(folder) is None
    assert checksums(folder).keys() == good.keys()
    if damage != "missing_images":
        assert (
            f"the demo dataset in {folder} is damaged" in caplog.text and "generating it again" in caplog.text
        )
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_intact_demo_cache_is_not_regenerated(tmp_path, small_demo, monkeypatch):
    folder = demo_module.ensure_demo_dataset(tmp_path)
    with h5py.File(folder / "labels.h5", "r") as h5:
        rows = len(h5["img_identifiers"])
    monkeypatch.setattr(demo_module, "generate_demo_dataset", lambda *a, **k: pytest.fail("regenerated"))
    assert demo_module.ensure_demo_dataset(tmp_path) == folder and rows == 90


def test_demo_cache_on_a_full_disk(tiny_disk, small_demo):
    with pytest.raises(OutputError) as err:
        with open(tiny_disk / "filler", "wb") as handle:
            handle.write(b"\0" * 900_000)
        demo_module.ensure_demo_dataset(tiny_disk / "cache")
    message = str(err.value)
    assert "cannot write the demo dataset into" in message and "no space left" in message
    assert "data.cache_dir" in message
    assert [p.name for p in (tiny_disk / "cache").iterdir() if not p.name.endswith(".lock")] == []
    shutil.rmtree(tiny_disk / "cache")
