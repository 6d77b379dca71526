"""Real torch.distributed on CPU: two gloo processes launched by torchrun through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from linnaeus.checkpoint import load_checkpoint
from linnaeus.logger import read_metrics
from tests.conftest import REPO

# ranks without unknown labels and no drop path: the mean loss over 2 x 4 samples then equals the
# mean over the same 8 samples in one process, so both runs must take the same optimizer steps
EXACT = [
    "debug=fast",
    "model=mformer_xs",
    "model.drop_path_rate=0.0",
    "data.task_keys=[taxa_L40,taxa_L30]",
    "train.max_steps=4",
    "train.val_every=4",
    "logger.wandb.mode=disabled",
]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=os.environ.copy())
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, demo_cache):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run([*torchrun, "train.py", *EXACT, "data.batch_size=4", f"hydra.run.dir={tmp_path / 'ddp'}"])
    run([sys.executable, "train.py", *EXACT, "data.batch_size=8", f"hydra.run.dir={tmp_path / 'single'}"])

    ddp = load_checkpoint(tmp_path / "ddp/checkpoints/last.pt")
    single = load_checkpoint(tmp_path / "single/checkpoints/last.pt")
    assert ddp["train_state"]["step"] == single["train_state"]["step"] == 4
    assert len(ddp["rng"]) == 2 and len(single["rng"]) == 1  # one RNG state per rank
    for key, value in single["model"].items():
        torch.testing.assert_close(ddp["model"][key], value, atol=2e-5, rtol=1e-4, msg=key)

    ddp_records = read_metrics(tmp_path / "ddp/metrics.jsonl")
    single_records = read_metrics(tmp_path / "single/metrics.jsonl")
    # only rank 0 writes: every step is logged once
    assert [r["step"] for r in ddp_records if "train/loss" in r] == [1, 2, 3, 4]
    train_ddp = [r["train/loss"] for r in ddp_records if "train/loss" in r]
    train_single = [r["train/loss"] for r in single_records if "train/loss" in r]
    torch.testing.assert_close(torch.tensor(train_ddp), torch.tensor(train_single), atol=1e-4, rtol=1e-4)
    # validation is split over the ranks and reduced: the same numbers as one process
    val_ddp = [r for r in ddp_records if "val/top1/taxa_L30" in r][-1]
    val_single = [r for r in single_records if "val/top1/taxa_L30" in r][-1]
    for key in ("val/top1/taxa_L40", "val/top1/taxa_L30", "val/top5/taxa_L30", "val_nometa/top1/taxa_L30"):
        assert abs(val_ddp[key] - val_single[key]) < 1e-3, key
