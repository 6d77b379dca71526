"""Evaluate a checkpoint: the trainer's validation metrics, per-class tables and plots.

    python -m linnaeus.evaluate checkpoint=PATH [split=val|train|all] [out=DIR] [weights=auto|model|ema]
    python -m linnaeus.evaluate checkpoint=PATH data=h5 data.labels=DIR/labels.h5 data.images=DIR/images.h5

By default the checkpoint's own dataset and split: the data are built by ``linnaeus.data.loader.build_data``
from the run's config, with the run's ``split.json``, so ``split=val`` is the trainer's validation set,
in the same batches. The numbers come from the trainer's own code (``linnaeus.evaluation.evaluate``):
per rank top-1/top-5, chain accuracy, mistake severity, ``hdist@5``, ECE and consistency, with
metadata as given (``val/...``), fully masked (``val_nometa/...``) and each component masked on its own
(``val_no_<component>/...``); ``split=train|all`` name them ``train/...`` and ``all/...``.

Another dataset (``data=...``, ``data.labels=...``) is evaluated in the checkpoint's label space: its
taxa must be taxa the model knows (a subset is fine), under the same parents. The preprocessing (image
size, crop, mean, std) stays the checkpoint's unless overridden explicitly (``data.image_size=...``).

Writes into ``out`` (default ``<run>/eval/<checkpoint stem>/``): ``metrics.json``,
``per_class_<task>.csv``, ``confusion_<task>.png`` and ``reliability.png`` (see ``linnaeus.reports``),
and, with ``wandb=offline|online``, a W&B run with the metrics, tables, plots and an artifact of it all.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from linnaeus.config import register_configs
from linnaeus.confusion import ConfusionCounts, RankConfusion
from linnaeus.data.loader import DataBundle, build_data
from linnaeus.data.taxonomy import Taxonomy
from linnaeus.dist import all_reduce_sum, cleanup, init_distributed
from linnaeus.evaluation import evaluate, metadata_views
from linnaeus.inference import APPS_CONFIG_DIR, LoadedRun, UsageError, load_run, resolve_device, run_cli
from linnaeus.losses import build_loss
from linnaeus.reports import write_reports
from linnaeus.run import plan_steps

log = logging.getLogger("linnaeus")
SPLITS = ("val", "train", "all")
WANDB_MODES = ("disabled", "offline", "online")
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# data keys that say which dataset and which rows; a data=<file> selection takes these from the file
# and leaves the rest (preprocessing, batch sizes) to the checkpoint
SOURCE_KEYS = ("name", "labels", "images", "demo", "cache_dir", "image_extension", "meta_components",
               "val_fraction", "split_seed", "on_conflict", "check_images", "bad_images", "max_bad_images",
               "max_bad_fraction")  # fmt: skip


# ---------------------------------------------------------------------- data
def explicit_data_keys() -> set[str]:
    """Top-level ``data.*`` keys given on the command line."""
    keys = set()
    for override in HydraConfig.get().overrides.task:
        name = override.lstrip("+~").split("=", 1)[0]
        if name.startswith("data."):
            keys.add(name.split(".")[1])
    return keys


def data_config(
    trained: DictConfig, given: DictConfig, *, group: str | None, explicit: set[str], task_keys: list[str]
) -> tuple[DictConfig, bool]:
    """The ``data`` node to build: the checkpoint's, with the dataset chosen on the command line.

    Returns the node and whether it names the dataset the checkpoint was trained on.
    """
    # a data file's ``???`` does not replace this config's nulls when merged: both mean "not given"
    absent = [k for k in ("labels", "images") if OmegaConf.is_missing(given, k) or given.get(k) is None]
    if group is not None and not given.get("demo") and absent:
        raise UsageError(f"data={group} needs {' and '.join(f'data.{k}=PATH' for k in absent)}")
    data = OmegaConf.to_container(trained, resolve=True)
    given = OmegaConf.to_container(given, resolve=True)
    if group is not None:  # data=<file>: the dataset keys of that file, plus explicit ones
        chosen = {k: v for k, v in given.items() if k in SOURCE_KEYS or k in explicit}
    else:  # only data.* overrides; the YAML's nulls mean "the checkpoint's"
        chosen = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(chosen) - set(data))
    if unknown:
        raise UsageError(f"unknown data key(s) {', '.join('data.' + k for k in unknown)}")
    data.update(chosen)
    if "labels" in chosen and "demo" not in chosen:
        data["demo"] = False  # an explicit labels file means that file, not the demo dataset
    if "task_keys" not in explicit:
        data["task_keys"] = list(task_keys)  # the model's ranks, whatever the file holds
    same = all(data.get(k) == trained.get(k) for k in ("labels", "images", "demo"))
    return OmegaConf.create(data), same


def label_maps(data_taxonomy: Taxonomy, model_taxonomy: Taxonomy) -> list[np.ndarray] | None:
    """Per task, data class index -> model class index; None when the label spaces are equal.

    A dataset may hold fewer taxa than the model knows, never others, and its tree must agree.
    """
    if data_taxonomy == model_taxonomy:
        return None
    if data_taxonomy.task_keys != model_taxonomy.task_keys:
        raise UsageError(
            f"the dataset's ranks {data_taxonomy.task_keys} differ from the checkpoint's {model_taxonomy.task_keys}"
        )
    maps = []
    for t, key in enumerate(model_taxonomy.task_keys):
        index = {int(i): c for c, i in enumerate(model_taxonomy.class_ids[t])}
        ids = data_taxonomy.class_ids[t].tolist()
        unknown = [i for i in ids if i not in index]
        if unknown:
            raise UsageError(
                f"the dataset has another label space: {len(unknown)} taxa at {key} that the checkpoint "
                f"does not know (taxon ids e.g. {unknown[:5]}); evaluate on data labelled with the model's taxa"
            )
        maps.append(np.array([index[i] for i in ids], dtype=np.int64))
    for t in range(1, len(maps)):
        parents = data_taxonomy.parents[t]
        known = parents != data_taxonomy.null_index
        expected = model_taxonomy.parents[t][maps[t][known]]
        if not np.array_equal(maps[t - 1][parents[known]], expected):
            raise UsageError(
                f"the dataset places taxa of {model_taxonomy.task_keys[t]} under other parents than the "
                "checkpoint's taxonomy; it has another label space"
            )
    return maps


class RelabelledLoader:
    """A loader whose batch targets are mapped into the model's label space (and counted)."""

    def __init__(self, loader, maps: list[np.ndarray] | None) -> None:
        self.loader = loader
        self.maps = None if maps is None else [torch.as_tensor(m) for m in maps]
        self.images = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.images += batch["targets"].shape[0]
            if self.maps is not None:
                targets = batch["targets"]
                batch = {
                    **batch,
                    "targets": torch.stack([m[targets[:, t]] for t, m in enumerate(self.maps)], 1),
                }
            yield batch


def split_loader(data, split: str, rank: int, world_size: int) -> DataLoader:
    """The loader for ``split``: the trainer's own validation loader, or one like it over other rows."""
    val = data.val_loader
    if split == "val":
        return val
    dataset = val.dataset  # deterministic evaluation preprocessing over every row
    in_val = np.zeros(len(dataset), dtype=bool)
    in_val[[i for batch in val.batch_sampler for i in batch]] = True
    # every rank holds a share of the validation rows; all of them are needed to know the training rows
    in_val = all_reduce_sum(torch.as_tensor(in_val, dtype=torch.int32)).numpy() > 0
    rows = np.flatnonzero(~in_val) if split == "train" else np.arange(len(dataset))
    share = rows[rank::world_size]
    size = len(val.batch_sampler[0]) if len(val.batch_sampler) else 64
    batches = [share[i : i + size].tolist() for i in range(0, len(share), size)]
    workers = val.num_workers
    return DataLoader(dataset, batch_sampler=batches, collate_fn=val.collate_fn, num_workers=workers,
                      pin_memory=val.pin_memory, generator=torch.Generator())  # fmt: skip


# ---------------------------------------------------------------------- command
def check_options(cfg: DictConfig) -> None:
    if cfg.split not in SPLITS:
        raise UsageError(f"split={cfg.split!r}; choose one of {', '.join(SPLITS)}")
    if cfg.wandb not in WANDB_MODES:
        raise UsageError(f"wandb={cfg.wandb!r}; choose one of {', '.join(WANDB_MODES)}")
    if cfg.precision is not None and str(cfg.precision) not in PRECISIONS:
        raise UsageError(f"precision={cfg.precision!r}; choose one of {', '.join(PRECISIONS)} or null")
    for key in ("batch_size", "limit_batches"):
        if cfg[key] is not None and cfg[key] < 1:
            raise UsageError(f"{key} must be >= 1, got {cfg[key]}")


def _clean(value: float) -> float | None:
    return value if math.isfinite(value) else None


def eval_data_config(cfg: DictConfig, run: LoadedRun) -> tuple[DictConfig, bool]:
    """The ``data`` node to build, with the command's loader settings; and whether it is the run's dataset."""
    choices = HydraConfig.get().runtime.choices
    data_cfg, same_data = data_config(
        run.cfg.data, cfg.data, group=choices.get("data"), explicit=explicit_data_keys(),
        task_keys=run.taxonomy.task_keys,
    )  # fmt: skip
    if cfg.batch_size is not None:
        data_cfg.val_batch_size = cfg.batch_size
    if cfg.num_workers is not None:
        data_cfg.num_workers = cfg.num_workers
    if "cache" in data_cfg:
        data_cfg.cache = "none"  # a RAM cache holds only the run's split, and is built for many epochs
    return data_cfg, same_data


def place_split_file(run_dir: Path, out: Path, *, same_data: bool, is_main: bool) -> None:
    """Rank 0: the run's ``split.json`` into ``out`` for the run's dataset, none for another dataset."""
    # the run's persisted split, so that split=val is the trainer's validation set; another dataset
    # gets a fresh split (written to out/split.json)
    split_file = out / "split.json"
    if same_data and (run_dir / "split.json").is_file():
        if is_main and (run_dir / "split.json").resolve() != split_file.resolve():
            shutil.copyfile(run_dir / "split.json", split_file)
    elif is_main:
        split_file.unlink(missing_ok=True)
        if same_data:
            log.warning("%s has no split.json; the split is made again from the config's seed", run_dir)


def check_metadata(data_dims: dict[str, int], model_dims: dict[str, int]) -> None:
    """Fail on metadata wider or narrower than the model takes; warn about metadata the dataset lacks."""
    for name, width in data_dims.items():
        if name in model_dims and model_dims[name] != width:
            raise UsageError(
                f"metadata '{name}' has {width} columns in the dataset but the model takes {model_dims[name]}"
            )
    missing = [name for name in model_dims if name not in data_dims]
    if missing:
        log.warning("the dataset has no %s metadata; the model sees it as missing", ", ".join(missing))


def model_class_counts(
    class_counts: list[np.ndarray], maps: list[np.ndarray] | None, taxonomy: Taxonomy
) -> list[np.ndarray]:
    """The dataset's training samples per class in the model's label space (for class-weighted losses)."""
    if maps is None:
        return class_counts
    counts_per_task = []
    for t, m in enumerate(maps):
        counts = np.zeros(taxonomy.num_classes[t], dtype=np.int64)
        np.add.at(counts, m, class_counts[t])
        counts_per_task.append(counts)
    return counts_per_task


def build_eval_loss(
    run: LoadedRun, data: DataBundle, maps: list[np.ndarray] | None, device: torch.device
) -> torch.nn.Module:
    """The run's loss on ``device`` as at its last validation, with its learned task weights."""
    class_counts = model_class_counts(data.class_counts, maps, run.taxonomy)
    loss_fn = build_loss(
        run.cfg.loss, run.taxonomy, class_counts, total_steps=plan_steps(run.cfg, data).total_steps
    )
    if "loss" in run.ckpt:
        loss_fn.load_state_dict(run.ckpt["loss"])  # learned task weights (GradNorm)
    loss_fn.set_step(max((run.step or 0) - 1, 0))  # as during the run's last validation
    return loss_fn.to(device)


def autocast_for(cfg: DictConfig, run: LoadedRun, device: torch.device) -> tuple[str, AbstractContextManager]:
    """The precision (the command's, else the run's) and the autocast context it runs under."""
    precision = str(cfg.precision if cfg.precision is not None else run.cfg.train.precision)
    amp = PRECISIONS[precision]
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    return precision, autocast


def split_views(split: str, components: list[str], *, mask_each: bool) -> dict:
    """The metadata views to evaluate, named after the split (``<split>/...``, ``<split>_nometa/...``)."""
    views = metadata_views(components, mask_each=components if mask_each else [])
    return {split + prefix[len("val") :]: masked for prefix, masked in views.items()}


def confusion_counts(
    views: dict, split: str, taxonomy: Taxonomy, device: torch.device
) -> dict[str, ConfusionCounts]:
    """View -> confusion counts to collect: the split's view, and its fully masked view when there is one."""
    main_view, nometa_view = split, f"{split}_nometa"
    collect = {main_view: ConfusionCounts(taxonomy, device)}
    if nometa_view in views:
        collect[nometa_view] = ConfusionCounts(taxonomy, device)
    return collect


def progress_bar(total: int, split: str, *, show: bool) -> Callable:
    """Wraps the evaluated batches in a progress bar (hidden when ``show`` is false)."""

    def progress(batches):
        return tqdm(batches, total=total, desc=f"evaluate {split}", unit="batch", disable=not show)

    return progress


def metrics_record(
    cfg: DictConfig,
    run: LoadedRun,
    data: DataBundle,
    ranks: list[RankConfusion],
    metrics: dict,
    *,
    images: int,
    precision: str,
) -> dict:
    """The content of ``metrics.json``: what was evaluated, on how many images, and the metrics."""
    return {
        "checkpoint": str(run.path),
        "run_dir": str(run.run_dir),
        "step": run.step,
        "weights": run.weights,
        "split": cfg.split,
        "precision": precision,
        "data": {"labels": data.report.get("labels"), "images": data.report.get("images")},
        "images": images,
        "support": {r.task_key: int(r.count.sum()) for r in ranks},
        "metrics": {k: _clean(v) for k, v in metrics.items()},
    }


def write_results(
    cfg: DictConfig,
    run: LoadedRun,
    data: DataBundle,
    out: Path,
    metrics: dict,
    collect: dict[str, ConfusionCounts],
    *,
    images: int,
    precision: str,
) -> None:
    """Into ``out``: ``metrics.json``, the per-class reports and the W&B run; the top-1 summary in the log."""
    main_view, nometa_view = cfg.split, f"{cfg.split}_nometa"
    ranks = collect[main_view].result()
    record = metrics_record(cfg, run, data, ranks, metrics, images=images, precision=precision)
    (out / "metrics.json").write_text(json.dumps(record, indent=1))
    wandb_run = _start_wandb(cfg, run, out) if cfg.wandb != "disabled" else None
    written = write_reports(
        out, ranks, run.taxonomy, nometa=collect.get(nometa_view), wandb_run=wandb_run, prefix=cfg.split,
        max_classes=cfg.confusion_max_classes, top_pairs=cfg.confusion_top_pairs,
    )  # fmt: skip
    if wandb_run is not None:
        _finish_wandb(wandb_run, metrics, [out / "metrics.json", *written.values()], run)
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(f"{main_view}/top1/")}
    log.info("%s | %d images | results in %s", shown, images, out)


def main(cfg: DictConfig) -> dict:
    check_options(cfg)
    dist_info = init_distributed(str(resolve_device(cfg.device)) if cfg.device != "auto" else "auto")
    device, is_main = dist_info.device, dist_info.is_main
    run = load_run(cfg.checkpoint, weights=cfg.weights, device=device)
    taxonomy = run.taxonomy
    out = Path(cfg.out).expanduser() if cfg.out else run.run_dir / "eval" / run.path.stem
    out.mkdir(parents=True, exist_ok=True)

    data_cfg, same_data = eval_data_config(cfg, run)
    place_split_file(run.run_dir, out, same_data=same_data, is_main=is_main)
    if dist_info.is_distributed:
        torch.distributed.barrier()
    data = build_data(
        data_cfg, run.cfg.augmentation, run_dir=out, seed=run.cfg.seed, rank=dist_info.rank,
        world_size=dist_info.world_size, pin_memory=device.type == "cuda", local_rank=dist_info.local_rank,
    )  # fmt: skip
    maps = label_maps(data.taxonomy, taxonomy)
    check_metadata(data.meta_dims, run.meta_dims)
    loss_fn = build_eval_loss(run, data, maps, device)

    precision, autocast = autocast_for(cfg, run, device)
    views = split_views(cfg.split, list(data.meta_dims), mask_each=cfg.mask_each)
    collect = confusion_counts(views, cfg.split, taxonomy, device)
    loader = RelabelledLoader(split_loader(data, cfg.split, dist_info.rank, dist_info.world_size), maps)
    total = len(loader) if cfg.limit_batches is None else min(len(loader), cfg.limit_batches)
    progress = progress_bar(total, cfg.split, show=is_main and cfg.progress_bar)
    log.info(
        "evaluating %s (step %s, %s weights) on %s | %s split | %d batches | precision %s | device %s",
        run.path, run.step, run.weights, data.report.get("labels"), cfg.split, total, precision, device,
    )  # fmt: skip
    metrics = evaluate(
        run.model, loader, loss_fn, taxonomy, device, views=views, autocast=autocast,
        limit=cfg.limit_batches, prepare=getattr(data, "prepare", None), progress=progress, collect=collect,
    )  # fmt: skip
    images = int(all_reduce_sum(torch.tensor([loader.images], dtype=torch.int64, device=device)).item())
    if is_main:
        write_results(cfg, run, data, out, metrics, collect, images=images, precision=precision)
    cleanup()
    return metrics


def _start_wandb(cfg: DictConfig, run, out: Path):
    import os

    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    settings = run.cfg.get("logger", {}).get("wandb", {})
    return wandb.init(
        project=cfg.wandb_project or settings.get("project") or "linnaeus",
        entity=settings.get("entity"),
        group=run.ckpt.get("wandb_run_id"),
        job_type="evaluate",
        name=f"eval/{run.run_dir.name}/{run.path.stem}",
        dir=str(out),
        mode=cfg.wandb,
        config={
            "checkpoint": str(run.path),
            "step": run.step,
            "weights": run.weights,
            "split": cfg.split,
            "train_config": OmegaConf.to_container(run.cfg, resolve=True),
        },  # fmt: skip
    )


def _finish_wandb(wandb_run, metrics: dict, files: list[Path], run) -> None:
    import wandb

    wandb_run.summary.update({k: v for k, v in metrics.items() if math.isfinite(v)})
    artifact = wandb.Artifact(f"eval-{run.run_dir.name}-{run.path.stem}", type="evaluation")
    for path in files:
        artifact.add_file(str(path))
    wandb_run.log_artifact(artifact)
    wandb_run.finish()


register_configs()


@hydra.main(version_base=None, config_path=APPS_CONFIG_DIR, config_name="evaluate")
def hydra_entry(cfg: DictConfig) -> None:
    run_cli(main, cfg)


if __name__ == "__main__":
    hydra_entry()
