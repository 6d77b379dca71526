"""Pretrained weights from a local file, matched to a model by name and shape, with a report.

Accepted files: a plain state dict, a timm-style checkpoint (``{"state_dict": ...}``, also ``.safetensors``),
or one of our checkpoints (``{"model": ..., "taxonomy": ...}``). Everything is read with
``torch.load(weights_only=True)``: no code from the file runs.

Matching: keys are stripped of ``module.`` / ``_orig_mod.`` (DDP, torch.compile) and, for models with a
``backbone`` (the timm wrapper), prefixed with ``backbone.`` when that matches more names. A tensor of
another shape is resized where that has a meaning (relative position bias tables, absolute position
embeddings: interpolated over the grid) and skipped otherwise. RoPE has no tensors: nothing to do.
Heads (``heads.*``) are loaded only when they fit the new label space (same taxonomy when both sides
know it, else every head tensor present with the same shape); otherwise all heads are re-initialised.
Every skipped, resized or missing tensor is logged (logger ``linnaeus``) and listed in the report.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from torch import nn

from linnaeus.data.taxonomy import Taxonomy

log = logging.getLogger("linnaeus")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
STATE_KEYS = ("model", "state_dict", "model_state", "state_dict_ema")
HEAD_PREFIX = "heads."


@dataclass
class LoadReport:
    """What ``load_pretrained`` did with every tensor; ``skipped`` maps a file key to the reason."""

    path: str
    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    heads_reinitialised: bool = False

    def summary(self) -> str:
        return (
            f"pretrained {self.path}: {len(self.loaded)} tensors loaded ({len(self.resized)} resized), "
            f"{len(self.skipped)} skipped, {len(self.missing)} model tensors not in the file"
            + (", heads re-initialised" if self.heads_reinitialised else "")
        )


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``(state dict, taxonomy dict or None)`` from any of the accepted file kinds."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    taxonomy = None
    if isinstance(obj, dict):
        for key in STATE_KEYS:
            if isinstance(obj.get(key), dict):
                taxonomy = obj.get("taxonomy")
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict (looked for a dict of tensors or keys {STATE_KEYS})")
    state = {}
    for key, value in obj.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    return state, taxonomy


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


def resize_tensor(
    name: str, source: torch.Tensor, target: torch.Tensor, num_prefix: int | None
) -> torch.Tensor | None:
    """``source`` interpolated to ``target``'s shape where the tensor is a grid of positions, else None."""
    if (
        name.endswith("relative_position_bias_table")
        and source.ndim == 3
        and source.shape[0] == target.shape[0]
    ):
        # ours: (heads, 2H - 1, 2W - 1); align_corners keeps offset 0 at the centre
        return F.interpolate(source[None].float(), size=target.shape[1:], mode="bicubic", align_corners=True)[
            0
        ]
    if (
        name.endswith("relative_position_bias_table")
        and source.ndim == 2
        and source.shape[1] == target.shape[1]
    ):
        side = _square_side(
            target.shape[0]
        )  # timm (Swin-style) flat table ((2W - 1)^2, heads), no extra tokens
        if side is not None and side % 2:
            window = ((side + 1) // 2, (side + 1) // 2)
            return resize_rel_pos_bias_table(source.float(), window, tuple(target.shape))
    if name.endswith("pos_embed") and source.ndim == 3 and source.shape[::2] == target.shape[::2]:
        prefixes = [num_prefix] if num_prefix is not None else range(0, 9)
        for prefix in prefixes:
            new_side = _square_side(target.shape[1] - prefix)
            if new_side and _square_side(source.shape[1] - prefix):
                return resample_abs_pos_embed(source.float(), [new_side, new_side], num_prefix_tokens=prefix)
    if name.endswith("pos_embed") and source.ndim == 4 and source.shape[:2] == target.shape[:2]:
        return F.interpolate(source.float(), size=target.shape[2:], mode="bicubic", align_corners=False)
    return None


def _heads_fit(
    source: dict, target: dict, source_taxonomy: dict | None, taxonomy: Taxonomy | None
) -> str | None:
    """None when the file's heads fit the model's label space, else the reason they do not."""
    if source_taxonomy is not None and taxonomy is not None:
        return None if Taxonomy.from_dict(source_taxonomy) == taxonomy else "head of another label space"
    source_heads = {k: v.shape for k, v in source.items() if k.startswith(HEAD_PREFIX)}
    target_heads = {k: v.shape for k, v in target.items() if k.startswith(HEAD_PREFIX)}
    return (
        None if source_heads == target_heads else "heads do not fit the label space (names or shapes differ)"
    )


def load_pretrained(model: nn.Module, path: str | Path, taxonomy: Taxonomy | None = None) -> LoadReport:
    """Load the weights in ``path`` into ``model`` by name and shape; returns (and logs) the report."""
    source, source_taxonomy = read_weights(path)
    target = model.state_dict()
    if hasattr(model, "backbone"):  # timm checkpoints name the backbone's tensors without our prefix
        prefixed = sum(f"backbone.{k}" in target for k in source)
        if prefixed > sum(k in target for k in source):
            source = {f"backbone.{k}": v for k, v in source.items()}
    num_prefix = getattr(getattr(model, "backbone", None), "num_prefix_tokens", None)

    report = LoadReport(str(path))
    heads_reason = _heads_fit(source, target, source_taxonomy, taxonomy)
    loadable = {}
    for name, tensor in source.items():
        if name.startswith(HEAD_PREFIX) and heads_reason is not None:
            report.skipped[name] = heads_reason
        elif name not in target:
            report.skipped[name] = "not in the model"
        elif tensor.shape == target[name].shape:
            loadable[name] = tensor
        elif (resized := resize_tensor(name, tensor, target[name], num_prefix)) is not None:
            loadable[name] = resized
            report.resized.append(name)
        else:
            report.skipped[name] = (
                f"shape {tuple(tensor.shape)} in the file, {tuple(target[name].shape)} in the model"
            )
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in loadable.items()}, strict=False)
    report.loaded = sorted(loadable)
    report.missing = sorted(k for k in target if k not in loadable)
    if heads_reason is not None and hasattr(model, "heads"):
        model.heads.reset_parameters()
        report.heads_reinitialised = True

    log.info("%s", report.summary())
    for name in report.resized:
        log.info("pretrained: interpolated %s to %s", name, tuple(target[name].shape))
    for name, reason in report.skipped.items():
        log.warning("pretrained: skipped %s (%s)", name, reason)
    for name in report.missing:
        log.warning("pretrained: %s not in the file; keeps its initialisation", name)
    return report
