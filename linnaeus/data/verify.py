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

from linnaeus.data.labels import DatasetError, read_labels
from linnaeus.errors import OutputError, UserError, describe_write_error


def verify(
    directory: Path, images: Path | None = None, workers: int = 2, extension: str | None = None
) -> dict:
    """Return a report dict with ``ok`` and the problems found (never raises for bad data)."""
    from linnaeus.data.check import find_bad_images  # torch: imported only once there is work to do
    from linnaeus.data.images import open_image_store
    from linnaeus.data.taxonomy import build_taxonomy

    report: dict = {"labels": str(directory / "labels.h5"), "ok": False, "errors": []}
    try:
        table = read_labels(directory / "labels.h5")
    except DatasetError as err:
        report["errors"].append(str(err))
        return report
    report["rows"] = len(table)
    report["ranks"] = table.task_keys
    names, counts = np.unique(table.identifiers.astype(str), return_counts=True)
    repeated = names[counts > 1]
    report["duplicate_identifiers"] = {
        "count": int((counts[counts > 1] - 1).sum()),
        "examples": [f"{name} ({int(k)} rows)" for name, k in zip(repeated[:10], counts[counts > 1][:10])],
    }
    if len(repeated):
        report["errors"].append(
            f"{report['duplicate_identifiers']['count']} rows repeat an image already listed (e.g. "
            f"{', '.join(report['duplicate_identifiers']['examples'][:3])}); a repeated image can land in both "
            "training and validation: rebuild the dataset (the builder keeps the first row of each image)"
        )
    report["metadata_coverage"] = {k: float(v.mean()) for k, v in table.meta_valid.items()}
    report["unknown_fraction"] = {
        k: float((table.taxa[:, t] == 0).mean()) for t, k in enumerate(table.task_keys)
    }
    try:
        taxonomy, _, tax_report = build_taxonomy(table, on_conflict="drop")
    except DatasetError as err:
        report["errors"].append(str(err))
        return report
    report["classes"] = dict(zip(taxonomy.task_keys, [n - 1 for n in taxonomy.num_classes]))
    report["taxonomy_conflicts"] = tax_report["conflicts"]
    report["rows_with_conflicts"] = tax_report["dropped_rows"]
    report["parents_filled"] = tax_report["filled_parents"]
    for conflict in tax_report["conflicts"]:
        report["errors"].append(f"taxonomy: {conflict['message']} ({conflict['rows']} rows)")

    if images is None:  # a hybrid dataset's labels say where its image folder is
        configured = (table.config or {}).get("images")
        use_configured = not (directory / "images.h5").exists() and configured and Path(configured).exists()
        images = Path(configured) if use_configured else directory / "images.h5"
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


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``error: ...`` line with status 1, like every other problem."""

    def error(self, message: str):
        self.exit(1, f"error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m linnaeus.data.verify",
        description="Check a linnaeus dataset (schema, taxonomy consistency, repeated rows, missing or corrupt "
        "images) and write a JSON report. Exits with status 1 when a problem is found. Images are decoded with "
        "the loader's decoder in child processes: an image that crashes the decoder is reported by name.",
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
    try:
        if not args.directory.exists():
            raise DatasetError(
                f"dataset folder not found: {args.directory}; give the folder holding labels.h5 "
                "(the --out of python -m linnaeus.data.build)"
            )
        if not args.directory.is_dir():
            raise DatasetError(f"{args.directory} is a file; give the folder holding labels.h5")
        if not 1 <= args.workers <= 256:
            raise DatasetError(f"--workers {args.workers}: must be between 1 and 256")
        if args.images is not None and not args.images.exists():
            raise DatasetError(f"--images {args.images}: no such file or folder")
        report = verify(args.directory, args.images, args.workers, args.image_extension)
        out = args.report or args.directory / "verify_report.json"
        text = json.dumps(
            report, indent=1, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)
        )
        try:
            out.write_text(text)
        except OSError as err:
            raise OutputError(
                describe_write_error(err, out, "the report") + " (or pass --report PATH)"
            ) from None
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if report["ok"]:
        print(f"OK: {report['rows']} rows, classes per rank {report['classes']}; report in {out}")
        return 0
    print(f"FAILED: {len(report['errors'])} problem(s); report in {out}", file=sys.stderr)
    for error in report["errors"][:20]:
        print(f"  - {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
