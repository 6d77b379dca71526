"""From the ``data`` config node to train/validation DataLoaders, the taxonomy and metadata widths."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from linnaeus.data.check import apply_bad_image_policy, find_bad_images
from linnaeus.data.dataset import TaxonDataset
from linnaeus.data.images import open_image_store
from linnaeus.data.labels import DatasetError, read_labels
from linnaeus.data.samplers import GroupedBatchSampler, RandomBatchSampler
from linnaeus.data.split import load_or_make_split
from linnaeus.data.taxonomy import Taxonomy, build_taxonomy
from linnaeus.data.transforms import build_eval_transform, build_image_transforms

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
    report: dict = field(default_factory=dict)
    # augmentation.device=gpu: the per-sample pipeline the training step applies on the device
    step_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
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


def build_data(
    data_cfg,
    aug_cfg,
    *,
    run_dir: Path | None,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataBundle:
    """Read labels, build the taxonomy, split, check images and assemble the loaders.

    Only rank 0 writes files (split and image report); every rank derives the same result.
    """
    is_main = rank == 0
    labels_path, images_path = resolve_paths(data_cfg)
    table = read_labels(labels_path, data_cfg.task_keys, data_cfg.meta_components)
    taxonomy, table, tax_report = build_taxonomy(table, data_cfg.on_conflict)
    if tax_report["dropped_rows"]:
        log.warning(
            "dropped %d rows with taxonomy conflicts (data.on_conflict=drop)", tax_report["dropped_rows"]
        )
    if tax_report["filled_parents"]:
        log.info("filled in %d unknown parent labels from the taxonomy", tax_report["filled_parents"])

    store = open_image_store(images_path, data_cfg.image_extension)
    image_rows, missing = store.rows_for(table.identifiers)
    if data_cfg.check_images or missing.any():
        bad = find_bad_images(
            store, table.identifiers, image_rows, missing, workers=max(1, data_cfg.num_workers)
        )
        report_path = run_dir / "image_check.json" if (run_dir is not None and is_main) else None
        keep = apply_bad_image_policy(
            bad,
            table.identifiers,
            policy=data_cfg.bad_images,
            max_count=data_cfg.max_bad_images,
            max_fraction=data_cfg.max_bad_fraction,
            report_path=report_path,
        )
        if not keep.all():
            table, image_rows = table.subset(keep), image_rows[keep]

    targets = taxonomy.encode(table.taxa)
    split_path = run_dir / "split.json" if run_dir is not None else None
    if split_path is not None and not is_main and not split_path.is_file():
        split_path = None  # rank 0 writes it; the split is seeded, so this rank computes the same
    train_idx, val_idx = load_or_make_split(
        split_path, table.identifiers, targets[:, -1], data_cfg.val_fraction, data_cfg.split_seed, table.split
    )
    if len(train_idx) == 0:
        raise DatasetError(f"{labels_path}: no training rows left after the split")

    mean, std = list(data_cfg.mean), list(data_cfg.std)
    common = dict(store=store, identifiers=table.identifiers, image_rows=image_rows, targets=targets)
    meta = dict(meta=table.meta, meta_valid=table.meta_valid)
    worker_transform, step_transform = build_image_transforms(aug_cfg, data_cfg.image_size, mean, std)
    train_set = TaxonDataset(**common, **meta, transform=worker_transform, seed=seed)
    val_set = TaxonDataset(
        **common,
        **meta,
        transform=build_eval_transform(data_cfg.image_size, mean, std, data_cfg.val_crop_pct),
        seed=seed,
    )

    mode = data_cfg.sampler.mode
    if mode == "random":
        sampler = RandomBatchSampler(
            train_idx, data_cfg.batch_size, seed=seed, rank=rank, world_size=world_size
        )
    else:
        group_key = data_cfg.sampler.group_rank or taxonomy.task_keys[-1]
        if group_key not in taxonomy.task_keys:
            raise DatasetError(
                f"data.sampler.group_rank={group_key!r} is not one of the tasks {taxonomy.task_keys}"
            )
        column = targets[train_idx, taxonomy.task_keys.index(group_key)]
        groups = np.where(column == taxonomy.null_index, -1, column)
        sampler = GroupedBatchSampler(
            train_idx, groups, data_cfg.batch_size, mode=mode, seed=seed, rank=rank, world_size=world_size
        )
    train_batches = EpochBatches(sampler)

    val_share = val_idx[rank::world_size]
    val_bs = data_cfg.val_batch_size or 2 * data_cfg.batch_size
    val_batches = [val_share[i : i + val_bs].tolist() for i in range(0, len(val_share), val_bs)]

    workers = data_cfg.num_workers
    loader_args = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0)
    # own generators: creating a loader iterator must not draw from the global RNG, or a resumed
    # run would see different dropout masks than an uninterrupted one
    train_loader = DataLoader(
        train_set, batch_sampler=train_batches, generator=torch.Generator(), **loader_args
    )
    val_loader = DataLoader(val_set, batch_sampler=val_batches, generator=torch.Generator(), **loader_args)
    log.info(
        "data: %s | %d train / %d val images | %s | metadata: %s",
        labels_path,
        len(train_idx),
        len(val_idx),
        taxonomy.summary(),
        table.meta_dims or "none",
    )
    return DataBundle(
        taxonomy=taxonomy,
        meta_dims=table.meta_dims,
        train_loader=train_loader,
        val_loader=val_loader,
        train_batches=train_batches,
        num_train=len(train_idx),
        num_val=len(val_idx),
        step_transform=step_transform,
        class_counts=[
            np.bincount(targets[train_idx, t], minlength=n) for t, n in enumerate(taxonomy.num_classes)
        ],
        report={"taxonomy": tax_report, "labels": str(labels_path), "images": str(images_path)},
    )
