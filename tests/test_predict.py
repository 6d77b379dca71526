"""Prediction: the hierarchical decision, metadata encoded as the builder encodes it, bad images."""

from __future__ import annotations

import csv
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from linnaeus.data import build
from linnaeus.data.images import decode_bytes
from linnaeus.data.taxonomy import Taxonomy
from linnaeus.data.transforms import build_eval_transform
from linnaeus.decision import METHODS, class_probabilities, hierarchical_decision, tree_probabilities
from linnaeus.inference import load_run, metadata_encodings
from linnaeus.predict import encode_metadata, scan_images
from tests.conftest import REPO
from tests.fake_checkpoint import make_checkpoint


# ---------------------------------------------------------------------- the decision, on random trees
def random_taxonomy(rng: np.random.Generator) -> Taxonomy:
    """2-4 ranks; some classes without children, a few with an unknown parent."""
    num_tasks = int(rng.integers(2, 5))
    sizes = [int(rng.integers(1, 5))]
    for _ in range(num_tasks - 1):
        sizes.append(int(rng.integers(1, 3 * sizes[-1] + 2)))
    ids, names, parents, next_id = [], [], [], 1
    for t, n in enumerate(sizes):
        ids.append(np.arange(next_id - 1, next_id + n))  # index 0: the null class
        ids[-1][0] = 0
        next_id += n
        names.append(["<unknown>"] + [f"t{t}c{i}" for i in range(1, n + 1)])
        if t == 0:
            parents.append(None)
            continue
        parent = rng.integers(1, sizes[t - 1] + 1, size=n + 1)
        parent[rng.random(n + 1) < 0.1] = 0  # unknown parent
        parent[0] = 0
        parents.append(parent)
    return Taxonomy([f"taxa_L{10 * (num_tasks - t)}" for t in range(num_tasks)], ids, names, parents)


def reference_decision(tree_probs: list[np.ndarray], taxonomy: Taxonomy, threshold: float):
    """One sample, in plain Python: walk down, taking the most probable child, while it passes."""
    path, probs, chosen = [], [], None
    for t, p in enumerate(tree_probs):
        options = [c for c in range(1, len(p)) if chosen is None or taxonomy.parents[t][c] == chosen]
        if chosen == 0 or not options:
            chosen, best = 0, 0.0
        else:
            chosen = max(options, key=lambda c: (p[c], -c))
            best = p[chosen]
        path.append(chosen)
        probs.append(best)
    rank = -1
    for t in range(len(path)):
        if path[t] == 0 or probs[t] < threshold:
            break
        rank = t
    return rank, path


@pytest.mark.parametrize("method", METHODS)
def test_decision_is_consistent_with_the_tree_on_random_probability_tables(method):
    rng = np.random.default_rng(0)
    for case in range(80):
        taxonomy = random_taxonomy(rng)
        batch = 6
        scale = float(rng.choice([0.5, 3.0, 12.0]))  # flat to peaked distributions
        logits = [torch.randn(batch, n) * scale for n in taxonomy.num_classes]
        probs = class_probabilities(logits, taxonomy.null_index)
        tree = tree_probabilities(probs, taxonomy, method)
        for t in range(taxonomy.num_tasks):
            assert torch.all(tree[t] >= 0) and torch.all(tree[t].sum(dim=1) <= 1 + 1e-5)
        # along the tree: a parent holds at least its children's mass, exactly that when they come
        # from the finest head or when it has children (chain rule)
        for t in range(1, taxonomy.num_tasks):
            parents = torch.as_tensor(taxonomy.parents[t])
            children_sum = torch.zeros_like(tree[t - 1]).index_add_(1, parents, tree[t])[:, 1:]
            above = tree[t - 1][:, 1:]
            assert torch.all(children_sum <= above + 1e-5), (case, t)
            has_children = torch.bincount(parents, minlength=taxonomy.num_classes[t - 1])[1:] > 0
            if method == "finest":
                assert torch.allclose(children_sum, above, atol=1e-6)
            else:
                assert torch.allclose(children_sum[:, has_children], above[:, has_children], atol=1e-5)
        if method == "finest":
            assert torch.equal(tree[-1], probs[-1])
        for threshold in (0.05, 0.3, 0.5, 0.8, 0.95, 1.0):
            rank, path, path_probs = hierarchical_decision(tree, taxonomy, threshold)
            for b in range(batch):
                r = int(rank[b])
                expected_rank, expected_path = reference_decision(
                    [p[b].numpy() for p in tree], taxonomy, threshold
                )
                assert (r, path[b].tolist()) == (expected_rank, expected_path), (case, threshold, b)
                # every rank down to the decision is confident, and they form one path in the tree
                assert all(path_probs[b, t] >= threshold for t in range(r + 1))
                assert r + 1 == taxonomy.num_tasks or path_probs[b, r + 1] < threshold or path[b, r + 1] == 0
                for t in range(1, r + 1):
                    assert taxonomy.parents[t][path[b, t]] == path[b, t - 1]
                assert all(
                    path_probs[b, t] <= path_probs[b, t - 1] + 1e-6 for t in range(1, taxonomy.num_tasks)
                )
                if method == "finest" and threshold > 0.5 and r >= 0:
                    # at most one class can pass: the decision is that rank's overall favourite
                    assert path[b, r] == int(tree[r][b, 1:].argmax()) + 1


def test_decision_names_the_finest_confident_rank():
    # order 1 > family 1 > genus 1 > species {1, 2}; a second family 2 > genus 2 > species 3
    taxonomy = Taxonomy(
        ["taxa_L40", "taxa_L30", "taxa_L20", "taxa_L10"],
        [np.array([0, 1]), np.array([0, 2, 3]), np.array([0, 4, 5]), np.array([0, 6, 7, 8])],
        [["?", "O"], ["?", "F1", "F2"], ["?", "G1", "G2"], ["?", "s1", "s2", "s3"]],
        [None, np.array([0, 1, 1]), np.array([0, 1, 2]), np.array([0, 1, 1, 2])],
    )
    finest = torch.tensor([[0.0, 0.5, 0.45, 0.05]])  # species unsure, genus G1 sure (0.95)
    probs = [torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1, 3), finest]
    tree = tree_probabilities(probs, taxonomy, "finest")
    assert torch.allclose(tree[2], torch.tensor([[0.0, 0.95, 0.05]]))
    rank, path, path_probs = hierarchical_decision(tree, taxonomy, 0.9)
    assert int(rank[0]) == 2 and path[0].tolist() == [1, 1, 1, 1]
    assert torch.allclose(path_probs[0], torch.tensor([1.0, 0.95, 0.95, 0.5]))


# ---------------------------------------------------------------------- metadata, as the builder encodes it
def test_csv_metadata_is_encoded_exactly_as_the_dataset_builder_encodes_it(tmp_path):
    lats = ["45.5", "-33.9", "", "91", "0", "12,5", "51.2"]
    lons = ["-73.6", "18.4", "", "10", "0", "7", "-0.1"]
    dates = [
        "2021-06-01",
        "2021-12-24 14:30",
        "",
        "2020-02-30",
        "2019-03-05T08:15:00",
        "not a date",
        "2020-07-04",
    ]
    elevations = ["120", "2300 m", "", "99999", "0", "abc", "35.5"]
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(len(lats)):
        Image.new("RGB", (20, 20), (30 * i, 100, 200)).save(tmp_path / "img" / f"im{i}.png")
        rows.append({"image": f"img/im{i}.png", "order": "O1", "family": "F1", "genus": f"G{i % 2}",
                     "species": f"S{i}", "lat": lats[i], "lng": lons[i], "observed_on": dates[i],
                     "altitude": elevations[i]})  # fmt: skip
    table = tmp_path / "obs.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "dataset"
    assert build.main(["csv", str(table), "--image-root", str(tmp_path), "--out", str(out), "--hybrid"]) == 0

    inputs = scan_images(table)
    assert inputs.identifiers == [r["image"] for r in rows]
    with h5py.File(out / "labels.h5") as h5:
        identifiers = [v.decode() for v in h5["img_identifiers"][()]]
        meta_dims = {name: h5[name].shape[1] for name in ("spatial", "temporal", "elevation_main")}
        stored = {name: (h5[name][()], h5[f"validity/{name}"][()]) for name in meta_dims}
    assert meta_dims["temporal"] == 4  # the builder saw hours
    encodings = {"elevation_main": {"scales": [100.0, 1000.0, 10000.0]}}
    meta, valid = encode_metadata(inputs.raw, len(inputs.paths), meta_dims, encodings)
    order = [inputs.identifiers.index(i) for i in identifiers]
    for name, (values, validity) in stored.items():
        assert np.array_equal(valid[name][order], validity), name
        assert np.array_equal(meta[name][order], values), name
    assert valid["spatial"].tolist() == [True, True, False, False, True, True, True]
    assert valid["elevation_main"].tolist() == [True, True, False, False, True, False, True]


# ---------------------------------------------------------------------- the command
def test_predict_on_a_folder_reports_broken_images_and_predicts_the_rest(tmp_path, demo_cache):
    checkpoint = make_checkpoint(tmp_path / "ckpt.pt", ["model=mformer_xs"])
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = ["a.png", "b.jpg", "sub/c.png"]
    for name in good:
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff this is not a JPEG")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "out" / "predictions.csv"
    cmd = [sys.executable, "-m", "linnaeus.predict", f"checkpoint={checkpoint}", f"images={folder}", f"out={out}",
           "topk=3", "threshold=0.3", "num_workers=0", "batch_size=2", "progress_bar=false"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["image"]: r for r in csv.DictReader(open(out))}
    assert sorted(rows) == sorted([*good, "broken.jpg", "empty.png"])
    for name in ("broken.jpg", "empty.png"):
        assert rows[name]["status"] == "error" and "not a readable image" in rows[name]["error"]
        assert rows[name]["species_1"] == ""
    run = load_run(checkpoint)
    taxonomy, data = run.taxonomy, run.cfg.data
    transform = build_eval_transform(data.image_size, list(data.mean), list(data.std), data.val_crop_pct)
    meta, valid = encode_metadata(None, 1, run.meta_dims, metadata_encodings(run.cfg, run.meta_dims))
    for name in good:
        row = rows[name]
        assert row["status"] == "ok" and row["error"] == ""
        # the same numbers as the model run by hand on the validation preprocessing
        image = decode_bytes((folder / name).read_bytes())  # the loader's decoder
        with torch.no_grad():
            logits = run.model(transform(image)[None], {k: torch.from_numpy(v) for k, v in meta.items()},
                               {k: torch.from_numpy(v) for k, v in valid.items()})  # fmt: skip
        species = class_probabilities(logits, 0)[-1][0]
        best = int(species[1:].argmax()) + 1
        assert row["species_1"] == taxonomy.names[-1][best]
        assert float(row["species_1_prob"]) == pytest.approx(float(species[best]), abs=1e-4)
        probs = [float(row[f"species_{k}_prob"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True)
        order_probs = [float(row[f"order_{k}_prob"]) for k in (1, 2, 3)]
        assert sum(order_probs) == pytest.approx(1.0, abs=1e-3)  # every order listed (3 orders)
        # the decision agrees with the top-k columns of its rank: a class with probability >= 0.3 is
        # among the top 3 (probabilities of a rank sum to at most 1)
        rank = row["decision_rank"]
        assert rank in ("order", "family", "genus", "species")
        assert float(row["decision_prob"]) >= 0.3
        listed = {row[f"{rank}_{k}"]: row[f"{rank}_{k}_prob"] for k in (1, 2, 3)}
        assert listed[row["decision_name"]] == row["decision_prob"]
        assert row["decision"] == f"{rank} {row['decision_name']}, {float(row['decision_prob']):.2f}"
    assert "2 of 5 images could not be read" in proc.stdout + proc.stderr
