"""What the dataset builder collected from a folder tree or a CSV, and the taxonomy its names give.

Taxa are identified by name (in folder mode by their whole path, so "alpina" under two genera is two
species). ``check_labels`` runs before any image is read: a rank without any label and a name under
two parents are reported with the names, rows and counts.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from linnaeus.data.labels import DatasetError
from linnaeus.data.table import Findings
from linnaeus.data.writer import RawMetadata, TaxonRow


@dataclass
class Records:
    """What the builder collected: image paths, label names per rank, raw metadata."""

    paths: list[Path]  # absolute image files
    identifiers: list[str]  # relative paths, used as keys and hybrid-mode file names
    names: list[list[str]]  # per row, per rank (coarse -> fine); "" = unknown
    levels: list[int]  # coarse -> fine
    raw: RawMetadata | None = None
    lines: list[int] | None = None  # CSV line of each row (for messages)
    rank_names: list[str] = field(default_factory=list)  # column or rank name per rank, for messages
    findings: Findings = field(default_factory=Findings)

    def where(self, i: int) -> str:
        return f"line {self.lines[i]}" if self.lines else self.identifiers[i]

    def subset(self, keep: list[int]) -> Records:
        return Records(
            [self.paths[i] for i in keep],
            [self.identifiers[i] for i in keep],
            [self.names[i] for i in keep],
            self.levels,
            subset_raw(self.raw, keep),
            None if self.lines is None else [self.lines[i] for i in keep],
            self.rank_names,
            self.findings,
        )


def check_labels(records: Records, on_conflict: str) -> list[int]:
    """Rows to keep after the label checks (before any image is read); raises on a conflict with ``error``.

    A name with two parents (one species under two genera) is a conflict: reported with names and
    row counts; ``drop`` removes the rows that disagree with the parent most rows give. A rank that
    is empty in every row is an error.
    """
    num_ranks = len(records.levels)
    for r in range(num_ranks):
        if not any(names[r] for names in records.names):
            others = [n for k, n in enumerate(records.rank_names) if k != r]
            raise DatasetError(
                f"rank column {records.rank_names[r]!r} is empty in every row; leave it out"
                + (f" with --ranks {','.join(others)}" if others and records.lines else "")
            )
    bad_rows: set[int] = set()
    problems: list[str] = []
    report: list[dict] = []
    for r in range(1, num_ranks):
        parents: dict[str, Counter] = defaultdict(Counter)
        rows_of: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, names in enumerate(records.names):
            if names[r] and names[r - 1]:
                parents[names[r]][names[r - 1]] += 1
                rows_of[names[r], names[r - 1]].append(i)
        for child, counts in parents.items():
            if len(counts) < 2:
                continue
            (kept, _), *others = counts.most_common()
            listed = " and ".join(
                f"{p!r} ({k} row{'s' * (k > 1)}, e.g. {records.where(rows_of[child, p][0])})"
                for p, k in counts.most_common(3)
            )
            problems.append(
                f"{records.rank_names[r]} {child!r} is under {records.rank_names[r - 1]} {listed}"
            )
            dropped = [i for p, _ in others for i in rows_of[child, p]]
            bad_rows.update(dropped)
            report.append({"rank": records.rank_names[r], "name": child, "parents": dict(counts), "kept": kept,
                           "rows_dropped": len(dropped) if on_conflict == "drop" else 0})  # fmt: skip
    records.findings.taxonomy_conflicts = report
    if problems and on_conflict == "error":
        more = f"; and {len(problems) - 3} more (all in build_report.json)" if len(problems) > 3 else ""
        raise DatasetError(
            f"{len(problems)} name(s) have two parents: {'; '.join(problems[:3])}{more}. Fix the table, or pass "
            f"--on-conflict drop to leave out the {len(bad_rows)} rows that disagree with the majority"
        )
    for i in sorted(bad_rows):
        records.findings.drop(
            "taxonomy_conflict", f"{records.where(i)}: {' / '.join(n for n in records.names[i] if n)}"
        )
    return [i for i in range(len(records.names)) if i not in bad_rows]


def taxa_and_taxonomy(records: Records, keyed_by_path: bool) -> tuple[dict[str, np.ndarray], list[TaxonRow]]:
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


def subset_raw(raw: RawMetadata | None, keep: list[int]) -> RawMetadata | None:
    if raw is None:
        return None
    pick = {
        k: (None if v is None else (np.asarray(v)[keep] if k != "dates" else [v[i] for i in keep]))
        for k, v in vars(raw).items()
        if k != "elevation_scales"
    }
    return RawMetadata(**pick, elevation_scales=raw.elevation_scales)
