"""`python train.py debug=fast model=X` for every model config, hierarchical heads, efficiency switches and
pretrained weights through the real command line (CPU, demo data)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from linnaeus.logger import read_metrics
from linnaeus.models import build_model
from tests.conftest import REPO
from tests.test_models import MODEL_CONFIGS

# One config per model family in the default suite (each run ~6-9 s on two idle CPU cores). The other sizes
# run the same code and are marked slow: md ~10 s, v0_md ~11 s, v0_lg ~16 s, lg ~25 s, xl over a minute.
FAST_MODELS = {"mformer_xs", "mformer_v0_sm", "timm"}
# one kept checkpoint: an xl checkpoint with its optimizer state is ~5 GB
QUIET = ["logger.wandb.mode=disabled", "logger.plots=false", "checkpoint.keep_last=1"]


def train(run_dir: Path, model: str, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "train.py", "debug=fast", f"model={model}", f"hydra.run.dir={run_dir}", *QUIET]
    proc = subprocess.run(
        [*cmd, *overrides], cwd=REPO, capture_output=True, text=True, timeout=1800, env=os.environ.copy()
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return read_metrics(run_dir / "metrics.jsonl")


def assert_trained_six_steps(records: list[dict]) -> None:
    train_lines = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["train/loss"]) for r in train_lines)
    val = [r for r in records if "val/top1/taxa_L10" in r]
    assert val[-1]["step"] == 6 and math.isfinite(val[-1]["val/loss"])


@pytest.mark.parametrize(
    "name",
    [pytest.param(p.stem, marks=() if p.stem in FAST_MODELS else pytest.mark.slow) for p in MODEL_CONFIGS],
)
def test_debug_run_trains_every_model_config(tmp_path, demo_cache, name):
    records = train(tmp_path / "run", name)
    assert_trained_six_steps(records)
    used = OmegaConf.load(tmp_path / "run/.hydra/config.yaml").model._target_
    assert used == OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")._target_


def test_hsoftmax_heads_with_grad_checkpointing_and_channels_last(tmp_path, demo_cache):
    records = train(
        tmp_path / "run",
        "mformer_sm",
        "model.head=hsoftmax",
        "model.grad_checkpointing=true",
        "train.channels_last=true",
    )
    assert_trained_six_steps(records)
    log = (tmp_path / "run/train.log").read_text()
    assert "MFormerV1" in log


def test_conditional_heads_start_from_pretrained_weights(tmp_path, demo_cache):
    # weights of a linear-head model: the body loads, the heads (other parameters) are re-initialised
    torch.manual_seed(0)
    taxonomy_free = build_model(OmegaConf.load(REPO / "conf/model/mformer_sm.yaml"), [2, 3, 4, 5], {})
    torch.save(taxonomy_free.state_dict(), tmp_path / "weights.pth")
    records = train(
        tmp_path / "run",
        "mformer_sm",
        "model.head=conditional",
        "model.head_routing=gumbel",
        f"model.pretrained={tmp_path / 'weights.pth'}",
    )
    assert_trained_six_steps(records)
    log = (tmp_path / "run/train.log").read_text()
    loaded = re.search(rf"pretrained {re.escape(str(tmp_path / 'weights.pth'))}: (\d+) tensors loaded", log)
    assert loaded is not None and int(loaded.group(1)) > 100, log[-3000:]
    assert "heads re-initialised" in log and "skipped heads.3.fc.weight" in log
