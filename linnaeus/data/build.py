"""Build a dataset (``labels.h5`` + ``images.h5``) from a folder tree or a CSV file.

    python -m linnaeus.data.build folder ROOT --out DIR
    python -m linnaeus.data.build csv FILE --image-root DIR --out DIR

Folder mode: ``ROOT/<rank1>/<rank2>/.../<species>/<image>``; every image must sit at the same depth,
and the folder names are the taxon names. CSV mode: one image path column, one column per rank
(names; an empty cell is an unknown label), optional ``latitude``, ``longitude``, ``date`` and
``elevation`` columns, from which the metadata encodings are computed.

``--hybrid`` writes only ``labels.h5`` and leaves the images as files (train with
``data.images=<image folder>``); ``--max-side N`` re-encodes images whose long side exceeds N pixels.
Grayscale, palette, RGBA and CMYK images are converted to RGB when re-encoded, and always at load time.
Every image is decoded once; undecodable or missing images are listed in ``build_report.json`` and
left out, or stop the build with ``--strict``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from linnaeus.data.encodings import parse_dates
from linnaeus.data.labels import DatasetError
from linnaeus.data.writer import RawMetadata, TaxonRow, write_images_h5, write_labels_h5

log = logging.getLogger("linnaeus.data.build")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# iNaturalist's ancestral levels for the usual rank names
RANK_LEVELS = {"kingdom": 70, "phylum": 60, "class": 50, "order": 40, "superfamily": 33, "family": 30,
               "subfamily": 27, "tribe": 25, "genus": 20, "subgenus": 15, "complex": 11, "species": 10,
               "subspecies": 5}  # fmt: skip
PATH_COLUMNS = ("image", "image_path", "path", "file", "file_name", "filename")


@dataclass
class Records:
    """What the builder collected: image paths, label names per rank, raw metadata."""

    paths: list[Path]  # absolute image files
    identifiers: list[str]  # relative paths, used as keys and hybrid-mode file names
    names: list[list[str]]  # per row, per rank (coarse -> fine); "" = unknown
    levels: list[int]  # coarse -> fine
    raw: RawMetadata | None = None


def default_levels(num_ranks: int) -> list[int]:
    """Levels for ``num_ranks`` ranks ending at species: 4 ranks -> 40, 30, 20, 10."""
    if not 1 <= num_ranks <= 7:
        raise DatasetError(f"{num_ranks} ranks found; pass --levels explicitly (e.g. --levels 40,30,20,10)")
    return [10 * (num_ranks - i) for i in range(num_ranks)]


def parse_levels(text: str | None, num_ranks: int) -> list[int]:
    if text is None:
        return default_levels(num_ranks)
    levels = [int(v) for v in text.split(",")]
    if len(levels) != num_ranks:
        raise DatasetError(f"--levels gives {len(levels)} levels but the data has {num_ranks} ranks")
    if any(a <= b for a, b in zip(levels, levels[1:])):
        raise DatasetError(f"--levels must decrease from coarse to fine, got {levels}")
    return levels


def scan_folder(root: Path, levels: str | None) -> Records:
    root = root.resolve()
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    depths = {}
    for p in paths:
        depths.setdefault(len(p.relative_to(root).parts) - 1, []).append(p)
    if len(depths) > 1:
        examples = "; ".join(f"depth {d}: {v[0].relative_to(root)}" for d, v in sorted(depths.items()))
        raise DatasetError(
            f"images under {root} sit at different depths ({examples}); every image must be at "
            "ROOT/<rank1>/.../<species>/<image>, one folder level per rank"
        )
    num_ranks = next(iter(depths))
    if num_ranks == 0:
        raise DatasetError(f"images lie directly in {root}; put them in one folder per taxon")
    identifiers = [p.relative_to(root).as_posix() for p in paths]
    # a taxon is its whole path: "sp1" under two genera is two different species
    names = [["/".join(p.relative_to(root).parts[: r + 1]) for r in range(num_ranks)] for p in paths]
    return Records(paths, identifiers, names, parse_levels(levels, num_ranks))


def _float_column(rows: list[dict], key: str | None) -> np.ndarray | None:
    if key is None:
        return None
    out = np.full(len(rows), np.nan)
    for i, row in enumerate(rows):
        try:
            out[i] = float(row[key])
        except (TypeError, ValueError):
            pass  # empty or non-numeric cell: missing
    return out


def scan_csv(
    file: Path, image_root: Path, ranks: str | None, levels: str | None, image_column: str | None
) -> Records:
    if not file.is_file():
        raise DatasetError(f"CSV file not found: {file}")
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if not rows:
        raise DatasetError(f"{file} has no data rows")
    lower = {h.lower(): h for h in header}
    if image_column is None:
        image_column = next((lower[c] for c in PATH_COLUMNS if c in lower), None)
        if image_column is None:
            raise DatasetError(
                f"{file}: no image path column ({', '.join(PATH_COLUMNS)}); use --image-column"
            )
    elif image_column not in header:
        raise DatasetError(f"{file}: --image-column {image_column!r} is not a column; columns: {header}")
    if ranks is None:
        rank_columns = sorted(
            (lower[r] for r in RANK_LEVELS if r in lower), key=lambda c: -RANK_LEVELS[c.lower()]
        )
        if not rank_columns:
            raise DatasetError(
                f"{file}: no rank columns found (e.g. order, family, genus, species); use --ranks"
            )
    else:
        rank_columns = [r.strip() for r in ranks.split(",")]
        absent = [r for r in rank_columns if r not in header]
        if absent:
            raise DatasetError(
                f"{file}: --ranks names columns {absent} that the file lacks; columns: {header}"
            )
    if levels is None and all(c.lower() in RANK_LEVELS for c in rank_columns):
        level_list = [RANK_LEVELS[c.lower()] for c in rank_columns]
    else:
        level_list = parse_levels(levels, len(rank_columns))

    image_root = image_root.resolve()
    identifiers = [row[image_column] for row in rows]
    paths = [image_root / i for i in identifiers]
    names = [[row[c] for c in rank_columns] for row in rows]
    lat_key, lon_key = lower.get("latitude") or lower.get("lat"), lower.get("longitude") or lower.get("lon")
    date_key, elev_key = lower.get("date") or lower.get("observed_on"), lower.get("elevation")
    raw = None
    if (lat_key and lon_key) or date_key or elev_key:
        dates = [row[date_key] for row in rows] if date_key else None
        day, hour = parse_dates(dates) if dates else (None, None)
        has_hours = hour is not None and np.isfinite(hour).any()
        raw = RawMetadata(
            lat=_float_column(rows, lat_key) if lon_key else None,
            lon=_float_column(rows, lon_key) if lat_key else None,
            day_of_year=day,
            hour=hour if has_hours else None,
            elevation=_float_column(rows, elev_key),
            dates=dates,
        )
    return Records(paths, identifiers, names, level_list, raw)


def _check_image(args: tuple[str, int | None]) -> tuple[bytes | None, str | None, list[int] | None]:
    """Read and decode one image; returns (bytes to store, error, original size).

    With ``max_side``, images larger than it are resized and re-encoded (PNG stays PNG, everything
    else becomes JPEG quality 95); otherwise the original bytes are kept.
    """
    path, max_side = args
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return None, f"cannot read ({err.strerror})", None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size = list(img.size)
            needs_resize = max_side is not None and max(img.size) > max_side
            if not needs_resize:
                return data, None, size
            is_png = img.format == "PNG"
            rgb = img.convert("RGB")  # grayscale, palette, RGBA and CMYK all end as RGB
            rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            out = io.BytesIO()
            rgb.save(out, format="PNG" if is_png else "JPEG", quality=95)
            return out.getvalue(), None, size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        return None, f"cannot decode ({type(err).__name__}: {err})", None


def _taxa_and_taxonomy(records: Records, keyed_by_path: bool) -> tuple[dict[str, np.ndarray], list[TaxonRow]]:
    """Integer ids per rank and the taxonomy rows.

    A taxon's parent comes from the first row naming it together with a known parent: a row with
    an empty cell at the coarser rank (partial label) says nothing about the parent.
    """
    num_ranks = len(records.levels)
    ids: list[dict[str, int]] = [{} for _ in range(num_ranks)]
    rows: list[TaxonRow] = []
    row_of: dict[int, TaxonRow] = {}
    taxa = np.zeros((len(records.names), num_ranks), dtype=np.int64)
    next_id = 1
    for i, names in enumerate(records.names):
        parent = 0
        for r, name in enumerate(names):
            if not name:
                parent = 0
                continue
            taxon = ids[r].get(name)
            if taxon is None:
                taxon = ids[r][name] = next_id
                next_id += 1
                display = name.rsplit("/", 1)[-1] if keyed_by_path else name
                row_of[taxon] = TaxonRow(taxon, records.levels[r], parent, display)
                rows.append(row_of[taxon])
            elif row_of[taxon].parent_id == 0 and parent:
                row_of[taxon].parent_id = parent
            taxa[i, r] = taxon
            parent = taxon
    return {f"taxa_L{lvl}": taxa[:, r] for r, lvl in enumerate(records.levels)}, rows


def build(
    records: Records,
    out: Path,
    *,
    hybrid: bool,
    max_side: int | None,
    workers: int,
    strict: bool,
    source: dict,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(p), max_side) for p in records.paths]
    with Pool(workers) if workers > 1 else _Serial() as pool:
        results = list(
            tqdm(pool.imap(_check_image, jobs, chunksize=16), total=len(jobs), desc="images", unit="img")
        )
    bad = [(ident, err) for ident, (_, err, _) in zip(records.identifiers, results) if err]
    report = {"source": source, "rows_found": len(records.paths), "bad_images": dict(bad)}
    if bad and strict:
        (out / "build_report.json").write_text(json.dumps(report, indent=2))
        shown = "\n".join(f"  {i}: {e}" for i, e in bad[:20])
        raise DatasetError(
            f"{len(bad)} images are missing or undecodable (--strict):\n{shown}\n"
            f"full list in {out / 'build_report.json'}; fix or remove them, or build without --strict"
        )
    keep = [i for i, (_, err, _) in enumerate(results) if err is None]
    if not keep:
        raise DatasetError("no readable images; nothing to build")
    kept = Records(
        [records.paths[i] for i in keep],
        [records.identifiers[i] for i in keep],
        [records.names[i] for i in keep],
        records.levels,
        _subset_raw(records.raw, keep),
    )
    taxa, taxonomy = _taxa_and_taxonomy(kept, keyed_by_path=source["mode"] == "folder")
    images_at = str(source["root"])
    if hybrid and max_side is not None:
        image_dir = out / "images"
        for i in keep:
            target = image_dir / records.identifiers[i]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(results[i][0])
        images_at = str(image_dir)
    elif not hybrid:
        write_images_h5(out / "images.h5", kept.identifiers, (results[i][0] for i in keep))
        images_at = str(out / "images.h5")
    config = {**source, "hybrid": hybrid, "max_side": max_side, "images": images_at}
    coverage = write_labels_h5(
        out / "labels.h5", kept.identifiers, taxa, taxonomy=taxonomy, raw=kept.raw, config=config
    )
    report.update(
        rows_written=len(keep),
        ranks={k: int(len(np.unique(v[v > 0]))) for k, v in taxa.items()},
        unknown_labels={k: int((v == 0).sum()) for k, v in taxa.items()},
        metadata_valid_rows=coverage,
        labels=str(out / "labels.h5"),
        images=images_at,
    )
    (out / "build_report.json").write_text(json.dumps(report, indent=2))
    return report


def _subset_raw(raw: RawMetadata | None, keep: list[int]) -> RawMetadata | None:
    if raw is None:
        return None
    pick = {
        k: (None if v is None else (np.asarray(v)[keep] if k != "dates" else [v[i] for i in keep]))
        for k, v in vars(raw).items()
        if k != "elevation_scales"
    }
    return RawMetadata(**pick, elevation_scales=raw.elevation_scales)


class _Serial:
    """Stands in for a process pool with one worker."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def imap(self, fn, items, chunksize: int = 1) -> Iterator:
        return map(fn, items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m linnaeus.data.build",
        description="Build labels.h5 (+ images.h5) from a folder tree or a CSV file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m linnaeus.data.build folder ROOT --out DIR\n"
        "  python -m linnaeus.data.build csv obs.csv --image-root photos/ --out DIR --hybrid",
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    folder = sub.add_parser("folder", help="ROOT/<rank1>/.../<species>/<image>")
    folder.add_argument("root", type=Path)
    table = sub.add_parser("csv", help="a CSV with an image path column and one column per rank")
    table.add_argument("file", type=Path)
    table.add_argument(
        "--image-root", type=Path, required=True, help="folder the image paths are relative to"
    )
    table.add_argument(
        "--image-column", help=f"image path column (default: first of {', '.join(PATH_COLUMNS)})"
    )
    table.add_argument(
        "--ranks",
        help="rank columns, coarse to fine, comma-separated (default: known rank names in the header)",
    )
    for p in (folder, table):
        p.add_argument("--out", type=Path, required=True, help="output folder")
        p.add_argument("--hybrid", action="store_true", help="write only labels.h5; keep the image files")
        p.add_argument("--max-side", type=int, help="re-encode images so the long side is at most N pixels")
        p.add_argument("--levels", help="taxon level per rank, coarse to fine (default ends at 10 = species)")
        p.add_argument("--workers", type=int, default=2, help="processes decoding images (default 2)")
        p.add_argument("--strict", action="store_true", help="fail on any missing or undecodable image")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.max_side is not None and args.max_side < 8:
        parser.error("--max-side must be at least 8 pixels")
    try:
        if args.mode == "folder":
            records = scan_folder(args.root, args.levels)
            source = {"mode": "folder", "root": str(args.root.resolve())}
        else:
            records = scan_csv(args.file, args.image_root, args.ranks, args.levels, args.image_column)
            source = {"mode": "csv", "file": str(args.file.resolve()), "root": str(args.image_root.resolve())}
        report = build(
            records,
            args.out,
            hybrid=args.hybrid,
            max_side=args.max_side,
            workers=args.workers,
            strict=args.strict,
            source=source,
        )
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    bad = len(report["bad_images"])
    log.info(
        "wrote %s: %d rows, classes per rank %s%s",
        args.out,
        report["rows_written"],
        report["ranks"],
        f", {bad} bad images left out (see build_report.json)" if bad else "",
    )
    log.info(
        "train with: python train.py data=h5 data.labels=%s data.images=%s",
        report["labels"],
        report["images"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
