"""Read the history steps of an offline W&B run file (``run-<id>.wandb``), for tests.

The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records (crc32 u32, length
u16, type u8: 1 full, 2 first, 3 middle, 4 last), each record a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def raw_records(path: Path) -> Iterator[bytes]:
    data = Path(path).read_bytes()
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def history_steps(path: Path) -> list[int]:
    from wandb.proto import wandb_internal_pb2

    steps = []
    for raw in raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            steps.append(record.history.step.num)
    return steps


def newest_run_file(run_dir: Path) -> Path:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))[-1]
