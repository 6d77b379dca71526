"""Reading an observation CSV for the builder: text encoding, delimiter, column roles and cell values.

Everything the reader leaves out or cannot use is recorded in a ``Findings`` object (counts and
examples with line numbers) for ``build_report.json`` and the console, never dropped silently:

- the encoding when the file is not UTF-8 (read as cp1252 or latin-1 instead, with a warning);
- columns that play no role (an id, notes, ...), and which column fills each role: the usual
  aliases are recognised (``lat``/``lng``/``decimalLatitude``, ``scientific_name``, iNaturalist's
  ``taxon_<rank>_name``, ``observed_on``, ``eventDate`` ...);
- rows with more cells than the header, rows without an image path, repeated image paths
  (the first row is kept: a repeated image would otherwise land in both training and validation);
- coordinates, dates, times and elevations that are not valid values (their metadata is left
  missing; the row stays).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from linnaeus.data.encodings import MISSING_TEXT, parse_date
from linnaeus.data.labels import DatasetError

RANK_LEVELS = {"kingdom": 70, "phylum": 60, "class": 50, "order": 40, "superfamily": 33, "family": 30,
               "subfamily": 27, "tribe": 25, "genus": 20, "subgenus": 15, "complex": 11, "species": 10,
               "subspecies": 5}  # fmt: skip
# role -> accepted header names, normalised (lower case, no spaces, "_" or "-"), in order of preference
ALIASES = {
    "image": ("image", "imagepath", "path", "file", "filename", "filepath", "imagefile", "imagename", "photo",
              "photopath", "img", "imgpath", "imgidentifier", "identifier"),
    "latitude": ("latitude", "lat", "decimallatitude", "latitudedeg", "latdeg"),
    "longitude": ("longitude", "lon", "lng", "long", "decimallongitude", "longitudedeg", "londeg"),
    "date": ("date", "observedon", "eventdate", "dateobserved", "observationdate", "datetime", "timeobservedat",
             "timestamp", "observedat"),
    "time": ("time", "eventtime", "timeobserved", "observationtime"),
    "elevation": ("elevation", "elevationm", "altitude", "altitudem", "elev", "alt"),
}  # fmt: skip
SPECIES_ALIASES = ("scientificname", "speciesname", "taxonname", "binomial")
INAT_RANK = re.compile(r"^taxon(\w+?)name$")  # iNaturalist exports: taxon_genus_name, ...
MAX_EXAMPLES = 10


def normalise(header: str) -> str:
    return re.sub(r"[\s_\-.]+", "", header.strip().lower())


@dataclass
class Finding:
    """One kind of problem: how many rows, and a few examples (line number and what was wrong)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(example)


@dataclass
class Findings:
    """What reading the table dropped, ignored or could not use."""

    encoding: str = "utf-8"
    delimiter: str = ","
    columns: dict[str, str] = field(default_factory=dict)  # role -> header used
    ignored_columns: list[str] = field(default_factory=list)
    dropped: dict[str, Finding] = field(default_factory=dict)  # rows left out, by reason
    invalid: dict[str, Finding] = field(default_factory=dict)  # values not used, by kind
    warnings: list[str] = field(default_factory=list)
    taxonomy_conflicts: list[dict] = field(default_factory=list)  # names with two parents

    def drop(self, reason: str, example: str) -> None:
        self.dropped.setdefault(reason, Finding()).add(example)

    def invalid_value(self, kind: str, example: str) -> None:
        self.invalid.setdefault(kind, Finding()).add(example)

    def to_dict(self) -> dict:
        return {
            "encoding": self.encoding,
            "delimiter": self.delimiter,
            "columns": self.columns,
            "ignored_columns": self.ignored_columns,
            "dropped_rows": {k: vars(v) for k, v in self.dropped.items()},
            "invalid_values": {k: vars(v) for k, v in self.invalid.items()},
        }


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]  # cells, padded to the header's length
    lines: list[int]  # line number of each row in the file (header = 1)


def decode_text(file: Path, findings: Findings) -> str:
    """The file's text: UTF-8 (with or without BOM), UTF-16 with BOM, else cp1252 / latin-1 with a warning."""
    try:
        data = file.read_bytes()
    except OSError as err:
        raise DatasetError(f"cannot read the CSV file {file}: {err.strerror}") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        findings.encoding = "utf-16"
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        for encoding in ("cp1252", "latin-1"):
            try:
                text = data.decode(encoding)
            except UnicodeDecodeError:
                continue
            findings.encoding = encoding
            findings.warnings.append(
                f"{file} is not UTF-8 (byte 0x{data[err.start]:02x} on line {line}); read it as {encoding}: "
                "check that names with accents came out right, or save the file as UTF-8"
            )
            return text
    raise AssertionError("latin-1 decodes any bytes")


def read_table(file: Path, findings: Findings) -> Table:
    if not file.exists():
        raise DatasetError(f"CSV file not found: {file}")
    if not file.is_file():
        raise DatasetError(f"{file} is a folder; give the CSV file (e.g. {file}/observations.csv)")
    text = decode_text(file, findings)
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise DatasetError(
            f"{file}: line {line} holds a NUL byte; this is not a text CSV file (export a spreadsheet as CSV UTF-8)"
        )
    first = text.split("\n", 1)[0]
    counts = {d: first.count(d) for d in (",", ";", "\t")}
    findings.delimiter = max(counts, key=counts.get) if any(counts.values()) else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=findings.delimiter)
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DatasetError(
                f"{file} is empty or has an empty header line; the first line must name the columns"
            )
        header = [h.strip() for h in header]
        seen: dict[str, int] = {}
        for h in header:
            seen[h] = seen.get(h, 0) + 1
        repeated = [h for h, k in seen.items() if k > 1 and h]
        if repeated:
            raise DatasetError(
                f"{file}: column(s) {repeated} appear more than once in the header; rename one"
            )
        rows, lines = [], []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue  # blank line
            line = reader.line_num
            if len(cells) > len(header):
                findings.drop(
                    "more_cells_than_header",
                    f"line {line}: {len(cells)} cells for {len(header)} columns (an unquoted "
                    f"'{findings.delimiter}' inside a name?)",
                )
                continue
            rows.append([c.strip() for c in cells] + [""] * (len(header) - len(cells)))
            lines.append(line)
    except csv.Error as err:
        raise DatasetError(f"{file}: line {reader.line_num} cannot be parsed as CSV ({err})") from None
    if not rows:
        raise DatasetError(f"{file} has no data rows (only the header {header})")
    return Table(header, rows, lines)


class _Columns:
    """A table's header and the role each column was given so far (``findings.columns`` kept in step)."""

    def __init__(self, table: Table, file: Path, findings: Findings) -> None:
        self.header, self.file, self.findings = table.header, file, findings
        self.by_norm: dict[str, str] = {}
        for h in self.header:
            self.by_norm.setdefault(normalise(h), h)
        self.used: dict[str, str] = {}  # header -> role

    def free(self, name: str) -> str | None:
        """The unused column whose normalised name is ``name``."""
        h = self.by_norm.get(name)
        return h if h is not None and h not in self.used else None

    def give(self, h: str, role: str, finding: str | None = None) -> str:
        self.used[h] = role
        if finding is not None:
            self.findings.columns[finding] = h
        return h

    def take(self, role: str, names: tuple[str, ...]) -> str | None:
        """The first unused column among the aliases ``names``, given ``role``."""
        for name in names:
            h = self.free(name)
            if h is not None:
                return self.give(h, role, role)
        return None


def _image_column(columns: _Columns, image_column: str | None) -> str:
    if image_column is not None:
        if image_column not in columns.header:
            raise DatasetError(
                f"{columns.file}: --image-column {image_column!r} is not a column; columns: {columns.header}"
            )
        return columns.give(image_column, "image", "image")
    image = columns.take("image", ALIASES["image"])
    if image is None:
        raise DatasetError(
            f"{columns.file}: no image path column (one of image, path, file, filename, photo, ...); "
            f"columns: {columns.header}; name it with --image-column"
        )
    return image


def _named_ranks(columns: _Columns, ranks: str, image: str) -> list[str]:
    """The ``--ranks`` columns, checked."""
    rank_columns = [r.strip() for r in ranks.split(",") if r.strip()]
    absent = [r for r in rank_columns if r not in columns.header]
    if absent:
        raise DatasetError(
            f"{columns.file}: --ranks names columns {absent} that the file lacks; columns: {columns.header}"
        )
    twice = sorted({r for r in rank_columns if rank_columns.count(r) > 1})
    if twice:
        raise DatasetError(f"--ranks lists {twice} more than once")
    if image in rank_columns:
        raise DatasetError(f"--ranks includes the image path column {image!r}")
    return [columns.give(r, "rank") for r in rank_columns]


def _found_ranks(columns: _Columns) -> list[str]:
    """The rank columns recognised by name (``order``, ``taxon_genus_name``, ``scientific_name``, ...),
    coarse -> fine."""
    found: dict[str, str] = {}  # rank name -> header
    for h in columns.header:
        norm = normalise(h)
        inat = INAT_RANK.match(norm)
        rank = (
            norm
            if norm in RANK_LEVELS
            else (inat.group(1) if inat and inat.group(1) in RANK_LEVELS else None)
        )
        if rank is not None and rank not in found and h not in columns.used:
            found[rank] = h
    if "species" not in found:
        species = [h for h in map(columns.free, SPECIES_ALIASES) if h is not None]
        if species:
            found["species"] = species[0]
    if not found:
        raise DatasetError(
            f"{columns.file}: no rank columns found (e.g. order, family, genus, species or scientific_name); "
            f"columns: {columns.header}; name them with --ranks"
        )
    for rank, h in found.items():
        columns.give(h, "rank", rank)
    return [found[r] for r in sorted(found, key=lambda r: -RANK_LEVELS[r])]


def assign_columns(
    table: Table, file: Path, findings: Findings, image_column: str | None, ranks: str | None
) -> tuple[str, list[str]]:
    """The image column and the rank columns (coarse -> fine); fills ``findings.columns`` and ignored ones."""
    columns = _Columns(table, file, findings)
    image = _image_column(columns, image_column)
    rank_columns = _found_ranks(columns) if ranks is None else _named_ranks(columns, ranks, image)
    for role in ("latitude", "longitude", "date", "time", "elevation"):
        columns.take(role, ALIASES[role])
    findings.ignored_columns = [h for h in table.header if h not in columns.used and h]
    return image, rank_columns


def rank_level(column: str) -> int | None:
    norm = normalise(column)
    inat = INAT_RANK.match(norm)
    if norm in RANK_LEVELS:
        return RANK_LEVELS[norm]
    if inat and inat.group(1) in RANK_LEVELS:
        return RANK_LEVELS[inat.group(1)]
    if norm in SPECIES_ALIASES:
        return RANK_LEVELS["species"]
    return None


NUMBER = re.compile(r"^[-+]?(\d+([.,]\d*)?|[.,]\d+)([eE][-+]?\d+)?$")


def _number(text: str) -> float | None:
    """A finite number from a cell ("12.5", "12,5", "1200 m"), or None when it is not one."""
    text = text.strip()
    if text.lower().endswith("m") and NUMBER.match(text[:-1].strip()):
        text = text[:-1].strip()
    if not NUMBER.match(text):
        return None
    value = float(text.replace(",", "."))
    return value if math.isfinite(value) else None


def read_coordinates(
    table: Table, lat_col: int, lon_col: int, findings: Findings
) -> tuple[np.ndarray, np.ndarray]:
    n = len(table.rows)
    lat, lon = np.full(n, np.nan), np.full(n, np.nan)
    for i, (cells, line) in enumerate(zip(table.rows, table.lines)):
        a, b = cells[lat_col], cells[lon_col]
        if a.lower() in MISSING_TEXT and b.lower() in MISSING_TEXT:
            continue
        x, y = _number(a), _number(b)
        if x is None or y is None:
            findings.invalid_value(
                "coordinates", f"line {line}: latitude {a!r}, longitude {b!r} (not both numbers)"
            )
        elif abs(x) > 90 or abs(y) > 180:
            findings.invalid_value(
                "coordinates", f"line {line}: latitude {a}, longitude {b} (outside ±90 / ±180 degrees)"
            )
        else:
            lat[i], lon[i] = x, y
    return lat, lon


def read_dates(
    table: Table, date_col: int, time_col: int | None, findings: Findings
) -> tuple[list[str], np.ndarray, np.ndarray]:
    n = len(table.rows)
    texts, day, hour = [], np.full(n, np.nan), np.full(n, np.nan)
    for i, (cells, line) in enumerate(zip(table.rows, table.lines)):
        text = cells[date_col]
        if time_col is not None and cells[time_col] and "T" not in text and ":" not in text:
            text = f"{text} {cells[time_col]}".strip()
        texts.append(text)
        day[i], hour[i], problem = parse_date(text)
        if problem is not None:
            kind = "times" if problem.startswith("impossible time") else "dates"
            findings.invalid_value(kind, f"line {line}: {text!r} ({problem})")
    return texts, day, hour


def read_elevation(table: Table, column: int, findings: Findings) -> np.ndarray:
    out = np.full(len(table.rows), np.nan)
    for i, (cells, line) in enumerate(zip(table.rows, table.lines)):
        text = cells[column]
        if text.lower() in MISSING_TEXT:
            continue
        value = _number(text)
        if value is None:
            findings.invalid_value("elevation", f"line {line}: {text!r} (not a number of metres)")
        elif not -500 < value < 9_000:
            findings.invalid_value("elevation", f"line {line}: {text} m (outside -500 .. 9000 m)")
        else:
            out[i] = value
    return out


def drop_repeated_images(table: Table, image_col: int, rank_cols: list[int], findings: Findings) -> None:
    """Drop rows without an image path and rows repeating an earlier row's image (the first is kept)."""
    first_line: dict[str, int] = {}
    first_labels: dict[str, list[str]] = {}
    keep = []
    for i, (cells, line) in enumerate(zip(table.rows, table.lines)):
        path = cells[image_col]
        if not path:
            findings.drop("no_image_path", f"line {line}")
            continue
        key = os.path.normpath(path.replace("\\", "/"))
        labels = [cells[c] for c in rank_cols]
        if key in first_line:
            differ = " with different labels" if labels != first_labels[key] else ""
            findings.drop("duplicate_image", f"line {line} repeats line {first_line[key]}: {path}{differ}")
            continue
        first_line[key], first_labels[key] = line, labels
        keep.append(i)
    table.rows = [table.rows[i] for i in keep]
    table.lines = [table.lines[i] for i in keep]
