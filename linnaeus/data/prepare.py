"""From a loader batch on its device to model input: decoding (``data.decode=gpu``) and normalisation.

Loader workers hand over uint8 images (a quarter of float32's bytes through shared memory, pinned
memory and the host-to-device copy). ``PrepareBatch`` (``DataBundle.prepare``) runs on the batch's
device, once per training and validation batch, right after the batch was moved there:

- ``data.decode=cpu``: ``images`` (B, 3, H, W) uint8 (contiguous or channels-last) -> normalised
  contiguous float32;
- ``data.decode=gpu``: ``images`` is an ``EncodedImages`` (the files' bytes, packed by the workers);
  JPEGs are decoded in one nvJPEG call (``torchvision.io.decode_jpeg(list, device=...)``), every other
  image (PNG, WebP, a JPEG nvJPEG rejects) on the CPU by the loader's own decoder; each is then
  resized and centre-cropped to the size the workers would have produced, and normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from linnaeus.data.images import BadImageError, decode_bytes, is_jpeg
from linnaeus.data.transforms import build_resize_crop, normalize_images


@dataclass(frozen=True)
class EncodedImages:
    """A batch of encoded image files: ``data`` (total,) uint8, image i is ``data[offsets[i]:offsets[i+1]]``.

    ``resize``/``crop``: the short side to resize to and the centre square to crop after decoding.
    ``device``: where ``decode`` puts the images; ``to`` only records it, since nvJPEG reads the
    bytes from host memory. Packed by ``pack`` in the loader workers (one tensor through shared memory).
    """

    data: torch.Tensor
    offsets: torch.Tensor
    identifiers: tuple[str, ...]
    resize: int
    crop: int
    device: torch.device = torch.device("cpu")

    @classmethod
    def pack(
        cls, files: Sequence[np.ndarray | torch.Tensor], identifiers: Sequence[str], resize: int, crop: int
    ):
        lengths = torch.tensor([len(f) for f in files], dtype=torch.int64)
        offsets = torch.zeros(len(files) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        data = np.empty(int(offsets[-1]), dtype=np.uint8)
        for i, f in enumerate(files):
            data[offsets[i] : offsets[i + 1]] = np.asarray(f)
        return cls(torch.from_numpy(data), offsets, tuple(identifiers), resize, crop)

    def __len__(self) -> int:
        return len(self.identifiers)

    def files(self) -> list[torch.Tensor]:
        bounds = self.offsets.tolist()
        return [self.data[bounds[i] : bounds[i + 1]] for i in range(len(self))]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncodedImages:
        return replace(self, device=torch.device(device))

    def pin_memory(self, device: torch.device | str | None = None) -> EncodedImages:
        return self  # nvJPEG copies from pageable memory itself; pinning would be an extra copy

    def decode(self) -> torch.Tensor:
        """(B, 3, crop, crop) uint8 on ``device``."""
        files = self.files()
        images: list[torch.Tensor | None] = [None] * len(files)
        jpegs = [i for i, f in enumerate(files) if is_jpeg(f)]
        if jpegs:
            for i, image in zip(jpegs, _decode_jpegs([files[i] for i in jpegs], self.device)):
                images[i] = image
        geometry = _resize_crop(self.resize, self.crop)
        out = []
        for i, image in enumerate(images):
            if image is None:  # not a JPEG, or one nvJPEG could not decode: the CPU decoder
                try:
                    image = decode_bytes(files[i]).to(self.device, non_blocking=True)
                except BadImageError as err:
                    raise BadImageError(f"image {self.identifiers[i]!r}: {err}") from err
            out.append(geometry(image))
        return torch.stack(out)


@lru_cache(maxsize=8)
def _resize_crop(resize: int, crop: int):
    return build_resize_crop(resize, crop)


def _decode_jpegs(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEGs on ``device`` in one call; when the batch call fails, one by one (None for failures)."""
    try:
        return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out: list[torch.Tensor | None] = []
    for f in files:
        try:
            out.append(decode_jpeg(f, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # e.g. CMYK, or a damaged file: the CPU decoder says what is wrong
            out.append(None)
    return out


class PrepareBatch:
    """``DataBundle.prepare``: a loader batch already on its device -> ``images`` as normalised float32.

    Call it exactly once per batch (training and validation), after moving the batch to the device and
    before the training step's augmentation. It expects the loader's output: uint8 images, or
    ``EncodedImages`` with ``data.decode=gpu``; float images mean it already ran, which is an error.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, batch: dict) -> dict:
        images = batch["images"]
        if isinstance(images, EncodedImages):
            images = images.decode()
        elif images.dtype != torch.uint8:
            raise TypeError(
                f"DataBundle.prepare expects the loader's uint8 images, got {images.dtype}; call it once per "
                "batch, right after moving the batch to the device"
            )
        # contiguous (B, 3, H, W) float32 whatever the loader's layout, in the same pass as the cast
        return {**batch, "images": normalize_images(images, self.mean, self.std)}

    def __repr__(self) -> str:
        return f"PrepareBatch(mean={self.mean}, std={self.std})"
