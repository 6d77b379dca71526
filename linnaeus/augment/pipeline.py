"""What the training step does to a batch before the forward pass, built once at setup.

``TrainBatchTransform`` runs three parts in order, each an object chosen at setup (an identity when
off), so no experiment flag reaches the step:

1. single-image augmentation on the batch's device, to the normalised images ``DataBundle.prepare``
   made (``KeepImages`` when there is none): with ``augmentation.device=gpu`` the same per-sample
   pipeline the workers would run, applied image by image where the batch lives and seeded per sample
   from (seed, epoch, index) exactly as in the workers, so both settings give the same images on the
   same device; in both settings random erasing, which acts on normalised values;
2. selective mixup/cutmix (``linnaeus.augment.mix``);
3. metadata masking (``linnaeus.augment.meta_mask``).

Parts 2 and 3 draw from NumPy generators seeded from (seed, rank, step, micro-batch): reproducible,
and independent of the device and of the global RNGs (dropout is untouched by augmentation).
"""

from __future__ import annotations

import numpy as np
import torch

from linnaeus.augment.meta_mask import MetaMask, NoMetaMask, build_meta_mask
from linnaeus.augment.mix import NoMix, SelectiveMix, build_mixer
from linnaeus.data.transforms import StepImageTransform, TimmPilPolicy, load_size_for, sample_seed


class KeepImages:
    """The loader workers already augmented and nothing is left for the step: images pass through."""

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        return images

    def __repr__(self) -> str:
        return "per sample in the loader workers"


class AugmentOnDevice:
    """Apply a per-sample transform to every image of a batch on the batch's device.

    ``images`` (B, 3, L, L) normalised float, as ``DataBundle.prepare`` returns them; ``indices`` (B,)
    the samples' dataset indices (on the CPU). Each image is seeded with ``sample_seed(seed, epoch,
    index)``, as ``TaxonDataset`` seeds it in a worker.
    """

    def __init__(self, transform: StepImageTransform, seed: int) -> None:
        self.transform, self.seed = transform, seed

    def __call__(self, images: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        out = [
            self.transform(image, sample_seed(self.seed, epoch, index))
            for image, index in zip(images, indices.tolist())
        ]
        return torch.stack(out)  # (B, 3, S, S) float

    def __repr__(self) -> str:
        if self.transform.augment is None:
            return "per sample in the loader workers (random erasing in the training step)"
        return "per sample on the batch's device in the training step"


class TrainBatchTransform:
    """Device augmentation → selective mixing → metadata masking, on one training batch."""

    def __init__(
        self,
        images: KeepImages | AugmentOnDevice,
        mix: SelectiveMix | NoMix,
        meta_mask: MetaMask | NoMetaMask,
        *,
        seed: int,
        rank: int = 0,
    ) -> None:
        self.images, self.mix, self.meta_mask = images, mix, meta_mask
        self.seed, self.rank = seed, rank

    def __call__(self, batch: dict, *, step: int, epoch: int, micro: int) -> dict:
        """The batch with augmented images, metadata and ``targets_b``/``lam`` (None when not mixing)."""
        mix_seq, mask_seq = np.random.SeedSequence([self.seed, self.rank, step, micro]).spawn(2)
        images = self.images(batch["images"], batch["index"], epoch)
        out = self.mix(
            images, batch["targets"], batch["meta"], batch["meta_valid"], np.random.default_rng(mix_seq)
        )
        meta, meta_valid = self.meta_mask(
            out["meta"], out["meta_valid"], step, np.random.default_rng(mask_seq)
        )
        return {**batch, **out, "meta": meta, "meta_valid": meta_valid}


def build_train_batch_transform(
    cfg,
    step_transform,
    *,
    task_keys: list[str],
    null_index: int,
    meta_components: list[str],
    total_steps: int,
    device: torch.device,
    rank: int = 0,
) -> TrainBatchTransform:
    """The training step's batch transform from the run config.

    ``step_transform``: the per-sample pipeline the step must apply on the device (from
    ``build_image_transforms``), or None when the loader workers did everything.
    """
    images = KeepImages() if step_transform is None else AugmentOnDevice(step_transform, cfg.seed)
    if device.type != "cpu" and any(
        isinstance(t, TimmPilPolicy) for t in getattr(step_transform, "transforms", [])
    ):
        raise ValueError(
            f"augmentation.auto_augment={cfg.augmentation.auto_augment} is timm's PIL implementation and runs "
            f"on CPU only, but augmentation.device=gpu augments on {device}; use augmentation.device=cpu "
            "or a tensor policy (rand-...-inc1, original)"
        )
    return TrainBatchTransform(
        images,
        build_mixer(cfg.augmentation, task_keys, null_index),
        build_meta_mask(cfg.data.meta_mask, meta_components, total_steps),
        seed=cfg.seed,
        rank=rank,
    )


def describe(cfg, transform: TrainBatchTransform) -> str:
    """One line saying what training augmentation and masking do in this run."""
    aug = cfg.augmentation
    parts = [
        f"crop scale {list(aug.scale)} ratio {list(aug.ratio)}",
        f"hflip {aug.hflip}",
        f"vflip {aug.vflip}",
        f"colour jitter {aug.color_jitter}",
        f"auto-augment {aug.auto_augment}",
        f"random erase p={aug.random_erase.prob} ({aug.random_erase.mode}, area {list(aug.random_erase.area)})",
    ]
    where = repr(transform.images)
    if isinstance(transform.images, AugmentOnDevice) and transform.images.transform.augment is not None:
        where += f" (workers resize to {load_size_for(aug, cfg.data.image_size)} px)"
    return f"augmentation {where}: {', '.join(parts)} | {transform.mix!r} | {transform.meta_mask!r}"
