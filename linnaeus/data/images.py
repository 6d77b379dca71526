"""Image sources: ``images.h5`` or a folder of files (hybrid mode), and decoding to uint8.

``images.h5`` has one of three layouts, told apart by its datasets (README, "Build a dataset"):

- ``contiguous`` (what the builder writes): ``images`` (total_bytes,) uint8, stored contiguously
  (no chunks, no compression), holding the encoded files back to back, and ``offsets`` (N + 1,) int64;
  row i is ``images[offsets[i]:offsets[i + 1]]``. Each process memory-maps the file (``mmap``) at the
  dataset's byte offset in the file, so reading an image is a slice of memory, with no HDF5 call;
- ``vlen``: ``images`` (N,) variable-length uint8, one encoded file per row (earlier files);
- ``decoded``: ``images`` (N, H, W, 3) uint8 RGB arrays (the predecessor's files).

Stores open their files lazily, on first read in the process that reads (each DataLoader worker
gets its own HDF5 handle and memory map; neither is ever shared across a fork).
"""

from __future__ import annotations

import copy
import io
import mmap
import os
from pathlib import Path

import h5py
import numpy as np
import simplejpeg
import torch
from PIL import Image
from torchvision.io import ImageReadMode

from linnaeus.data.labels import BUILD_HINT, DatasetError
from linnaeus.errors import UserError

# JPEG frame headers (SOF0-SOF15 except DHT, JPG and DAC), where the image size is written
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class BadImageError(UserError, RuntimeError):
    """An image is missing or cannot be decoded."""


JPEG_START = b"\xff\xd8\xff"  # start-of-image marker and the first byte of the next marker


def is_jpeg(data: bytes | np.ndarray | torch.Tensor) -> bool:
    if isinstance(data, np.ndarray):
        return data[:3].tobytes() == JPEG_START
    if isinstance(data, torch.Tensor):
        return bytes(data[:3].tolist()) == JPEG_START
    return bytes(data[:3]) == JPEG_START


def jpeg_size(data) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header without decoding it; None when there is none."""
    view = memoryview(data.numpy() if isinstance(data, torch.Tensor) else data).cast("B")
    n, pos = len(view), 2
    while pos + 4 <= n:
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if marker in _SOF_MARKERS:
            if pos + 9 > n:
                return None
            height = view[pos + 5] << 8 | view[pos + 6]
            width = view[pos + 7] << 8 | view[pos + 8]
            return width, height
        if marker == 0xDA:  # scan data before any frame header
            return None
        pos += 2 + (view[pos + 2] << 8 | view[pos + 3])
    return None


def map_file(path: str | Path, offset: int, length: int, private: bool = False) -> np.ndarray:
    """``length`` bytes of a file from ``offset``, memory-mapped, as a plain (length,) uint8 array
    (slicing a plain array costs less than slicing ``np.memmap``, a Python subclass).

    Read-only, or with ``private`` copy-on-write: writable in this process and never written back,
    so its slices become tensors without a copy (the file is only ever read).
    """
    if length == 0:
        return np.zeros(0, dtype=np.uint8)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets are page-aligned
    access = mmap.ACCESS_COPY if private else mmap.ACCESS_READ
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), offset - start + length, offset=start, access=access)
    return np.frombuffer(mapped, dtype=np.uint8, count=length, offset=offset - start)


def _decode_full(data: torch.Tensor) -> torch.Tensor:
    # the op behind torchvision.io.decode_image, without that wrapper's per-call deprecation warning
    # and usage logging (about as long as decoding a 28 px PNG)
    return torch.ops.image.decode_image(data, ImageReadMode.RGB.value, False)


def _as_tensor(data: bytes | np.ndarray | torch.Tensor) -> torch.Tensor:
    """A (L,) uint8 CPU tensor over the bytes (no copy when they are writable already)."""
    if isinstance(data, torch.Tensor):
        return data
    array = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else np.asarray(data)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array.reshape(-1))


def _decode_pil(data: bytes | np.ndarray | torch.Tensor) -> torch.Tensor:
    buffer = data.numpy() if isinstance(data, torch.Tensor) else data
    with Image.open(io.BytesIO(memoryview(buffer).cast("B"))) as img:
        img = img.convert("RGB")  # grayscale, palette, alpha and CMYK all end as RGB
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


def _dct_scale(size: tuple[int, int] | None, min_side: int | None) -> tuple[int, tuple[int, int] | None]:
    """(factor, (height, width) at that factor) for a JPEG of ``size`` (width, height): the smallest
    DCT scale (1/2, 1/4 or 1/8) that keeps the short side >= ``min_side``, else 1."""
    factor = 1
    while min_side and size is not None and factor < 8 and min(size) >= 2 * factor * min_side:
        factor *= 2
    return factor, None if size is None else (-(-size[1] // factor), -(-size[0] // factor))


def _simplejpeg_decode(buffer, factor: int, scaled, into: np.ndarray | None) -> np.ndarray:
    if factor == 1:
        return simplejpeg.decode_jpeg(buffer, "RGB", buffer=into)
    # exactly that factor: the least output that still has ceil(side / factor) pixels
    return simplejpeg.decode_jpeg(
        buffer, "RGB", min_factor=factor, min_height=scaled[0], min_width=scaled[1], buffer=into
    )


def _decode_jpeg(
    data: bytes | np.ndarray | torch.Tensor, min_side: int | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A JPEG through simplejpeg (libjpeg-turbo, straight into one array): a (3, H, W) view over
    (H, W, 3) pixels, as torchvision returns them, decoded at the smallest DCT scale (1/2, 1/4 or 1/8)
    that keeps the short side >= ``min_side``; into ``out`` itself when it can hold exactly that
    (``writable_pixels``)."""
    buffer = data.numpy() if isinstance(data, torch.Tensor) else data
    target = writable_pixels(out)
    factor, scaled = _dct_scale(jpeg_size(buffer) if min_side or target is not None else None, min_side)
    into = target if target is not None and scaled == target.shape[:2] else None
    pixels = _simplejpeg_decode(buffer, factor, scaled, into)
    if into is None:
        return torch.from_numpy(pixels).permute(2, 0, 1)
    if pixels.shape == into.shape:
        return out
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # not the size foreseen: off ``out``


def writable_pixels(out: torch.Tensor | None) -> np.ndarray | None:
    """The (H, W, 3) uint8 array a decoder can write ``out``'s pixels into: ``out`` must be a (3, H, W)
    uint8 CPU tensor over contiguous (H, W, 3) memory (a row of a channels-last batch); else None."""
    if out is None:
        return None
    try:  # cheaper than asking the tensor: this runs once per image
        pixels = out.numpy().transpose(1, 2, 0)
    except (TypeError, RuntimeError, ValueError):  # not on the CPU, needs grad, not 3-D
        return None
    if pixels.dtype != np.uint8 or pixels.shape[2] != 3 or not pixels.flags.c_contiguous:
        return None
    return pixels


def decode_bytes(
    data: bytes | np.ndarray | torch.Tensor, min_side: int | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Encoded image bytes -> (3, H, W) uint8 RGB tensor (grayscale, alpha, CMYK converted).

    ``out``: where the caller will put the pixels (a row of a channels-last batch). A JPEG that decodes
    to exactly its size is decoded into it, saving an allocation and a copy, and ``out`` itself comes
    back; any other image comes back in memory of its own (and ``out`` may have been written to).

    ``min_side``: the shortest side the caller's first resize or crop needs. A JPEG whose short side
    is at least twice that is decoded at a reduced DCT scale that still keeps the short side >=
    ``min_side``. JPEGs are decoded by libjpeg-turbo through simplejpeg (about 10 % faster than
    torchvision at full size and 20 % faster than PIL's ``draft`` when downscaling, the same pixels:
    docs/BENCHMARKS.md); other formats by torchvision (libpng, libwebp), which is about twice as fast
    as PIL, and CMYK JPEGs; what none of them can read (some TIFF/BMP) by PIL.
    """
    try:
        if is_jpeg(data):
            try:
                return _decode_jpeg(data, min_side, out)
            except ValueError:
                pass  # a JPEG simplejpeg cannot convert to RGB (CMYK): torchvision, at full size
        return _decode_full(_as_tensor(data))
    except (RuntimeError, ValueError, OSError):
        pass  # formats the fast decoders cannot read: PIL at full size
    try:
        return _decode_pil(data)
    except Exception as err:  # PIL raises many exception types for damaged files
        raise BadImageError(f"cannot decode image ({type(err).__name__}: {err})") from err


class _SizedReads:
    """``min_side`` for a store's decodes, settable per dataset with ``with_min_side``; ``read`` takes
    the batch row the image goes to (``out``, see ``decode_bytes``). A store without
    ``decodes_into_rows`` is called as ``read(row, identifier)``."""

    min_side: int | None = None
    decodes_into_rows = True

    def with_min_side(self, min_side: int | None):
        """This store, decoding JPEGs for consumers that need a short side of ``min_side`` (shares the file)."""
        view = copy.copy(self)
        view.min_side = min_side
        view._reset()
        return view

    def _reset(self) -> None:
        pass


class H5ImageStore(_SizedReads):
    """``images.h5`` in any of the three layouts (module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(
                f"images file not found: {self.path}. Set data.images to an images.h5 file or a folder. {BUILD_HINT}"
            )
        self.offsets: np.ndarray | None = None
        self._byte_offset: int | None = None  # where the contiguous bytes start in the file
        try:
            with h5py.File(self.path, "r") as h5:
                if "images" not in h5:
                    raise DatasetError(f"{self.path}: required dataset 'images' is missing. {BUILD_HINT}")
                images = h5["images"]
                self.layout = self._layout_of(images, h5)
                if self.layout == "contiguous":
                    self.offsets = self._read_offsets(h5, images)
                    self.num_rows = len(self.offsets) - 1
                    if images.chunks is None and images.compression is None and images.shape[0] > 0:
                        self._byte_offset = images.id.get_offset()
                else:
                    self.num_rows = images.shape[0]
                self.identifiers = None
                if "img_identifiers" in h5:
                    ids = h5["img_identifiers"][()]
                    self.identifiers = [v.decode() if isinstance(v, bytes) else str(v) for v in ids]
                    if len(self.identifiers) != self.num_rows:
                        raise DatasetError(
                            f"{self.path}: 'img_identifiers' has {len(self.identifiers)} rows but 'images' has "
                            f"{self.num_rows}; rebuild the file"
                        )
        except OSError as err:
            raise DatasetError(
                f"{self.path} is not a readable HDF5 file ({err}). Rebuild it. {BUILD_HINT}"
            ) from err
        self._reset()

    def _layout_of(self, images: h5py.Dataset, h5: h5py.File) -> str:
        if images.dtype.kind == "O":
            return "vlen"
        if images.ndim == 1 and images.dtype == np.uint8 and "offsets" in h5:
            return "contiguous"
        if images.ndim == 4 and images.shape[-1] == 3 and images.dtype == np.uint8:
            return "decoded"
        raise DatasetError(
            f"{self.path}: 'images' has shape {images.shape} and dtype {images.dtype}; expected (B,) uint8 "
            "with an 'offsets' dataset (encoded files back to back), (N,) variable-length uint8 (encoded "
            "files) or (N, H, W, 3) uint8 (decoded RGB)"
        )

    def _read_offsets(self, h5: h5py.File, images: h5py.Dataset) -> np.ndarray:
        offsets = h5["offsets"][()].astype(np.int64)
        if (
            offsets.ndim != 1
            or len(offsets) == 0
            or offsets[0] != 0
            or offsets[-1] != images.shape[0]
            or (np.diff(offsets) < 0).any()
        ):
            raise DatasetError(
                f"{self.path}: 'offsets' must be (N + 1,) non-decreasing from 0 to the {images.shape[0]} bytes "
                f"of 'images'; the file is damaged, rebuild it. {BUILD_HINT}"
            )
        return offsets

    @property
    def encoded(self) -> bool:
        """Whether rows are encoded files (False: decoded arrays)."""
        return self.layout != "decoded"

    def _reset(self) -> None:
        self._h5: h5py.File | None = None
        self._bytes: np.ndarray | None = None
        self._pid = -1

    def _open(self) -> None:
        if self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            if self._byte_offset is not None:
                self._bytes = map_file(self.path, self._byte_offset, int(self.offsets[-1]), private=True)
            self._pid = os.getpid()

    def rows_for(self, identifiers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row of each label identifier in this file, and a mask of identifiers that have no row."""
        if self.identifiers is None:
            if len(identifiers) != self.num_rows:
                raise DatasetError(
                    f"{self.path} has {self.num_rows} images but the labels file has {len(identifiers)} rows, "
                    "and there is no 'img_identifiers' dataset to match them by name; rebuild the images file"
                )
            return np.arange(len(identifiers)), np.zeros(len(identifiers), dtype=bool)
        index = {name: i for i, name in enumerate(self.identifiers)}
        rows = np.array([index.get(name, -1) for name in identifiers], dtype=np.int64)
        return rows, rows < 0

    def read_encoded(self, row: int, identifier: str = "") -> np.ndarray:
        """The encoded file bytes of ``row``, (L,) uint8 (a view into the memory map when contiguous)."""
        self._open()
        if self.layout == "contiguous":
            start, end = int(self.offsets[row]), int(self.offsets[row + 1])
            if self._bytes is not None:
                return self._bytes[start:end]
            return self._h5["images"][start:end]  # chunked or compressed copy of the layout: via HDF5
        if self.layout == "vlen":
            return self._h5["images"][row]
        raise TypeError(f"{self.path} holds decoded arrays, not encoded files")

    def read(self, row: int, identifier: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Row ``row``'s (3, H, W) uint8 pixels (``out``: as for ``decode_bytes``)."""
        if self.layout == "decoded":
            self._open()
            data = self._h5["images"][row]
            return torch.from_numpy(np.ascontiguousarray(data)).permute(2, 0, 1).contiguous()
        data = self.read_encoded(row, identifier)
        if len(data) == 0:
            raise BadImageError(f"image {identifier!r} (row {row} of {self.path}) is empty")
        try:
            return decode_bytes(data, self.min_side, out)
        except BadImageError as err:
            raise BadImageError(f"image {identifier!r} (row {row} of {self.path}): {err}") from err

    def decode_rows(self, rows: list[int], pixels: np.ndarray, trace=None) -> list[bool]:
        """Decode image ``rows[k]`` straight into ``pixels[k]`` ((H, W, 3) uint8, rows of a channels-last
        batch) where it is a JPEG that decodes to exactly that size (at this store's DCT scale): one
        loop for a batch, without the per-image calls of ``read``. False where it is not (another size
        or format, a file the decoder refuses): the caller reads that image through ``read``, which
        also says what is wrong with a bad one. ``trace``: (table, slot, pid), the crash trace's
        shared table, where each image's row is written while it is decoded."""
        self._open()
        done = [False] * len(rows)
        if self._bytes is None:  # not the contiguous layout in a plain memory map
            return done
        data, shape = self._bytes, pixels.shape[1:3]
        index = np.asarray(rows, dtype=np.int64)
        starts, ends = self.offsets[index].tolist(), self.offsets[index + 1].tolist()
        for k, (start, end) in enumerate(zip(starts, ends)):
            buffer = data[start:end]
            if not is_jpeg(buffer):
                continue
            factor, scaled = _dct_scale(jpeg_size(buffer), self.min_side)
            if scaled != shape:
                continue
            if trace is not None:
                table, slot, pid = trace
                table[slot, 0], table[slot, 1] = pid, rows[k]
            try:
                done[k] = _simplejpeg_decode(buffer, factor, scaled, pixels[k]).shape[:2] == shape
            except ValueError:  # e.g. CMYK or damaged: ``read`` finds what can decode it
                pass
            if trace is not None:
                table[slot, 1] = -1
        return done

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_h5=None, _bytes=None, _pid=-1)  # handles never travel to another process
        return state


class FolderImageStore(_SizedReads):
    """Hybrid mode: image ``<root>/<identifier>`` (plus ``extension`` when the identifier has none)."""

    encoded = True

    def __init__(self, root: str | Path, extension: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"image folder not found: {self.root}. Set data.images to the folder the images are in."
            )
        self.extension = extension if not extension or extension.startswith(".") else f".{extension}"

    def path_of(self, identifier: str) -> Path:
        path = self.root / identifier
        if self.extension and not path.suffix:
            path = path.with_name(path.name + self.extension)
        return path

    def rows_for(self, identifiers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(len(identifiers)), np.zeros(len(identifiers), dtype=bool)

    def read_encoded(self, row: int, identifier: str) -> np.ndarray:
        path = self.path_of(identifier)
        try:
            return np.frombuffer(bytearray(path.read_bytes()), dtype=np.uint8)
        except OSError as err:
            raise BadImageError(f"image {identifier!r}: cannot read {path} ({err.strerror})") from err

    def read(self, row: int, identifier: str, out: torch.Tensor | None = None) -> torch.Tensor:
        data = self.read_encoded(row, identifier)
        try:
            return decode_bytes(data, self.min_side, out)
        except BadImageError as err:
            raise BadImageError(f"image {identifier!r} ({self.path_of(identifier)}): {err}") from err


def open_image_store(images: str | Path, extension: str | None = None) -> H5ImageStore | FolderImageStore:
    path = Path(images)
    if path.is_dir():
        return FolderImageStore(path, extension)
    return H5ImageStore(path)
