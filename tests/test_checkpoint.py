import random

import numpy as np
import pytest
import torch

from linnaeus.checkpoint import (
    CheckpointError,
    capture_rng,
    load_checkpoint,
    load_latest,
    restore_rng,
    save_checkpoint,
    step_checkpoints,
)


def state(step: int) -> dict:
    return {
        "model": {"w": torch.full((4,), float(step))},
        "train_state": {"step": step},
        "rng": [capture_rng()],
    }


def test_rotation_keeps_last_n_and_links_last_and_best(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(state(step), tmp_path, step, keep_last=2, is_best=step == 20)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_00000040.pt", "step_00000030.pt"]
    assert load_checkpoint(tmp_path / "last.pt")["train_state"]["step"] == 40
    assert load_checkpoint(tmp_path / "best.pt")["train_state"]["step"] == 20  # survives pruning
    assert not list(tmp_path.glob(".*tmp"))


def test_damaged_latest_falls_back_with_warning(tmp_path, caplog):
    for step in (10, 20):
        save_checkpoint(state(step), tmp_path, step, keep_last=3)
    newest = tmp_path / "step_00000020.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])  # truncated, like a crash mid-copy
    loaded, path = load_latest(tmp_path)
    assert path.name == "step_00000010.pt"
    assert loaded["train_state"]["step"] == 10
    assert "damaged" in caplog.text and "falling back" in caplog.text


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    save_checkpoint(state(5), tmp_path, 5, keep_last=1)
    (tmp_path / "step_00000005.pt").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        load_latest(tmp_path)
    assert load_latest(tmp_path / "empty") is None


def test_foreign_file_is_rejected(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="does not hold a linnaeus training state"):
        load_checkpoint(tmp_path / "x.pt")


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint({"model": {}, "rng": capture_rng()}, tmp_path, 1, keep_last=1)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
