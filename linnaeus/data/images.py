"""Image sources: ``images.h5`` (encoded bytes or decoded arrays) or a folder of files (hybrid mode).

Stores open their files lazily, on first read in the process that reads (each DataLoader worker
gets its own HDF5 handle; handles are never shared across a fork).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from linnaeus.data.labels import BUILD_HINT, DatasetError


class BadImageError(RuntimeError):
    """An image is missing or cannot be decoded."""


def decode_bytes(data: bytes | np.ndarray) -> torch.Tensor:
    """Encoded image bytes -> (3, H, W) uint8 RGB tensor (grayscale, alpha, CMYK converted)."""
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(buffer, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        pass  # formats torchvision cannot decode (e.g. some TIFF/BMP): fall back to PIL
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            img = img.convert("RGB")
            return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()
    except Exception as err:  # PIL raises many exception types for damaged files
        raise BadImageError(f"cannot decode image ({type(err).__name__}: {err})") from err


class H5ImageStore:
    """``images.h5``: dataset ``images`` of encoded bytes (N,) or decoded arrays (N, H, W, 3)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(
                f"images file not found: {self.path}. Set data.images to an images.h5 file or a folder. {BUILD_HINT}"
            )
        try:
            with h5py.File(self.path, "r") as h5:
                if "images" not in h5:
                    raise DatasetError(f"{self.path}: required dataset 'images' is missing. {BUILD_HINT}")
                images = h5["images"]
                self.encoded = images.dtype.kind == "O"
                if not self.encoded and (
                    images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8
                ):
                    raise DatasetError(
                        f"{self.path}: 'images' has shape {images.shape} and dtype {images.dtype}; expected "
                        "(N,) variable-length uint8 (encoded files) or (N, H, W, 3) uint8 (decoded RGB)"
                    )
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
        self._h5: h5py.File | None = None
        self._pid = -1

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

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def read(self, row: int, identifier: str) -> torch.Tensor:
        data = self._file()["images"][row]
        if not self.encoded:
            return torch.from_numpy(np.ascontiguousarray(data)).permute(2, 0, 1).contiguous()
        if len(data) == 0:
            raise BadImageError(f"image {identifier!r} (row {row} of {self.path}) is empty")
        try:
            return decode_bytes(data)
        except BadImageError as err:
            raise BadImageError(f"image {identifier!r} (row {row} of {self.path}): {err}") from err

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"], state["_pid"] = None, -1  # a handle never travels to another process
        return state


class FolderImageStore:
    """Hybrid mode: image ``<root>/<identifier>`` (plus ``extension`` when the identifier has none)."""

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

    def read(self, row: int, identifier: str) -> torch.Tensor:
        path = self.path_of(identifier)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise BadImageError(f"image {identifier!r}: cannot read {path} ({err.strerror})") from err
        try:
            return decode_bytes(data)
        except BadImageError as err:
            raise BadImageError(f"image {identifier!r} ({path}): {err}") from err


def open_image_store(images: str | Path, extension: str | None = None) -> H5ImageStore | FolderImageStore:
    path = Path(images)
    if path.is_dir():
        return FolderImageStore(path, extension)
    return H5ImageStore(path)
