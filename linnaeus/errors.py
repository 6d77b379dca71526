"""The one base class for problems the user can fix: bad input, configuration, data or files.

Command-line entry points catch ``UserError`` and print ``error: <message>`` (one line, no traceback)
with exit status 1; anything else is a bug and keeps its traceback. Messages say what is wrong, where
(key, file, row) and how to fix it.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class UserError(Exception):
    """Bad input, a bad setting or an unusable file; the message says what, where and how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid (the message names the key, the value and the fix)."""


class OutputError(UserError, OSError):
    """An output file could not be written (disk full, permissions); nothing already saved was lost."""


def free_space(path: str | Path) -> str:
    """Free space on the file system holding ``path`` (or its nearest existing parent), e.g. ``"1.2 GB"``."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return format_bytes(shutil.disk_usage(path).free)
    except OSError:
        return "unknown"


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def os_error_in(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err``: itself, or one it was raised from or while handling (libraries such as
    torch.save turn a failed write into their own RuntimeError)."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def is_disk_full(err: BaseException) -> bool:
    """True for "no space left" / "quota exceeded", also when a library wrapped the OSError in its own error."""
    cause = os_error_in(err)
    if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err).lower()
    return "no space left" in text or "disk quota" in text


def describe_write_error(err: BaseException, path: str | Path, what: str) -> str:
    """One line for a failed write of ``what`` to ``path``: the cause, the free space, what to do."""
    if is_disk_full(err):
        reason = "no space left on the device"
    else:
        cause = os_error_in(err)
        text = str(err).strip().splitlines()
        reason = getattr(cause, "strerror", None) or (text[0] if text else type(err).__name__)
    return (
        f"cannot write {what} {path}: {reason} ({free_space(path)} free there); "
        "free some space or choose another location, then run the same command again"
    )
