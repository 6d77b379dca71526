"""Metadata encodings, and building datasets from folder trees and CSV files (real images, real HDF5)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from linnaeus.data.build import main as build_main
from linnaeus.data.encodings import encode_elevation, encode_spatial, encode_temporal, parse_dates
from linnaeus.data.images import FolderImageStore, H5ImageStore, decode_bytes, open_image_store
from linnaeus.data.labels import read_labels
from tests.conftest import REPO

# ---------------------------------------------------------------------- encodings


def test_spatial_known_points_and_unit_norm():
    lat = np.array([0.0, 90.0, 0.0, 0.0, -90.0, 0.0, 37.5])
    lon = np.array([0.0, 0.0, 180.0, -180.0, 0.0, 90.0, -122.25])
    values, valid = encode_spatial(lat, lon)
    assert values.shape == (7, 3) and values.dtype == np.float32
    assert valid.tolist() == [True] * 7
    np.testing.assert_allclose(values[0], [1, 0, 0], atol=1e-6)  # lat 0 / lon 0 is a real place
    np.testing.assert_allclose(values[1], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(values[2], [-1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(values[2], values[3], atol=1e-6)  # longitude wraps at ±180°
    np.testing.assert_allclose(values[4], [0, 0, -1], atol=1e-6)
    np.testing.assert_allclose(values[5], [0, 1, 0], atol=1e-6)
    phi, lam = np.radians(37.5), np.radians(-122.25)
    expected = [np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)]
    np.testing.assert_allclose(values[6], expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-6)


def test_spatial_missing_and_out_of_range_rows_are_zero_and_invalid():
    lat = np.array([np.nan, 91.0, 10.0, 10.0, 0.0, -90.5, 0.0])
    lon = np.array([10.0, 10.0, 181.0, np.inf, np.nan, 0.0, 45.0])
    values, valid = encode_spatial(lat, lon)
    assert valid.tolist() == [False, False, False, False, False, False, True]
    assert np.all(values[:6] == 0.0)
    np.testing.assert_allclose(values[6], [np.cos(np.pi / 4), np.sin(np.pi / 4), 0], atol=1e-6)


def test_temporal_day_only():
    values, valid = encode_temporal(np.array([1.0, 183.625, 92.3125, np.nan, 0.0, 367.0]))
    assert values.shape == (6, 2)
    assert valid.tolist() == [True, True, True, False, False, False]
    np.testing.assert_allclose(values[0], [0, 1], atol=1e-6)
    np.testing.assert_allclose(values[1], [0, -1], atol=1e-6)  # half a year after 1 January
    np.testing.assert_allclose(values[2], [1, 0], atol=1e-6)  # a quarter of a year
    assert np.all(values[3:] == 0.0)


def test_temporal_with_hours():
    day = np.array([1.0, 1.0, 100.0, np.nan])
    hour = np.array([6.0, 18.0, np.nan, 12.0])
    values, valid = encode_temporal(day, hour)
    assert values.shape == (4, 4)
    assert valid.tolist() == [True, True, True, False]  # a missing hour alone keeps the row valid
    np.testing.assert_allclose(values[0], [0, 1, 1, 0], atol=1e-6)
    np.testing.assert_allclose(values[1], [0, 1, -1, 0], atol=1e-6)
    angle = 2 * np.pi * 99 / 365.25
    np.testing.assert_allclose(values[2], [np.sin(angle), np.cos(angle), 0, 0], atol=1e-6)
    assert values[2, 2:].tolist() == [0.0, 0.0]
    assert values[3].tolist() == [0.0, 0.0, 0.0, 0.0]  # a valid hour does not rescue a missing day


def test_elevation_scales_and_missing():
    elevation = np.array([0.0, 250.0, 1234.0, np.nan, -1000.0, 9500.0])
    values, valid = encode_elevation(elevation, scales=(100.0, 1000.0))
    assert values.shape == (6, 4) and values.dtype == np.float32
    assert valid.tolist() == [True, True, True, False, False, False]
    np.testing.assert_allclose(values[0], [0, 1, 0, 1], atol=1e-6)
    np.testing.assert_allclose(values[1], [0, -1, 1, 0], atol=1e-5)  # 2.5 and 0.25 periods
    a, b = 2 * np.pi * 1234 / 100, 2 * np.pi * 1234 / 1000
    np.testing.assert_allclose(values[2], [np.sin(a), np.cos(a), np.sin(b), np.cos(b)], atol=1e-5)
    assert np.all(values[3:] == 0.0)
    default, _ = encode_elevation(np.array([500.0, 20.0]))
    assert default.shape == (2, 6)  # three default scales


def test_parse_dates():
    day, hour = parse_dates(
        ["2021-01-01", "2020-12-31", "2021-06-01T14:30", "2021-06-01 14:30:00", "", "garbage", "2021-03-01"]
    )
    np.testing.assert_array_equal(day[[0, 1, 2, 3, 6]], [1, 366, 152, 152, 60])
    assert np.isnan(day[4]) and np.isnan(day[5])
    assert hour[2] == pytest.approx(14.5) and hour[3] == pytest.approx(14.5)
    assert np.isnan(hour[[0, 1, 4, 5, 6]]).all()  # a date without a time has no hour


# ---------------------------------------------------------------------- folder builds

GOOD_IMAGES = {  # identifier -> (width, height)
    "Coleoptera/Carabus/alpina/big.png": (300, 200),
    "Lepidoptera/Pieris/alpina/c.png": (16, 12),
    "Lepidoptera/Pieris/rapae/pal.png": (10, 14),
    "Lepidoptera/Pieris/rapae/rgba.png": (12, 12),
    "Lepidoptera/Vanessa/atalanta/a.png": (20, 10),
    "Lepidoptera/Vanessa/atalanta/b.jpg": (24, 16),
    "Lepidoptera/Vanessa/cardui/gray.png": (9, 17),
}
CORRUPT = "Lepidoptera/Vanessa/cardui/x.png"


def _save(path: Path, mode: str, size: tuple[int, int], colour=(200, 40, 30), fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).convert(mode).save(path, format=fmt)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    modes = {"pal.png": "P", "rgba.png": "RGBA", "gray.png": "L"}
    for ident, size in GOOD_IMAGES.items():
        name = ident.rsplit("/", 1)[-1]
        if name.endswith(".jpg"):
            _save(root / ident, "CMYK", size, fmt="JPEG")
        else:
            _save(root / ident, modes.get(name, "RGB"), size, colour=(10, 200, 30))
    (root / CORRUPT).write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return root


@pytest.fixture(scope="module")
def folder_build(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folder_out")
    assert build_main(["folder", str(tree), "--out", str(out)]) == 0  # default: 2 worker processes
    return out


def test_folder_build_labels_and_taxonomy(folder_build):
    report = json.loads((folder_build / "build_report.json").read_text())
    assert report["rows_found"] == 8 and report["rows_written"] == 7
    assert list(report["bad_images"]) == [CORRUPT]
    assert "cannot decode" in report["bad_images"][CORRUPT]
    assert report["ranks"] == {"taxa_L30": 2, "taxa_L20": 3, "taxa_L10": 5}

    table = read_labels(folder_build / "labels.h5")
    assert table.task_keys == ["taxa_L30", "taxa_L20", "taxa_L10"]
    assert table.identifiers.tolist() == sorted(GOOD_IMAGES)
    assert [len(np.unique(table.taxa[:, t])) for t in range(3)] == [2, 3, 5]
    assert (table.taxa > 0).all()
    names = dict(zip(table.taxonomy["taxon_id"].tolist(), table.taxonomy["name"].tolist()))
    parents = dict(zip(table.taxonomy["taxon_id"].tolist(), table.taxonomy["parent_id"].tolist()))
    levels = dict(zip(table.taxonomy["taxon_id"].tolist(), table.taxonomy["level"].tolist()))
    by_level = {lvl: sorted(n for t, n in names.items() if levels[t] == lvl) for lvl in (30, 20, 10)}
    assert by_level == {
        30: ["Coleoptera", "Lepidoptera"],
        20: ["Carabus", "Pieris", "Vanessa"],
        10: ["alpina", "alpina", "atalanta", "cardui", "rapae"],
    }
    for ident, row in zip(table.identifiers, table.taxa):
        assert [names[int(t)] for t in row] == ident.split("/")[:3]  # every row names its folders
        assert parents[int(row[2])] == row[1] and parents[int(row[1])] == row[0] and parents[int(row[0])] == 0
    # "alpina" under Carabus and under Pieris are two species
    alpina = {
        ident.split("/")[1]: int(row[2])
        for ident, row in zip(table.identifiers, table.taxa)
        if "alpina" in ident
    }
    assert len(alpina) == 2 and alpina["Carabus"] != alpina["Pieris"]
    assert table.config["mode"] == "folder" and table.config["images"] == str(folder_build / "images.h5")


def test_folder_build_images_decode_to_rgb(folder_build, tree):
    store = H5ImageStore(folder_build / "images.h5")
    assert store.layout == "contiguous"  # what the builder writes
    identifiers = store.identifiers
    stored = {ident: store.read_encoded(i).tobytes() for i, ident in enumerate(identifiers)}
    assert identifiers == sorted(GOOD_IMAGES)
    for ident, (width, height) in GOOD_IMAGES.items():
        assert stored[ident] == (tree / ident).read_bytes()  # without --max-side the bytes are kept
        image = decode_bytes(stored[ident])
        assert image.shape == (3, height, width) and image.dtype == torch.uint8
    gray = decode_bytes(stored["Lepidoptera/Vanessa/cardui/gray.png"])
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all()
    rgba = decode_bytes(stored["Lepidoptera/Pieris/rapae/rgba.png"])
    assert rgba[:, 0, 0].tolist() == [10, 200, 30]
    cmyk = decode_bytes(stored["Lepidoptera/Vanessa/atalanta/b.jpg"]).float().mean(dim=(1, 2))
    assert cmyk.tolist() == pytest.approx([200, 40, 30], abs=12)


def test_folder_build_max_side_resizes_large_images_only(tree, tmp_path):
    assert (
        build_main(["folder", str(tree), "--out", str(tmp_path), "--max-side", "64", "--workers", "1"]) == 0
    )
    store = H5ImageStore(tmp_path / "images.h5")
    assert store.layout == "contiguous"  # what the builder writes
    identifiers = store.identifiers
    stored = {ident: store.read_encoded(i).tobytes() for i, ident in enumerate(identifiers)}
    big = stored["Coleoptera/Carabus/alpina/big.png"]
    assert big[:8] == b"\x89PNG\r\n\x1a\n"  # PNG stays PNG
    image = decode_bytes(big)
    assert image.shape[0] == 3 and image.shape[2] == 64
    assert abs(image.shape[1] - 64 * 200 / 300) <= 1  # aspect kept
    assert image.float().mean(dim=(1, 2)).tolist() == pytest.approx([10, 200, 30], abs=2)
    for ident in GOOD_IMAGES:
        if ident != "Coleoptera/Carabus/alpina/big.png":
            assert stored[ident] == (tree / ident).read_bytes()
    report = json.loads((tmp_path / "build_report.json").read_text())
    assert report["rows_written"] == 7 and read_labels(tmp_path / "labels.h5").config["max_side"] == 64


def test_folder_build_strict_fails_on_corrupt_image(tree, tmp_path, capsys):
    code = build_main(["folder", str(tree), "--out", str(tmp_path), "--strict", "--workers", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert CORRUPT in err and "--strict" in err
    assert not (tmp_path / "labels.h5").exists() and not (tmp_path / "images.h5").exists()
    assert list(json.loads((tmp_path / "build_report.json").read_text())["bad_images"]) == [CORRUPT]


def test_folder_build_rejects_mixed_depths(tmp_path, capsys):
    root = tmp_path / "root"
    _save(root / "Order" / "Genus" / "species" / "a.png", "RGB", (8, 8))
    _save(root / "Order" / "Genus" / "b.png", "RGB", (8, 8))
    code = build_main(["folder", str(root), "--out", str(tmp_path / "out"), "--workers", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "different depths" in err and "Order/Genus/b.png" in err
    assert not (tmp_path / "out" / "labels.h5").exists()


def test_folder_build_hybrid_reads_images_from_the_tree(tree, tmp_path):
    assert build_main(["folder", str(tree), "--out", str(tmp_path), "--hybrid", "--workers", "1"]) == 0
    assert (tmp_path / "labels.h5").is_file() and not (tmp_path / "images.h5").exists()
    table = read_labels(tmp_path / "labels.h5")
    assert table.identifiers.tolist() == sorted(GOOD_IMAGES)
    assert table.config["hybrid"] is True and table.config["images"] == str(tree.resolve())
    store = open_image_store(tree)
    assert isinstance(store, FolderImageStore)
    for row, ident in enumerate(table.identifiers):
        width, height = GOOD_IMAGES[ident]
        assert tuple(store.read(row, ident).shape) == (3, height, width)


# ---------------------------------------------------------------------- CSV builds

CSV_HEADER = "image,order,family,genus,species,latitude,longitude,date,elevation\n"
CSV_ROWS = [
    # genus unknown, species known: the parent must come from a later row
    "p5.png,Lepidoptera,Nymphalidae,,Vanessa atalanta,12.5,-3,2021-03-01,80",
    "p0.png,Lepidoptera,Nymphalidae,Vanessa,Vanessa atalanta,0,0,2021-06-01T14:30,150",
    "p1.png,Lepidoptera,Nymphalidae,Vanessa,,48.5,2.25,2021-01-01,35",
    "p2.png,Lepidoptera,Pieridae,Pieris,Pieris rapae,,10,,1200",
    "missing.png,Coleoptera,Carabidae,Carabus,Carabus nemoralis,1,1,2021-01-02,5",
    "p3.png,Coleoptera,Carabidae,Carabus,Carabus nemoralis,-33.9,151.2,2020-12-31,",
]
CSV_IMAGES = ["p0.png", "p1.png", "p2.png", "p3.png", "p5.png"]


@pytest.fixture(scope="module")
def csv_source(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("csv")
    for i, name in enumerate(CSV_IMAGES):
        _save(base / "photos" / name, "RGB", (10 + i, 8), colour=(i * 40, 100, 50))
    (base / "obs.csv").write_text(CSV_HEADER + "\n".join(CSV_ROWS) + "\n")
    return base / "obs.csv", base / "photos"


@pytest.fixture(scope="module")
def csv_build(csv_source, tmp_path_factory) -> Path:
    file, photos = csv_source
    out = tmp_path_factory.mktemp("csv_out")
    assert (
        build_main(["csv", str(file), "--image-root", str(photos), "--out", str(out), "--workers", "1"]) == 0
    )
    return out


def test_csv_build_labels_and_metadata(csv_build):
    report = json.loads((csv_build / "build_report.json").read_text())
    assert (
        list(report["bad_images"]) == ["missing.png"] and "cannot read" in report["bad_images"]["missing.png"]
    )
    assert report["rows_written"] == 5
    assert report["metadata_valid_rows"] == {"spatial": 4, "temporal": 4, "elevation_main": 4}

    table = read_labels(csv_build / "labels.h5")
    assert table.identifiers.tolist() == ["p5.png", "p0.png", "p1.png", "p2.png", "p3.png"]
    assert table.task_keys == ["taxa_L40", "taxa_L30", "taxa_L20", "taxa_L10"]
    taxa = table.taxa
    assert (taxa[:, :2] > 0).all()
    assert taxa[0, 2] == 0 and (taxa[1:, 2] > 0).all()  # genus unknown in the first row only
    assert taxa[2, 3] == 0 and taxa[0, 3] == taxa[1, 3] > 0  # missing species -> 0
    assert len(np.unique(taxa[:, 3][taxa[:, 3] > 0])) == 3
    assert table.meta_valid["spatial"].tolist() == [True, True, True, False, True]
    assert table.meta_valid["temporal"].tolist() == [True, True, True, False, True]
    assert table.meta_valid["elevation_main"].tolist() == [True, True, True, True, False]
    np.testing.assert_allclose(table.meta["spatial"][1], [1, 0, 0], atol=1e-6)  # lat 0 / lon 0
    phi, lam = np.radians(48.5), np.radians(2.25)
    np.testing.assert_allclose(
        table.meta["spatial"][2],
        [np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)],
        atol=1e-6,
    )
    assert table.meta["spatial"][3].tolist() == [0, 0, 0]
    assert table.meta["temporal"].shape == (5, 4)  # one row has a time of day, so hours are encoded
    hour_angle = 2 * np.pi * 14.5 / 24
    np.testing.assert_allclose(
        table.meta["temporal"][1, 2:], [np.sin(hour_angle), np.cos(hour_angle)], atol=1e-6
    )
    np.testing.assert_allclose(table.meta["temporal"][2], [0, 1, 0, 0], atol=1e-6)  # 1 January, no time
    assert table.meta["elevation_main"].shape == (5, 6)

    with h5py.File(csv_build / "labels.h5", "r") as h5:
        raw_lat = h5["raw_lat"][()]
        np.testing.assert_allclose(raw_lat[[0, 1, 2, 4]], [12.5, 0, 48.5, -33.9], atol=1e-5)
        assert np.isnan(raw_lat[3])
        np.testing.assert_allclose(h5["raw_elevation"][[0, 1, 2, 3]], [80, 150, 35, 1200])
        assert [v.decode() for v in h5["raw_date_observed"][()]][3] == ""
        config = json.loads(h5["metadata"].attrs["config_json"])
    assert config["mode"] == "csv" and config["file"].endswith("obs.csv")

    names = dict(zip(table.taxonomy["taxon_id"].tolist(), table.taxonomy["name"].tolist()))
    parents = dict(zip(table.taxonomy["taxon_id"].tolist(), table.taxonomy["parent_id"].tolist()))
    atalanta = int(taxa[0, 3])
    assert names[atalanta] == "Vanessa atalanta"
    assert names[parents[atalanta]] == "Vanessa"  # filled from the second row, not left at 0


def test_csv_build_with_selected_ranks(csv_source, tmp_path):
    file, photos = csv_source
    args = ["csv", str(file), "--image-root", str(photos), "--out", str(tmp_path), "--ranks", "genus,species"]
    assert build_main([*args, "--workers", "1"]) == 0
    table = read_labels(tmp_path / "labels.h5")
    assert table.task_keys == ["taxa_L20", "taxa_L10"]
    assert table.taxa.shape == (5, 2)
    assert sorted(table.taxonomy["level"].tolist()) == [10, 10, 10, 20, 20, 20]


def test_csv_build_unknown_image_column(csv_source, tmp_path, capsys):
    file, photos = csv_source
    args = ["csv", str(file), "--image-root", str(photos), "--out", str(tmp_path), "--image-column", "photo"]
    assert build_main(args) == 1
    err = capsys.readouterr().err
    assert "--image-column 'photo' is not a column" in err and "'image'" in err
    assert not (tmp_path / "labels.h5").exists()


# ---------------------------------------------------------------------- verify


def _verify(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "linnaeus.data.verify", str(directory), "--workers", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("built", ["folder_build", "csv_build"])
def test_built_datasets_pass_verify(built, request):
    directory = request.getfixturevalue(built)
    result = _verify(directory)
    assert result.returncode == 0, result.stderr
    report = json.loads((directory / "verify_report.json").read_text())
    assert report["ok"] is True and report["errors"] == [] and report["bad_images"] == []
    assert report["rows"] == (7 if built == "folder_build" else 5)
    assert report["taxonomy_conflicts"] == []


def test_verify_rejects_rank_of_wrong_length(folder_build, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder_build, broken)
    with h5py.File(broken / "labels.h5", "r+") as h5:
        species = h5["taxa_L10"][()]
        del h5["taxa_L10"]
        h5["taxa_L10"] = np.concatenate([species, species[:1]])
    result = _verify(broken)
    assert result.returncode == 1
    assert "'taxa_L10' has 8 rows but 'img_identifiers' has 7" in result.stderr
    report = json.loads((broken / "verify_report.json").read_text())
    assert report["ok"] is False and any("taxa_L10" in e for e in report["errors"])
