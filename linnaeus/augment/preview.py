"""A grid of augmented training images, as the model sees them (after mixing), saved at the start of a run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import default_collate


def first_samples(dataset, batches, epoch: int, count: int = 16) -> dict:
    """The first ``count`` samples of ``epoch``'s first training batch, collated on the CPU as the
    loader does (so it goes through ``DataBundle.prepare`` like any batch).

    Taking the batch's head keeps the sampler's same-group pairs (at positions 2i, 2i+1) together, so
    the grid shows real mixing. The sampler's position is restored afterwards.
    """
    saved = batches.state_dict()
    batches.set_epoch(epoch)
    first = next(iter(batches))
    batches.load_state_dict(saved)
    collate = getattr(dataset, "collate", default_collate)  # as the loader collates (uint8 or encoded images)
    return collate([dataset[key] for key in first[:count]])


def save_sample_grid(batch: dict, path: Path, mean: Sequence[float], std: Sequence[float]) -> Path:
    """De-normalise ``batch["images"]`` and save them as a grid, titled with λ and valid metadata."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = batch["images"].detach().float().cpu()
    images = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    images = images.clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    n = len(images)
    lam = batch.get("lam")
    valid = torch.stack(list(batch["meta_valid"].values()), 1).cpu() if batch["meta_valid"] else None
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i])
        title = [f"λ={float(lam[i]):.2f}" if lam is not None else f"#{int(batch['index'][i])}"]
        if valid is not None:
            title.append(f"meta {int(valid[i].sum())}/{valid.shape[1]}")
        ax.set_title(" ".join(title), fontsize=7)
    fig.suptitle("augmented training samples (after mixing and metadata masking)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
