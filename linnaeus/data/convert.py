"""Rewrite an ``images.h5`` in another layout, row for row.

    python -m linnaeus.data.convert OLD_images.h5 NEW_images.h5                  # -> contiguous
    python -m linnaeus.data.convert OLD_images.h5 NEW_images.h5 --layout vlen

The input may be in any layout the loader reads (``contiguous``, ``vlen``, or the predecessor's
decoded (N, H, W, 3) arrays, which are encoded as lossless PNG). Encoded bytes are copied unchanged,
``img_identifiers`` is kept, and the result is written under a temporary name and renamed into
place, so the output is either complete or absent. The labels file needs no change.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from linnaeus.data.images import H5ImageStore
from linnaeus.data.labels import DatasetError
from linnaeus.data.writer import IMAGE_LAYOUTS, write_images_h5

log = logging.getLogger("linnaeus.data.convert")


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _rows(store: H5ImageStore) -> Iterator[bytes | np.ndarray]:
    for row in range(store.num_rows):
        if store.encoded:
            yield np.array(store.read_encoded(row))
        else:
            yield _png(store.read(row, str(row)).permute(1, 2, 0).numpy())


def convert(source: str | Path, target: str | Path, layout: str = "contiguous") -> dict:
    """Write ``target`` with every row of ``source`` in ``layout``; returns what was done."""
    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        raise DatasetError(f"{source}: the output must be another file than the input")
    store = H5ImageStore(source)
    write_images_h5(target, store.identifiers, _rows(store), layout=layout)
    return {"rows": store.num_rows, "from": store.layout, "to": layout, "png_encoded": not store.encoded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m linnaeus.data.convert",
        description="Rewrite an images.h5 in another layout (default: contiguous, the fast one).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="layouts:\n  contiguous  'images' (total_bytes,) uint8 + 'offsets' (N+1,) int64; read by memory map\n"
        "  vlen        'images' (N,) variable-length uint8, one encoded file per row\n"
        "decoded (N, H, W, 3) arrays are read too, and written as PNG-encoded rows",
    )
    parser.add_argument("source", type=Path, help="images.h5 to read")
    parser.add_argument("target", type=Path, help="images.h5 to write")
    parser.add_argument("--layout", choices=IMAGE_LAYOUTS, default="contiguous", help="layout of the output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        done = convert(args.source, args.target, args.layout)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log.info(
        "wrote %s: %d rows, %s -> %s%s",
        args.target,
        done["rows"],
        done["from"],
        done["to"],
        " (decoded arrays encoded as PNG)" if done["png_encoded"] else "",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
