"""A dataset folder is replaced whole or not at all.

The builder writes everything into a staging folder beside the target (``.<name>.building-<pid>``)
and swaps it in only when complete. An existing dataset is replaced only with ``--force``; a folder
holding anything that is not part of a dataset is never replaced; a failed or interrupted build
leaves no staging folder behind, and staging folders of builds that were killed outright are
removed by the next build.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from linnaeus.data.labels import DatasetError
from linnaeus.errors import describe_write_error
from linnaeus.rundir import pid_alive

log = logging.getLogger("linnaeus.data.build")

# What a build writes; anything else in an output folder is someone's data.
DATASET_ENTRIES = {"labels.h5", "images.h5", "images", "build_report.json", "build_report.failed.json",
                   "verify_report.json"}  # fmt: skip


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(out: Path, *, force: bool, sources: list[Path], scan_root: Path | None = None) -> bool:
    """Refuse an output folder that would lose data; True when it holds a dataset to be replaced.

    ``sources`` are the inputs (image folder, CSV file); ``scan_root`` the folder scanned for images,
    which must not contain the output (the next build would scan the output's own images).
    """
    out = out.expanduser().absolute()
    resolved = out.resolve()
    for source in sources:
        source = source.expanduser().resolve()
        if _inside(source, resolved):
            raise DatasetError(
                f"--out {out} is or contains the input {source}; the build would replace it. Choose an output "
                "folder outside the inputs"
            )
    if scan_root is not None and _inside(resolved, scan_root.expanduser().resolve()):
        raise DatasetError(
            f"--out {out} lies inside the image folder {scan_root} that is being scanned; choose a folder outside it"
        )
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} is a file; give a folder (it is created if needed)")
    if not out.is_dir():
        return False
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    foreign = [name for name in entries if name not in DATASET_ENTRIES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise DatasetError(
            f"--out {out} holds files that are not part of a dataset ({shown}); it is never replaced. "
            "Choose a new or empty folder"
        )
    has_dataset = (out / "labels.h5").exists() or (out / "images.h5").exists()
    if has_dataset and not force:
        raise DatasetError(
            f"--out {out} already holds a dataset; pass --force to replace it (the old one is removed only "
            "once the new one is complete), or choose another folder"
        )
    return has_dataset


def remove_stale_staging(out: Path) -> None:
    """Remove staging folders of earlier builds of ``out`` whose process no longer runs."""
    parent = out.expanduser().absolute().parent
    if not parent.is_dir():
        return
    for path in parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name.rpartition("-")
        if not (kind.endswith(".building") or kind.endswith(".replaced")) or not pid.isdigit():
            continue
        if not pid_alive(int(pid)):
            log.info("removing %s, left by an interrupted build", path)
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged_output(out: Path):
    """Yield a staging folder beside ``out``; on success it replaces ``out`` whole, on any failure it is removed.

    A failed write becomes a one-line ``DatasetError`` with the path and the free space.
    """
    out = out.expanduser().absolute()
    stage = out.parent / f".{out.name}.building-{os.getpid()}"
    replaced = out.parent / f".{out.name}.replaced-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
    except OSError as err:
        raise DatasetError(describe_write_error(err, out.parent, "the output folder in")) from None
    try:
        yield stage
        if out.exists():
            os.replace(out, replaced)
        os.replace(stage, out)
    except OSError as err:
        if replaced.exists() and not out.exists():
            os.replace(replaced, out)  # put the previous dataset back
        where = str(err.filename).replace(str(stage), str(out)) if err.filename else out
        raise DatasetError(
            describe_write_error(err, where, "the dataset") + f"; {out} was not changed"
        ) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
