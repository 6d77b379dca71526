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
from contextlib import nullcontext
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from linnaeus.config import register_configs
from linnaeus.confusion import ConfusionCounts
from linnaeus.data.loader import build_data
from linnaeus.data.taxonomy import Taxonomy
from linnaeus.dist import all_reduce_sum, cleanup, init_distributed
from linnaeus.evaluation import evaluate, metadata_views
from linnaeus.inference import APPS_CONFIG_DIR, UsageError, load_run, resolve_device, run_cli
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


def main(cfg: DictConfig) -> dict:
    check_options(cfg)
    dist_info = init_distributed(str(resolve_device(cfg.device)) if cfg.device != "auto" else "auto")
    device, is_main = dist_info.device, dist_info.is_main
    run = load_run(cfg.checkpoint, weights=cfg.weights, device=device)
    taxonomy = run.taxonomy
    out = Path(cfg.out).expanduser() if cfg.out else run.run_dir / "eval" / run.path.stem
    out.mkdir(parents=True, exist_ok=True)

    choices = HydraConfig.get().runtime.choices
    data_cfg, same_data = data_config(
        run.cfg.data, cfg.data, group=choices.get("data"), explicit=explicit_data_keys(),
        task_keys=taxonomy.task_keys,
    )  # fmt: skip
    if cfg.batch_size is not None:
        data_cfg.val_batch_size = cfg.batch_size
    if cfg.num_workers is not None:
        data_cfg.num_workers = cfg.num_workers
    if "cache" in data_cfg:
        data_cfg.cache = "none"  # a RAM cache holds only the run's split, and is built for many epochs
    # the run's persisted split, so that split=val is the trainer's validation set; another dataset
    # gets a fresh split (written to out/split.json)
    split_file = out / "split.json"
    if same_data and (run.run_dir / "split.json").is_file():
        if is_main and (run.run_dir / "split.json").resolve() != split_file.resolve():
            shutil.copyfile(run.run_dir / "split.json", split_file)
    elif is_main:
        split_file.unlink(missing_ok=True)
        if same_data:
            log.warning("%s has no split.json; the split is made again from the config's seed", run.run_dir)
    if dist_info.is_distributed:
        torch.distributed.barrier()
    data = build_data(
        data_cfg, run.cfg.augmentation, run_dir=out, seed=run.cfg.seed, rank=dist_info.rank,
        world_size=dist_info.world_size, pin_memory=device.type == "cuda", local_rank=dist_info.local_rank,
        channels_last=device.type == "cuda",
    )  # fmt: skip
    maps = label_maps(data.taxonomy, taxonomy)
    for name, width in data.meta_dims.items():
        if name in run.meta_dims and run.meta_dims[name] != width:
            raise UsageError(
                f"metadata '{name}' has {width} columns in the dataset but the model takes {run.meta_dims[name]}"
            )
    missing = [name for name in run.meta_dims if name not in data.meta_dims]
    if missing:
        log.warning("the dataset has no %s metadata; the model sees it as missing", ", ".join(missing))

    class_counts = data.class_counts
    if maps is not None:  # into the model's label space (for class-weighted losses)
        class_counts = []
        for t, m in enumerate(maps):
            counts = np.zeros(taxonomy.num_classes[t], dtype=np.int64)
            np.add.at(counts, m, data.class_counts[t])
            class_counts.append(counts)
    loss_fn = build_loss(
        run.cfg.loss, taxonomy, class_counts, total_steps=plan_steps(run.cfg, data).total_steps
    )
    if "loss" in run.ckpt:
        loss_fn.load_state_dict(run.ckpt["loss"])  # learned task weights (GradNorm)
    loss_fn.set_step(max((run.step or 0) - 1, 0))  # as during the run's last validation
    loss_fn = loss_fn.to(device)

    precision = str(cfg.precision if cfg.precision is not None else run.cfg.train.precision)
    amp = PRECISIONS[precision]
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    components = list(data.meta_dims)
    views = metadata_views(components, mask_each=components if cfg.mask_each else [])
    views = {cfg.split + prefix[len("val") :]: masked for prefix, masked in views.items()}
    main_view, nometa_view = cfg.split, f"{cfg.split}_nometa"
    collect = {main_view: ConfusionCounts(taxonomy, device)}
    if nometa_view in views:
        collect[nometa_view] = ConfusionCounts(taxonomy, device)

    loader = RelabelledLoader(split_loader(data, cfg.split, dist_info.rank, dist_info.world_size), maps)
    total = len(loader) if cfg.limit_batches is None else min(len(loader), cfg.limit_batches)
    show = is_main and cfg.progress_bar

    def progress(batches):
        return tqdm(batches, total=total, desc=f"evaluate {cfg.split}", unit="batch", disable=not show)

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
        ranks = collect[main_view].result()
        record = {
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
        (out / "metrics.json").write_text(json.dumps(record, indent=1))
        wandb_run = _start_wandb(cfg, run, out) if cfg.wandb != "disabled" else None
        written = write_reports(
            out, ranks, taxonomy, nometa=collect.get(nometa_view), wandb_run=wandb_run, prefix=cfg.split,
            max_classes=cfg.confusion_max_classes, top_pairs=cfg.confusion_top_pairs,
        )  # fmt: skip
        if wandb_run is not None:
            _finish_wandb(wandb_run, metrics, [out / "metrics.json", *written.values()], run)
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(f"{main_view}/top1/")}
        log.info("%s | %d images | results in %s", shown, images, out)
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
