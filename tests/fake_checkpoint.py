"""Checkpoints of untrained models in the trainer's format, for prediction and export tests.

The config is the real composed training config (Hydra's compose API), the taxonomy and metadata
widths come from the demo dataset, and the file holds what the trainer's checkpoints hold for
evaluation and export: ``model``, ``config``, ``taxonomy``, ``meta_dims``, ``train_state``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from linnaeus.config import register_configs
from linnaeus.data.labels import read_labels
from linnaeus.data.loader import resolve_paths
from linnaeus.data.taxonomy import build_taxonomy
from linnaeus.models import build_model
from tests.conftest import REPO


def compose_config(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=overrides)


def make_checkpoint(path: Path, overrides: list[str], *, seed: int = 0, ema: bool = False) -> Path:
    """Write ``path``: a freshly initialised model for the demo dataset, with the run's config."""
    cfg = compose_config(["data=demo", "debug=fast", *overrides])
    labels, _ = resolve_paths(cfg.data)
    table = read_labels(labels, cfg.data.task_keys, cfg.data.meta_components)
    taxonomy, _, _ = build_taxonomy(table, cfg.data.on_conflict)
    torch.manual_seed(seed)
    model = build_model(cfg.model, taxonomy.num_classes, table.meta_dims, taxonomy)
    for module in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    payload = {
        "model": state,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "taxonomy": taxonomy.to_dict(),
        "meta_dims": dict(table.meta_dims),
        "train_state": {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_value": None},
    }
    if ema:  # EMA weights that differ from the live ones
        payload["ema"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path
