"""images.h5 layouts (contiguous, vlen, decoded arrays), the converter, decoding and per-worker opening."""

from __future__ import annotations

import io
import os

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from linnaeus.data.build import main as build_main
from linnaeus.data.convert import main as convert_main
from linnaeus.data.images import H5ImageStore, decode_bytes, jpeg_size
from linnaeus.data.labels import DatasetError
from linnaeus.data.writer import write_images_h5


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB picture with some noise (compresses like a photo, not like a flat colour)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    a, b, c = rng.uniform(1, 8, 3)
    base = np.stack([np.sin(a * xx + b * yy + c + k) for k in range(3)], -1) * 90 + 128
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files() -> tuple[list[str], list[bytes]]:
    """Nine encoded images of mixed formats and sizes, with their identifiers."""
    data = []
    for i in range(9):
        array = photo(20 + 3 * i, 30 - i, seed=i)
        fmt = ["PNG", "JPEG", "WEBP"][i % 3]
        data.append(encode(array, fmt, **({"quality": 90} if fmt != "PNG" else {})))
    return [f"img_{i}.{['png', 'jpg', 'webp'][i % 3]}" for i in range(9)], data


def write_vlen_raw(path, identifiers, data) -> None:
    """The variable-length layout, written with plain h5py as earlier versions and other tools do."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset(
            "img_identifiers", data=np.array(identifiers, dtype=object), dtype=h5py.string_dtype()
        )
        ds = h5.create_dataset("images", (len(data),), dtype=h5py.vlen_dtype(np.uint8))
        for i, d in enumerate(data):
            ds[i] = np.frombuffer(d, dtype=np.uint8)


def test_contiguous_layout_round_trips_every_row_like_vlen(tmp_path, files):
    identifiers, data = files
    write_images_h5(tmp_path / "contiguous.h5", identifiers, iter(data))  # a generator: spooled
    write_images_h5(tmp_path / "vlen.h5", identifiers, data, layout="vlen")
    with h5py.File(tmp_path / "contiguous.h5", "r") as h5:
        images, offsets = h5["images"], h5["offsets"][()]
        assert images.dtype == np.uint8 and images.ndim == 1
        assert images.chunks is None and images.compression is None  # one contiguous block
        assert images.id.get_offset() is not None
        assert (
            offsets.dtype == np.int64 and offsets.tolist() == np.cumsum([0] + [len(d) for d in data]).tolist()
        )
        assert [v.decode() for v in h5["img_identifiers"][()]] == identifiers
        assert images[()].tobytes() == b"".join(data)
    contiguous, vlen = H5ImageStore(tmp_path / "contiguous.h5"), H5ImageStore(tmp_path / "vlen.h5")
    assert (contiguous.layout, vlen.layout) == ("contiguous", "vlen")
    assert contiguous.identifiers == vlen.identifiers == identifiers
    for row in range(len(data)):
        assert contiguous.read_encoded(row).tobytes() == vlen.read_encoded(row).tobytes() == data[row]
        view = contiguous.read_encoded(row)
        assert not view.flags.owndata  # a slice of the memory map, no copy
        assert torch.equal(contiguous.read(row, identifiers[row]), vlen.read(row, identifiers[row]))
    # the map is private (copy-on-write): a consumer writing into a slice never changes the file
    view = contiguous.read_encoded(0)
    view[:] = 0
    assert H5ImageStore(tmp_path / "contiguous.h5").read_encoded(0).tobytes() == data[0]
    with h5py.File(tmp_path / "contiguous.h5", "r") as h5:
        assert h5["images"][()].tobytes() == b"".join(data)


def test_vlen_and_decoded_array_files_load_and_decode_identically(tmp_path, files):
    identifiers, data = files
    same_size = [encode(photo(24, 32, seed=i), "PNG") for i in range(4)]
    write_vlen_raw(tmp_path / "vlen.h5", identifiers[:4], same_size)
    write_images_h5(tmp_path / "contiguous.h5", identifiers[:4], same_size)
    with h5py.File(tmp_path / "decoded.h5", "w") as h5:  # the predecessor's (N, H, W, 3) arrays
        h5["images"] = np.stack([np.asarray(Image.open(io.BytesIO(d)).convert("RGB")) for d in same_size])
    stores = [H5ImageStore(tmp_path / f"{name}.h5") for name in ("vlen", "contiguous", "decoded")]
    assert [s.layout for s in stores] == ["vlen", "contiguous", "decoded"]
    assert [s.encoded for s in stores] == [True, True, False]
    for row in range(4):
        images = [s.read(row, identifiers[row]) for s in stores]
        assert images[0].shape == (3, 24, 32) and images[0].dtype == torch.uint8
        assert torch.equal(images[0], images[1]) and torch.equal(images[0], images[2])


def test_damaged_offsets_are_reported(tmp_path, files):
    identifiers, data = files
    write_images_h5(tmp_path / "images.h5", identifiers, data)
    with h5py.File(tmp_path / "images.h5", "a") as h5:
        offsets = h5["offsets"][()]
        offsets[3] = offsets[5] + 1  # not monotonic
        h5["offsets"][...] = offsets
    with pytest.raises(DatasetError, match="'offsets' must be .* non-decreasing.*damaged"):
        H5ImageStore(tmp_path / "images.h5")


def test_chunked_copy_of_the_layout_reads_through_hdf5(tmp_path, files):
    """A file repacked with chunks/compression (e.g. by h5repack) still loads, through HDF5."""
    identifiers, data = files
    blob = np.frombuffer(b"".join(data), dtype=np.uint8)
    with h5py.File(tmp_path / "images.h5", "w") as h5:
        h5.create_dataset("images", data=blob, chunks=(1024,), compression="gzip")
        h5["offsets"] = np.cumsum([0] + [len(d) for d in data]).astype(np.int64)
    store = H5ImageStore(tmp_path / "images.h5")
    assert store.layout == "contiguous" and store._byte_offset is None
    assert [store.read_encoded(r).tobytes() for r in range(len(data))] == data


def tree_of(root, arrays: dict[str, np.ndarray]) -> None:
    for ident, array in arrays.items():
        path = root / ident
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, quality=90)


def test_converter_output_equals_builder_output(tmp_path):
    arrays = {
        f"Order{o}/Genus{o}{g}/species{g}/{n}.{'jpg' if n % 2 else 'png'}": photo(
            18 + n, 22, seed=o * 10 + g * 3 + n
        )
        for o in range(2)
        for g in range(2)
        for n in range(3)
    }
    tree_of(tmp_path / "tree", arrays)
    assert (
        build_main(["folder", str(tmp_path / "tree"), "--out", str(tmp_path / "built"), "--workers", "1"])
        == 0
    )
    built = H5ImageStore(tmp_path / "built" / "images.h5")
    assert built.layout == "contiguous" and built.num_rows == 12
    # the same files in the variable-length layout, as an earlier build wrote them
    old = tmp_path / "old_images.h5"
    write_vlen_raw(old, built.identifiers, [(tmp_path / "tree" / i).read_bytes() for i in built.identifiers])
    assert convert_main([str(old), str(tmp_path / "new_images.h5")]) == 0
    with (
        h5py.File(tmp_path / "built" / "images.h5", "r") as a,
        h5py.File(tmp_path / "new_images.h5", "r") as b,
    ):
        assert sorted(a) == sorted(b) == ["images", "img_identifiers", "offsets"]
        for key in ("images", "img_identifiers", "offsets"):
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
            np.testing.assert_array_equal(a[key][()], b[key][()])
        assert b["images"].chunks is None and b["images"].compression is None
    # and back to vlen, row for row
    assert convert_main([str(tmp_path / "new_images.h5"), str(tmp_path / "back.h5"), "--layout", "vlen"]) == 0
    back = H5ImageStore(tmp_path / "back.h5")
    assert back.layout == "vlen"
    assert [back.read_encoded(r).tobytes() for r in range(12)] == [
        built.read_encoded(r).tobytes() for r in range(12)
    ]


def test_converter_encodes_decoded_arrays_losslessly(tmp_path, capsys):
    arrays = np.stack([photo(12, 16, seed=s) for s in range(3)])
    with h5py.File(tmp_path / "decoded.h5", "w") as h5:
        h5["images"] = arrays
    assert convert_main([str(tmp_path / "decoded.h5"), str(tmp_path / "new.h5")]) == 0
    new = H5ImageStore(tmp_path / "new.h5")
    assert new.layout == "contiguous" and new.identifiers is None and new.num_rows == 3
    for row in range(3):
        assert torch.equal(new.read(row, str(row)), torch.from_numpy(arrays[row]).permute(2, 0, 1))
    assert convert_main([str(tmp_path / "new.h5"), str(tmp_path / "new.h5")]) == 1
    assert "must be another file" in capsys.readouterr().err


def test_jpeg_size_and_dct_downscaled_decode():
    array = photo(384, 512, seed=4)
    baseline = encode(array, "JPEG", quality=90)
    progressive = encode(array, "JPEG", quality=90, progressive=True)
    exif = Image.Exif()
    exif[0x010E] = "x" * 3000  # a large APP1 segment before the frame header
    with_exif = encode(array, "JPEG", quality=90, exif=exif.tobytes())
    for data in (baseline, progressive, with_exif):
        assert jpeg_size(data) == (512, 384)
    assert jpeg_size(encode(array, "PNG")) is None
    full = decode_bytes(baseline)
    assert full.shape == (3, 384, 512)
    assert torch.equal(decode_bytes(baseline, min_side=200), full)  # 384 < 2 x 200: full size
    half = decode_bytes(baseline, min_side=150)  # DCT scale 1/2 keeps the short side >= 150
    quarter = decode_bytes(np.frombuffer(baseline, np.uint8), min_side=96)
    assert half.shape == (3, 192, 256) and quarter.shape == (3, 96, 128)
    assert half.dtype == quarter.dtype == torch.uint8
    for scaled, side in ((half, 150), (quarter, 96)):  # the pixels PIL's draft mode decodes
        with Image.open(io.BytesIO(baseline)) as img:
            img.draft("RGB", (side, side))
            assert torch.equal(scaled, torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))
    # the same picture: close to the full decode averaged over 2 x 2 pixels
    pooled = torch.nn.functional.avg_pool2d(full.float()[None], 2)[0]
    assert (half.float() - pooled).abs().mean() < 3.0
    png = encode(array, "PNG")
    assert decode_bytes(png, min_side=50).shape == (3, 384, 512)  # only JPEGs are downscaled


@pytest.mark.parametrize("subsampling", [0, 1, 2])
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("shape", [(120, 97), (33, 200), (7, 5)])
def test_jpeg_decoding_gives_torchvisions_pixels(subsampling, progressive, shape):
    """JPEGs go through simplejpeg for speed; every chroma subsampling, progressive or not, odd sizes
    and grayscale decode to exactly the pixels torchvision's decode_image gives (as the loader used
    to), as writable uint8 tensors from bytes, NumPy views and tensors alike; CMYK ends as RGB."""
    from torchvision.io import ImageReadMode, decode_image

    array = photo(*shape, seed=subsampling + 3 * progressive)
    for data in (
        encode(array, "JPEG", quality=90, subsampling=subsampling, progressive=progressive),
        encode(array[..., 1], "JPEG", quality=80, progressive=progressive),  # grayscale
    ):
        expected = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        for given in (
            data,
            np.frombuffer(data, np.uint8),
            torch.frombuffer(bytearray(data), dtype=torch.uint8),
        ):
            got = decode_bytes(given)
            assert got.dtype == torch.uint8 and got.shape == (3, *shape) and torch.equal(got, expected)
    buffer = io.BytesIO()
    Image.fromarray(array).convert("CMYK").save(buffer, format="JPEG", quality=95)
    got = decode_bytes(buffer.getvalue())
    assert (
        got.shape == (3, *shape) and (got.float() - torch.from_numpy(array).permute(2, 0, 1)).abs().mean() < 6
    )


def test_a_jpeg_of_the_rows_size_decodes_straight_into_the_row():
    """Given the batch row it goes to (``out``: channels-last memory), a JPEG that decodes to exactly
    the row's size, at full size or DCT-downscaled, is decoded into the row and the row comes back,
    with the pixels of a plain decode; anything else (another size, PNG, CMYK, a planar row) comes
    back in memory of its own, with the same pixels as without ``out``, and no other row is touched.
    A CMYK JPEG has the pixels of a plain decode either way."""
    batch = torch.full((3, 3, 48, 40), 7, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    row = batch[1]
    array = photo(48, 40, seed=11)
    direct = [
        (encode(array, "JPEG", quality=90, subsampling=s, progressive=p), None)
        for s in (0, 1, 2)
        for p in (False, True)
    ]
    direct.append((encode(array[..., 0], "JPEG", quality=85), None))  # grayscale ends as RGB
    direct.append((encode(photo(96, 80, seed=12), "JPEG", quality=90), 40))  # 1/2 DCT scale: 48 x 40
    direct.append((encode(photo(95, 79, seed=15), "JPEG", quality=90), 20))  # 1/2, rounded up: 48 x 40
    direct.append((encode(photo(192, 160, seed=13), "JPEG", quality=90), 40))  # 1/4: 48 x 40
    for data, min_side in direct:
        expected = decode_bytes(data, min_side)
        row.fill_(0)
        got = decode_bytes(data, min_side, out=row)
        assert expected.shape == row.shape and got is row and torch.equal(got, expected)
    cmyk = io.BytesIO()
    Image.fromarray(array).convert("CMYK").save(cmyk, format="JPEG", quality=95)
    planar = torch.zeros(3, 48, 40, dtype=torch.uint8)
    square = photo(40, 40, seed=16)
    square_row = torch.zeros(1, 3, 40, 40, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)[0]
    others = [
        (encode(photo(50, 40, seed=14), "JPEG", quality=90), None, row),  # another size
        (encode(array, "PNG"), None, row),
        (encode(array, "JPEG", quality=90), None, planar),  # (3, H, W) memory: no decoder writes that
        (encode(array, "JPEG", quality=90), None, batch[1, :2]),  # not 3 channels
        (encode(array, "JPEG", quality=90), None, batch[1].float()),  # not uint8
        (encode(array, "JPEG", quality=90), None, batch[1, 0]),  # not 3-D
        (encode(array, "JPEG", quality=90), None, torch.zeros(48, 40, 3, dtype=torch.uint8)),  # (H, W, 3)
        (encode(square, "JPEG", quality=90), None, square_row.transpose(1, 2)),  # rows and columns swapped
    ]
    for data, min_side, out in others:
        got = decode_bytes(data, min_side, out=out)
        assert got.data_ptr() != out.data_ptr() and torch.equal(got, decode_bytes(data, min_side))
    assert torch.equal(decode_bytes(cmyk.getvalue(), out=row), decode_bytes(cmyk.getvalue()))
    assert (batch[0] == 7).all() and (batch[2] == 7).all()


class WorkerProbe(Dataset):
    """Reads through a store and reports which process opened it."""

    def __init__(self, store: H5ImageStore) -> None:
        self.store = store

    def __len__(self) -> int:
        return self.store.num_rows

    def __getitem__(self, row: int):
        image = self.store.read(row, str(row))
        opened_here = self.store._pid == os.getpid() and self.store._bytes is not None
        return image.float().mean(), os.getpid(), opened_here


def test_each_worker_opens_its_own_memory_map(tmp_path):
    data = [encode(photo(16, 16, seed=i), "PNG") for i in range(16)]
    write_images_h5(tmp_path / "images.h5", [f"{i}.png" for i in range(16)], data)
    store = H5ImageStore(tmp_path / "images.h5")
    loader = DataLoader(WorkerProbe(store), batch_size=2, num_workers=2, multiprocessing_context="fork")
    means, pids, opened = [], set(), []
    for mean, pid, here in loader:
        means += mean.tolist()
        pids.update(pid.tolist())
        opened += here.tolist()
    assert store._pid == -1 and store._bytes is None  # never opened in the main process
    assert len(pids) == 2 and os.getpid() not in pids and all(opened)
    expected = [decode_bytes(d).float().mean().item() for d in data]
    assert means == pytest.approx(expected)
