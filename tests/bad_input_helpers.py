"""Shared pieces of the bad-input tests: a PNG that crashes the native decoder, CLI runs, checksums."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

from PIL import Image

from tests.conftest import REPO


def png(size: tuple[int, int] = (8, 8), colour=(10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def crashing_png() -> bytes:
    """A small PNG whose compressed image data lacks its last row (valid zlib stream and CRCs).

    PIL decodes it (the missing row comes out black), but libpng reports "Not enough image data"
    while reading rows, and torchvision's decoder (0.29) dies with a segmentation fault on that error
    instead of raising: the kind of file that passes a PIL check and then kills a loader worker.
    """
    data = png()
    out, pos = [data[:8]], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IDAT":
            raw = zlib.decompress(body)
            body = zlib.compress(raw[: -(len(raw) // 8)])  # 8 rows of filter byte + pixels: drop one
        out.append(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body)))
        pos += 12 + length
    return b"".join(out)


def decoder_crashes(data: bytes) -> bool:
    """Whether torchvision's decode_image kills a fresh process on ``data`` (not just raises)."""
    code = (
        "import sys, torch; from torchvision.io import decode_image, ImageReadMode\n"
        "data = torch.frombuffer(bytearray(sys.stdin.buffer.read()), dtype=torch.uint8)\n"
        "try:\n    decode_image(data, mode=ImageReadMode.RGB)\nexcept Exception:\n    pass\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=120)
    return proc.returncode < 0


def run_module(module: str, *args: str, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    """``python -m module args...`` from the repository root, with text output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **kwargs,
    )


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str, status: int = 1) -> str:
    """The process failed with ``status`` and exactly one ``error: ...`` line (no traceback) holding ``fragments``."""
    # stripped: a crashed worker's own report (torch's "ERROR: ...") may leave a space before ours
    lines = [line.strip("\x00 \t") for line in proc.stderr.splitlines() if line.strip("\x00 \t")]
    assert proc.returncode == status, f"status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line:\n{proc.stderr}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative paths), to prove nothing changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(parent: Path) -> list[str]:
    """Staging or temporary entries a build or save left in ``parent`` (names containing tmp/building/replaced)."""
    return sorted(
        p.name for p in parent.iterdir() if any(k in p.name for k in (".building-", ".replaced-", ".tmp"))
    )
