"""Optimizer construction with weight-decay rules per parameter group."""

from __future__ import annotations

import hydra
import torch
from omegaconf import OmegaConf
from torch import nn

NO_DECAY_NAME_PARTS = ("token", "pos_embed", "missing", "norm", "bias")


def split_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices and kernels decay; biases, norms, tokens and embeddings do not."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip or any(part in name for part in NO_DECAY_NAME_PARTS):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """Instantiate ``optimizer._target_`` over the decay groups; every group remembers its base LR."""
    cfg = (
        OmegaConf.to_container(optim_cfg, resolve=True) if OmegaConf.is_config(optim_cfg) else dict(optim_cfg)
    )
    target = cfg.pop("_target_")
    groups = split_decay_groups(model, cfg.get("weight_decay", 0.0))
    try:
        optimizer = hydra.utils.get_class(target)(groups, **cfg)
    except (TypeError, ValueError, ImportError) as err:
        raise ValueError(f"cannot build optimizer {target} from optimizer.{list(cfg)}: {err}") from err
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer
