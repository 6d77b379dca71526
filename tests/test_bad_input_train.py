"""Bad input to the real trainer command line: one `error: ...` line, status 1, no traceback, nothing lost."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bad_input_helpers import assert_user_error, checksums, crashing_png, png
from tests.conftest import REPO, write_h5_dataset

FAST = ["debug=fast", "model=mformer_xs", "logger.wandb.mode=disabled", "logger.plots=false"]


def train(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *FAST, f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


CONFIG_CASES = {
    "lr_negative": (["optimizer.lr=-1"], ["optimizer.lr=-1: the learning rate must be a number > 0"]),
    "precision_16": (["train.precision=16"], ["train.precision=16", "did you mean train.precision=fp16?"]),
    "model_unknown_key": (["+model.unknown_key=1"], ["model.unknown_key"]),
    "h5_without_labels": (["data=h5"], ["data.labels and data.images not set"]),
    "batch_size_zero": (["data.batch_size=0"], ["data.batch_size=0"]),
    "timm_name": (["model=timm", "model.name=convnxt_tiny"], ["model.name=convnxt_tiny", "convnext_tiny"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_mistakes_stop_the_trainer_in_one_line(case, tmp_path, demo_cache):
    overrides, fragments = CONFIG_CASES[case]
    proc = train(tmp_path / "run", *overrides)
    assert_user_error(proc, *fragments)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_worker_crash_in_training_names_the_image(tmp_path):
    n = 24
    images = [crashing_png() if i == 5 else png((8, 8), (i * 10, 90, 40)) for i in range(n)]
    data = write_h5_dataset(
        tmp_path / "ds", {"taxa_L20": [1 + i % 2 for i in range(n)], "taxa_L10": [3 + i % 4 for i in range(n)]},
        images=images,
    )  # fmt: skip
    proc = train(
        tmp_path / "run", "data=h5", f"data.labels={data / 'labels.h5'}", f"data.images={data / 'images.h5'}",
        "data.num_workers=1", "data.check_images=false", "data.val_fraction=0.25", "data.image_size=8",
        "train.max_steps=20", "data.batch_size=4",
    )  # fmt: skip
    line = assert_user_error(proc, "img_0005.png", "python -m linnaeus.data.verify")
    assert "data-loading worker" in line


@pytest.mark.slow
def test_resume_with_another_configuration_is_refused(tmp_path, demo_cache):
    run = tmp_path / "run"
    first = train(run)
    assert first.returncode == 0, first.stderr[-3000:]
    before = checksums(run / "checkpoints")
    proc = train(run, "optimizer.lr=3e-4")
    assert_user_error(proc, "optimizer.lr: 0.001 -> 0.0003", "Rerun the original command", "hydra.run.dir=")
    assert checksums(run / "checkpoints") == before
    again = train(run, "train.max_steps=8")  # a longer run is a safe change: it resumes
    assert again.returncode == 0, again.stderr[-3000:]


@pytest.mark.slow
def test_second_trainer_on_one_run_directory_is_refused(tmp_path, demo_cache):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "train.py", *FAST, f"hydra.run.dir={run}", "train.max_steps=400", "train.val_every=400"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (run / ".lock").is_file():
            time.sleep(0.5)
        time.sleep(2)
        proc = train(run)
        assert_user_error(proc, f"another trainer is using the run directory {run}", f"pid {first.pid}")
    finally:
        first.kill()
        first.wait()
