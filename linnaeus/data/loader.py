"""From the ``data`` config node to train/validation DataLoaders, the taxonomy and metadata widths."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from linnaeus.data.buffers import BatchBuffers
from linnaeus.data.cache import CachePart, build_ram_cache
from linnaeus.data.check import apply_bad_image_policy, find_bad_images
from linnaeus.data.dataset import TaxonDataset
from linnaeus.data.images import open_image_store
from linnaeus.data.labels import DatasetError, read_labels
from linnaeus.data.prepare import PrepareBatch
from linnaeus.data.samplers import GroupedBatchSampler, RandomBatchSampler
from linnaeus.data.split import load_or_make_split
from linnaeus.data.taxonomy import Taxonomy, build_taxonomy
from linnaeus.data.transforms import (
    ResizedCrop,
    StepImageTransform,
    build_eval_load_transform,
    build_image_transforms,
    eval_resize_for,
    load_size_for,
    train_min_side,
)

log = logging.getLogger(__name__)


class EpochBatches:
    """Wraps a batch sampler so every index travels with its epoch (seeds per-sample augmentation)."""

    def __init__(self, sampler: RandomBatchSampler | GroupedBatchSampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        epoch = self.epoch
        for batch in self.sampler:
            yield [(int(i), epoch) for i in batch]


@dataclass
class DataBundle:
    taxonomy: Taxonomy
    meta_dims: dict[str, int]
    train_loader: DataLoader
    val_loader: DataLoader
    train_batches: EpochBatches
    num_train: int
    num_val: int
    # every train and validation batch, right after it was moved to the device and before the step's
    # augmentation: uint8 (or, with data.decode=gpu, encoded) images -> normalised float32
    prepare: Callable[[dict], dict]
    report: dict = field(default_factory=dict)
    # the per-sample image pipeline the training step applies on the device, to prepared images:
    # random erasing, and with augmentation.device=gpu the whole random pipeline (None: nothing)
    step_transform: StepImageTransform | None = None
    class_counts: list[np.ndarray] = field(default_factory=list)  # per task: training samples per class


def resolve_paths(data_cfg) -> tuple[Path, Path]:
    """The labels and images paths, generating the demo dataset on first use."""
    if data_cfg.demo and data_cfg.labels is None:
        from linnaeus.data.demo import ensure_demo_dataset

        root = ensure_demo_dataset(Path(data_cfg.cache_dir).expanduser())
        return root / "labels.h5", root / "images.h5"
    if data_cfg.labels is None or data_cfg.images is None:
        raise DatasetError(
            "set data.labels=PATH/labels.h5 and data.images=PATH/images.h5 (or an image folder)"
        )
    return Path(data_cfg.labels).expanduser(), Path(data_cfg.images).expanduser()


def read_taxa(data_cfg, labels_path: Path):
    """The label table and the taxonomy built from it (conflicts handled per ``data.on_conflict``)."""
    table = read_labels(labels_path, data_cfg.task_keys, data_cfg.meta_components)
    taxonomy, table, report = build_taxonomy(table, data_cfg.on_conflict)
    if report["dropped_rows"]:
        log.warning("dropped %d rows with taxonomy conflicts (data.on_conflict=drop)", report["dropped_rows"])
    if report["filled_parents"]:
        log.info("filled in %d unknown parent labels from the taxonomy", report["filled_parents"])
    return taxonomy, table, report


def ram_cache_stores(data_cfg, store, parts: list[CachePart], world_size: int, local_rank: int | None):
    """``data.cache=ram``: a store over each part's images in shared memory, filled by the node's
    local rank 0 (default: ``LOCAL_RANK``/``SLURM_LOCALID``)."""
    if local_rank is None:
        env_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))
        local_rank = 0 if world_size == 1 else int(env_rank)
    return build_ram_cache(
        store,
        parts,
        directory=data_cfg.ram_cache_dir,
        workers=max(1, data_cfg.num_workers),
        local_rank=local_rank,
    )


def split_rows(data_cfg, table, targets: np.ndarray, run_dir: Path | None, is_main: bool):
    """(training rows, validation rows): the run's ``split.json`` when there is one, else a seeded
    split that rank 0 writes there."""
    split_path = run_dir / "split.json" if run_dir is not None else None
    if split_path is not None and not is_main and not split_path.is_file():
        split_path = None  # rank 0 writes it; the split is seeded, so this rank computes the same
    return load_or_make_split(
        split_path, table.identifiers, targets[:, -1], data_cfg.val_fraction, data_cfg.split_seed, table.split
    )


def validation_batches(data_cfg, val_idx: np.ndarray, rank: int, world_size: int) -> list[list[int]]:
    """This rank's share of the validation rows in batches of ``data.val_batch_size`` (default twice
    the training batch)."""
    share = val_idx[rank::world_size]
    size = data_cfg.val_batch_size or 2 * data_cfg.batch_size
    return [share[i : i + size].tolist() for i in range(0, len(share), size)]


def check_image_rows(data_cfg, store, table, image_rows: np.ndarray, missing: np.ndarray, run_dir, is_main):
    """The label table and image rows left after the start-up image check (``data.check_images``;
    always when some rows have no image), with the report in the run directory (rank 0)."""
    if not (data_cfg.check_images or missing.any()):
        return table, image_rows
    bad = find_bad_images(store, table.identifiers, image_rows, missing, workers=max(1, data_cfg.num_workers))
    keep = apply_bad_image_policy(
        bad,
        table.identifiers,
        policy=data_cfg.bad_images,
        max_count=data_cfg.max_bad_images,
        max_fraction=data_cfg.max_bad_fraction,
        report_path=run_dir / "image_check.json" if (run_dir is not None and is_main) else None,
    )
    if keep.all():
        return table, image_rows
    return table.subset(keep), image_rows[keep]


def encoded_geometry(data_cfg, aug_cfg, store, images_path: Path, load_size: int, eval_resize: int):
    """With ``data.decode=gpu``: the (resize, crop) each split's encoded batches decode to, after
    checking the settings it needs; (None, None) with ``data.decode=cpu``."""
    if data_cfg.decode not in ("cpu", "gpu"):
        raise ValueError(f"data.decode must be cpu or gpu, got {data_cfg.decode!r}")
    if data_cfg.cache not in ("none", "ram"):
        raise ValueError(f"data.cache must be none or ram, got {data_cfg.cache!r}")
    if data_cfg.decode == "cpu":
        return None, None
    if data_cfg.cache == "ram":
        raise ValueError(
            "data.cache=ram holds decoded images, so there is nothing for data.decode=gpu to decode; choose one"
        )
    if not store.encoded:
        raise DatasetError(
            f"data.decode=gpu needs encoded image files, but {images_path} holds decoded arrays; use data.decode=cpu"
        )
    if aug_cfg.device != "gpu":
        raise ValueError(
            "data.decode=gpu decodes on the device, so training augmentation must run there too: add augmentation.device=gpu"
        )
    return (load_size, load_size), (eval_resize, data_cfg.image_size)


def train_sampler(
    data_cfg, taxonomy: Taxonomy, targets: np.ndarray, train_idx: np.ndarray, seed, rank, world_size
):
    """The training batch sampler ``data.sampler.mode`` asks for."""
    mode = data_cfg.sampler.mode
    if mode == "random":
        return RandomBatchSampler(train_idx, data_cfg.batch_size, seed=seed, rank=rank, world_size=world_size)
    group_key = data_cfg.sampler.group_rank or taxonomy.task_keys[-1]
    if group_key not in taxonomy.task_keys:
        raise DatasetError(
            f"data.sampler.group_rank={group_key!r} is not one of the tasks {taxonomy.task_keys}"
        )
    column = targets[train_idx, taxonomy.task_keys.index(group_key)]
    groups = np.where(column == taxonomy.null_index, -1, column)
    return GroupedBatchSampler(
        train_idx, groups, data_cfg.batch_size, mode=mode, seed=seed, rank=rank, world_size=world_size
    )


def make_loader(dataset: TaxonDataset, batches, data_cfg, pin_memory: bool) -> DataLoader:
    """A DataLoader over ``batches`` (a batch sampler or a list of index lists)."""
    workers = data_cfg.num_workers
    # its own generator: creating a loader iterator must not draw from the global RNG, or a resumed
    # run would see different dropout masks than an uninterrupted one
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=dataset.collate,
        generator=torch.Generator(),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None,
    )


def split_stores(data_cfg, aug_cfg, store, table, image_rows: np.ndarray, split, world_size: int, local_rank):
    """(training store, validation store, validation load transform): each split decodes a JPEG at the
    DCT scale that still covers its first resize or crop, or reads the RAM cache (``data.cache=ram``)."""
    train_idx, val_idx = split
    size = data_cfg.image_size
    load_size, eval_resize = load_size_for(aug_cfg, size), eval_resize_for(size, data_cfg.val_crop_pct)
    if data_cfg.cache != "ram":
        train_store = store.with_min_side(train_min_side(aug_cfg, size))
        return (
            train_store,
            store.with_min_side(eval_resize),
            build_eval_load_transform(size, data_cfg.val_crop_pct),
        )
    train_part = CachePart(image_rows[train_idx], table.identifiers[train_idx], load_size, load_size)
    if (
        aug_cfg.device == "cpu"
        and aug_cfg.load_size is None
        and ResizedCrop(size, aug_cfg.scale, aug_cfg.ratio).fixed
    ):
        # the fixed crop (augmentation=none) is cached as it crops, so no training step resizes
        train_part = CachePart(train_part.image_rows, train_part.identifiers, size, size, square=True)
    parts = [
        train_part,
        CachePart(image_rows[val_idx], table.identifiers[val_idx], eval_resize, size),
    ]
    train_store, val_store = ram_cache_stores(data_cfg, store, parts, world_size, local_rank)
    return train_store, val_store, v2.Identity()  # cached exactly as validation crops them


def build_data(
    data_cfg,
    aug_cfg,
    *,
    run_dir: Path | None,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    local_rank: int | None = None,
    channels_last: bool = True,
) -> DataBundle:
    """Read labels, build the taxonomy, split, check images and assemble the loaders.

    Only rank 0 writes files (split and image report); every rank derives the same result.
    ``local_rank`` (default: ``LOCAL_RANK``/``SLURM_LOCALID``) picks the rank of a node that fills the
    shared RAM cache (``data.cache=ram``). ``channels_last``: image batches over (B, H, W, 3) memory, as
    decoders return pixels (``prepare`` casts them to contiguous float); False: contiguous batches.
    """
    is_main = rank == 0
    labels_path, images_path = resolve_paths(data_cfg)
    taxonomy, table, tax_report = read_taxa(data_cfg, labels_path)

    store = open_image_store(images_path, data_cfg.image_extension)
    image_rows, missing = store.rows_for(table.identifiers)
    table, image_rows = check_image_rows(data_cfg, store, table, image_rows, missing, run_dir, is_main)

    targets = taxonomy.encode(table.taxa)
    train_idx, val_idx = split_rows(data_cfg, table, targets, run_dir, is_main)
    if len(train_idx) == 0:
        raise DatasetError(f"{labels_path}: no training rows left after the split")

    mean, std = list(data_cfg.mean), list(data_cfg.std)
    size = data_cfg.image_size
    worker_transform, step_transform = build_image_transforms(aug_cfg, size, mean, std)
    load_size, eval_resize = load_size_for(aug_cfg, size), eval_resize_for(size, data_cfg.val_crop_pct)
    train_encoded, val_encoded = encoded_geometry(
        data_cfg, aug_cfg, store, images_path, load_size, eval_resize
    )
    train_store, val_store, val_transform = split_stores(
        data_cfg, aug_cfg, store, table, image_rows, (train_idx, val_idx), world_size, local_rank
    )

    def dataset(split_store, transform, encoded) -> TaxonDataset:
        buffers = BatchBuffers(data_cfg.num_workers, data_cfg.prefetch_factor + 2, channels_last)
        return TaxonDataset(
            split_store, identifiers=table.identifiers, image_rows=image_rows, targets=targets,
            meta=table.meta, meta_valid=table.meta_valid, transform=transform, seed=seed, encoded=encoded,
            buffers=buffers,
        )  # fmt: skip

    train_batches = EpochBatches(
        train_sampler(data_cfg, taxonomy, targets, train_idx, seed, rank, world_size)
    )
    val_batches = validation_batches(data_cfg, val_idx, rank, world_size)
    train_loader = make_loader(
        dataset(train_store, worker_transform, train_encoded), train_batches, data_cfg, pin_memory
    )
    val_loader = make_loader(
        dataset(val_store, val_transform, val_encoded), val_batches, data_cfg, pin_memory
    )
    log.info(
        "data: %s | %d train / %d val images | %s | metadata: %s | decode %s, cache %s", labels_path,
        len(train_idx), len(val_idx), taxonomy.summary(), table.meta_dims or "none", data_cfg.decode, data_cfg.cache,
    )  # fmt: skip
    return DataBundle(
        taxonomy=taxonomy,
        meta_dims=table.meta_dims,
        train_loader=train_loader,
        val_loader=val_loader,
        train_batches=train_batches,
        num_train=len(train_idx),
        num_val=len(val_idx),
        prepare=PrepareBatch(mean, std),
        step_transform=step_transform,
        class_counts=[
            np.bincount(targets[train_idx, t], minlength=n) for t, n in enumerate(taxonomy.num_classes)
        ],
        report={"taxonomy": tax_report, "labels": str(labels_path), "images": str(images_path)},
    )
