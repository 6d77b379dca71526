"""The built-in demo dataset: taxonomy, partial labels, metadata coverage, visual twins, determinism."""

from collections import defaultdict

import h5py
import numpy as np
import pytest

from linnaeus.data.demo import DEMO_VERSION, IMAGES_PER_SPECIES, ensure_demo_dataset, generate_demo_dataset
from linnaeus.data.images import H5ImageStore, open_image_store
from linnaeus.data.labels import read_labels
from linnaeus.data.taxonomy import build_taxonomy

RANKS = ["taxa_L40", "taxa_L30", "taxa_L20", "taxa_L10"]


@pytest.fixture(scope="module")
def demo(demo_cache):
    return demo_cache / f"demo-v{DEMO_VERSION}"


@pytest.fixture(scope="module")
def table(demo):
    return read_labels(demo / "labels.h5")


@pytest.fixture(scope="module")
def raw(demo) -> dict[str, np.ndarray]:
    """Datasets as written, before the reader zeroes invalid rows."""
    with h5py.File(demo / "labels.h5", "r") as h5:
        keys = ["raw_lat", "raw_lon", "raw_elevation", "spatial", "temporal", "elevation_main"]
        out = {k: h5[k][()] for k in keys}
        out.update({f"valid_{k}": h5[f"validity/{k}"][()] for k in ("spatial", "temporal", "elevation_main")})
    return out


def _species_by_name(table) -> dict[str, int]:
    tax = table.taxonomy
    return {n: int(t) for t, n, lvl in zip(tax["taxon_id"], tax["name"], tax["level"]) if lvl == 10}


def test_ranks_classes_and_rows(table):
    assert table.task_keys == RANKS
    assert len(table) == 30 * IMAGES_PER_SPECIES == 3000
    assert table.taxa.shape == (3000, 4)
    distinct = [len(np.unique(table.taxa[:, t][table.taxa[:, t] > 0])) for t in range(4)]
    assert distinct == [3, 6, 12, 30]
    assert len(set(table.identifiers.tolist())) == 3000
    taxonomy, _, report = build_taxonomy(table, on_conflict="error")  # consistent tree, nothing dropped
    assert taxonomy.num_classes == [4, 7, 13, 31]
    assert report["dropped_rows"] == 0 and report["conflicts"] == []
    assert set(table.meta) == {"spatial", "temporal", "elevation_main"}
    assert table.meta_dims == {"spatial": 3, "temporal": 2, "elevation_main": 6}


def test_taxonomy_names(table):
    tax = table.taxonomy
    names = dict(zip(tax["taxon_id"].tolist(), tax["name"].tolist()))
    parents = dict(zip(tax["taxon_id"].tolist(), tax["parent_id"].tolist()))
    levels = dict(zip(tax["taxon_id"].tolist(), tax["level"].tolist()))
    assert sorted(levels.values()) == [10] * 30 + [20] * 12 + [30] * 6 + [40] * 3
    for t, key in enumerate(RANKS):
        used = np.unique(table.taxa[:, t][table.taxa[:, t] > 0]).tolist()
        assert all(levels[i] == int(key[6:]) for i in used)  # every id in the rows is in the tree
    species = [i for i, lvl in levels.items() if lvl == 10]
    assert len({names[i] for i in species}) == 30
    for i in species:
        genus_name, epithet = names[i].split(" ")
        assert names[parents[i]] == genus_name and epithet.islower()
    for i, lvl in levels.items():
        assert (parents[i] == 0) == (lvl == 40)
        if lvl < 40:
            assert levels[parents[i]] == lvl + 10
    # the rows agree with the tree wherever both ranks are known
    for t in range(1, 4):
        child, parent = table.taxa[:, t], table.taxa[:, t - 1]
        known = (child > 0) & (parent > 0)
        assert all(parents[c] == p for c, p in zip(child[known].tolist(), parent[known].tolist()))


def test_unknown_label_fractions(table):
    unknown = (table.taxa == 0).mean(axis=0)
    assert unknown[0] == 0 and unknown[1] == 0  # order and family are always known
    assert 0.005 <= unknown[2] <= 0.04
    assert 0.03 <= unknown[3] <= 0.10
    genus_unknown = table.taxa[:, 2] == 0
    assert genus_unknown.sum() > 0 and (table.taxa[genus_unknown, 3] == 0).all()


@pytest.mark.parametrize("component", ["spatial", "temporal", "elevation_main"])
def test_metadata_coverage_and_zeroed_invalid_rows(raw, table, component):
    valid, values = raw[f"valid_{component}"], raw[component]
    assert valid.dtype == bool and valid.shape == (3000,)
    assert 0.85 <= valid.mean() <= 0.95
    assert np.all(values[~valid] == 0.0)
    assert np.all(np.abs(values[valid]).sum(axis=1) > 0)
    np.testing.assert_array_equal(table.meta_valid[component], valid)
    if component == "spatial":
        np.testing.assert_allclose(np.linalg.norm(values[valid], axis=1), 1.0, atol=1e-5)
        assert np.array_equal(np.isnan(raw["raw_lat"]), ~valid)


def test_visual_twins_are_told_apart_by_metadata(table, raw):
    species = _species_by_name(table)
    tax = table.taxonomy
    parent = dict(zip(tax["taxon_id"].tolist(), tax["parent_id"].tolist()))
    pairs = defaultdict(list)
    for name in species:
        genus, epithet = name.split(" ")
        pairs[epithet].append(genus)
    assert len(pairs["borealis"]) == 3 and sorted(pairs["borealis"]) == sorted(pairs["australis"])
    assert len(pairs["montana"]) == 3 and sorted(pairs["montana"]) == sorted(pairs["campestris"])
    assert len(pairs["aestiva"]) == 3 and sorted(pairs["aestiva"]) == sorted(pairs["hiemalis"])

    def mean_of(key: str, name: str) -> float:
        rows = table.taxa[:, 3] == species[name]
        assert rows.sum() >= 80
        return float(np.nanmean(raw[key][rows]))

    for genus in pairs["borealis"]:
        north, south = f"{genus} borealis", f"{genus} australis"
        assert parent[species[north]] == parent[species[south]]
        assert mean_of("raw_lat", north) > 20 and mean_of("raw_lat", south) < -20
    for genus in pairs["montana"]:
        high, low = f"{genus} montana", f"{genus} campestris"
        assert parent[species[high]] == parent[species[low]]
        assert mean_of("raw_elevation", high) - mean_of("raw_elevation", low) > 1000


def test_images_decode(demo, table):
    store = open_image_store(demo / "images.h5")
    rows, missing = store.rows_for(table.identifiers)
    assert not missing.any() and rows.tolist() == list(range(3000))
    for row in (0, 1234, 2999):
        image = store.read(row, table.identifiers[row])
        assert tuple(image.shape) == (3, 48, 48) and str(image.dtype) == "torch.uint8"
        assert image.float().std() > 5  # a drawing with noise, not a blank


def _contents(directory):
    with h5py.File(directory / "labels.h5", "r") as h5:
        ids = [v.decode() for v in h5["img_identifiers"][()]]
        taxa = {k: h5[k][()] for k in RANKS}
        lat = h5["raw_lat"][()]
    store = H5ImageStore(directory / "images.h5")
    assert store.layout == "contiguous"
    images = [store.read_encoded(row).tobytes() for row in range(store.num_rows)]
    return ids, taxa, lat, images


def test_generation_is_deterministic(tmp_path):
    a = _contents(generate_demo_dataset(tmp_path / "a", seed=0, images_per_species=5))
    b = _contents(generate_demo_dataset(tmp_path / "b", seed=0, images_per_species=5))
    c = _contents(generate_demo_dataset(tmp_path / "c", seed=1, images_per_species=5))
    assert len(a[0]) == 150 and a[0] == b[0]
    for key in RANKS:
        np.testing.assert_array_equal(a[1][key], b[1][key])
    np.testing.assert_array_equal(a[2], b[2])  # NaN in the same places too
    assert a[3] == b[3]
    assert len(c[3]) == 150 and sum(x != y for x, y in zip(a[3], c[3])) == 150


def test_ensure_reuses_the_cached_dataset(demo_cache, demo):
    before = {name: (demo / name).stat().st_mtime_ns for name in ("labels.h5", "images.h5")}
    assert ensure_demo_dataset(demo_cache) == demo
    after = {name: (demo / name).stat().st_mtime_ns for name in ("labels.h5", "images.h5")}
    assert after == before
    assert (
        sorted(p.name for p in demo_cache.iterdir() if p.name.startswith(f".demo-v{DEMO_VERSION}.tmp")) == []
    )
