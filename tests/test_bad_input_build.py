"""Bad input to the dataset builder, through the real command line: one-line errors, nothing lost,
datasets replaced whole, and every dropped row or unused value reported."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from linnaeus.data.build import main as build_main
from linnaeus.data.labels import read_labels
from tests.bad_input_helpers import (
    assert_user_error,
    checksums,
    crashing_png,
    leftovers,
    png,
    run_module,
)
from tests.conftest import REPO

BUILD = "linnaeus.data.build"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """ROOT/<order>/<genus>/<species>/<image>: 6 small PNGs."""
    root = tmp_path_factory.mktemp("tree") / "root"
    for i, ident in enumerate(
        ["Lep/Pieris/rapae/a.png", "Lep/Pieris/rapae/b.png", "Lep/Vanessa/cardui/c.png",
         "Col/Carabus/nemoralis/d.png", "Col/Carabus/nemoralis/e.png", "Col/Carabus/auratus/f.png"]
    ):  # fmt: skip
        path = root / ident
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png((8 + i, 8), (i * 30, 100, 50)))
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(8):
        (folder / f"p{i}.png").write_bytes(png((8 + i, 8), (i * 25, 60, 90)))
    return folder


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory) -> Path:
    """A dataset built once, copied by the tests that must not change it."""
    out = tmp_path_factory.mktemp("built") / "ds"
    proc = run_module(BUILD, "folder", tree, "--out", out, "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    return out


def write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


GOOD_ROWS = [
    "p0.png,Lepidoptera,Pieris,Pieris rapae",
    "p1.png,Lepidoptera,Pieris,Pieris napi",
    "p2.png,Lepidoptera,Vanessa,Vanessa cardui",
    "p3.png,Coleoptera,Carabus,Carabus nemoralis",
]


# ---------------------------------------------------------------------- arguments and paths
ARGUMENT_CASES = {
    # name: (extra args, fragments of the one error line)
    "levels_not_numbers": (["--levels", "40,abc,10"], ["--levels '40,abc,10'", "e.g. --levels 40,30,20,10"]),
    "levels_increasing": (["--levels", "10,20,30"], ["decrease from coarse to fine"]),
    "levels_wrong_count": (["--levels", "40,30"], ["gives 2 levels", "3 ranks"]),
    "levels_zero": (["--levels", "20,10,0"], ["positive integers"]),
    "max_side_too_small": (["--max-side", "0"], ["--max-side 0", "at least 8"]),
    "max_side_not_a_number": (["--max-side", "big"], ["--max-side", "invalid int value: 'big'", "--help"]),
    "workers_zero": (["--workers", "0"], ["--workers 0", "between 1 and 256"]),
    "workers_negative": (["--workers", "-2"], ["--workers -2"]),
    "unknown_option": (["--colour", "red"], ["unrecognized arguments: --colour red"]),
}


@pytest.mark.parametrize("case", sorted(ARGUMENT_CASES))
def test_bad_arguments_fail_in_one_line_before_any_work(case, tree, tmp_path):
    extra, fragments = ARGUMENT_CASES[case]
    out = tmp_path / "out"
    proc = run_module(BUILD, "folder", tree, "--out", out, "--workers", "1", *extra)
    assert_user_error(proc, *fragments)
    assert not out.exists() and leftovers(tmp_path) == []


def test_missing_inputs_are_named(tmp_path, photos):
    cases = [
        (["folder", tmp_path / "nowhere", "--out", tmp_path / "o"], ["image folder not found", "nowhere"]),
        (["folder", photos / "p0.png", "--out", tmp_path / "o"], ["p0.png is a file"]),
        (["csv", tmp_path / "none.csv", "--image-root", photos, "--out", tmp_path / "o"], ["CSV file not found"]),
        (["csv", photos, "--image-root", photos, "--out", tmp_path / "o"], ["is a folder; give the CSV file"]),
        (["csv", write_csv(tmp_path / "a.csv", "image,species\np0.png,x\n"), "--image-root", tmp_path / "no",
          "--out", tmp_path / "o"], ["--image-root", "no such folder"]),
    ]  # fmt: skip
    for args, fragments in cases:
        assert_user_error(run_module(BUILD, *args, "--workers", "1"), *fragments)
    assert not (tmp_path / "o").exists()


def test_output_that_would_lose_data_is_refused(tree, built, tmp_path):
    before = checksums(tree)
    file_out = tmp_path / "out.txt"
    file_out.write_text("keep me")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes")
    cases = [
        (file_out, [], ["is a file"]),
        (tree, ["--force"], ["is or contains the input"]),
        (tree.parent, ["--force"], ["is or contains the input"]),
        (tree / "Lep" / "out", [], ["lies inside the image folder"]),
        (foreign, ["--force"], ["not part of a dataset (notes.txt)", "never replaced"]),
    ]
    for out, extra, fragments in cases:
        assert_user_error(
            run_module(BUILD, "folder", tree, "--out", out, "--workers", "1", *extra), *fragments
        )
    assert checksums(tree) == before
    assert file_out.read_text() == "keep me" and (foreign / "notes.txt").read_text() == "my notes"
    assert not (tree / "Lep" / "out").exists()


def test_existing_dataset_needs_force(built, tree, tmp_path):
    target = tmp_path / "ds"
    shutil.copytree(built, target)
    before = checksums(target)
    proc = run_module(BUILD, "folder", tree, "--out", target, "--workers", "1")
    assert_user_error(proc, f"--out {target} already holds a dataset", "--force")
    assert checksums(target) == before and leftovers(tmp_path) == []


def test_force_replaces_the_dataset_whole(built, tree, tmp_path):
    target = tmp_path / "ds"
    shutil.copytree(built, target)
    (target / "verify_report.json").write_text("{}")  # belongs to the old dataset: must go
    assert (
        build_main(["folder", str(tree), "--out", str(target), "--workers", "1", "--hybrid", "--force"]) == 0
    )
    assert sorted(p.name for p in target.iterdir()) == ["build_report.json", "labels.h5"]
    assert read_labels(target / "labels.h5").config["hybrid"] is True
    assert leftovers(tmp_path) == []


def test_failed_build_keeps_the_old_dataset(built, tree, tmp_path):
    """--force with --strict and a corrupt image: the build stops, the old dataset stays as it was."""
    source = tmp_path / "src"
    shutil.copytree(tree, source)
    (source / "Lep/Pieris/rapae/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    target = tmp_path / "ds"
    shutil.copytree(built, target)
    before = checksums(target)
    proc = run_module(BUILD, "folder", source, "--out", target, "--workers", "1", "--strict", "--force")
    assert_user_error(proc, "1 images are missing or undecodable (--strict)", "Lep/Pieris/rapae/broken.png")
    after = checksums(target)
    failed = after.pop("build_report.failed.json")
    assert after == before and failed
    report = json.loads((target / "build_report.failed.json").read_text())
    assert list(report["bad_images"]) == ["Lep/Pieris/rapae/broken.png"]
    assert leftovers(tmp_path) == []


def test_staging_folder_of_a_killed_build_is_removed(tree, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".ds.building-{dead.pid}"
    (stale / "images").mkdir(parents=True)
    (stale / "labels.h5").write_bytes(b"half")
    assert build_main(["folder", str(tree), "--out", str(tmp_path / "ds"), "--workers", "1", "--hybrid"]) == 0
    assert not stale.exists() and leftovers(tmp_path) == []


def test_interrupt_leaves_nothing_behind(tmp_path):
    """Ctrl-C while images are being checked: status 130, one line, no output folder, no staging folder."""
    root = tmp_path / "root"
    big = png((600, 600))
    for i in range(400):
        path = root / "Ord" / "Gen" / f"sp{i % 4}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(big)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", BUILD, "folder", str(root), "--out", str(out), "--workers", "1", "--max-side", "64"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
        p.startswith(("python", "linnaeus")) for p in _children(proc.pid)
    ):
        time.sleep(0.1)  # wait until the image workers run
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and f"error: interrupted; {out} was not changed" in stderr
    assert not out.exists() and leftovers(tmp_path) == []


def _children(pid: int) -> list[str]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    names = []
    for child in children:
        try:
            names.append(Path(f"/proc/{child}/comm").read_text().strip())
        except OSError:
            pass
    return names


# ---------------------------------------------------------------------- the label table
TABLE_ERRORS = {
    "species_under_two_genera": (
        "image,order,genus,species\n" + "\n".join(GOOD_ROWS) + "\np4.png,Lepidoptera,Pyrameis,Vanessa cardui\n",
        ["species 'Vanessa cardui' is under genus 'Vanessa' (1 row, e.g. line 4) and 'Pyrameis' (1 row, e.g. line 6)",
         "--on-conflict drop"],
    ),
    "empty_rank": (
        "image,order,genus,species\n" + "\n".join(",".join(r.split(",")[:2] + ["", r.split(",")[3]]) for r in GOOD_ROWS),
        ["rank column 'genus' is empty in every row", "--ranks order,species"],
    ),
    "no_image_column": ("photo_id,species\n1,a\n", ["no image path column", "['photo_id', 'species']", "--image-column"]),
    "no_rank_column": ("image,colour\np0.png,red\n", ["no rank columns found", "--ranks"]),
    "empty_file": ("", ["is empty or has an empty header line"]),
    "header_only": ("image,species\n", ["has no data rows"]),
    "nul_bytes": ("image,species\np0.png,a\x00b\n", ["line 2 holds a NUL byte", "not a text CSV"]),
    "repeated_header": ("image,species,species\np0.png,a,b\n", ["['species'] appear more than once"]),
    "only_empty_paths": ("image,species\n,a\n,b\n", ["no row has an image path"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(TABLE_ERRORS))
def test_bad_tables_fail_before_any_image_is_read(case, photos, tmp_path):
    text, fragments = TABLE_ERRORS[case]
    csv = write_csv(tmp_path / "obs.csv", text)
    out = tmp_path / "out"
    proc = run_module(BUILD, "csv", csv, "--image-root", photos, "--out", out, "--workers", "1")
    assert_user_error(proc, *fragments)
    assert not (out / "labels.h5").exists() and leftovers(tmp_path) == []


def test_bad_rank_selection(photos, tmp_path):
    csv = write_csv(tmp_path / "obs.csv", "image,order,genus,species\n" + "\n".join(GOOD_ROWS))
    for ranks, fragment in (("genus,family", "--ranks names columns ['family']"), ("genus,genus", "more than once"),
                            ("image,species", "includes the image path column")):  # fmt: skip
        proc = run_module(
            BUILD, "csv", csv, "--image-root", photos, "--out", tmp_path / "o", "--ranks", ranks
        )
        assert_user_error(proc, fragment)


def test_conflicts_can_be_dropped_and_are_reported_with_names(photos, tmp_path, caplog):
    rows = GOOD_ROWS + [
        "p4.png,Lepidoptera,Vanessa,Vanessa cardui",
        "p5.png,Lepidoptera,Pyrameis,Vanessa cardui",
    ]
    csv = write_csv(tmp_path / "obs.csv", "image,order,genus,species\n" + "\n".join(rows))
    out = tmp_path / "out"
    args = [
        "csv",
        str(csv),
        "--image-root",
        str(photos),
        "--out",
        str(out),
        "--on-conflict",
        "drop",
        "--workers",
        "1",
    ]
    with caplog.at_level(logging.INFO, logger="linnaeus.data.build"):
        assert build_main(args) == 0
    report = json.loads((out / "build_report.json").read_text())
    assert report["taxonomy_conflicts"] == [
        {"rank": "species", "name": "Vanessa cardui", "parents": {"Vanessa": 2, "Pyrameis": 1}, "kept": "Vanessa",
         "rows_dropped": 1}
    ]  # fmt: skip
    assert report["dropped_rows"]["taxonomy_conflict"]["examples"] == [
        "line 7: Lepidoptera / Pyrameis / Vanessa cardui"
    ]
    assert read_labels(out / "labels.h5").identifiers.tolist() == [
        "p0.png",
        "p1.png",
        "p2.png",
        "p3.png",
        "p4.png",
    ]
    assert "dropped 1 rows whose parent taxon disagrees" in caplog.text


# ---------------------------------------------------------------------- what the builder drops or ignores
def _build_csv(tmp_path: Path, photos: Path, text: str, caplog, encoding: str = "utf-8") -> tuple[dict, str]:
    """Build in this process (the command line's main, without a new interpreter per case); report and log."""
    csv = write_csv(tmp_path / "obs.csv", text, encoding)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="linnaeus.data.build"):
        assert (
            build_main(["csv", str(csv), "--image-root", str(photos), "--out", str(out), "--workers", "1"])
            == 0
        )
    return json.loads((out / "build_report.json").read_text()), caplog.text


def test_invalid_coordinates_are_counted_and_left_missing(photos, tmp_path, caplog):
    text = (
        "image,species,latitude,longitude\n"
        "p0.png,a,45.5,7.25\n"  # valid
        "p1.png,a,200,10\n"  # latitude out of range
        "p2.png,b,abc,10\n"  # not a number
        "p3.png,b,inf,10\n"  # not finite
        "p4.png,c,12.5,\n"  # latitude without longitude
        "p5.png,c,,\n"  # missing: not a problem
        "p6.png,c,-33.9,181\n"  # longitude out of range
    )
    report, log = _build_csv(tmp_path, photos, text, caplog)
    coordinates = report["invalid_values"]["coordinates"]
    assert coordinates["count"] == 5
    assert coordinates["examples"][0] == "line 3: latitude 200, longitude 10 (outside ±90 / ±180 degrees)"
    assert "line 4: latitude 'abc', longitude '10' (not both numbers)" in coordinates["examples"]
    assert report["metadata_valid_rows"]["spatial"] == 1
    table = read_labels(tmp_path / "out" / "labels.h5")
    assert table.meta_valid["spatial"].tolist() == [True, False, False, False, False, False, False]
    assert "5 invalid coordinates left missing, e.g. line 3: latitude 200" in log


def test_impossible_dates_and_times_are_reported(photos, tmp_path, caplog):
    text = (
        "image,species,date\n"
        "p0.png,a,2021-06-01\n"
        "p1.png,a,2021-02-30\n"  # impossible date
        "p2.png,b,yesterday\n"  # not a date
        "p3.png,b,2021-06-01T25:10\n"  # impossible time: the date is kept
        "p4.png,c,01/06/2021\n"  # ambiguous format
        "p5.png,c,2020-02-29 14:30\n"  # a real leap day with a time
    )
    report, log = _build_csv(tmp_path, photos, text, caplog)
    assert report["invalid_values"]["dates"]["count"] == 3
    assert report["invalid_values"]["dates"]["examples"][0] == "line 3: '2021-02-30' (impossible date)"
    assert report["invalid_values"]["times"] == {
        "count": 1, "examples": ["line 5: '2021-06-01T25:10' (impossible time of day (the date is used))"]
    }  # fmt: skip
    table = read_labels(tmp_path / "out" / "labels.h5")
    assert table.meta_valid["temporal"].tolist() == [True, False, False, True, False, True]
    assert "3 invalid dates left missing" in log and "1 invalid times left missing" in log


def test_invalid_elevations_are_reported(photos, tmp_path, caplog):
    text = "image,species,elevation\np0.png,a,1200 m\np1.png,a,high\np2.png,b,20000\np3.png,b,-3,5\n"
    report, _ = _build_csv(tmp_path, photos, text.replace("-3,5", "-3"), caplog)
    assert report["invalid_values"]["elevation"]["count"] == 2
    assert report["metadata_valid_rows"]["elevation_main"] == 2  # "1200 m" and -3 are fine


def test_repeated_images_are_dropped_keeping_the_first(photos, tmp_path, caplog):
    text = (
        "image,genus,species\n"
        "p0.png,Pieris,Pieris rapae\n"
        "p1.png,Pieris,Pieris napi\n"
        "p0.png,Pieris,Pieris rapae\n"  # exact repeat
        "./p1.png,Pieris,Pieris rapae\n"  # same file, other label
        "p2.png,Vanessa,Vanessa cardui\n"
        ",Vanessa,Vanessa cardui\n"  # no image path
    )
    report, log = _build_csv(tmp_path, photos, text, caplog)
    assert report["dropped_rows"]["duplicate_image"] == {
        "count": 2,
        "examples": [
            "line 4 repeats line 2: p0.png",
            "line 5 repeats line 3: ./p1.png with different labels",
        ],
    }
    assert report["dropped_rows"]["no_image_path"] == {"count": 1, "examples": ["line 7"]}
    assert report["rows_found"] == 6 and report["rows_written"] == 3
    assert read_labels(tmp_path / "out" / "labels.h5").identifiers.tolist() == ["p0.png", "p1.png", "p2.png"]
    assert "dropped 2 rows repeating an earlier row's image (the first is kept)" in log


def test_column_aliases_are_recognised_and_the_rest_listed(photos, tmp_path, caplog):
    text = (
        "id,File Name,Order,taxon_genus_name,scientific_name,lat,lng,observed_on,altitude,notes\n"
        "1,p0.png,Lepidoptera,Pieris,Pieris rapae,45.5,7.25,2021-06-01,300,seen twice\n"
        "2,p1.png,Lepidoptera,Vanessa,Vanessa cardui,-33.9,151.2,2021-12-24,10,\n"
    )
    report, log = _build_csv(tmp_path, photos, text, caplog)
    assert report["columns"] == {
        "image": "File Name", "order": "Order", "genus": "taxon_genus_name", "species": "scientific_name",
        "latitude": "lat", "longitude": "lng", "date": "observed_on", "elevation": "altitude",
    }  # fmt: skip
    assert report["ignored_columns"] == ["id", "notes"]
    assert report["metadata_valid_rows"] == {"spatial": 2, "temporal": 2, "elevation_main": 2}
    assert read_labels(tmp_path / "out" / "labels.h5").task_keys == ["taxa_L40", "taxa_L20", "taxa_L10"]
    assert "ignored columns (no known role): id, notes" in log


@pytest.mark.parametrize(
    "encoding, expected",
    [("cp1252", "cp1252"), ("latin-1", "latin-1"), ("utf-16", "utf-16"), ("utf-8-sig", "utf-8")],
)
def test_text_encodings(photos, tmp_path, caplog, encoding, expected):
    name = "Pieris napæ" if encoding != "latin-1" else "Pieris \x81napé"  # 0x81 is undefined in cp1252
    text = f"image,genus,species\np0.png,Pieris,{name}\np1.png,Pieris,Pieris rapae\n"
    report, log = _build_csv(tmp_path, photos, text, caplog, encoding)
    assert report["encoding"] == expected
    names = read_labels(tmp_path / "out" / "labels.h5").taxonomy["name"].tolist()
    assert name in names
    if expected in ("cp1252", "latin-1"):
        assert "is not UTF-8 (byte 0x" in log and f"read it as {expected}" in log


def test_semicolons_and_decimal_commas(photos, tmp_path, caplog):
    text = "image;species;latitude;longitude\np0.png;a;45,5;7,25\np1.png;b;-12,5;100\n"
    report, _ = _build_csv(tmp_path, photos, text, caplog)
    assert report["delimiter"] == ";" and report["metadata_valid_rows"] == {"spatial": 2}
    with h5py.File(tmp_path / "out" / "labels.h5", "r") as h5:
        np.testing.assert_allclose(h5["raw_lat"][()], [45.5, -12.5])


def test_rows_with_extra_cells_are_dropped(photos, tmp_path, caplog):
    text = "image,genus,species\np0.png,Pieris,Pieris rapae\np1.png,Pieris,Pieris, napi\np2.png,Vanessa\n"
    report, log = _build_csv(tmp_path, photos, text, caplog)
    assert report["dropped_rows"]["more_cells_than_header"]["examples"] == [
        "line 3: 4 cells for 3 columns (an unquoted ',' inside a name?)"
    ]
    table = read_labels(tmp_path / "out" / "labels.h5")
    assert (
        table.identifiers.tolist() == ["p0.png", "p2.png"] and table.taxa[1, 1] == 0
    )  # short row: unknown species


def test_identical_images_are_reported(tmp_path, caplog):
    root = tmp_path / "root"
    for ident in ("G/s1/a.png", "G/s1/b.png", "G/s2/copy_of_a.png"):
        (root / ident).parent.mkdir(parents=True, exist_ok=True)
        (root / ident).write_bytes(png((9, 9)) if "b.png" not in ident else png((9, 10)))
    with caplog.at_level(logging.INFO, logger="linnaeus.data.build"):
        assert build_main(["folder", str(root), "--out", str(tmp_path / "out"), "--workers", "1"]) == 0
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["identical_images"] == {"count": 1, "examples": ["G/s2/copy_of_a.png = G/s1/a.png"]}
    assert "1 images have the same bytes as another one" in caplog.text


# ---------------------------------------------------------------------- damaged images
def test_image_that_crashes_the_decoder_is_named_not_fatal(tree, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(tree, source)
    (source / "Lep/Vanessa/cardui/crash.png").write_bytes(crashing_png())
    out = tmp_path / "out"
    proc = run_module(BUILD, "folder", source, "--out", out, "--workers", "2", timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "build_report.json").read_text())
    reason = report["bad_images"]["Lep/Vanessa/cardui/crash.png"]
    assert reason == "the image decoder crashed (killed by signal SIGSEGV) on this file; it is damaged"
    assert report["rows_written"] == 6
    strict = run_module(BUILD, "folder", source, "--out", tmp_path / "o2", "--workers", "2", "--strict")
    assert_user_error(strict, "Lep/Vanessa/cardui/crash.png", "--strict")


def test_no_readable_image_at_all(tmp_path):
    root = tmp_path / "root"
    (root / "G" / "s").mkdir(parents=True)
    (root / "G" / "s" / "a.jpg").write_bytes(b"not a jpeg")
    proc = run_module(BUILD, "folder", root, "--out", tmp_path / "out", "--workers", "1")
    assert_user_error(proc, "none of the 1 images could be read")
    assert not (tmp_path / "out" / "labels.h5").exists()


# ---------------------------------------------------------------------- a full disk
def test_disk_full_while_writing(tree, tmp_path, tiny_disk):
    """The output on a 1 MB file system: one line with the path and the free space, nothing left behind."""
    big = tmp_path / "big"
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    from PIL import Image

    for i in range(12):  # ~1.4 MB of incompressible PNGs
        path = big / "G" / f"s{i % 3}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(noise, i, axis=0)).save(path)
    out = tiny_disk / "ds"
    proc = run_module(BUILD, "folder", big, "--out", out, "--workers", "1")
    line = assert_user_error(proc, "no space left on the device", "free there", f"{out} was not changed")
    assert str(out) in line
    assert sorted(os.listdir(tiny_disk)) == []
