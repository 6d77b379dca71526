"""What evaluation, prediction and export share: a checkpoint turned back into a model, and CLI errors.

``load_run`` reads a checkpoint written by the trainer (``model``, ``config``, ``taxonomy``, optional
``ema`` and ``meta_dims``), rebuilds the model with ``build_model`` exactly as the trainer built it and
loads the chosen weights. The metadata components the model takes come from the checkpoint's
``meta_dims``, else from the metadata embeddings in the weights themselves (so a checkpoint is usable
without its dataset).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from linnaeus.checkpoint import CheckpointError, load_checkpoint
from linnaeus.data.encodings import DEFAULT_ELEVATION_SCALES
from linnaeus.data.images import BadImageError
from linnaeus.data.labels import level_of
from linnaeus.data.table import RANK_LEVELS
from linnaeus.data.taxonomy import Taxonomy
from linnaeus.errors import UserError
from linnaeus.models import build_model

log = logging.getLogger("linnaeus")
# the command-line apps' own config folder: conf/ has a `checkpoint` group, which would swallow
# checkpoint=PATH
APPS_CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf" / "apps")
WEIGHTS = ("auto", "model", "ema")
META_EMBED_KEY = re.compile(r"(?:^|\.)meta_embed\.([^.]+)\.embed\.0\.weight$")
LEVEL_NAMES = {level: name for name, level in RANK_LEVELS.items()}


class UsageError(UserError, ValueError):
    """A bad argument to evaluate/predict/export; the message says what is wrong and how to fix it."""


@dataclass
class LoadedRun:
    """A checkpoint with the model rebuilt from it."""

    path: Path  # the checkpoint file
    run_dir: Path  # the training run's directory (holds split.json, taxonomy.json, checkpoints/)
    ckpt: dict
    cfg: DictConfig  # the training run's resolved config
    taxonomy: Taxonomy
    meta_dims: dict[str, int]  # the metadata components the model takes (none when it ignores metadata)
    model: torch.nn.Module  # on the device, in eval mode
    weights: str  # which weights were loaded: "model" or "ema"

    @property
    def step(self) -> int | None:
        return (self.ckpt.get("train_state") or {}).get("step")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return device


def run_dir_of(checkpoint: Path) -> Path:
    """``<run>/checkpoints/last.pt`` -> ``<run>``; a checkpoint elsewhere -> its folder."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def meta_dims_from_weights(state_dict: dict) -> dict[str, int]:
    """Component -> width from the first layer of each metadata embedding, in the model's order."""
    dims: dict[str, int] = {}
    for key, value in state_dict.items():
        match = META_EMBED_KEY.search(key)
        if match and match.group(1) not in dims:
            dims[match.group(1)] = int(value.shape[1])  # Linear weight: (hidden, in_dim)
    return dims


def choose_weights(ckpt: dict, weights: str, path: Path) -> tuple[dict, str]:
    """The state dict to load: the EMA weights for ``ema`` (or ``auto`` when present), else ``model``."""
    if weights not in WEIGHTS:
        raise UsageError(f"weights={weights!r}; choose one of {', '.join(WEIGHTS)}")
    ema = ckpt.get("ema")
    if weights == "ema" and not ema:
        raise UsageError(f"{path} holds no EMA weights (the run trained without EMA); use weights=model")
    if weights in ("ema", "auto") and ema:
        return ema, "ema"
    return ckpt["model"], "model"


def load_run(
    checkpoint: str | Path, *, weights: str = "auto", device: torch.device | str = "cpu"
) -> LoadedRun:
    """Load ``checkpoint`` and rebuild its model on ``device`` (eval mode) with the chosen weights."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        raise UsageError(
            f"checkpoint={path} is a folder; give a file, e.g. {path / 'checkpoints' / 'last.pt'}"
        )
    ckpt = load_checkpoint(path, map_location="cpu")
    for key in ("config", "taxonomy"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path} has no '{key}' entry; it was not written by linnaeus.train")
    cfg = OmegaConf.create(ckpt["config"])
    taxonomy = Taxonomy.from_dict(ckpt["taxonomy"])
    state, used = choose_weights(ckpt, weights, path)
    meta_dims = dict(ckpt.get("meta_dims") or meta_dims_from_weights(ckpt["model"]))
    model = build_model(cfg.model, taxonomy.num_classes, meta_dims, taxonomy)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise CheckpointError(
            f"the weights in {path} do not fit the model its config describes ({first[0].strip()})"
        ) from err
    model = model.to(device).eval()
    used_dims = dict(getattr(model, "meta_dims", meta_dims))  # empty when model.meta.enabled=false
    return LoadedRun(path, run_dir_of(path), ckpt, cfg, taxonomy, used_dims, model, used)


def rank_name(task_key: str) -> str:
    """``taxa_L10`` -> ``species``; levels without a usual name keep the task key."""
    return LEVEL_NAMES.get(level_of(task_key), task_key)


def metadata_encodings(cfg: DictConfig, meta_dims: dict[str, int]) -> dict[str, dict]:
    """How each component the model takes is computed from raw values (``linnaeus.data.encodings``).

    Elevation scales are read from the training labels file (attribute ``scales``) when it is here;
    otherwise the builder's defaults are assumed when the width fits them, else they are unknown (None).
    """
    described = {}
    for name, width in meta_dims.items():
        if name == "spatial":
            described[name] = {
                "width": width,
                "function": "linnaeus.data.encodings.encode_spatial",
                "inputs": ["latitude (degrees)", "longitude (degrees)"],
                "formula": "(cos(lat) cos(lon), cos(lat) sin(lon), sin(lat))",
            }
        elif name == "temporal":
            described[name] = {
                "width": width,
                "function": "linnaeus.data.encodings.encode_temporal",
                "inputs": ["day of year (1..366)"] + (["hour (0..24)"] if width == 4 else []),
                "formula": "sin, cos of 2 pi (day - 1) / 365.25"
                + ("; sin, cos of 2 pi hour / 24 (0, 0 when the hour is unknown)" if width == 4 else ""),
            }
        elif name.startswith("elevation_"):
            scales = _elevation_scales(cfg, name, width)
            described[name] = {
                "width": width,
                "function": "linnaeus.data.encodings.encode_elevation",
                "inputs": ["elevation (metres)"],
                "formula": "sin, cos of 2 pi e / s for each scale s, interleaved per scale",
                "scales": scales,
            }
        else:
            described[name] = {"width": width, "function": None, "inputs": [], "formula": "unknown component"}
    return described


def _elevation_scales(cfg: DictConfig, name: str, width: int) -> list[float] | None:
    labels = cfg.data.get("labels")
    if labels and Path(labels).is_file():
        import h5py

        try:
            with h5py.File(labels, "r") as h5:
                if name in h5 and "scales" in h5[name].attrs:
                    return [float(s) for s in h5[name].attrs["scales"]]
        except OSError:
            pass
    if width == 2 * len(DEFAULT_ELEVATION_SCALES):  # what the builder and the demo dataset write
        return list(DEFAULT_ELEVATION_SCALES)
    return None


def run_cli(main: Callable[[DictConfig], object], cfg: DictConfig) -> None:
    """Run a command; bad input ends it with ``error: <message>`` and exit status 1, never a traceback."""
    try:
        if OmegaConf.is_missing(cfg, "checkpoint"):
            raise UsageError(
                "checkpoint=PATH is required, e.g. checkpoint=outputs/demo/default/checkpoints/best.pt"
            )
        main(cfg)
    except (UserError, BadImageError) as err:
        message = str(err) if not isinstance(err, CheckpointError) else str(err).splitlines()[0]
        log.debug("%s", message, exc_info=True)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
