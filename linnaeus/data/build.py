"""Build a dataset (``labels.h5`` + ``images.h5``) from a folder tree or a CSV file.

    python -m linnaeus.data.build folder ROOT --out DIR
    python -m linnaeus.data.build csv FILE --image-root DIR --out DIR

Folder mode: ``ROOT/<rank1>/<rank2>/.../<species>/<image>``; every image must sit at the same depth,
and the folder names are the taxon names. CSV mode: one image path column, one column per rank
(names; an empty cell is an unknown label), optional ``latitude``, ``longitude``, ``date`` and
``elevation`` columns (common aliases such as ``lat``/``lng``, ``decimalLatitude``, ``observed_on``,
``scientific_name`` are recognised), from which the metadata encodings are computed.

``--hybrid`` writes only ``labels.h5`` and leaves the images as files (train with
``data.images=<image folder>``); ``--max-side N`` re-encodes images whose long side exceeds N pixels.
Grayscale, palette, RGBA and CMYK images are converted to RGB when re-encoded, and always at load time.

Every argument and the label table are checked before any image is read. Every image is decoded once,
with the loader's decoder, in child processes (an image that crashes the decoder is named, not fatal);
undecodable or missing images are listed in ``build_report.json`` and left out, or stop the build
with ``--strict``. The report also lists every row dropped and every value not used, with examples.
The dataset is written to a staging folder and replaces ``--out`` only when complete; an existing
dataset is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from linnaeus.data import table as csv_table
from linnaeus.data.isolate import Crashed, isolated_map
from linnaeus.data.labels import DatasetError
from linnaeus.data.output import check_output, remove_stale_staging, staged_output
from linnaeus.data.records import Records, check_labels, taxa_and_taxonomy
from linnaeus.data.table import Finding, Findings
from linnaeus.data.writer import RawMetadata, write_images_h5, write_labels_h5
from linnaeus.errors import UserError

log = logging.getLogger("linnaeus.data.build")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
MAX_WORKERS = 256


# ---------------------------------------------------------------------- arguments
def default_levels(num_ranks: int) -> list[int]:
    """Levels for ``num_ranks`` ranks ending at species: 4 ranks -> 40, 30, 20, 10."""
    if not 1 <= num_ranks <= 7:
        raise DatasetError(f"{num_ranks} ranks found; pass --levels explicitly (e.g. --levels 40,30,20,10)")
    return [10 * (num_ranks - i) for i in range(num_ranks)]


def parse_levels(text: str | None, num_ranks: int) -> list[int]:
    if text is None:
        return default_levels(num_ranks)
    parts = [v.strip() for v in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise DatasetError(
            f"--levels {text!r}: give positive integers separated by commas, e.g. --levels 40,30,20,10"
        )
    levels = [int(p) for p in parts]
    if len(levels) != num_ranks:
        raise DatasetError(f"--levels gives {len(levels)} levels but the data has {num_ranks} ranks")
    if any(a <= b for a, b in zip(levels, levels[1:])):
        raise DatasetError(f"--levels must decrease from coarse to fine (e.g. 40,30,20,10), got {text}")
    return levels


def check_arguments(args: argparse.Namespace) -> None:
    """Everything about the command line that can be wrong, before any file is read."""
    if args.max_side is not None and args.max_side < 8:
        raise DatasetError(f"--max-side {args.max_side}: must be at least 8 pixels")
    if not 1 <= args.workers <= MAX_WORKERS:
        raise DatasetError(
            f"--workers {args.workers}: must be between 1 and {MAX_WORKERS} (this machine has {os.cpu_count()} CPUs)"
        )
    if args.levels is not None:
        parse_levels(args.levels, len(args.levels.split(",")))
    if args.mode == "folder":
        if not args.root.exists():
            raise DatasetError(f"image folder not found: {args.root}")
        if not args.root.is_dir():
            raise DatasetError(f"{args.root} is a file; give the folder ROOT/<rank1>/.../<species>/<image>")
    else:
        if not args.image_root.exists():
            raise DatasetError(f"--image-root {args.image_root}: no such folder")
        if not args.image_root.is_dir():
            raise DatasetError(
                f"--image-root {args.image_root} is a file; give the folder the image paths start from"
            )


# ---------------------------------------------------------------------- scanning
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
    level_list = parse_levels(levels, num_ranks)
    return Records(paths, identifiers, names, level_list, rank_names=[f"taxa_L{v}" for v in level_list])


def scan_csv(
    file: Path, image_root: Path, ranks: str | None, levels: str | None, image_column: str | None
) -> Records:
    findings = Findings()
    table = csv_table.read_table(file, findings)
    image, rank_columns = csv_table.assign_columns(table, file, findings, image_column, ranks)
    index = {h: i for i, h in enumerate(table.header)}
    rank_levels = [csv_table.rank_level(c) for c in rank_columns]
    if levels is None and all(v is not None for v in rank_levels):
        level_list = [int(v) for v in rank_levels]
        if any(a <= b for a, b in zip(level_list, level_list[1:])):
            raise DatasetError(
                f"{file}: rank columns {rank_columns} give repeated levels; choose them with --ranks"
            )
    else:
        level_list = parse_levels(levels, len(rank_columns))
    csv_table.drop_repeated_images(table, index[image], [index[c] for c in rank_columns], findings)
    if not table.rows:
        raise DatasetError(f"{file}: no row has an image path in column {image!r}")

    image_root = image_root.resolve()
    identifiers = [cells[index[image]] for cells in table.rows]
    paths = [image_root / i for i in identifiers]
    names = [[cells[index[c]] for c in rank_columns] for cells in table.rows]
    columns = findings.columns
    raw = None
    has_location = "latitude" in columns and "longitude" in columns
    for role, other in (("latitude", "longitude"), ("longitude", "latitude")):
        if role in columns and other not in columns:
            findings.warnings.append(
                f"column {columns[role]!r} has no {other} column beside it; locations are not used"
            )
            findings.ignored_columns.append(columns.pop(role))
    if has_location or "date" in columns or "elevation" in columns:
        lat = lon = day = hour = elevation = dates = None
        if has_location:
            lat, lon = csv_table.read_coordinates(
                table, index[columns["latitude"]], index[columns["longitude"]], findings
            )
        if "date" in columns:
            time_col = index[columns["time"]] if "time" in columns else None
            dates, day, hour = csv_table.read_dates(table, index[columns["date"]], time_col, findings)
            if not np.isfinite(hour).any():
                hour = None
        if "elevation" in columns:
            elevation = csv_table.read_elevation(table, index[columns["elevation"]], findings)
        raw = RawMetadata(lat=lat, lon=lon, day_of_year=day, hour=hour, elevation=elevation, dates=dates)
    return Records(paths, identifiers, names, level_list, raw, table.lines, rank_columns, findings)


# ---------------------------------------------------------------------- images
def _check_image(
    args: tuple[str, int | None],
) -> tuple[bytes | None, str | None, list[int] | None, str | None]:
    """Read and decode one image; returns (bytes to store, error, original size, sha1 of the file).

    With ``max_side``, images larger than it are resized and re-encoded (PNG stays PNG, everything
    else becomes JPEG quality 95); otherwise the original bytes are kept. The stored bytes are then
    decoded once more with the loader's own decoder, so the dataset holds only images it can read.
    """
    from linnaeus.data.images import BadImageError, decode_bytes

    path, max_side = args
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return None, f"cannot read ({err.strerror})", None, None
    digest = hashlib.sha1(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size = list(img.size)
            if max_side is not None and max(img.size) > max_side:
                is_png = img.format == "PNG"
                rgb = img.convert("RGB")  # grayscale, palette, RGBA and CMYK all end as RGB
                rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
                out = io.BytesIO()
                rgb.save(out, format="PNG" if is_png else "JPEG", quality=95)
                data = out.getvalue()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        return None, f"cannot decode ({type(err).__name__}: {err})", None, digest
    try:
        decode_bytes(data)
    except BadImageError as err:
        return None, f"the loader's decoder rejects it ({err})", None, digest
    return data, None, size, digest


def check_images(records: Records, max_side: int | None, workers: int) -> list[tuple]:
    import linnaeus.data.images  # noqa: F401  (loaded once here, so every worker process inherits it)

    jobs = [(str(p), max_side) for p in records.paths]
    results: list[tuple | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc="images", unit="img", disable=not sys.stderr.isatty())
    for i, result in isolated_map(
        _check_image, jobs, workers=workers, chunk_size=16, what="the image decoder"
    ):
        if isinstance(result, Crashed):
            result = (None, f"{result.reason} on this file; it is damaged", None, None)
        results[i] = result
        bar.update(1)
    bar.close()
    return results


# ---------------------------------------------------------------------- build
def _prepare_output(out: Path, source: dict, force: bool) -> bool:
    """Check that ``out`` may be written and clear old staging folders; whether it holds a dataset."""
    inputs = [Path(source["root"])] + ([Path(source["file"])] if "file" in source else [])
    had_dataset = check_output(
        out,
        force=force,
        sources=inputs,
        scan_root=Path(source["root"]) if source["mode"] == "folder" else None,
    )
    remove_stale_staging(out)
    return had_dataset


def _checked_records(
    records: Records, on_conflict: str, out: Path, had_dataset: bool, report: dict
) -> Records:
    """The records that pass the label checks; on a failure the report is written before the error."""
    findings = records.findings
    try:
        keep = check_labels(records, on_conflict)
    except DatasetError:
        _write_failure_report(
            out,
            had_dataset,
            {**report, **findings.to_dict(), "taxonomy_conflicts": findings.taxonomy_conflicts},
        )
        raise
    return records.subset(keep)


def _readable_images(
    results: list[tuple], bad: list[tuple[str, str]], strict: bool, out: Path, had_dataset: bool, report: dict
) -> list[int]:
    """Indices of the images that decoded; raises (report written) with ``strict`` or when none did."""
    if bad and strict:
        where = _write_failure_report(out, had_dataset, report)
        shown = "; ".join(f"{i}: {e}" for i, e in bad[:5])
        raise DatasetError(
            f"{len(bad)} images are missing or undecodable (--strict), e.g. {shown}; the full list is in {where}. "
            "Fix or remove them, or build without --strict to leave them out"
        )
    good = [i for i, (_, err, _, _) in enumerate(results) if err is None]
    if not good:
        where = _write_failure_report(out, had_dataset, report)
        raise DatasetError(f"none of the {len(results)} images could be read; nothing to build (see {where})")
    return good


def _identical_images(records: Records, results: list[tuple], good: list[int]) -> Finding:
    """Images whose file has the same bytes as an earlier one, as ``copy = first`` examples."""
    identical = Finding()
    first_of: dict[str, int] = {}
    for i in good:
        digest = results[i][3]
        if digest in first_of:
            identical.add(f"{records.identifiers[i]} = {records.identifiers[first_of[digest]]}")
        else:
            first_of[digest] = i
    return identical


def _stage_images(
    stage: Path,
    out: Path,
    kept: Records,
    data: Iterable[bytes],
    *,
    hybrid: bool,
    max_side: int | None,
    root: str,
) -> str:
    """Write the kept images into ``stage``; where the dataset's images will be (``root``: left in place)."""
    if hybrid and max_side is not None:
        for identifier, image in zip(kept.identifiers, data):
            target = stage / "images" / identifier
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(image)
        return str(out / "images")
    if not hybrid:
        write_images_h5(stage / "images.h5", kept.identifiers, data)
        return str(out / "images.h5")
    return root


def build(
    records: Records,
    out: Path,
    *,
    hybrid: bool,
    max_side: int | None,
    workers: int,
    strict: bool,
    source: dict,
    force: bool = False,
    on_conflict: str = "error",
) -> dict:
    """Check the labels, decode every image, and write the dataset into ``out`` (replaced whole)."""
    out = out.expanduser().absolute()
    had_dataset = _prepare_output(out, source, force)
    findings = records.findings
    report: dict = {"source": source, "rows_found": len(records.paths) + _count(findings.dropped)}
    records = _checked_records(records, on_conflict, out, had_dataset, report)

    results = check_images(records, max_side, workers)
    bad = [(ident, err) for ident, (_, err, _, _) in zip(records.identifiers, results) if err]
    report.update(findings.to_dict(), taxonomy_conflicts=findings.taxonomy_conflicts, bad_images=dict(bad))
    good = _readable_images(results, bad, strict, out, had_dataset, report)
    identical = _identical_images(records, results, good)
    kept = records.subset(good)
    taxa, taxonomy = taxa_and_taxonomy(kept, keyed_by_path=source["mode"] == "folder")
    with staged_output(out) as stage:
        data = (results[i][0] for i in good)
        images_at = _stage_images(
            stage, out, kept, data, hybrid=hybrid, max_side=max_side, root=str(source["root"])
        )
        config = {**source, "hybrid": hybrid, "max_side": max_side, "images": images_at}
        coverage = write_labels_h5(
            stage / "labels.h5", kept.identifiers, taxa, taxonomy=taxonomy, raw=kept.raw, config=config
        )
        report.update(
            rows_written=len(good),
            ranks={k: int(len(np.unique(v[v > 0]))) for k, v in taxa.items()},
            unknown_labels={k: int((v == 0).sum()) for k, v in taxa.items()},
            metadata_valid_rows=coverage,
            identical_images=vars(identical),
            labels=str(out / "labels.h5"),
            images=images_at,
        )
        (stage / "build_report.json").write_text(json.dumps(report, indent=2))
    return report


def _count(groups: dict[str, Finding]) -> int:
    return sum(f.count for f in groups.values())


def _write_failure_report(out: Path, had_dataset: bool, report: dict) -> Path:
    """The report of a build that stopped: beside an existing dataset it must not replace that one's report."""
    path = out / ("build_report.failed.json" if had_dataset else "build_report.json")
    try:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    except OSError as err:
        log.warning("could not write %s: %s", path, err.strerror)
    return path


def summarise(report: dict, findings: Findings) -> None:
    """One console line per kind of thing dropped or ignored (the details are in build_report.json)."""
    for line in findings.warnings:
        log.warning("warning: %s", line)
    if findings.ignored_columns:
        log.warning(
            "ignored columns (no known role): %s; see --help for the recognised names",
            ", ".join(findings.ignored_columns),
        )
    labels = {"duplicate_image": "rows repeating an earlier row's image (the first is kept)",
              "no_image_path": "rows without an image path", "more_cells_than_header": "rows with more cells than the header",
              "taxonomy_conflict": "rows whose parent taxon disagrees with the other rows"}  # fmt: skip
    for reason, finding in findings.dropped.items():
        log.warning("dropped %d %s, e.g. %s", finding.count, labels.get(reason, reason), finding.examples[0])
    for kind, finding in findings.invalid.items():
        log.warning("%d invalid %s left missing, e.g. %s", finding.count, kind, finding.examples[0])
    identical = report.get("identical_images", {})
    if identical.get("count"):
        log.warning(
            "%d images have the same bytes as another one (kept; copies can land in both training and "
            "validation), e.g. %s", identical["count"], identical["examples"][0],
        )  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``error: ...`` line with status 1, like every other problem."""

    def error(self, message: str):
        self.exit(1, f"error: {message} (see {self.prog} --help)\n")


def _build_parser() -> _Parser:
    """The command line: a ``folder`` and a ``csv`` mode sharing the output and build options."""
    parser = _Parser(
        prog="python -m linnaeus.data.build",
        description="Build labels.h5 (+ images.h5) from a folder tree or a CSV file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m linnaeus.data.build folder ROOT --out DIR\n"
        "  python -m linnaeus.data.build csv obs.csv --image-root photos/ --out DIR --hybrid\n\n"
        "CSV columns recognised (case, spaces and _ ignored): image path: image, path, file, filename, photo;\n"
        "ranks: kingdom ... species, subspecies, scientific_name, taxon_<rank>_name; latitude: lat,\n"
        "decimalLatitude; longitude: lon, lng, long, decimalLongitude; date: date, observed_on, eventDate,\n"
        "datetime; time: time, eventTime; elevation: elevation, altitude. Other columns are listed as ignored.",
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    folder = sub.add_parser("folder", help="ROOT/<rank1>/.../<species>/<image>")
    folder.add_argument("root", type=Path)
    table = sub.add_parser("csv", help="a CSV with an image path column and one column per rank")
    table.add_argument("file", type=Path)
    table.add_argument(
        "--image-root", type=Path, required=True, help="folder the image paths are relative to"
    )
    table.add_argument("--image-column", help="image path column (default: image, path, file, filename, ...)")
    table.add_argument(
        "--ranks",
        help="rank columns, coarse to fine, comma-separated (default: known rank names in the header)",
    )
    table.add_argument(
        "--on-conflict",
        choices=("error", "drop"),
        default="error",
        help="a name with two parents (one species under two genera): stop (default) or drop the minority rows",
    )
    for p in (folder, table):
        p.add_argument("--out", type=Path, required=True, help="output folder (replaced only with --force)")
        p.add_argument("--force", action="store_true", help="replace a dataset already in --out")
        p.add_argument("--hybrid", action="store_true", help="write only labels.h5; keep the image files")
        p.add_argument("--max-side", type=int, help="re-encode images so the long side is at most N pixels")
        p.add_argument("--levels", help="taxon level per rank, coarse to fine (default ends at 10 = species)")
        p.add_argument("--workers", type=int, default=2, help="processes decoding images (default 2)")
        p.add_argument("--strict", action="store_true", help="fail on any missing or undecodable image")
    return parser


def _scan(args: argparse.Namespace) -> tuple[Records, dict]:
    """The records of the folder or CSV named on the command line, and the source entry of the report."""
    if args.mode == "folder":
        records = scan_folder(args.root, args.levels)
        source = {"mode": "folder", "root": str(args.root.resolve())}
    else:
        records = scan_csv(args.file, args.image_root, args.ranks, args.levels, args.image_column)
        source = {"mode": "csv", "file": str(args.file.resolve()), "root": str(args.image_root.resolve())}
    return records, source


def _log_written(out: Path, report: dict) -> None:
    """The closing lines: what was written, and the command to train on it."""
    bad = len(report["bad_images"])
    log.info(
        "wrote %s: %d rows, classes per rank %s%s",
        out,
        report["rows_written"],
        report["ranks"],
        f", {bad} bad images left out (see build_report.json)" if bad else "",
    )
    log.info(
        "train with: python train.py data=h5 data.labels=%s data.images=%s",
        report["labels"],
        report["images"],
    )


def main(argv: list[str] | None = None) -> int:
    """Build a dataset from the command line; the exit status (1 on any error, 130 on Ctrl-C)."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        check_arguments(args)
        records, source = _scan(args)
        report = build(
            records,
            args.out,
            hybrid=args.hybrid,
            max_side=args.max_side,
            workers=args.workers,
            strict=args.strict,
            source=source,
            force=args.force,
            on_conflict=getattr(args, "on_conflict", "error"),
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.out} was not changed", file=sys.stderr)
        return 130
    summarise(report, records.findings)
    _log_written(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
