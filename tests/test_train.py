"""End-to-end runs of the real command line on the demo dataset (CPU, tiny model)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from linnaeus.checkpoint import load_checkpoint
from linnaeus.logger import read_metrics
from tests.conftest import REPO
from tests.wandb_files import history_steps, newest_run_file

FAST = ["debug=fast", "model=mformer_xs"]


def run_train(run_dir: Path, *overrides: str, module: bool = False, check: bool = True, timeout: int = 300):
    entry = ["-m", "linnaeus.train"] if module else ["train.py"]
    cmd = [sys.executable, *entry, *FAST, f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def final_val(records: list[dict]) -> dict:
    return [r for r in records if "val/top1/taxa_L10" in r][-1]


def test_debug_run_writes_the_run_directory(tmp_path, demo_cache):
    run = tmp_path / "run"
    run_train(run)
    for path in (
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "train.log",
        "metrics.jsonl",
        "taxonomy.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "plots/curves.png",
        "split.json",
    ):
        assert (run / path).is_file(), path
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run missing"
    records = read_metrics(run / "metrics.jsonl")
    assert all("step" in r and "epoch" in r for r in records)
    last = final_val(records)
    assert last["step"] == 6
    for key in ("taxa_L40", "taxa_L30", "taxa_L20", "taxa_L10"):
        assert 0.0 <= last[f"val/top1/{key}"] <= 1.0
        assert last[f"val/top5/{key}"] >= last[f"val/top1/{key}"]
        assert f"val_nometa/top1/{key}" in last
    assert "val/chain_accuracy" in last and "val/mistake_severity" in last
    train_lines = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    assert all(r["perf/images_per_s"] > 0 and r["train/lr"] > 0 for r in train_lines)
    ckpt = load_checkpoint(run / "checkpoints/last.pt")
    assert ckpt["train_state"]["step"] == 6
    assert ckpt["taxonomy"] == json.loads((run / "taxonomy.json").read_text())
    assert ckpt["config"]["model"]["_target_"].endswith("MFormerV1")
    assert "run dir" in (run / "train.log").read_text()
    # the last validation's per-class tables and confusion plots, for every rank
    for key in ("taxa_L40", "taxa_L30", "taxa_L20", "taxa_L10"):
        assert (run / "plots" / f"confusion_{key}.png").is_file()
        rows = list(csv.DictReader((run / "reports" / f"per_class_{key}.csv").open()))
        assert sum(int(r["support"]) for r in rows) <= 32  # debug=fast: 2 validation batches of 16
    order = list(csv.DictReader((run / "reports" / "per_class_taxa_L40.csv").open()))
    assert sum(int(r["support"]) for r in order) == 32  # every demo image has a known order
    hits = sum(float(r["top1"]) * int(r["support"]) for r in order)
    assert hits / 32 == pytest.approx(last["val/top1/taxa_L40"])


def test_module_entry_point_and_seed_override(tmp_path, demo_cache):
    a = run_train(tmp_path / "a", "seed=3", "logger.wandb.mode=disabled", module=True)
    assert a.returncode == 0
    records = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert final_val(records)["step"] == 6
    assert not (tmp_path / "a" / "wandb").exists()
    assert "seed: 3" in (tmp_path / "a" / ".hydra/config.yaml").read_text()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochz=3", "train.epochz"),
        ("data.batch_size=many", "data.batch_size"),
        ("model.conv_dimz=[8,8]", "model.conv_dimz"),
    ],
)
def test_config_mistakes_fail_at_start_naming_the_key(tmp_path, override, expected):
    proc = run_train(tmp_path / "x", override, check=False, timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_refuses_to_overwrite_checkpoints_without_auto_resume(tmp_path, demo_cache):
    run = tmp_path / "run"
    run_train(run, "logger.wandb.mode=disabled")
    proc = run_train(run, "logger.wandb.mode=disabled", "checkpoint.auto_resume=false", check=False)
    assert proc.returncode != 0 and "refusing to overwrite" in proc.stderr


RESUME_COMMON = [
    "train.max_steps=30",
    "checkpoint.every_steps=5",
    "train.val_every=10",
    "train.log_every=4",  # logging windows that span the checkpoints
    "data.num_workers=1",
    "logger.wandb.mode=offline",
]


def assert_same_as_uninterrupted(straight: Path, run: Path) -> None:
    """Final training state, bit-identical weights (and EMA), and every logged row but timings."""
    a = load_checkpoint(straight / "checkpoints/last.pt")
    b = load_checkpoint(run / "checkpoints/last.pt")
    assert a["train_state"] == b["train_state"]
    for part in ("model", "ema"):
        if a.get(part) is None:
            assert b.get(part) is None
            continue
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)

    def rows(path: Path) -> list[dict]:
        return [
            {k: v for k, v in r.items() if not k.startswith("perf/")}
            for r in read_metrics(path / "metrics.jsonl")
        ]

    assert rows(straight) == rows(run)


@pytest.mark.parametrize(
    "extra",
    [[], ["train.ema.decay=0.9", "optimizer=muon"]],
    ids=["default", "ema-and-two-optimizers"],
)
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, demo_cache, extra):
    common = [*RESUME_COMMON, *extra]
    run_train(tmp_path / "straight", *common)

    run = tmp_path / "killed"
    cmd = [sys.executable, "train.py", *FAST, f"hydra.run.dir={run}", *common]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step_00000010.pt").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run / "checkpoints/last.pt")["train_state"]
    assert 10 <= killed_at["step"] < 30
    assert killed_at["batch_in_epoch"] > 0  # mid-epoch

    run_train(run, *common)  # the same command again
    assert "resumed from" in (run / "train.log").read_text()
    a = load_checkpoint(tmp_path / "straight" / "checkpoints/last.pt")
    b = load_checkpoint(run / "checkpoints/last.pt")
    assert a["train_state"] == b["train_state"]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert_same_as_uninterrupted(tmp_path / "straight", run)
    # every step in metrics.jsonl reached W&B: the resumed attempt's file holds them all
    logged = {r["step"] for r in read_metrics(run / "metrics.jsonl")}
    assert logged <= set(history_steps(newest_run_file(run)))
    va, vb = (
        final_val(read_metrics(tmp_path / "straight/metrics.jsonl")),
        final_val(read_metrics(run / "metrics.jsonl")),
    )
    assert va == vb
    # the resumed metrics file holds each step once
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 30


def test_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, demo_cache):
    run = tmp_path / "run"
    common = ["train.max_steps=6", "checkpoint.keep_last=5", "logger.wandb.mode=disabled"]
    run_train(run, *common)
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # also damages step 6, which last.pt links to
    proc = run_train(run, "train.max_steps=9", *common[1:])
    assert "falling back to the previous checkpoint" in proc.stderr + (run / "train.log").read_text()
    assert "resumed from" in (run / "train.log").read_text()
    assert load_checkpoint(run / "checkpoints/last.pt")["train_state"]["step"] == 9


@pytest.mark.parametrize(
    "overrides, micro_batches",
    [
        (["train.precision=bf16", "data.sampler.mode=mixed-pairs"], 6),
        (["train.precision=fp16", "train.accumulate=2", "data.sampler.mode=strict-group"], 12),
    ],
    ids=["bf16-mixed-pairs", "fp16-accumulate-strict-group"],
)
def test_precisions_accumulation_and_grouped_samplers(tmp_path, demo_cache, overrides, micro_batches):
    run = tmp_path / "run"
    run_train(run, "logger.wandb.mode=disabled", *overrides)
    records = read_metrics(run / "metrics.jsonl")
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 6 and all(0 < v < 50 for v in losses)
    state = load_checkpoint(run / "checkpoints/last.pt")["train_state"]
    assert state["step"] == 6 and state["batch_in_epoch"] == micro_batches


def test_corrupt_image_stops_the_run_with_its_name_or_is_dropped_on_request(tmp_path):
    from tests.conftest import png_bytes, write_h5_dataset

    n = 40
    images = [png_bytes((10 * i % 255, 80, 160)) for i in range(n)]
    images[7] = b"\x89PNG\r\n\x1a\n this is not an image"
    data = write_h5_dataset(
        tmp_path / "data",
        {"taxa_L20": [1 + i % 2 for i in range(n)], "taxa_L10": [10 + i % 4 for i in range(n)]},
        images=images,
    )
    paths = ["data=h5", f"data.labels={data / 'labels.h5'}", f"data.images={data / 'images.h5'}",
             "logger.wandb.mode=disabled"]  # fmt: skip
    proc = run_train(tmp_path / "strict", *paths, "data.check_images=true", check=False)
    assert proc.returncode == 1
    assert "1 of 40 images are missing or undecodable" in proc.stderr
    assert "img_0007.png" in proc.stderr and "data.bad_images=drop" in proc.stderr
    assert "Traceback" not in proc.stderr  # bad input is reported, not a crash
    assert not (tmp_path / "strict" / "checkpoints").exists()

    # without the start-up check the loader meets the image and names it just the same
    proc = run_train(tmp_path / "unchecked", *paths, check=False)
    assert proc.returncode == 1
    assert "img_0007.png" in proc.stderr and "linnaeus.data.verify" in proc.stderr

    run_train(
        tmp_path / "drop",
        *paths,
        "data.check_images=true",
        "data.bad_images=drop",
        "data.max_bad_fraction=0.05",
    )
    report = json.loads((tmp_path / "drop" / "image_check.json").read_text())
    assert report["bad"] == 1 and report["bad_images"][0]["identifier"] == "img_0007.png"
    split = json.loads((tmp_path / "drop" / "split.json").read_text())
    assert "img_0007.png" not in json.dumps(split)
    # a dataset without metadata is validated once: no val_nometa/* pass that would repeat val/*
    keys = {k for r in read_metrics(tmp_path / "drop" / "metrics.jsonl") for k in r}
    assert "val/top1/taxa_L10" in keys and not any(k.startswith("val_nometa") for k in keys)
