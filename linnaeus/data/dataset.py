"""The map-style dataset: labels and metadata in memory, images read and decoded on demand."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from linnaeus.data.buffers import BatchBuffers, travelling
from linnaeus.data.images import BadImageError, FolderImageStore, H5ImageStore
from linnaeus.data.prepare import EncodedImages
from linnaeus.data.transforms import is_deterministic, keeps_its_output_size, sample_seed

BAD_IMAGE_HINT = (
    "Find every bad image with `python -m linnaeus.data.verify DIR`, or let the start-up check drop "
    "them: data.check_images=true data.bad_images=drop"
)


class TaxonDataset(Dataset):
    """One sample: a uint8 image, class indices per task, and metadata with its validity.

    Indices may be plain ints or ``(index, epoch)`` pairs. With a pair, the random transform is
    seeded from (seed, epoch, index), so a sample's augmentation does not depend on which worker
    loads it or on where a resumed run restarted; the training step seeds the same way when it
    augments on the device (``augmentation.device=gpu``).

    ``encoded=(resize, crop)`` (``data.decode=gpu``): images are not decoded here; a sample holds the
    file's bytes and ``collate`` packs a batch of them into ``EncodedImages``, which
    ``DataBundle.prepare`` decodes on the device and resizes to ``resize`` / crops to ``crop``.

    ``buffers``: where batches of decoded images are written (``linnaeus.data.buffers``: reused memory,
    channels-last when the batches go to a GPU).
    """

    def __init__(
        self,
        store: H5ImageStore | FolderImageStore,
        identifiers: np.ndarray,
        image_rows: np.ndarray,
        targets: np.ndarray,
        meta: dict[str, np.ndarray],
        meta_valid: dict[str, np.ndarray],
        transform: Callable[[torch.Tensor], torch.Tensor] | None,
        seed: int = 0,
        encoded: tuple[int, int] | None = None,
        buffers: BatchBuffers | None = None,
    ) -> None:
        self.store = store
        self.identifiers = identifiers
        self.image_rows = image_rows
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.meta = {k: torch.as_tensor(v) for k, v in meta.items()}
        self.meta_valid = {k: torch.as_tensor(v) for k, v in meta_valid.items()}
        self.transform = transform
        self.seed = seed
        self.encoded = encoded
        self.buffers = buffers if buffers is not None else BatchBuffers()

    @property
    def transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self._transform

    @transform.setter
    def transform(self, transform: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self._transform = transform
        # a module's own ``forward`` (ours hold no hooks): nn.Module's call machinery costs a few us
        # per image
        self._apply = transform.forward if isinstance(transform, nn.Module) else transform
        self.seeded = transform is not None and not is_deterministic(transform)
        # a row the store decoded at the batch's size is final as it is
        self._finish_rows = transform is not None and not keeps_its_output_size(transform)

    @property
    def store(self) -> H5ImageStore | FolderImageStore:
        return self._store

    @store.setter
    def store(self, store: H5ImageStore | FolderImageStore) -> None:  # e.g. the crash trace's wrapper
        self._store = store
        self._into_rows = getattr(store, "decodes_into_rows", False)  # looked up once, not per image
        self._decode_rows = getattr(store, "decode_rows", None) if self._into_rows else None

    def __len__(self) -> int:
        return len(self.identifiers)

    def _read(self, index: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The decoded image (or, with ``encoded``, the file's bytes) of sample ``index``; decoded into
        ``out`` where the store can (``decode_bytes``)."""
        row, identifier = int(self.image_rows[index]), str(self.identifiers[index])
        try:
            if self.encoded is not None:
                return torch.from_numpy(np.array(self.store.read_encoded(row, identifier)))
            if out is not None and self._into_rows:
                return self.store.read(row, identifier, out)
            return self.store.read(row, identifier)
        except BadImageError as err:
            raise BadImageError(f"{err}. {BAD_IMAGE_HINT}") from err

    def _rng_scope(self, pairs: list[tuple[int, int | None]]):
        """One save and restore of the global RNG around a batch whose samples seed their own draws."""
        if self.seeded and any(epoch is not None for _, epoch in pairs):
            return torch.random.fork_rng(devices=[])
        return nullcontext()

    def _sample(self, index: int, epoch: int | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sample ``index``'s transformed image (inside ``_rng_scope``): seeded from (seed, epoch, index).
        ``out``: the batch row it goes to, which the decoder may write into (``BatchBuffers.fill``)."""
        return self._finish(index, epoch, self._read(index, out))

    def _finish(self, index: int, epoch: int | None, image: torch.Tensor) -> torch.Tensor:
        """Sample ``index``'s transformed image from its decoded pixels (read, or decoded into its batch
        row by the store's ``decode_rows``), inside ``_rng_scope``: seeded from (seed, epoch, index)."""
        if self.seeded and epoch is not None:
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
        return self._apply(image)

    def _decode_batch_rows(self, pairs: list[tuple[int, int | None]], ks: range, pixels: np.ndarray):
        """The store's ``decode_rows`` for samples ``pairs[k]``, k in ``ks``, into ``pixels``."""
        return self._decode_rows([int(self.image_rows[pairs[k][0]]) for k in ks], pixels)

    def _image(self, index: int, epoch: int | None) -> torch.Tensor:
        if self.encoded is not None:
            return self._read(index)
        with self._rng_scope([(index, epoch)]):
            return self._sample(index, epoch)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        return {
            "images": self._image(index, epoch),
            "targets": self.targets[index],
            "meta": {k: v[index] for k, v in self.meta.items()},
            "meta_valid": {k: v[index] for k, v in self.meta_valid.items()},
            "index": index,
        }

    def __getitems__(self, keys: list) -> dict:
        """A whole batch, as ``collate`` would make it from ``self[key]`` for every key (the DataLoader's
        fetcher calls this): images decoded straight into a reused batch buffer where the decoder can
        (else each written into it and freed before the next, so the decoder reuses warm memory), then
        labels and metadata gathered with one index each, which saves building and collating a dict
        per sample."""
        pairs = [key if isinstance(key, tuple) else (key, None) for key in keys]
        indices = [index for index, _ in pairs]
        if self.encoded is None:
            with self._rng_scope(pairs):  # each image written into the batch as soon as it is made
                packed = self.buffers.fill(
                    lambda k, out: self._sample(*pairs[k], out),
                    len(pairs),
                    None if self._decode_rows is None else partial(self._decode_batch_rows, pairs),
                    (lambda k, row: self._finish(*pairs[k], row)) if self._finish_rows else None,
                )
        else:
            identifiers = [str(self.identifiers[i]) for i in indices]
            packed = EncodedImages.pack([self._read(i) for i in indices], identifiers, *self.encoded)
        rows = torch.as_tensor(indices, dtype=torch.int64)
        return {  # small tensors ride inside a worker's message (``travelling``)
            "images": packed,
            "targets": travelling(self.targets[rows]),
            "meta": {k: travelling(v[rows]) for k, v in self.meta.items()},
            "meta_valid": {k: travelling(v[rows]) for k, v in self.meta_valid.items()},
            "index": travelling(rows),
        }

    def collate(self, samples: list[dict] | dict) -> dict:
        """A batch (the DataLoader's ``collate_fn``): stacked uint8 images, or ``EncodedImages``.

        ``samples``: ``self[key]`` for each key, or what ``__getitems__`` made already (passed through).
        """
        if isinstance(samples, dict):
            return samples
        if self.encoded is None:
            return default_collate(samples)
        files = [s["images"] for s in samples]
        batch = default_collate([{k: v for k, v in s.items() if k != "images"} for s in samples])
        identifiers = [str(self.identifiers[s["index"]]) for s in samples]
        batch["images"] = EncodedImages.pack(files, identifiers, *self.encoded)
        return batch
