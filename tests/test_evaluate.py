"""Evaluation of a checkpoint: the trainer's numbers, per-class tables, plots, other datasets, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from linnaeus.confusion import ConfusionCounts, RankConfusion
from linnaeus.data.taxonomy import Taxonomy
from linnaeus.logger import read_metrics
from linnaeus.metrics import ECE_BINS, MetricAccumulator, expected_calibration_error
from linnaeus.reports import write_reports
from tests.conftest import REPO
from tests.fake_checkpoint import make_checkpoint

TRAIN = ["debug=fast", "model=mformer_xs", "logger.wandb.mode=disabled", "train.limit_val_batches=null"]


def run_module(
    module: str, *args: str, check: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, demo_cache) -> Path:
    run = tmp_path_factory.mktemp("evaluate") / "run"
    run_module("linnaeus.train", *TRAIN, f"hydra.run.dir={run}", timeout=600)
    return run


def demo_files(demo_cache: Path) -> tuple[Path, Path]:
    root = next(p for p in demo_cache.iterdir() if (p / "labels.h5").is_file())
    return root / "labels.h5", root / "images.h5"


def val_rows(run: Path, labels: Path) -> np.ndarray:
    names = set(json.loads((run / "split.json").read_text())["val_identifiers"])
    with h5py.File(labels) as h5:
        ids = [v.decode() for v in h5["img_identifiers"][()]]
    return np.array([i for i, name in enumerate(ids) if name in names])


def read_csv(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_evaluate_reproduces_the_trainers_final_validation(trained_run, tmp_path, demo_cache):
    out = tmp_path / "eval"
    run_module("linnaeus.evaluate", f"checkpoint={trained_run / 'checkpoints/last.pt'}", f"out={out}",
               "wandb=offline", "progress_bar=false")  # fmt: skip
    record = json.loads((out / "metrics.json").read_text())
    metrics = record["metrics"]
    last = [r for r in read_metrics(trained_run / "metrics.jsonl") if "val/top1/taxa_L10" in r][-1]
    logged = {k: v for k, v in last.items() if k.startswith("val")}
    assert len(logged) >= 2 * 14  # val/ and val_nometa/: 4 ranks x top-1/top-5 and 6 more each
    assert {k: metrics[k] for k in logged} == logged  # the same numbers, exactly
    for view in ("val_no_spatial", "val_no_temporal", "val_no_elevation_main"):
        assert 0 <= metrics[f"{view}/top1/taxa_L10"] <= 1
    assert record["step"] == last["step"] and record["weights"] == "model" and record["split"] == "val"

    labels, _ = demo_files(demo_cache)
    rows = val_rows(trained_run, labels)
    with h5py.File(labels) as h5:
        species_known = int((h5["taxa_L10"][()][rows] != 0).sum())
    assert record["images"] == len(rows)
    task_keys = ["taxa_L40", "taxa_L30", "taxa_L20", "taxa_L10"]
    taxonomy = Taxonomy.load(trained_run / "taxonomy.json")
    for t, key in enumerate(task_keys):
        table = read_csv(out / f"per_class_{key}.csv")
        assert len(table) == taxonomy.num_classes[t] - 1  # every real class, with or without support
        support = np.array([int(r["support"]) for r in table])
        assert support.sum() == record["support"][key] <= len(rows)
        # the per-class table adds up to the overall accuracy
        correct = sum(float(r["top1"]) * int(r["support"]) for r in table if r["top1"])
        assert correct / support.sum() == pytest.approx(metrics[f"val/top1/{key}"], abs=1e-3)
        assert (out / f"confusion_{key}.png").is_file()
        with Image.open(out / f"confusion_{key}.png") as image:
            assert min(image.size) >= 300
    assert record["support"]["taxa_L40"] == len(rows)  # every order is known (filled from the tree)
    assert record["support"]["taxa_L10"] == species_known  # unknown species stay unknown
    assert (out / "reliability.png").is_file()
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_evaluate_training_split_into_the_default_folder(trained_run, demo_cache):
    run_module("linnaeus.evaluate", f"checkpoint={trained_run / 'checkpoints/last.pt'}", "split=train",
               "mask_each=false", "progress_bar=false")  # fmt: skip
    out = trained_run / "eval" / "last"
    record = json.loads((out / "metrics.json").read_text())
    labels, _ = demo_files(demo_cache)
    with h5py.File(labels) as h5:
        total = len(h5["img_identifiers"])
    assert record["images"] == total - len(val_rows(trained_run, labels))
    assert record["support"]["taxa_L40"] == record["images"]
    assert "train/top1/taxa_L10" in record["metrics"] and "train_nometa/top1/taxa_L10" in record["metrics"]
    assert not any(k.startswith(("val", "train_no_")) for k in record["metrics"])


def write_labels_subset(source: Path, target: Path, rows: np.ndarray, id_offset: int = 0) -> Path:
    """A labels.h5 with some rows of ``source``; ``id_offset`` renames every species (another label space)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(source) as src, h5py.File(target, "w") as dst:
        n = len(src["img_identifiers"])

        def copy(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                if obj.shape and obj.shape[0] == n and not name.startswith("taxonomy"):
                    data = data[rows]
                if name == "taxa_L10" and id_offset:
                    data = np.where(data > 0, data + id_offset, 0).astype(data.dtype)
                if name.startswith("taxonomy") and id_offset:
                    return
                kwargs = {"dtype": h5py.string_dtype()} if obj.dtype.kind == "O" else {}
                ds = dst.create_dataset(name, data=data, **kwargs)
                ds.attrs.update(dict(obj.attrs))

        src.visititems(copy)
    return target


def test_evaluate_another_dataset_in_the_checkpoints_label_space(trained_run, tmp_path, demo_cache):
    labels, images = demo_files(demo_cache)
    with h5py.File(labels) as h5:
        orders = h5["taxa_L40"][()]
    rows = np.flatnonzero(orders == orders[0])[:150]  # one order: fewer taxa than the model knows
    subset = write_labels_subset(labels, tmp_path / "subset" / "labels.h5", rows)
    out = tmp_path / "eval"
    run_module("linnaeus.evaluate", f"checkpoint={trained_run / 'checkpoints/last.pt'}", "data=h5",
               f"data.labels={subset}", f"data.images={images}", "split=all", f"out={out}",
               "progress_bar=false")  # fmt: skip
    record = json.loads((out / "metrics.json").read_text())
    assert record["images"] == len(rows) and record["data"]["labels"] == str(subset)
    table = read_csv(out / "per_class_taxa_L40.csv")
    assert len(table) == 3  # the checkpoint's label space, not the subset's
    assert sorted(int(r["support"]) for r in table) == [0, 0, len(rows)]
    assert 0 <= record["metrics"]["all/top1/taxa_L40"] <= 1


# ---------------------------------------------------------------------- the counts behind the reports
def tiny_taxonomy(num_species: int) -> Taxonomy:
    genus_of = np.concatenate([[0], 1 + np.arange(num_species) % 3])
    return Taxonomy(
        ["taxa_L20", "taxa_L10"],
        [np.arange(4), np.concatenate([[0], 100 + np.arange(num_species)])],
        [["?", "g1", "g2", "g3"], ["?"] + [f"s{i}" for i in range(num_species)]],
        [None, genus_of],
    )


def test_confusion_counts_agree_with_the_metrics(monkeypatch):
    monkeypatch.setattr("linnaeus.confusion.MERGE_AT", 50)  # merge buffered pairs many times
    taxonomy = tiny_taxonomy(40)
    counts, metrics = ConfusionCounts(taxonomy, "cpu"), MetricAccumulator(taxonomy, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        targets = torch.stack([torch.randint(0, 4, (32,), generator=generator),
                               torch.randint(0, 41, (32,), generator=generator)], dim=1)  # fmt: skip
        logits = [torch.randn(32, 4, generator=generator) * 2, torch.randn(32, 41, generator=generator) * 2]
        logits[1][targets[:, 1] > 20, 0] = 50.0  # a large null logit must not become a prediction
        counts.update(logits, targets)
        metrics.update(logits, targets)
    counts.reduce()
    values = metrics.compute()
    for t, rank in enumerate(counts.result()):
        key = taxonomy.task_keys[t]
        total = rank.count.sum()
        assert rank.correct().sum() / total == pytest.approx(values[f"top1/{key}"], abs=1e-12)
        assert rank.top5_hits.sum() / total == pytest.approx(values[f"top5/{key}"], abs=1e-12)
        assert rank.support()[0] == 0 and rank.predicted()[0] == 0  # null: neither a truth nor a prediction
        assert len(np.unique(rank.true * rank.num_classes + rank.pred)) == len(rank.count)
    finest = counts.result()[-1]
    # the trainer's ECE goes through float32 once; the bins themselves are identical
    assert expected_calibration_error(torch.as_tensor(finest.calibration)) == pytest.approx(
        values["ece"], abs=1e-6
    )


def test_reports_at_ten_thousand_classes_show_the_top_confusions(tmp_path):
    num = 10_000
    taxonomy = tiny_taxonomy(num)
    rng = np.random.default_rng(0)
    true = rng.integers(1, num + 1, 5000)
    pred = np.where(rng.random(5000) < 0.5, true, rng.integers(1, num + 1, 5000))
    pred[:300] = 7  # one class that many images are mistaken for
    keys, count = np.unique(true * (num + 1) + pred, return_counts=True)
    finest = RankConfusion("taxa_L10", num + 1, keys // (num + 1), keys % (num + 1), count,
                           top5_hits=np.bincount(true, minlength=num + 1), calibration=np.zeros((3, ECE_BINS)))  # fmt: skip
    genus = RankConfusion("taxa_L20", 4, np.array([1, 2]), np.array([1, 3]), np.array([5, 2]),
                          top5_hits=np.array([0, 5, 2, 0]), calibration=np.zeros((3, ECE_BINS)))  # fmt: skip
    written = write_reports(tmp_path, [genus, finest], taxonomy, plots_dir=tmp_path / "plots", top_pairs=25)
    assert written["confusion_taxa_L10.png"] == tmp_path / "plots" / "confusion_taxa_L10.png"
    with Image.open(written["confusion_taxa_L10.png"]) as image:
        width, height = image.size
    assert (
        width <= 1500 and height <= 1200
    )  # bar charts of 25 pairs and classes, not a 10,000 x 10,000 matrix
    table = read_csv(tmp_path / "per_class_taxa_L10.csv")
    assert len(table) == num and sum(int(r["support"]) for r in table) == 5000
    by_name = {r["name"]: r for r in table}
    for c in np.unique(true)[
        :50
    ]:  # most confused with: the most frequent wrong prediction (ties: lower index)
        wrong = {
            int(b): int(k) for a, b, k in zip(keys // (num + 1), keys % (num + 1), count) if a == c and b != c
        }
        row = by_name[f"s{c - 1}"]
        if not wrong:
            assert row["most_confused_with"] == "" and row["most_confused_count"] == "0"
            continue
        best = min(wrong, key=lambda b: (-wrong[b], b))
        assert (row["most_confused_with"], int(row["most_confused_count"])) == (f"s{best - 1}", wrong[best])
    predicted_seven = count[(keys % (num + 1)) == 7].sum()
    correct_seven = count[(keys // (num + 1) == 7) & (keys % (num + 1) == 7)].sum()
    assert float(by_name["s6"]["precision"] or "nan") == pytest.approx(
        correct_seven / predicted_seven, abs=1e-4
    )
    assert (tmp_path / "plots" / "reliability.png").is_file()


# ---------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def fake_checkpoint(tmp_path_factory, demo_cache) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("fake") / "model.pt", ["model=mformer_xs"])


@pytest.fixture(scope="module")
def relabelled(tmp_path_factory, demo_cache) -> tuple[Path, Path]:
    labels, images = demo_files(demo_cache)
    target = tmp_path_factory.mktemp("relabelled") / "labels.h5"
    return write_labels_subset(labels, target, np.arange(200), id_offset=100_000), images


@pytest.mark.parametrize(
    "module, case, expected",
    [
        ("linnaeus.evaluate", "missing", "checkpoint not found"),
        ("linnaeus.predict", "missing", "checkpoint not found"),
        ("linnaeus.export", "missing", "checkpoint not found"),
        ("linnaeus.evaluate", "not_a_checkpoint", "not a linnaeus checkpoint"),
        ("linnaeus.export", "no_argument", "checkpoint=PATH is required"),
        ("linnaeus.evaluate", "other_label_space", "another label space"),
    ],
)
def test_bad_arguments_exit_with_one_line_naming_the_problem(tmp_path, fake_checkpoint, relabelled, module, case,
                                                             expected):  # fmt: skip
    args = {"missing": [f"checkpoint={tmp_path / 'nope.pt'}"], "no_argument": []}.get(case)
    if case == "not_a_checkpoint":
        (tmp_path / "notes.pt").write_text("these are my notes, not weights")
        args = [f"checkpoint={tmp_path / 'notes.pt'}"]
    if case == "other_label_space":
        labels, images = relabelled
        args = [f"checkpoint={fake_checkpoint}", f"data.labels={labels}", f"data.images={images}",
                f"out={tmp_path / 'eval'}"]  # fmt: skip
    if module == "linnaeus.predict":
        args.append(f"images={tmp_path}")
    proc = run_module(module, *args, check=False, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
