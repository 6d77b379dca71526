"""Validation: the metrics the trainer logs and ``python -m linnaeus.evaluate`` reports, one code path.

``evaluate`` runs the model over a loader once per metadata view (as given, fully masked, each
component masked on its own) and returns ``<view>/<metric>`` keys computed by ``MetricAccumulator``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

from linnaeus.data.taxonomy import Taxonomy
from linnaeus.metrics import MetricAccumulator


def move_batch(batch: dict, device: torch.device) -> dict:
    """A loader batch on ``device``; ``index`` stays on the CPU (it seeds per-sample augmentation)."""
    return {
        **batch,
        "images": batch["images"].to(device, non_blocking=True),
        "targets": batch["targets"].to(device, non_blocking=True),
        "meta": {k: v.to(device, non_blocking=True) for k, v in batch["meta"].items()},
        "meta_valid": {k: v.to(device, non_blocking=True) for k, v in batch["meta_valid"].items()},
    }


def without_meta(batch: dict, components: Sequence[str] | None = None) -> dict:
    """The same batch with the named metadata components (default: all) marked missing."""
    names = batch["meta"].keys() if components is None else components
    return {
        **batch,
        "meta": {k: torch.zeros_like(v) if k in names else v for k, v in batch["meta"].items()},
        "meta_valid": {k: v & (k not in names) for k, v in batch["meta_valid"].items()},
    }


def metadata_views(meta_components: Sequence[str], mask_each: Sequence[str] = ()) -> dict:
    """Prefix -> components to mask (None = all). No masked view when the data has no metadata."""
    views: dict = {"val": ()}
    if meta_components:
        views["val_nometa"] = None
        views.update({f"val_no_{name}": [name] for name in mask_each})
    return views


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader,
    loss_fn,
    taxonomy: Taxonomy,
    device: torch.device,
    *,
    views: dict,
    autocast=None,
    limit: int | None = None,
    prepare=None,
    progress=None,
    collect: dict | None = None,
) -> dict:
    """Metrics for every view in ``views`` (see ``metadata_views``), keyed ``<view>/<metric>``.

    ``prepare`` turns a loader batch (on the device) into model inputs (e.g. GPU decode and
    normalisation); ``progress`` wraps the loader (a tqdm bar) when given. ``collect`` maps a view to
    a collector that sees that view's ``update(logits, targets)`` for every batch and, at the end, its
    ``reduce()`` (if it has one) on every process, e.g. ``linnaeus.confusion.ConfusionCounts`` for the
    per-class tables and confusion plots.
    """
    collect = collect or {}
    unknown = sorted(set(collect) - set(views))
    if unknown:
        raise ValueError(f"collect names views {unknown} that are not evaluated; views: {list(views)}")
    autocast = autocast or nullcontext()
    was_training = model.training
    model.eval()
    accs = {prefix: MetricAccumulator(taxonomy, device) for prefix in views}
    batches = loader if progress is None else progress(loader)
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            break
        batch = move_batch(batch, device)
        if prepare is not None:
            batch = prepare(batch)
        for prefix, masked in views.items():
            b = without_meta(batch, masked) if masked != () else batch
            with autocast:
                logits = model(b["images"], b["meta"], b["meta_valid"])
                loss, _ = loss_fn(logits, b["targets"])
            accs[prefix].update(logits, b["targets"], loss)
            if prefix in collect:
                collect[prefix].update(logits, b["targets"])
    model.train(was_training)
    for collector in collect.values():
        if hasattr(collector, "reduce"):
            collector.reduce()
    return {f"{prefix}/{k}": v for prefix, acc in accs.items() for k, v in acc.compute().items()}
