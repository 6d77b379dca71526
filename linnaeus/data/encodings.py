"""Metadata encodings computed from raw observation values, each with a validity mask.

Missing values are never encoded as a number that could be real (latitude 0 is a real place): the
encoded row is zero and its validity flag is False. All functions are vectorised over rows.
"""

from __future__ import annotations

import datetime
import math
import re

import numpy as np

DEFAULT_ELEVATION_SCALES = (100.0, 1_000.0, 10_000.0)  # metres; fine to coarse periods


def encode_spatial(lat_deg: np.ndarray, lon_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Latitude/longitude in degrees -> points on the unit sphere (N, 3) and validity (N,).

    (cos φ cos λ, cos φ sin λ, sin φ): nearby places are nearby vectors, and longitude wraps at ±180°.
    """
    lat = np.asarray(lat_deg, dtype=np.float64)
    lon = np.asarray(lon_deg, dtype=np.float64)
    valid = np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180)
    phi, lam = np.radians(np.where(valid, lat, 0.0)), np.radians(np.where(valid, lon, 0.0))
    out = np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], axis=1)
    out[~valid] = 0.0
    return out.astype(np.float32), valid


def encode_temporal(day_of_year: np.ndarray, hour: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Day of year (1..366, fractional allowed) and optional hour (0..24) -> sin/cos features.

    Returns (N, 2) without hours or (N, 4) with them, and validity (N,) from the day of year (a
    missing hour alone leaves its two columns zero but keeps the row valid).
    """
    day = np.asarray(day_of_year, dtype=np.float64)
    valid = np.isfinite(day) & (day >= 1) & (day < 367)
    angle = 2 * np.pi * (np.where(valid, day, 1.0) - 1) / 365.25
    columns = [np.sin(angle), np.cos(angle)]
    if hour is not None:
        h = np.asarray(hour, dtype=np.float64)
        has_hour = valid & np.isfinite(h) & (h >= 0) & (h <= 24)
        hour_angle = 2 * np.pi * np.where(has_hour, h, 0.0) / 24
        columns += [np.where(has_hour, np.sin(hour_angle), 0.0), np.where(has_hour, np.cos(hour_angle), 0.0)]
    out = np.stack(columns, axis=1)
    out[~valid] = 0.0
    return out.astype(np.float32), valid


def encode_elevation(
    elevation_m: np.ndarray, scales: tuple[float, ...] | list[float] = DEFAULT_ELEVATION_SCALES
) -> tuple[np.ndarray, np.ndarray]:
    """Elevation in metres -> sin/cos of 2π·e/s for each scale s: (N, 2k) and validity (N,)."""
    e = np.asarray(elevation_m, dtype=np.float64)
    valid = np.isfinite(e) & (e > -500) & (e < 9_000)
    angles = 2 * np.pi * np.where(valid, e, 0.0)[:, None] / np.asarray(scales, dtype=np.float64)[None, :]
    out = np.stack([np.sin(angles), np.cos(angles)], axis=2).reshape(len(e), -1)  # (N, k, 2) -> (N, 2k)
    out[~valid] = 0.0
    return out.astype(np.float32), valid


DATE_PATTERN = re.compile(
    r"^(\d{4})[-/](\d{1,2})[-/](\d{1,2})"  # date: 2021-06-01 or 2021/06/01
    r"(?:[T ](\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?)?"  # optional time: 14:30, 14:30:05.123
    r"\s*(?:Z|UTC|GMT|[+-]\d{2}:?\d{2}|[A-Z]{3,4})?$",  # optional zone (ignored: local time is what matters)
    re.IGNORECASE,
)
MISSING_TEXT = ("", "nan", "none", "null", "na", "n/a")


def parse_date(text: str) -> tuple[float, float, str | None]:
    """One date -> (day of year, hour, problem); NaN where unknown.

    ``problem`` is None for a valid or empty value, else why the value was not used: an unsupported
    format, an impossible date (2021-02-30) or an impossible time (25:10; the date is still used).
    """
    text = str(text).strip()
    if text.lower() in MISSING_TEXT:
        return math.nan, math.nan, None
    match = DATE_PATTERN.match(text)
    if match is None:
        return math.nan, math.nan, "not a date in the form YYYY-MM-DD[ HH:MM[:SS]]"
    year, month, day = (int(v) for v in match.group(1, 2, 3))
    try:
        day_of_year = float(datetime.date(year, month, day).timetuple().tm_yday)
    except ValueError:
        return math.nan, math.nan, "impossible date"
    if match.group(4) is None:
        return day_of_year, math.nan, None
    hour, minute, second = int(match.group(4)), int(match.group(5)), int(match.group(6) or 0)
    if hour > 23 or minute > 59 or second > 60:
        return day_of_year, math.nan, "impossible time of day (the date is used)"
    return day_of_year, hour + minute / 60, None


def parse_dates(values: list[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ISO dates (``2021-06-01``, ``2021-06-01T14:30``, ``2021-06-01 14:30:00``) -> day of year and hour.

    Unparseable or empty strings give NaN; a date without a time gives NaN hours.
    """
    n = len(values)
    day, hour = np.full(n, np.nan), np.full(n, np.nan)
    for i, value in enumerate(values):
        day[i], hour[i], _ = parse_date(value)
    return day, hour
