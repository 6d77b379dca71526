"""The training loop: setup, loop, teardown, in that order, in this one file.

`python train.py [overrides]` and `python -m linnaeus.train [overrides]` both land in ``main``.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from linnaeus.augment import build_train_batch_transform, describe
from linnaeus.augment.preview import first_samples, save_sample_grid
from linnaeus.checkpoint import (
    CheckpointError,
    capture_rng,
    load_latest,
    restore_rng,
    save_checkpoint,
    step_checkpoints,
)
from linnaeus.config import register_configs
from linnaeus.data.images import BadImageError
from linnaeus.data.labels import DatasetError
from linnaeus.data.loader import build_data
from linnaeus.data.taxonomy import Taxonomy
from linnaeus.dist import DistInfo, all_reduce_sum, broadcast_object, cleanup, init_distributed
from linnaeus.logger import NullLogger, RunLogger
from linnaeus.losses import build_loss
from linnaeus.metrics import MetricAccumulator
from linnaeus.models import build_model
from linnaeus.models.memory_format import ChannelsLastInputs
from linnaeus.models.pretrained import load_pretrained
from linnaeus.optim import build_optimizer
from linnaeus.schedule import lr_multiplier, warmup_steps_for

log = logging.getLogger("linnaeus")
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    """Where the loop is; saved in every checkpoint."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_value: float | None = None


def move_batch(batch: dict, device: torch.device) -> dict:
    return {
        "images": batch["images"].to(device, non_blocking=True),
        "targets": batch["targets"].to(device, non_blocking=True),
        "meta": {k: v.to(device, non_blocking=True) for k, v in batch["meta"].items()},
        "meta_valid": {k: v.to(device, non_blocking=True) for k, v in batch["meta_valid"].items()},
        "index": batch["index"],  # stays on the CPU: seeds per-sample augmentation on the device
    }


def without_meta(batch: dict, components: Sequence[str] | None = None) -> dict:
    """The same batch with the named metadata components (default: all) marked missing."""
    names = batch["meta"].keys() if components is None else components
    return {
        **batch,
        "meta": {k: torch.zeros_like(v) if k in names else v for k, v in batch["meta"].items()},
        "meta_valid": {k: v & (k not in names) for k, v in batch["meta_valid"].items()},
    }


@torch.no_grad()
def evaluate(
    model,
    loader,
    loss_fn,
    taxonomy: Taxonomy,
    device,
    autocast,
    limit: int | None = None,
    mask_each: Sequence[str] = (),
) -> dict:
    """Validation metrics with metadata as given (``val/...``), fully masked (``val_nometa/...``) and
    with each component of ``mask_each`` masked on its own (``val_no_<component>/...``)."""
    model.eval()
    # prefix -> components to mask (None = all)
    views = {"val": (), "val_nometa": None, **{f"val_no_{name}": [name] for name in mask_each}}
    accs = {prefix: MetricAccumulator(taxonomy, device) for prefix in views}
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        batch = move_batch(batch, device)
        for prefix, masked in views.items():
            b = without_meta(batch, masked)
            with autocast:
                logits = model(b["images"], b["meta"], b["meta_valid"])
                loss, _ = loss_fn(logits, b["targets"])
            accs[prefix].update(logits, b["targets"], loss)
    model.train()
    return {f"{prefix}/{k}": v for prefix, acc in accs.items() for k, v in acc.compute().items()}


def checkpoint_state(
    model,
    loss_fn,
    optimizer,
    scaler,
    state: TrainState,
    cfg: DictConfig,
    taxonomy: Taxonomy,
    run_id: str | None,
    rng: list,
) -> dict:
    return {
        "version": 1,
        "model": model.state_dict(),
        "loss": loss_fn.state_dict(),  # GradNorm task weights and their optimizer
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "train_state": asdict(state),
        "rng": rng,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "taxonomy": taxonomy.to_dict(),
        "wandb_run_id": run_id,
    }


def gather_rng(dist_info: DistInfo) -> list:
    """Every rank's RNG state, in rank order (on all ranks)."""
    if not dist_info.is_distributed:
        return [capture_rng()]
    states = [None] * dist_info.world_size
    torch.distributed.all_gather_object(states, capture_rng())
    return states


def main(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    # ------------------------------------------------------------------ setup
    if run_dir is None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dist_info = init_distributed(cfg.train.device)
    device, is_main = dist_info.device, dist_info.is_main
    logging.getLogger().setLevel(cfg.log_level if is_main else "WARNING")
    log.setLevel(cfg.log_level if is_main else "WARNING")
    if cfg.train.precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {list(PRECISIONS)}, got {cfg.train.precision!r}")
    for key, value in (
        ("train.accumulate", cfg.train.accumulate),
        ("train.log_every", cfg.train.log_every),
        ("checkpoint.every_steps", cfg.checkpoint.every_steps),
    ):
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")
    ckpt_dir = run_dir / "checkpoints"

    resumed = None
    if cfg.checkpoint.auto_resume:
        resumed = load_latest(ckpt_dir, map_location="cpu")
    elif step_checkpoints(ckpt_dir) or (ckpt_dir / "last.pt").exists():
        raise RuntimeError(
            f"{run_dir} already holds checkpoints and checkpoint.auto_resume=false; refusing to overwrite them. "
            "Choose another run (e.g. name=... or hydra.run.dir=...) or delete that folder."
        )

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = build_data(
        cfg.data,
        cfg.augmentation,
        run_dir=run_dir,
        seed=cfg.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        pin_memory=device.type == "cuda",
    )
    taxonomy = data.taxonomy
    if resumed is not None and Taxonomy.from_dict(resumed[0]["taxonomy"]) != taxonomy:
        raise RuntimeError(
            f"the label space of {resumed[1]} differs from the one built from the data now; the dataset "
            "changed since this run started. Start a new run (another name= or output directory)."
        )
    if is_main:
        taxonomy.save(run_dir / "taxonomy.json")

    model = build_model(cfg.model, taxonomy.num_classes, data.meta_dims, taxonomy)
    if resumed is None and cfg.model.get("pretrained"):  # a resumed run has its own weights
        load_pretrained(model, cfg.model.pretrained, taxonomy)
    model = model.to(device, memory_format=torch.channels_last if cfg.train.channels_last else None)
    optimizer = build_optimizer(model, cfg.optimizer)
    amp_dtype = PRECISIONS[cfg.train.precision]
    if amp_dtype is not None and device.type == "cpu":
        log.warning(
            "train.precision=%s on the CPU: most CPUs emulate half precision and run it many times slower "
            "than fp32 (docs/BENCHMARKS.md); train.precision=32 is the fast choice here",
            cfg.train.precision,
        )
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")

    micro_per_epoch = len(data.train_batches)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.train.accumulate)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps) if cfg.train.epochs > 0 else cfg.train.max_steps
    warmup = warmup_steps_for(total_steps, cfg.scheduler.warmup_steps, cfg.scheduler.warmup_fraction)
    loss_fn = build_loss(cfg.loss, taxonomy, data.class_counts, total_steps=total_steps).to(device)
    # GradNorm balances the ranks' gradients on the last layer that all heads share
    shared_params = list(model.shared_parameters()) if hasattr(model, "shared_parameters") else []
    if cfg.loss.gradnorm.enabled and not shared_params:
        raise ValueError(f"loss.gradnorm needs {type(model).__name__}.shared_parameters(); it has none")
    # what the step does to a batch before the forward pass: device augmentation, mixing, metadata masking
    batch_transform = build_train_batch_transform(
        cfg,
        data.step_transform,
        task_keys=taxonomy.task_keys,
        null_index=taxonomy.null_index,
        meta_components=list(data.meta_dims),
        total_steps=total_steps,
        device=device,
        rank=dist_info.rank,
    )

    state = TrainState()
    run_id = None
    if resumed is not None:
        ckpt, ckpt_path = resumed
        model.load_state_dict(ckpt["model"])
        if "loss" in ckpt:
            loss_fn.load_state_dict(ckpt["loss"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(**ckpt["train_state"])
        rng = ckpt["rng"]
        restore_rng(rng[dist_info.rank] if len(rng) == dist_info.world_size else rng[0])
        run_id = ckpt.get("wandb_run_id")
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            ckpt_path,
            state.step,
            state.epoch,
            state.batch_in_epoch,
        )
    else:
        torch.manual_seed(
            cfg.seed + dist_info.rank
        )  # dropout differs per rank; weights were made identical above

    raw_model = model
    if cfg.train.channels_last:  # converts the images; the weights were converted above
        model = ChannelsLastInputs(model)
    if cfg.train.compile:
        model = torch.compile(model)
    if dist_info.is_distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    logger = NullLogger()
    if is_main:
        logger = RunLogger(
            run_dir,
            config=OmegaConf.to_container(cfg, resolve=True),
            wandb_cfg=cfg.logger.wandb,
            resume_step=state.step if resumed is not None else None,
            run_id=run_id,
            make_plots=cfg.logger.plots,
        )
    run_id = broadcast_object(logger.run_id)
    monitor = cfg.checkpoint.monitor or f"val/top1/{taxonomy.task_keys[-1]}"
    sign = 1.0 if cfg.checkpoint.monitor_mode == "max" else -1.0
    log.info(
        "run dir %s | %s | %d params | %d steps (%d per epoch, %d micro-batches of %d x %d ranks, accumulate %d) | "
        "precision %s | device %s",
        run_dir,
        type(raw_model).__name__,
        sum(p.numel() for p in raw_model.parameters()),
        total_steps,
        steps_per_epoch,
        micro_per_epoch,
        cfg.data.batch_size,
        dist_info.world_size,
        cfg.train.accumulate,
        cfg.train.precision,
        device,
    )
    log.info("%s", describe(cfg, batch_transform))
    if is_main and cfg.logger.plots:  # the first batch as the model will see it
        head = first_samples(data.train_loader.dataset, data.train_batches, state.epoch)
        head = batch_transform(move_batch(head, device), step=state.step, epoch=state.epoch, micro=0)
        grid = save_sample_grid(head, run_dir / "plots/augmented_samples.png", cfg.data.mean, cfg.data.std)
        logger.log_image("train/augmented_samples", grid, state.step)
    mask_each = list(data.meta_dims) if cfg.train.val_mask_components else []

    def validate() -> dict:
        limit = cfg.train.limit_val_batches
        metrics = evaluate(model, data.val_loader, loss_fn, taxonomy, device, autocast, limit, mask_each)
        logger.log(metrics, state.step, state.epoch)
        logger.plot()
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("val/top1", "val_nometa/top1"))}
        log.info("step %d validation: %s", state.step, shown)
        return metrics

    def save(metrics: dict | None = None) -> None:
        is_best = False
        value = None if metrics is None else metrics.get(monitor)
        if value is not None and math.isfinite(value):
            is_best = state.best_value is None or sign * value > sign * state.best_value
            if is_best:
                state.best_value = value
        rng = gather_rng(dist_info)
        if is_main:
            payload = checkpoint_state(
                raw_model, loss_fn, optimizer, scaler, state, cfg, taxonomy, run_id, rng
            )
            save_checkpoint(payload, ckpt_dir, state.step, cfg.checkpoint.keep_last, is_best=is_best)

    # ------------------------------------------------------------------ loop
    metrics: dict = {}
    if state.step >= total_steps:
        log.info(
            "run already complete (step %d of %d); start another run to train again", state.step, total_steps
        )
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        disable=not (is_main and cfg.logger.progress_bar),
        dynamic_ncols=True,
    )
    window = {
        "loss": torch.zeros((), device=device),
        "task_loss": torch.zeros(taxonomy.num_tasks, device=device),
        "steps": 0,
        "images": 0,
        "time": time.perf_counter(),
    }
    model.train()
    while state.step < total_steps:
        # the sampler skips the micro-batches a resumed run already trained on in this epoch
        data.train_batches.load_state_dict({"epoch": state.epoch, "start_batch": state.batch_in_epoch})
        data.train_batches.set_epoch(state.epoch)
        micro = state.batch_in_epoch
        group_left = 0
        for batch in data.train_loader:
            if group_left == 0:  # first micro-batch of an optimizer step
                group_left = min(cfg.train.accumulate, micro_per_epoch - micro)
                group_size = group_left
                loss_fn.set_step(state.step)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_multiplier(
                        state.step,
                        total_steps=total_steps,
                        warmup_steps=warmup,
                        name=cfg.scheduler.name,
                        min_ratio=cfg.scheduler.min_lr_ratio,
                    )
            batch = move_batch(batch, device)
            batch = batch_transform(batch, step=state.step, epoch=state.epoch, micro=micro)
            group_left -= 1
            sync = group_left == 0 or not dist_info.is_distributed
            with nullcontext() if sync else model.no_sync(), autocast:
                logits = model(batch["images"], batch["meta"], batch["meta_valid"])
                loss, task_losses = loss_fn(logits, batch["targets"], batch["targets_b"], batch["lam"])
            if group_left == 0:  # GradNorm learns from the last micro-batch, before backward frees the graph
                loss_fn.update_task_weights(state.step, shared_params, loss_scale=scaler.get_scale())
            scaler.scale(loss / group_size).backward()
            micro += 1
            # accumulated on the device: no host sync per step
            window["loss"] += loss.detach().float() / group_size
            window["task_loss"] += task_losses.detach().float() / group_size
            window["images"] += batch["images"].shape[0] * dist_info.world_size
            if group_left > 0:
                continue

            # optimizer step
            if cfg.train.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batch_in_epoch = micro
            window["steps"] += 1
            bar.update(1)

            if state.step % cfg.train.log_every == 0 or state.step == total_steps:
                elapsed = time.perf_counter() - window["time"]
                n = window["steps"] * dist_info.world_size
                # mean over ranks: the logged loss is the global batch's, as in a single process
                losses = all_reduce_sum(torch.cat([window["loss"].view(1), window["task_loss"]])).cpu()
                window["loss"], window["task_loss"] = losses[0].item(), losses[1:]
                lr = optimizer.param_groups[0]["lr"]
                train_metrics = {
                    "train/loss": window["loss"] / n,
                    "train/lr": lr,
                    "perf/images_per_s": window["images"] / max(elapsed, 1e-9),
                }
                train_metrics.update(
                    {
                        f"train/loss/{k}": v / n
                        for k, v in zip(taxonomy.task_keys, window["task_loss"].tolist())
                    }
                )
                train_metrics.update(
                    {
                        f"train/task_weight/{k}": v
                        for k, v in zip(taxonomy.task_keys, loss_fn.current_task_weights().tolist())
                    }
                )
                logger.log(train_metrics, state.step, state.epoch)
                bar.set_postfix(
                    loss=f"{train_metrics['train/loss']:.3f}",
                    lr=f"{lr:.2e}",
                    img_s=f"{train_metrics['perf/images_per_s']:.0f}",
                )
                if not bar.disable:
                    log.debug("step %d %s", state.step, train_metrics)
                else:
                    log.info(
                        "step %d/%d loss %.4f lr %.2e %.0f img/s",
                        state.step,
                        total_steps,
                        train_metrics["train/loss"],
                        lr,
                        train_metrics["perf/images_per_s"],
                    )
                window.update(
                    loss=torch.zeros((), device=device),
                    task_loss=torch.zeros(taxonomy.num_tasks, device=device),
                    steps=0,
                    images=0,
                    time=time.perf_counter(),
                )

            end_of_epoch = micro == micro_per_epoch
            finished = state.step >= total_steps
            if end_of_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            do_val = (
                finished
                or (cfg.train.val_every > 0 and state.step % cfg.train.val_every == 0)
                or (cfg.train.val_every == 0 and end_of_epoch)
            )
            paused = time.perf_counter()
            if do_val:
                metrics = validate()
            if do_val or finished or end_of_epoch or state.step % cfg.checkpoint.every_steps == 0:
                save(metrics if do_val else None)
            window["time"] += time.perf_counter() - paused  # images/s counts training time only
            if finished or end_of_epoch:
                break
    bar.close()

    # ------------------------------------------------------------------ teardown
    if not metrics and resumed is not None:
        log.info("final metrics are in %s", run_dir / "metrics.jsonl")
    logger.finish()
    cleanup()
    return metrics


register_configs()


# an absolute path: relative paths would be resolved as a Python package when imported by the shim
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def hydra_entry(cfg: DictConfig) -> float | None:
    try:
        metrics = main(cfg)
    except (DatasetError, BadImageError, CheckpointError) as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # let the sweep record this job's failure and go on
        # bad input, not a bug: the message says what is wrong and how to fix it; no traceback
        log.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    monitor = cfg.checkpoint.monitor or None
    if monitor is None and metrics:
        monitor = next((k for k in reversed(list(metrics)) if k.startswith("val/top1/")), None)
    return metrics.get(monitor) if monitor else None


if __name__ == "__main__":
    hydra_entry()
