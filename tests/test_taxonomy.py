import numpy as np
import pytest
import torch

from linnaeus.data.labels import DatasetError, read_labels
from linnaeus.data.taxonomy import NULL_INDEX, Taxonomy, build_taxonomy
from tests.conftest import write_h5_dataset

# order (L40) -> genus (L20) -> species (L10); ids unique across ranks
ROWS = {
    "taxa_L40": [1, 1, 1, 1, 2, 2, 2],
    "taxa_L20": [10, 10, 11, 11, 20, 20, 0],
    "taxa_L10": [100, 101, 110, 0, 200, 201, 0],
}


def build(tmp_path, rows=ROWS, on_conflict="error", **kwargs):
    write_h5_dataset(tmp_path, rows, **kwargs)
    return build_taxonomy(read_labels(tmp_path / "labels.h5"), on_conflict)


def test_label_space_orders_ranks_and_reserves_null(tmp_path):
    tax, table, report = build(tmp_path)
    assert tax.task_keys == ["taxa_L40", "taxa_L20", "taxa_L10"]
    assert tax.num_classes == [3, 4, 6]  # null + real classes
    assert tax.class_ids[2].tolist() == [0, 100, 101, 110, 200, 201]
    assert tax.null_index == NULL_INDEX
    targets = tax.encode(table.taxa)
    assert targets[:, 2].tolist() == [1, 2, 3, 0, 4, 5, 0]
    assert report["dropped_rows"] == 0


def test_parents_and_ancestors(tmp_path):
    tax, _, _ = build(tmp_path)
    # genus 10 -> order 1, genus 20 -> order 2; species 110 -> genus 11
    assert tax.parents[1].tolist() == [0, 1, 1, 2]
    assert tax.parents[2].tolist() == [0, 1, 1, 2, 3, 3]
    assert tax.ancestors[2][3].tolist() == [1, 2, 3]  # species 110: order 1, genus 11, itself


def test_lca_distance_is_vectorised_and_symmetric(tmp_path):
    tax, _, _ = build(tmp_path)
    a = torch.tensor([1, 1, 1, 1, 4])
    b = torch.tensor([1, 2, 3, 4, 5])
    # same, siblings (same genus), cousins (same order), different orders, siblings
    assert tax.distance(2, a, b).tolist() == [0, 2, 4, 6, 2]
    assert torch.equal(tax.distance(2, a, b), tax.distance(2, b, a))
    # at the coarsest rank two classes share nothing: distance 2
    assert tax.distance(0, torch.tensor([1]), torch.tensor([2])).tolist() == [2]


def test_two_parents_is_a_conflict_naming_the_taxon(tmp_path):
    rows = {k: list(v) for k, v in ROWS.items()}
    rows["taxa_L20"][1] = 11  # species 101 now under genus 11 ...
    rows["taxa_L10"][2] = 101  # ... and another row puts 101 under genus 11 as well; 100 stays under 10
    rows["taxa_L20"][0] = 10
    rows["taxa_L10"][0] = 101  # 101 under 10 once, under 11 twice -> two parents
    with pytest.raises(
        DatasetError, match=r"taxon 101 \(taxa_L10\) has several parents(.|\n)*data.on_conflict=drop"
    ):
        build(tmp_path, rows)
    tax, table, report = build(tmp_path, rows, on_conflict="drop")
    assert report["dropped_rows"] == 1
    assert len(table) == 6


def test_unknown_parent_filled_in_when_the_tree_knows_it(tmp_path):
    rows = {k: list(v) for k, v in ROWS.items()}
    rows["taxa_L20"][1] = 0  # species 101 with unknown genus; row 0 says 101's genus... no: 100 is under 10
    rows["taxa_L10"].append(101)
    rows["taxa_L20"].append(10)
    rows["taxa_L40"].append(1)
    tax, table, report = build(tmp_path, rows)
    assert report["filled_parents"] == 1
    assert table.taxa[1].tolist() == [1, 10, 101]


def test_label_below_unresolvable_unknown_parent(tmp_path):
    rows = {k: list(v) for k, v in ROWS.items()}
    rows["taxa_L20"][5] = 0  # species 201 appears only here, genus unknown
    with pytest.raises(DatasetError, match=r"taxon 201 \(taxa_L10\) sits below an unknown parent"):
        build(tmp_path, rows)


def test_taxonomy_group_gives_names_and_checks_parents(tmp_path):
    group = [
        (1, 40, 0, "Ordo"),
        (2, 40, 0, "Alius"),
        (10, 20, 1, "Genus"),
        (11, 20, 1, "Genoides"),
        (20, 20, 2, "Tertius"),
        (100, 10, 10, "Genus alba"),
        (101, 10, 10, "Genus nigra"),
        (110, 10, 11, "Genoides rufa"),
        (200, 10, 20, "Tertius viridis"),
        (201, 10, 20, "Tertius flava"),
    ]
    tax, _, _ = build(tmp_path, taxonomy=group)
    assert tax.names[2][1:] == [
        "Genus alba",
        "Genus nigra",
        "Genoides rufa",
        "Tertius viridis",
        "Tertius flava",
    ]
    assert tax.names[2][0] == "<unknown>"
    broken = [row for row in group if row[0] != 20]  # genus 20 missing: its species' parent is unknown
    with pytest.raises(DatasetError, match="taxon 20 .* missing from the 'taxonomy' group"):
        build(tmp_path, taxonomy=broken)
    contradicting = [(101, 10, 11, "Genus nigra") if r[0] == 101 else r for r in group]
    with pytest.raises(DatasetError, match=r"taxon 101 .* in the taxonomy group"):
        build(tmp_path, taxonomy=contradicting)


def test_cycle_in_taxonomy_group_is_reported(tmp_path):
    rows = {"taxa_L20": [10, 10], "taxa_L10": [100, 100]}
    group = [(10, 20, 0, "G"), (100, 10, 5, "S"), (5, 15, 6, "x"), (6, 15, 5, "y")]  # 5 <-> 6
    with pytest.raises(DatasetError, match="cycle"):
        build(tmp_path, rows, taxonomy=group)


def test_json_round_trip(tmp_path):
    tax, _, _ = build(tmp_path)
    tax.save(tmp_path / "taxonomy.json")
    loaded = Taxonomy.load(tmp_path / "taxonomy.json")
    assert loaded == tax
    assert np.array_equal(loaded.ancestors[2], tax.ancestors[2])
