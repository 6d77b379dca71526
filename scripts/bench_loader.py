"""Training-loader throughput (images/s): decoding plus per-sample augmentation, no model.

    python scripts/bench_loader.py                       # demo data and a synthetic 224 px JPEG set
    python scripts/bench_loader.py --aug default none strong --workers 0 2 --batches 20

For each dataset, augmentation option and worker count, builds the real training loader with
``build_data`` (config composed as ``train.py`` would) and times ``--batches`` batches after two untimed
ones (worker start-up), with one torch thread in the main process (``--threads``), as in each
worker. Datasets: the built-in demo (48 px PNGs, trained at 32 px) and a synthetic
``images.h5`` of ``--images`` 224 x 224 JPEGs written to a temporary folder (trained at 224 px).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from linnaeus.config import register_configs
from linnaeus.data.loader import build_data
from linnaeus.data.writer import write_images_h5, write_labels_h5

REPO = Path(__file__).resolve().parents[1]


def synthetic_jpegs(out_dir: Path, count: int, size: int = 224, seed: int = 0) -> Path:
    """labels.h5 (4 ranks, no metadata) and images.h5 of ``count`` smooth random JPEGs (quality 90)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size

    def jpeg() -> bytes:
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * xx + b * yy + c + k) for k in range(3)], -1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    identifiers = [f"syn_{i:05d}.jpg" for i in range(count)]
    species = rng.integers(0, 100, count)
    taxa = {
        "taxa_L40": 1000 + species // 50,
        "taxa_L30": 2000 + species // 25,
        "taxa_L20": 3000 + species // 5,
        "taxa_L10": 4000 + species,
    }
    write_images_h5(out_dir / "images.h5", identifiers, (jpeg() for _ in range(count)))
    write_labels_h5(out_dir / "labels.h5", identifiers, taxa)
    return out_dir


def throughput(overrides: list[str], batches: int) -> tuple[float, int]:
    """(images/s over ``batches`` timed batches, image size) for one composed config."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    data = build_data(cfg.data, cfg.augmentation, run_dir=None, seed=0)
    data.train_batches.set_epoch(0)
    it = iter(data.train_loader)
    for _ in range(2):  # untimed: worker start-up and first reads
        next(it)
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            data.train_batches.set_epoch(1)
            it = iter(data.train_loader)
            batch = next(it)
        images += batch["images"].shape[0]
    elapsed = time.perf_counter() - start
    del it, data
    return images / elapsed, cfg.data.image_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aug", nargs="+", default=["default", "none"], help="conf/augmentation options")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=2000, help="synthetic JPEGs")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides, e.g. augmentation.device=gpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # as in DataLoader workers; more threads only fight over small images
    register_configs()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        synthetic = synthetic_jpegs(Path(tmp), args.images)
        print(f"wrote {args.images} synthetic 224 px JPEGs in {time.perf_counter() - start:.1f} s")
        datasets = {
            "demo (48 px PNG)": ["data=demo"],
            "synthetic (224 px JPEG)": [
                "data=h5",
                f"data.labels={synthetic / 'labels.h5'}",
                f"data.images={synthetic / 'images.h5'}",
                "data.image_size=224",
            ],
        }
        rows = []
        for dataset, data_overrides in datasets.items():
            for aug in args.aug:
                for workers in args.workers:
                    overrides = [
                        *data_overrides,
                        f"augmentation={aug}",
                        f"data.num_workers={workers}",
                        f"data.batch_size={args.batch_size}",
                        "data.check_images=false",
                        *args.extra,
                    ]
                    rate, size = throughput(overrides, args.batches)
                    rows.append(
                        {
                            "dataset": dataset,
                            "size": size,
                            "augmentation": aug,
                            "workers": workers,
                            "images_s": rate,
                        }
                    )
                    print(
                        f"{dataset:24s} {size:4d} px  augmentation={aug:8s} workers={workers}  {rate:8.0f} images/s"
                    )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
