"""Checkpoint files: atomic writes, rotation, ``last.pt``/``best.pt`` and damage-tolerant resume.

Layout of ``<run>/checkpoints/``: ``step_XXXXXXXX.pt`` (the newest ``keep_last``), ``last.pt`` and
``best.pt`` (hard links to step files, or copies where links are not possible). A file only ever
appears under its final name complete: it is written to a temporary name, synced, then renamed.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from linnaeus.errors import UserError, describe_write_error, os_error_in

log = logging.getLogger(__name__)
STEP_PATTERN = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was expected."""


# ---------------------------------------------------------------------- RNG state
def capture_rng() -> dict:
    """RNG states of torch (CPU and CUDA), numpy and python, in a form ``weights_only`` loading accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- writing
def _is_write_failure(err: BaseException) -> bool:
    """OSErrors, and the RuntimeErrors torch.save raises when its file writes fail (e.g. a full disk)."""
    if os_error_in(err) is not None:
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("write" in text or "no space" in text)


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    On any failure the temporary file is removed and ``path`` keeps its previous content; a failed
    write (disk full, permissions) raises ``CheckpointError`` naming the path and the free space.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if _is_write_failure(err):
            raise CheckpointError(
                describe_write_error(err, path, "checkpoint") + "; the previous checkpoints are intact"
            ) from err
        raise


def _link(source: Path, target: Path) -> None:
    """Atomically make ``target`` the same file as ``source`` (hard link, else a copy)."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if _is_write_failure(err):
            raise CheckpointError(
                describe_write_error(err, target, "checkpoint") + f"; {source} is complete and loadable"
            ) from err
        raise


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Step checkpoints, newest first."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("step_*.pt") if (m := STEP_PATTERN.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(state: dict, ckpt_dir: Path, step: int, keep_last: int, is_best: bool = False) -> Path:
    """Write ``step_<step>.pt``, point ``last.pt`` (and ``best.pt`` when asked) at it, prune old steps."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step:08d}.pt"
    atomic_save(state, path)
    _link(path, ckpt_dir / "last.pt")
    if is_best:
        _link(path, ckpt_dir / "best.pt")
    for old in step_checkpoints(ckpt_dir)[max(1, keep_last) :]:
        old.unlink(missing_ok=True)  # best.pt keeps its own link to the data
    return path


# ---------------------------------------------------------------------- reading
def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load one checkpoint safely (``weights_only=True``); a clear error when it is damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a linnaeus checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} does not hold a linnaeus training state (no 'model' entry)")
    return state


def load_latest(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
    """The newest loadable checkpoint: ``last.pt``, else step files newest first, with a warning per damaged file.

    Returns None when the folder holds no checkpoint at all; raises when every file is damaged.
    """
    candidates = []
    if (ckpt_dir / "last.pt").is_file():
        candidates.append(ckpt_dir / "last.pt")
    candidates += step_checkpoints(ckpt_dir)
    if not candidates:
        return None
    errors = []
    for path in candidates:
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as err:
            log.warning("%s; falling back to the previous checkpoint", err)
            errors.append(str(err))
            continue
        if errors:
            log.warning(
                "resuming from %s (step %s) instead of the damaged newer checkpoint(s)",
                path,
                state.get("train_state", {}).get("step"),
            )
        return state, path
    raise CheckpointError(
        f"every checkpoint in {ckpt_dir} is damaged:\n  "
        + "\n  ".join(errors)
        + "\nMove the folder away to start the run afresh, or set checkpoint.auto_resume=false with a new output directory."
    )
