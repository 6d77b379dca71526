"""Resuming with a different configuration: which changes keep the run meaningful, and which do not.

A run directory belongs to one configuration. Resuming it with other model, optimizer, loss, data or
augmentation settings would silently mix two experiments in one set of curves and checkpoints, so
``check_resume`` refuses, with the differences and the two ways out. Changes that only say how long
to train, how often to log, validate or checkpoint, or how many loader workers to use are safe and
only logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from linnaeus.errors import UserError

log = logging.getLogger(__name__)

# Dotted keys (or prefixes ending in ".") whose change is safe when resuming.
SAFE_KEYS = (
    "train.epochs",
    "train.max_steps",
    "train.log_every",
    "train.val_every",
    "train.limit_val_batches",
    "train.val_mask_components",
    "train.device",
    "train.compile",
    "train.channels_last",
    "train.max_bad_steps",
    "log_level",
    "name",
    "logger.",
    "data.num_workers",
    "data.auto_batch.",  # a resumed run keeps the batch size it found
    "data.val_batch_size",
    "data.check_images",
    "data.cache_dir",
    "checkpoint.every_steps",
    "checkpoint.every_minutes",
    "checkpoint.keep_last",
    "checkpoint.auto_resume",
)
PATH_KEYS = ("data.labels", "data.images", "model.pretrained")  # compared as resolved paths
ABSENT = "<absent>"
MAX_SHOWN = 6


class ResumeConfigError(UserError):
    """The run directory was started with a configuration that differs in a way resuming cannot honour."""


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay whole values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def is_safe(key: str) -> bool:
    return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in SAFE_KEYS)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def compare_configs(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Differences as ``"key: old -> new"`` strings, split into (safe, unsafe).

    A key present on one side only (a setting added or removed by a newer version of the code) is
    reported as safe: its value is the default that the old run did not know about.
    """
    flat_old, flat_new = flatten(old), flatten(new)
    safe, unsafe = [], []
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, ABSENT), flat_new.get(key, ABSENT)
        if key in PATH_KEYS and isinstance(a, str) and isinstance(b, str) and _same_path(a, b):
            continue
        if a == b or (_is_number(a) and _is_number(b) and float(a) == float(b)):
            continue
        line = f"{key}: {_show(a)} -> {_show(b)}"
        if is_safe(key) or a is ABSENT or b is ABSENT:
            safe.append(line)
        else:
            unsafe.append(line)
    return safe, unsafe


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_resume(
    old: Mapping[str, Any], new: Mapping[str, Any], where: str = "this run directory"
) -> list[str]:
    """Raise ``ResumeConfigError`` when ``new`` differs unsafely from the configuration the run began with.

    ``old`` is the config stored in the checkpoint, ``new`` the one composed now (both resolved
    containers). Returns the safe changes (also logged).
    """
    safe, unsafe = compare_configs(old, new)
    if unsafe:
        shown = "; ".join(unsafe[:MAX_SHOWN])
        more = f"; and {len(unsafe) - MAX_SHOWN} more" if len(unsafe) > MAX_SHOWN else ""
        raise ResumeConfigError(
            f"cannot resume {where}: it was started with a different configuration ({shown}{more}). "
            "Rerun the original command to continue that run, or start a new run in another directory "
            "(name=<new name> or hydra.run.dir=<new folder>)"
        )
    for line in safe:
        log.info("resuming with a changed setting: %s", line)
    return safe
