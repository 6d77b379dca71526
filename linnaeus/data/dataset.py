"""The map-style dataset: labels and metadata in memory, images read and decoded on demand."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from linnaeus.data.images import BadImageError, FolderImageStore, H5ImageStore
from linnaeus.data.transforms import sample_seed, seeded_rng


class TaxonDataset(Dataset):
    """One sample: a transformed image, class indices per task, and metadata with its validity.

    Indices may be plain ints or ``(index, epoch)`` pairs. With a pair, the random transform is
    seeded from (seed, epoch, index), so a sample's augmentation does not depend on which worker
    loads it or on where a resumed run restarted; the training step seeds the same way when it
    augments on the device (``augmentation.device=gpu``).
    """

    def __init__(
        self,
        store: H5ImageStore | FolderImageStore,
        identifiers: np.ndarray,
        image_rows: np.ndarray,
        targets: np.ndarray,
        meta: dict[str, np.ndarray],
        meta_valid: dict[str, np.ndarray],
        transform: Callable[[torch.Tensor], torch.Tensor],
        seed: int = 0,
    ) -> None:
        self.store = store
        self.identifiers = identifiers
        self.image_rows = image_rows
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.meta = {k: torch.as_tensor(v) for k, v in meta.items()}
        self.meta_valid = {k: torch.as_tensor(v) for k, v in meta_valid.items()}
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.identifiers)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        try:
            image = self.store.read(int(self.image_rows[index]), str(self.identifiers[index]))
        except BadImageError as err:
            raise BadImageError(
                f"{err}. Find every bad image with `python -m linnaeus.data.verify DIR`, or let the "
                "start-up check drop them: data.check_images=true data.bad_images=drop"
            ) from err
        if epoch is None:
            image = self.transform(image)
        else:
            with seeded_rng(sample_seed(self.seed, epoch, index)):
                image = self.transform(image)
        return {
            "images": image,
            "targets": self.targets[index],
            "meta": {k: v[index] for k, v in self.meta.items()},
            "meta_valid": {k: v[index] for k, v in self.meta_valid.items()},
            "index": index,
        }
