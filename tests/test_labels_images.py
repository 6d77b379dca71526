import h5py
import numpy as np
import pytest
import torch

from linnaeus.data.check import apply_bad_image_policy, find_bad_images
from linnaeus.data.images import BadImageError, FolderImageStore, H5ImageStore, open_image_store
from linnaeus.data.labels import DatasetError, read_labels
from tests.conftest import png_bytes, write_h5_dataset

TAXA = {"taxa_L20": [1, 1, 2], "taxa_L10": [10, 11, 20]}


def test_reads_ranks_coarse_to_fine_and_metadata_validity(tmp_path):
    spatial = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1]], dtype=np.float32)  # row 0 is lat 0 / lon 0: real
    write_h5_dataset(tmp_path, TAXA, spatial=spatial)
    table = read_labels(tmp_path / "labels.h5")
    assert table.task_keys == ["taxa_L20", "taxa_L10"]
    assert table.taxa.tolist() == [[1, 10], [1, 11], [2, 20]]
    # without a validity group an all-zero row is missing, (1, 0, 0) is a real place
    assert table.meta_valid["spatial"].tolist() == [True, False, True]
    assert table.meta_dims == {"spatial": 3}


def test_explicit_validity_wins_and_invalid_rows_are_zeroed(tmp_path):
    spatial = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    write_h5_dataset(tmp_path, TAXA, spatial=spatial, validity={"spatial": np.array([True, False, True])})
    table = read_labels(tmp_path / "labels.h5")
    assert table.meta_valid["spatial"].tolist() == [True, False, True]
    assert table.meta["spatial"][1].tolist() == [0, 0, 0]


def test_task_key_and_component_selection(tmp_path):
    write_h5_dataset(tmp_path, TAXA, spatial=np.ones((3, 3)))
    table = read_labels(tmp_path / "labels.h5", task_keys=["taxa_L10"], meta_components=[])
    assert table.task_keys == ["taxa_L10"] and table.meta == {}
    with pytest.raises(
        DatasetError, match=r"asks for \['taxa_L30'\].*available ranks: \['taxa_L20', 'taxa_L10'\]"
    ):
        read_labels(tmp_path / "labels.h5", task_keys=["taxa_L30"])


def test_missing_file_names_path_and_builder(tmp_path):
    with pytest.raises(DatasetError, match=r"labels file not found: .*nope.h5.*linnaeus.data.build"):
        read_labels(tmp_path / "nope.h5")


def test_not_hdf5(tmp_path):
    (tmp_path / "labels.h5").write_text("hello")
    with pytest.raises(DatasetError, match="not a readable HDF5 file"):
        read_labels(tmp_path / "labels.h5")


def test_missing_identifiers_and_ranks(tmp_path):
    with h5py.File(tmp_path / "labels.h5", "w") as h5:
        h5["taxa_L10"] = np.array([1, 2], dtype=np.uint32)
    with pytest.raises(DatasetError, match="'img_identifiers' is missing"):
        read_labels(tmp_path / "labels.h5")
    with h5py.File(tmp_path / "labels.h5", "w") as h5:
        h5.create_dataset(
            "img_identifiers", data=np.array(["a", "b"], dtype=object), dtype=h5py.string_dtype()
        )
    with pytest.raises(DatasetError, match="no taxa_L<level> datasets"):
        read_labels(tmp_path / "labels.h5")


def test_length_mismatch_and_misshaped_datasets(tmp_path):
    write_h5_dataset(tmp_path, TAXA)
    with h5py.File(tmp_path / "labels.h5", "a") as h5:
        del h5["taxa_L10"]
        h5["taxa_L10"] = np.array([1, 2], dtype=np.uint32)
    with pytest.raises(DatasetError, match=r"'taxa_L10' has 2 rows but 'img_identifiers' has 3"):
        read_labels(tmp_path / "labels.h5")
    write_h5_dataset(tmp_path, TAXA)
    with h5py.File(tmp_path / "labels.h5", "a") as h5:
        h5["spatial"] = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(DatasetError, match=r"'spatial' has 2 columns; expected one of \(3,\)"):
        read_labels(tmp_path / "labels.h5")
    write_h5_dataset(tmp_path, TAXA)
    with h5py.File(tmp_path / "labels.h5", "a") as h5:
        h5["temporal"] = np.zeros((3,), dtype=np.float32)
    with pytest.raises(DatasetError, match=r"metadata 'temporal' has shape \(3,\); expected \(3, D\)"):
        read_labels(tmp_path / "labels.h5")


def test_h5_store_decodes_and_matches_by_identifier(tmp_path):
    write_h5_dataset(
        tmp_path, TAXA, images=[png_bytes((255, 0, 0)), png_bytes((0, 255, 0)), png_bytes((0, 0, 255))]
    )
    store = H5ImageStore(tmp_path / "images.h5")
    rows, missing = store.rows_for(np.array(["img_0002.png", "img_0000.png", "other.png"], dtype=object))
    assert rows.tolist() == [2, 0, -1] and missing.tolist() == [False, False, True]
    image = store.read(2, "img_0002.png")
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert image[:, 0, 0].tolist() == [0, 0, 255]


def test_decoded_array_images_load(tmp_path):
    arrays = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    arrays[1, ..., 1] = 200
    with h5py.File(tmp_path / "images.h5", "w") as h5:
        h5["images"] = arrays
    store = H5ImageStore(tmp_path / "images.h5")
    assert store.read(1, "x")[:, 3, 3].tolist() == [0, 200, 0]
    with pytest.raises(DatasetError, match="has 2 images but the labels file has 3 rows"):
        store.rows_for(np.array(["a", "b", "c"], dtype=object))


def test_misshaped_images_dataset(tmp_path):
    with h5py.File(tmp_path / "images.h5", "w") as h5:
        h5["images"] = np.zeros((2, 8, 8), dtype=np.uint8)
    with pytest.raises(DatasetError, match=r"'images' has shape \(2, 8, 8\).*expected"):
        H5ImageStore(tmp_path / "images.h5")


def test_corrupt_and_missing_images_are_named(tmp_path):
    write_h5_dataset(
        tmp_path, TAXA, images=[png_bytes((1, 2, 3)), b"not an image at all", png_bytes((4, 5, 6))]
    )
    store = open_image_store(tmp_path / "images.h5")
    with pytest.raises(BadImageError, match=r"image 'img_0001.png' \(row 1 of .*images.h5\): cannot decode"):
        store.read(1, "img_0001.png")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes((9, 9, 9)))
    fstore = FolderImageStore(folder, extension="png")
    assert fstore.read(0, "a")[:, 0, 0].tolist() == [9, 9, 9]  # extension appended
    with pytest.raises(BadImageError, match=r"image 'b': cannot read .*b.png"):
        fstore.read(0, "b")


def test_startup_check_finds_bad_images_and_applies_policy(tmp_path):
    images = [png_bytes((i, i, i)) for i in range(100)]
    images[7] = b"garbage"
    taxa = {"taxa_L10": list(range(1, 101))}
    write_h5_dataset(tmp_path, taxa, images=images)
    store = H5ImageStore(tmp_path / "images.h5")
    ids = read_labels(tmp_path / "labels.h5").identifiers
    ids[50] = "absent.png"
    rows, missing = store.rows_for(ids)
    bad = find_bad_images(store, ids, rows, missing, workers=2)  # parallel path (>= 64 images)
    assert sorted(bad) == [7, 50]
    assert "no entry" in bad[50] and "cannot decode" in bad[7]
    report = tmp_path / "report.json"
    with pytest.raises(
        DatasetError, match=r"(?s)2 of 100 images are missing or undecodable.*data.bad_images=drop"
    ):
        apply_bad_image_policy(bad, ids, policy="error", max_count=10, max_fraction=0.1, report_path=report)
    assert '"bad": 2' in report.read_text()
    keep = apply_bad_image_policy(bad, ids, policy="drop", max_count=10, max_fraction=0.1)
    assert keep.sum() == 98 and not keep[7] and not keep[50]
    with pytest.raises(DatasetError, match="above the limits"):
        apply_bad_image_policy(bad, ids, policy="drop", max_count=1, max_fraction=0.1)
