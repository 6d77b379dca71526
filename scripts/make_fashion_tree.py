"""Write Fashion-MNIST images as a folder tree ROOT/<group>/<kind>/<class>/<n>.png.

A small real-image dataset with a three-rank hierarchy, for trying the folder builder:

    python scripts/make_fashion_tree.py /tmp/fashion --per-class 200
    python -m linnaeus.data.build folder /tmp/fashion --out /tmp/fashion_h5

The images come from Debian's `dataset-fashion-mnist` package (apt-get install dataset-fashion-mnist).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
# class index -> (group, kind, class name)
HIERARCHY = {
    0: ("apparel", "tops", "t-shirt"),
    2: ("apparel", "tops", "pullover"),
    4: ("apparel", "tops", "coat"),
    6: ("apparel", "tops", "shirt"),
    1: ("apparel", "bottoms", "trouser"),
    3: ("apparel", "one-piece", "dress"),
    5: ("footwear", "shoes", "sandal"),
    7: ("footwear", "shoes", "sneaker"),
    9: ("footwear", "boots", "ankle-boot"),
    8: ("accessories", "bags", "bag"),
}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def make_tree(root: Path, per_class: int, source: Path = SOURCE, split: str = "train") -> int:
    """Write ``per_class`` images of every class; returns the number written."""
    images = read_idx(source / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(source / f"{split}-labels-idx1-ubyte.gz")
    written = 0
    for label, (group, kind, name) in HIERARCHY.items():
        folder = root / group / kind / name
        folder.mkdir(parents=True, exist_ok=True)
        for n, index in enumerate(np.flatnonzero(labels == label)[:per_class]):
            Image.fromarray(images[index]).save(folder / f"{n:05d}.png")
            written += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="output folder")
    parser.add_argument("--per-class", type=int, default=200, help="images per class (at most 6000)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="folder with the *-idx*-ubyte.gz files")
    args = parser.parse_args()
    print(f"wrote {make_tree(args.root, args.per_class, args.source)} images under {args.root}")


if __name__ == "__main__":
    main()
