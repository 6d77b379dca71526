"""Classify new images with a checkpoint: top-k per rank and a hierarchical decision per image.

    python -m linnaeus.predict checkpoint=PATH images=FOLDER [out=predictions.csv] [topk=5] [threshold=0.8]
    python -m linnaeus.predict checkpoint=PATH images=observations.csv [image_root=DIR]

``images`` is a folder (every image file below it) or a CSV file, read by the dataset builder's own
reader (``linnaeus.data.table``): an image path column (paths relative to ``image_root``, by default
the CSV's folder) and optional metadata columns under any name the builder accepts (``latitude``/``lat``,
``longitude``/``lng``, ``date``/``observed_on``/``eventDate``, ``time``, ``elevation``/``altitude``),
parsed and encoded (``linnaeus.data.encodings``) exactly as ``python -m linnaeus.data.build csv`` does.
A component the model takes but the input lacks is given to the model as missing.

Images get the checkpoint's validation preprocessing (``build_eval_transform``). The CSV written to
``out`` has one row per image: ``status`` (ok / error) and ``error`` (why an image could not be read;
such images never stop the run), the decision (``decision`` like "genus Quercus, 0.91",
``decision_rank``, ``decision_name``, ``decision_id``, ``decision_prob``) and, per rank coarse to fine,
the top-k classes and their probabilities (``<rank>_<k>``, ``<rank>_<k>_prob``). All probabilities are
the tree-consistent ones of ``linnaeus.decision`` (``combine=finest|chain``), so the top-k table and the
decision agree; the decision is the finest rank whose choice passes ``threshold``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from linnaeus.data import table as csv_table
from linnaeus.data.build import IMAGE_SUFFIXES
from linnaeus.data.encodings import encode_elevation, encode_spatial, encode_temporal
from linnaeus.data.images import BadImageError, decode_bytes
from linnaeus.data.transforms import build_eval_transform
from linnaeus.data.writer import RawMetadata
from linnaeus.decision import METHODS, class_probabilities, hierarchical_decision, tree_probabilities
from linnaeus.inference import (
    APPS_CONFIG_DIR,
    UsageError,
    load_run,
    metadata_encodings,
    rank_name,
    resolve_device,
    run_cli,
)

log = logging.getLogger("linnaeus")
META_ROLES = ("latitude", "longitude", "date", "time", "elevation")  # CSV column roles (linnaeus.data.table)


@dataclass
class Inputs:
    identifiers: list[str]  # as given: the path relative to the folder, or the CSV cell
    paths: list[Path]
    raw: RawMetadata | None  # raw metadata per image (CSV input only)


# ---------------------------------------------------------------------- inputs
def scan_images(source: Path, image_root: Path | None = None, image_column: str | None = None) -> Inputs:
    """The images to classify: every image file under a folder, or the rows of a CSV file."""
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise UsageError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {source}")
        return Inputs([p.relative_to(source).as_posix() for p in paths], paths, None)
    if not source.is_file():
        raise UsageError(f"images={source} is neither a folder nor a CSV file")
    findings = csv_table.Findings()
    table = csv_table.read_table(source, findings)  # the builder's reader: encodings, delimiters, checks
    by_norm: dict[str, str] = {}
    for header in table.header:
        by_norm.setdefault(csv_table.normalise(header), header)

    def column(role: str) -> str | None:  # the builder's names for each role, in its order of preference
        return next((by_norm[a] for a in csv_table.ALIASES[role] if a in by_norm), None)

    if image_column is None:
        image_column = column("image")
        if image_column is None:
            raise UsageError(
                f"{source}: no image path column (image, path, file, filename, ...); columns: {table.header}; "
                "name it with image_column=NAME"
            )
    elif image_column not in table.header:
        raise UsageError(f"{source}: image_column={image_column!r} is not a column; columns: {table.header}")
    index = {h: i for i, h in enumerate(table.header)}
    root = image_root if image_root is not None else source.parent
    identifiers = [cells[index[image_column]] for cells in table.rows]
    raw = raw_metadata(table, {role: column(role) for role in META_ROLES}, index, findings)
    for kind, finding in findings.invalid.items():
        log.warning("%s: %d %s not used (missing for the model), e.g. %s", source, finding.count, kind,
                    finding.examples[0])  # fmt: skip
    return Inputs(identifiers, [root / i for i in identifiers], raw)


def raw_metadata(
    table, columns: dict[str, str | None], index: dict[str, int], findings
) -> RawMetadata | None:
    """Raw coordinates, dates and elevations of the CSV rows, read by the dataset builder's functions."""
    lat = lon = day = hour = elevation = dates = None
    if columns["latitude"] and columns["longitude"]:
        lat, lon = csv_table.read_coordinates(
            table, index[columns["latitude"]], index[columns["longitude"]], findings
        )
    if columns["date"]:
        time_col = index[columns["time"]] if columns["time"] else None
        dates, day, hour = csv_table.read_dates(table, index[columns["date"]], time_col, findings)
        if not np.isfinite(hour).any():
            hour = None
    if columns["elevation"]:
        elevation = csv_table.read_elevation(table, index[columns["elevation"]], findings)
    if lat is None and day is None and elevation is None:
        return None
    return RawMetadata(lat=lat, lon=lon, day_of_year=day, hour=hour, elevation=elevation, dates=dates)


def encode_metadata(
    raw: RawMetadata | None, count: int, meta_dims: dict[str, int], encodings: dict[str, dict]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every component the model takes, (N, width) float32 plus validity (N,); absent ones all missing."""
    meta = {name: np.zeros((count, width), np.float32) for name, width in meta_dims.items()}
    valid = {name: np.zeros(count, bool) for name in meta_dims}
    if raw is None:
        return meta, valid
    for name, width in meta_dims.items():
        encoded = None
        if name == "spatial" and raw.lat is not None:
            encoded = encode_spatial(raw.lat, raw.lon)
        elif name == "temporal" and raw.day_of_year is not None:
            # the width says whether the model was trained with hours (the builder adds them when known)
            hour = (raw.hour if raw.hour is not None else np.full(count, np.nan)) if width == 4 else None
            encoded = encode_temporal(raw.day_of_year, hour)
        elif name == "elevation_main" and raw.elevation is not None:
            scales = encodings[name].get("scales")
            if scales is None:
                raise UsageError(
                    f"the model's {name} metadata has {width} columns and its scales are unknown (the "
                    "training labels file is not here); drop the elevation column to predict without it"
                )
            encoded = encode_elevation(raw.elevation, scales)
        if encoded is not None:
            meta[name], valid[name] = encoded
    return meta, valid


class ImageFiles(Dataset):
    """Decoded, preprocessed images; an unreadable one yields its error instead of raising."""

    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        if self.paths[index].is_dir():
            return {"index": index, "image": None, "error": f"no image file at {self.paths[index]}"}
        try:
            data = self.paths[index].read_bytes()
            if not data:
                raise BadImageError("empty file")
            image = self.transform(decode_bytes(data))
        except OSError as err:
            return {
                "index": index,
                "image": None,
                "error": f"cannot read {self.paths[index]} ({err.strerror or err})",
            }
        except (BadImageError, RuntimeError, ValueError) as err:
            reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))  # no memory addresses
            return {"index": index, "image": None, "error": f"not a readable image: {reason}"}
        return {"index": index, "image": image, "error": ""}


def collate(items: list[dict]) -> dict:
    good = [item for item in items if item["image"] is not None]
    return {
        "index": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "images": torch.stack([item["image"] for item in good]) if good else None,
        "errors": {item["index"]: item["error"] for item in items if item["image"] is None},
    }


# ---------------------------------------------------------------------- output
def columns(task_keys: list[str], topk: list[int]) -> list[str]:
    out = [
        "image",
        "status",
        "error",
        "decision",
        "decision_rank",
        "decision_name",
        "decision_id",
        "decision_prob",
    ]
    for key, k in zip(task_keys, topk):
        rank = rank_name(key)
        for i in range(1, k + 1):
            out += [f"{rank}_{i}", f"{rank}_{i}_prob"]
    return out


def prediction_rows(
    identifiers: list[str], tree_probs: list[torch.Tensor], taxonomy, topk: list[int], threshold: float
) -> list[dict]:
    """One output row per image of a batch, from its tree-consistent probabilities."""
    rank, path, path_probs = hierarchical_decision(tree_probs, taxonomy, threshold)
    tops = []
    for t, probs in enumerate(tree_probs):
        masked = probs.clone()
        masked[:, taxonomy.null_index] = -1.0
        values, indices = masked.topk(topk[t], dim=1)
        tops.append((values.clamp_min(0).tolist(), indices.tolist()))
    rows = []
    for b, identifier in enumerate(identifiers):
        row = {"image": identifier, "status": "ok", "error": ""}
        r = int(rank[b])
        if r >= 0:
            c, p = int(path[b, r]), float(path_probs[b, r])
            name = taxonomy.names[r][c]
            level = rank_name(taxonomy.task_keys[r])
            row.update(decision=f"{level} {name}, {p:.2f}", decision_rank=level, decision_name=name,
                       decision_id=int(taxonomy.class_ids[r][c]), decision_prob=f"{p:.4f}")  # fmt: skip
        else:
            row.update(decision=f"none (below {threshold} at every rank)")
        for t, key in enumerate(taxonomy.task_keys):
            values, indices = tops[t]
            for i, (p, c) in enumerate(zip(values[b], indices[b]), start=1):
                row[f"{rank_name(key)}_{i}"] = taxonomy.names[t][c]
                row[f"{rank_name(key)}_{i}_prob"] = f"{p:.4f}"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- command
def check_options(cfg: DictConfig) -> None:
    if not 0 < cfg.threshold <= 1:
        raise UsageError(f"threshold must be in (0, 1], got {cfg.threshold}")
    if cfg.topk < 1 or cfg.batch_size < 1:
        raise UsageError(f"topk and batch_size must be >= 1, got {cfg.topk} and {cfg.batch_size}")
    if cfg.combine not in METHODS:
        raise UsageError(f"combine={cfg.combine!r}; choose one of {', '.join(METHODS)}")
    if cfg.images is None:
        raise UsageError("images=FOLDER_OR_CSV is required: a folder of images or a CSV with an image column")


@torch.no_grad()
def main(cfg: DictConfig) -> Path:
    check_options(cfg)
    device = resolve_device(cfg.device)
    run = load_run(cfg.checkpoint, weights=cfg.weights, device=device)
    taxonomy, data_cfg = run.taxonomy, run.cfg.data
    source = Path(cfg.images).expanduser()
    inputs = scan_images(source, Path(cfg.image_root) if cfg.image_root else None, cfg.image_column)
    meta, meta_valid = encode_metadata(
        inputs.raw, len(inputs.paths), run.meta_dims, metadata_encodings(run.cfg, run.meta_dims)
    )
    given = [name for name, v in meta_valid.items() if v.any()]
    log.info(
        "%s (step %s, %s weights) | %d images from %s | metadata: %s",
        run.path, run.step, run.weights, len(inputs.paths), source, ", ".join(given) or "none",
    )  # fmt: skip
    transform = build_eval_transform(
        data_cfg.image_size, list(data_cfg.mean), list(data_cfg.std), data_cfg.val_crop_pct
    )
    loader = DataLoader(
        ImageFiles(inputs.paths, transform), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        collate_fn=collate, pin_memory=device.type == "cuda",
    )  # fmt: skip
    topk = [min(cfg.topk, n - 1) for n in taxonomy.num_classes]
    rows: list[dict | None] = [None] * len(inputs.paths)
    bar = tqdm(loader, desc="predict", unit="batch", disable=not cfg.progress_bar)
    for batch in bar:
        for index, error in batch["errors"].items():
            rows[index] = {"image": inputs.identifiers[index], "status": "error", "error": error}
        if batch["images"] is None:
            continue
        index = batch["index"]
        logits = run.model(
            batch["images"].to(device),
            {k: torch.from_numpy(v[index.numpy()]).to(device) for k, v in meta.items()},
            {k: torch.from_numpy(v[index.numpy()]).to(device) for k, v in meta_valid.items()},
        )
        probs = tree_probabilities(class_probabilities(logits, taxonomy.null_index), taxonomy, cfg.combine)
        identifiers = [inputs.identifiers[i] for i in index.tolist()]
        for i, row in zip(index.tolist(), prediction_rows(identifiers, probs, taxonomy, topk, cfg.threshold)):
            rows[i] = row

    out = Path(cfg.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns(taxonomy.task_keys, topk), restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out)
    failed = sum(row["status"] == "error" for row in rows)
    if failed:
        log.warning("%d of %d images could not be read; their rows say why", failed, len(rows))
    log.info("wrote %s: %d images, %d predicted", out, len(rows), len(rows) - failed)
    return out


@hydra.main(version_base=None, config_path=APPS_CONFIG_DIR, config_name="predict")
def hydra_entry(cfg: DictConfig) -> None:
    run_cli(main, cfg)


if __name__ == "__main__":
    hydra_entry()
