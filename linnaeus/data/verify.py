"""Check a dataset: `python -m linnaeus.data.verify DIR`.

Reads DIR/labels.h5 and the images (DIR/images.h5, or the folder given with --images), checks the
schema, the taxonomy's consistency and every image, prints a summary, writes a JSON report and
exits with status 1 when anything is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from linnaeus.data.check import find_bad_images
from linnaeus.data.images import open_image_store
from linnaeus.data.labels import DatasetError, read_labels
from linnaeus.data.taxonomy import build_taxonomy


def verify(
    directory: Path, images: Path | None = None, workers: int = 2, extension: str | None = None
) -> dict:
    """Return a report dict with ``ok`` and the problems found (never raises for bad data)."""
    report: dict = {"labels": str(directory / "labels.h5"), "ok": False, "errors": []}
    try:
        table = read_labels(directory / "labels.h5")
    except DatasetError as err:
        report["errors"].append(str(err))
        return report
    report["rows"] = len(table)
    report["ranks"] = table.task_keys
    report["metadata_coverage"] = {k: float(v.mean()) for k, v in table.meta_valid.items()}
    report["unknown_fraction"] = {
        k: float((table.taxa[:, t] == 0).mean()) for t, k in enumerate(table.task_keys)
    }
    taxonomy, _, tax_report = build_taxonomy(table, on_conflict="drop")
    report["classes"] = dict(zip(taxonomy.task_keys, [n - 1 for n in taxonomy.num_classes]))
    report["taxonomy_conflicts"] = tax_report["conflicts"]
    report["rows_with_conflicts"] = tax_report["dropped_rows"]
    report["parents_filled"] = tax_report["filled_parents"]
    for conflict in tax_report["conflicts"]:
        report["errors"].append(f"taxonomy: {conflict['message']} ({conflict['rows']} rows)")

    images = images or directory / "images.h5"
    try:
        store = open_image_store(images, extension)
        rows, missing = store.rows_for(table.identifiers)
    except DatasetError as err:
        report["errors"].append(str(err))
        return report
    bad = find_bad_images(store, table.identifiers, rows, missing, workers=workers)
    report["images"] = str(images)
    report["bad_images"] = [{"identifier": str(table.identifiers[p]), "reason": r} for p, r in bad.items()]
    if bad:
        report["errors"].append(f"{len(bad)} of {len(table)} images are missing or undecodable")
    report["ok"] = not report["errors"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m linnaeus.data.verify",
        description="Check a linnaeus dataset (schema, taxonomy consistency, missing or corrupt images) and write "
        "a JSON report. Exits with status 1 when a problem is found.",
    )
    parser.add_argument("directory", type=Path, help="folder holding labels.h5 (and images.h5)")
    parser.add_argument(
        "--images",
        type=Path,
        default=None,
        help="images.h5 or image folder (hybrid datasets); default DIR/images.h5",
    )
    parser.add_argument(
        "--image-extension", default=None, help="extension appended to identifiers without one"
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="where to write the JSON report (default DIR/verify_report.json)",
    )
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel image checks"
    )
    args = parser.parse_args(argv)

    report = verify(args.directory, args.images, args.workers, args.image_extension)
    out = args.report or args.directory / "verify_report.json"
    out.write_text(
        json.dumps(report, indent=1, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
    )
    if report["ok"]:
        print(f"OK: {report['rows']} rows, classes per rank {report['classes']}; report in {out}")
        return 0
    print(f"FAILED: {len(report['errors'])} problem(s); report in {out}", file=sys.stderr)
    for error in report["errors"][:20]:
        print(f"  - {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
