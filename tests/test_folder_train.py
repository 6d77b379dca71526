"""Real images end to end: a Fashion-MNIST folder tree -> the builder CLI -> training, in both modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from linnaeus.logger import read_metrics
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from make_fashion_tree import SOURCE, make_tree  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (SOURCE / "train-images-idx3-ubyte.gz").is_file(),
    reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)",
)
RANKS = ["taxa_L30", "taxa_L20", "taxa_L10"]


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def build(tmp: Path, per_class: int, *extra: str) -> tuple[Path, Path]:
    root, out = tmp / "tree", tmp / ("hybrid" if "--hybrid" in extra else "h5")
    if not root.exists():
        assert make_tree(root, per_class) == 10 * per_class
    run("-m", "linnaeus.data.build", "folder", str(root), "--out", str(out), *extra)
    report = json.loads((out / "build_report.json").read_text())
    assert report["rows_written"] == 10 * per_class
    assert report["ranks"] == {"taxa_L30": 3, "taxa_L20": 6, "taxa_L10": 10}
    return root, out


def train(run_dir: Path, labels: Path, images: Path, *overrides: str) -> dict:
    run(
        "train.py",
        "data=h5",
        f"data.labels={labels}",
        f"data.images={images}",
        "data.image_size=28",
        "data.num_workers=1",
        "model=mformer_xs",
        "logger.wandb.mode=disabled",
        "logger.progress_bar=false",
        f"hydra.run.dir={run_dir}",
        *overrides,
    )
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "val/top1/taxa_L10" in r][-1]


def test_folder_tree_builds_and_trains_the_same_from_images_h5_and_from_files(tmp_path):
    root, out = build(tmp_path, 20)
    _, hybrid = build(tmp_path, 20, "--hybrid")
    assert (out / "images.h5").is_file() and not (hybrid / "images.h5").exists()
    from_h5 = train(tmp_path / "run_h5", out / "labels.h5", out / "images.h5", "debug=fast")
    from_files = train(tmp_path / "run_files", hybrid / "labels.h5", root, "debug=fast")
    assert from_h5["step"] == 6
    for key in RANKS:
        assert 0.0 <= from_h5[f"val/top1/{key}"] <= 1.0
    # the same bytes, split, seed and steps: the same numbers
    assert from_h5 == from_files
    names = json.dumps(json.loads((tmp_path / "run_h5" / "taxonomy.json").read_text()))
    assert "sneaker" in names and "footwear" in names


@pytest.mark.slow
def test_folder_tree_learns_every_rank(tmp_path):
    """Five epochs on 2,000 real images: every rank far above chance (1/3, 1/6, 1/10)."""
    root, out = build(tmp_path, 200)
    final = train(
        tmp_path / "run", out / "labels.h5", out / "images.h5", "train.epochs=5", "data.batch_size=32"
    )
    assert final["val/top1/taxa_L30"] > 0.9
    assert final["val/top1/taxa_L20"] > 0.7
    assert final["val/top1/taxa_L10"] > 0.45
