"""End-to-end runs of the loop's options: EMA, early stopping, schedules, several optimizers,
non-finite numbers and stop signals (real command line, demo dataset, CPU)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from linnaeus.checkpoint import load_checkpoint
from linnaeus.logger import read_metrics
from linnaeus.schedule import lr_multiplier
from tests.conftest import REPO
from tests.test_train import FAST, RESUME_COMMON, assert_same_as_uninterrupted, final_val, run_train

QUIET = ["logger.wandb.mode=disabled", "logger.plots=false"]


def train_rows(run) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]


def test_ema_is_validated_saved_and_can_decide_best(tmp_path, demo_cache):
    run = tmp_path / "run"
    run_train(run, *QUIET, "train.ema.decay=0.9", "checkpoint.monitor=val_ema/top1/taxa_L10")
    last = final_val(read_metrics(run / "metrics.jsonl"))
    for key in ("taxa_L40", "taxa_L10"):
        assert 0 <= last[f"val_ema/top1/{key}"] <= 1
    ckpt = load_checkpoint(run / "checkpoints/last.pt")
    assert ckpt["ema"].keys() == ckpt["model"].keys()
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    assert load_checkpoint(run / "checkpoints/best.pt")["preferred_weights"] == "ema"
    # logger.plots=false: the per-class tables, and no PNG at all
    assert sorted(p.name for p in (run / "reports").iterdir()) == [
        f"per_class_{k}.csv" for k in ("taxa_L10", "taxa_L20", "taxa_L30", "taxa_L40")
    ]
    assert not list(run.rglob("*.png"))


def test_early_stopping_stops_logs_and_keeps_its_count_across_a_resume(tmp_path, demo_cache):
    run = tmp_path / "run"
    # min_delta=1: top-1 can never improve by more than 1, so every validation after the first is "bad"
    stop = ["train.early_stop.monitor=val/top1/taxa_L10", "train.early_stop.min_delta=1.0", *QUIET]
    run_train(run, *stop, "train.early_stop.patience=2", "train.max_steps=6")  # validations at 3, 6
    state = load_checkpoint(run / "checkpoints/last.pt")["early_stop"]
    assert state["bad_validations"] == 1 and not state["stopped"]
    run_train(run, *stop, "train.early_stop.patience=2", "train.max_steps=30")  # longer training: resumes
    ckpt = load_checkpoint(run / "checkpoints/last.pt")
    assert ckpt["train_state"]["step"] == 9  # the count carried over: stopped at the next validation
    assert ckpt["early_stop"]["stopped"] and ckpt["early_stop"]["bad_validations"] == 2
    assert "early stopping at step 9" in (run / "train.log").read_text()
    run_train(run, *stop, "train.early_stop.patience=2", "train.max_steps=30")
    assert "run already complete" in (run / "train.log").read_text()
    assert load_checkpoint(run / "checkpoints/last.pt")["train_state"]["step"] == 9


@pytest.mark.parametrize(
    "overrides, schedule",
    [
        (["scheduler.name=wsd", "scheduler.decay_fraction=0.5"], dict(name="wsd", decay_fraction=0.5)),
        (
            ["scheduler.name=step", "scheduler.milestones=[2,4]", "scheduler.gamma=0.5"],
            dict(name="step", milestones=[2, 4], gamma=0.5),
        ),
    ],
    ids=["wsd", "step"],
)
def test_schedules_set_the_logged_learning_rate(tmp_path, demo_cache, overrides, schedule):
    run = tmp_path / "run"
    run_train(run, *QUIET, "scheduler.warmup_steps=1", "scheduler.min_lr_ratio=0.0", *overrides)
    lrs = [r["train/lr"] for r in train_rows(run)]
    want = [1e-3 * lr_multiplier(s, total_steps=6, warmup_steps=1, **schedule) for s in range(6)]
    assert lrs == pytest.approx(want)


@pytest.mark.parametrize(
    "overrides, names, classes",
    [
        (["optimizer=muon"], ["default", "muon"], ["AdamW", "Muon"]),
        (["optimizer=lion"], ["default"], ["Lion"]),
        (
            [
                "optimizer._target_=torch.optim.AdamW",
                "+optimizer.groups=[{name:heads,match:['heads.*'],_target_:torch.optim.SGD,lr:0.05,momentum:0.9}]",
            ],
            ["default", "heads"],
            ["AdamW", "SGD"],
        ),
    ],
    ids=["muon", "lion", "sgd-heads-adamw-rest"],
)
def test_optimizer_configs_train_and_checkpoint_every_optimizer(
    tmp_path, demo_cache, overrides, names, classes
):
    run = tmp_path / "run"
    proc = run_train(run, *QUIET, *overrides)
    ckpt = load_checkpoint(run / "checkpoints/last.pt")
    assert ckpt["optimizer"]["names"] == names
    assert all(opt["state"] for opt in ckpt["optimizer"]["optimizers"])  # every optimizer stepped
    log = (run / "train.log").read_text()
    for name, cls in zip(names, classes):
        assert f"optimizer {name}: " in log and cls in log
    losses = [r["train/loss"] for r in train_rows(run)]
    assert len(losses) == 6 and all(0 < v < 50 for v in losses)
    if len(names) > 1:
        row = train_rows(run)[-1]
        assert {k for k in row if k.startswith("train/lr/")} >= {f"train/lr/{n}/decay" for n in names}
    assert proc.returncode == 0


def test_optimizer_groups_that_overlap_stop_the_run_naming_the_parameters(tmp_path, demo_cache):
    proc = run_train(
        tmp_path / "run",
        *QUIET,
        "+optimizer.groups=[{name:a,match:['heads.*']},{name:b,match:['heads.0.*']}]",
        check=False,
    )
    assert proc.returncode == 1
    assert "heads.0.fc.weight (a, b)" in proc.stderr and "Traceback" not in proc.stderr


def test_divergence_stops_with_a_message_and_never_saves_non_finite_weights(tmp_path, demo_cache):
    run = tmp_path / "run"
    proc = run_train(run, *QUIET, "optimizer.lr=1e9", "checkpoint.every_steps=1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "training diverged" in proc.stderr and "lower optimizer.lr" in proc.stderr
    for path in (run / "checkpoints").glob("*.pt"):
        ckpt = load_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values()), path
    assert (run / "checkpoints/last.pt").is_file()
    # rerunning resumes from the finite checkpoint and stops the same way, without saving NaNs
    proc = run_train(run, *QUIET, "optimizer.lr=1e9", "checkpoint.every_steps=1", check=False)
    assert proc.returncode == 1 and "training diverged" in proc.stderr


def test_max_bad_steps_skips_that_many_bad_steps_then_stops(tmp_path, demo_cache):
    run = tmp_path / "run"
    proc = run_train(run, *QUIET, "optimizer.lr=1e9", "train.max_bad_steps=2", check=False)
    assert proc.returncode == 1 and "training diverged" in proc.stderr
    skipped = [r.get("train/skipped_steps") for r in train_rows(run)]
    assert skipped[-1] == 2  # two steps skipped and logged; the third bad one stopped the run


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, demo_cache):
    run = tmp_path_factory.mktemp("straight") / "run"
    run_train(run, *RESUME_COMMON)
    return run


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR2], ids=lambda s: s.name)
def test_a_stop_signal_checkpoints_exits_cleanly_and_the_rerun_matches(tmp_path, straight_run, signum):
    run = tmp_path / "run"
    cmd = [sys.executable, "train.py", *FAST, f"hydra.run.dir={run}", *RESUME_COMMON]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step_00000005.pt").exists():
        assert proc.poll() is None, "training ended before the signal"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped = load_checkpoint(run / "checkpoints/last.pt")["train_state"]["step"]
    assert 5 <= stopped < 30
    assert (run / "checkpoints" / f"step_{stopped:08d}.pt").is_file()  # saved at the signal, not before
    assert f"stopped by {signum.name} at step {stopped}" in (run / "train.log").read_text()
    run_train(run, *RESUME_COMMON)  # the same command again
    assert_same_as_uninterrupted(straight_run, run)


def test_every_minutes_checkpoints_by_time_between_step_checkpoints(tmp_path, demo_cache):
    run = tmp_path / "run"
    # 1/100,000 of a minute: due after every step; every_steps and validation alone would save at 3 and 6
    run_train(
        run,
        *QUIET,
        "checkpoint.every_minutes=0.00001",
        "checkpoint.every_steps=1000",
        "checkpoint.keep_last=10",
    )
    steps = sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt"))
    assert steps == [1, 2, 3, 4, 5, 6]
    run_train(tmp_path / "off", *QUIET, "checkpoint.every_steps=1000", "checkpoint.keep_last=10")
    steps = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "off" / "checkpoints").glob("step_*.pt"))
    assert steps == [3, 6]


def test_auto_batch_size_on_the_cpu_stops_before_training_with_what_to_do(tmp_path, demo_cache):
    proc = run_train(tmp_path / "run", *QUIET, "data.batch_size=auto", check=False, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "data.batch_size=auto measures accelerator memory" in proc.stderr
    assert "data.batch_size=64" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
