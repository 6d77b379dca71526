"""Setup: everything a training run needs, built once into a ``Run`` by plain builder functions.

Decisions are taken here, by building different objects (an EMA or none, one optimizer or several,
a guard that skips bad steps or one that only watches), so the step in ``linnaeus.train`` never
reads an experiment flag.
"""

from __future__ import annotations

import logging
import math
import os
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from linnaeus.augment import build_train_batch_transform
from linnaeus.cadence import Cadence, EarlyStopping
from linnaeus.checkpoint import CheckpointError, load_latest, restore_rng, step_checkpoints
from linnaeus.data.loader import DataBundle, build_data
from linnaeus.data.taxonomy import Taxonomy
from linnaeus.dist import DistInfo, agree_flags, broadcast_object, init_distributed, make_control_group
from linnaeus.ema import NoEMA, build_ema
from linnaeus.errors import ConfigError
from linnaeus.guard import build_guard
from linnaeus.logger import NullLogger, RunLogger
from linnaeus.losses import build_loss
from linnaeus.models import build_model
from linnaeus.models.memory_format import ChannelsLastInputs
from linnaeus.models.pretrained import load_pretrained
from linnaeus.optim import Optimizers, build_optimizer, scale_lr_for_batch
from linnaeus.resume import check_resume
from linnaeus.rundir import watch_parent
from linnaeus.schedule import build_lr_schedule
from linnaeus.signals import StopSignals
from linnaeus.validate import check_config
from linnaeus.window import LogWindow

log = logging.getLogger("linnaeus")
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    """Where the loop is; saved in every checkpoint."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_value: float | None = None


@dataclass
class Plan:
    """Step counts derived from the data and the config (logged at start-up)."""

    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    accumulate: int


@dataclass
class Run:
    cfg: DictConfig
    run_dir: Path
    dist: DistInfo
    data: DataBundle
    taxonomy: Taxonomy
    raw_model: torch.nn.Module  # the bare weights: saved, averaged, evaluated
    model: torch.nn.Module  # what the step calls: raw_model, maybe channels-last, compiled, DDP
    optimizer: Optimizers
    scaler: torch.amp.GradScaler
    loss_fn: torch.nn.Module
    ema: NoEMA
    guard: object
    transform: object  # the step's batch augmentation
    autocast: object
    no_sync: object  # context for micro-batches that do not synchronise gradients
    schedule: object  # step -> LR multiplier
    plan: Plan
    cadence: Cadence
    early_stop: EarlyStopping
    window: LogWindow
    logger: NullLogger
    signals: StopSignals
    control: object  # CPU process group for stop/checkpoint agreement (None in one process)
    shared_params: list
    clip_grads: object  # params -> global gradient norm (clipping it to train.grad_clip when set)
    monitor: str
    monitor_sign: float
    state: TrainState = field(default_factory=TrainState)
    resumed_from: Path | None = None
    confusion: dict | None = None  # per-class counts of the last validation, per view

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def resolve_auto_batch(
    cfg: DictConfig, resumed: tuple[dict, Path] | None, dist_info: DistInfo, control
) -> None:
    """Replace ``data.batch_size=auto`` by a number: the resumed run's, or the largest that fits
    (``linnaeus.autobatch``), the minimum over ranks. Written into ``cfg``, so checkpoints keep it."""
    from linnaeus.autobatch import cuda_trial, find_batch_size
    from linnaeus.data.labels import read_labels
    from linnaeus.data.loader import resolve_paths
    from linnaeus.data.taxonomy import build_taxonomy

    if resumed is not None:
        size = int(resumed[0]["config"]["data"]["batch_size"])
        log.info("data.batch_size=auto: %d per device, as found when this run started", size)
    else:
        device = dist_info.device
        fits = None
        if device.type == "cuda":
            labels_path, _ = resolve_paths(cfg.data)
            table = read_labels(labels_path, cfg.data.task_keys, cfg.data.meta_components)
            taxonomy, table, _ = build_taxonomy(table, cfg.data.on_conflict)
            loss_fn = build_loss(cfg.loss, taxonomy).to(device)
            autocast, _ = build_precision(cfg.train.precision, device)
            fits = cuda_trial(
                lambda: build_model(cfg.model, taxonomy.num_classes, table.meta_dims, taxonomy),
                loss_fn,
                image_size=cfg.data.image_size,
                meta_dims=table.meta_dims,
                num_classes=taxonomy.num_classes,
                device=device,
                autocast=autocast,
            )
        size = find_batch_size(
            fits, safety=cfg.data.auto_batch.safety, limit=cfg.data.auto_batch.max, device=device
        )
        size = -agree_flags([-size], control)[0]  # the minimum over ranks
    cfg.data.batch_size = size


def find_resume(cfg: DictConfig, run_dir: Path) -> tuple[dict, Path] | None:
    """The checkpoint to resume from, None for a fresh run; refuses to overwrite without auto-resume."""
    ckpt_dir = run_dir / "checkpoints"
    if cfg.checkpoint.auto_resume:
        return load_latest(ckpt_dir, map_location="cpu")
    if step_checkpoints(ckpt_dir) or (ckpt_dir / "last.pt").exists():
        raise CheckpointError(
            f"{run_dir} already holds checkpoints and checkpoint.auto_resume=false; refusing to overwrite them. "
            "Choose another run (e.g. name=... or hydra.run.dir=...) or delete that folder."
        )
    return None


def build_precision(precision: str, device: torch.device):
    """The autocast context and gradient scaler for ``train.precision``."""
    amp_dtype = PRECISIONS[precision]
    if amp_dtype is not None and device.type == "cpu":
        log.warning(
            "train.precision=%s on the CPU: most CPUs emulate half precision and run it many times slower "
            "than fp32 (docs/BENCHMARKS.md); train.precision=32 is the fast choice here",
            precision,
        )
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    return autocast, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def plan_steps(cfg: DictConfig, data: DataBundle) -> Plan:
    micro = len(data.train_batches)
    per_epoch = math.ceil(micro / cfg.train.accumulate)
    total = cfg.train.epochs * per_epoch
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps) if cfg.train.epochs > 0 else cfg.train.max_steps
    return Plan(micro, per_epoch, total, cfg.train.accumulate)


def build_model_for(cfg: DictConfig, data: DataBundle, device: torch.device, fresh: bool) -> torch.nn.Module:
    model = build_model(cfg.model, data.taxonomy.num_classes, data.meta_dims, data.taxonomy)
    if fresh and cfg.model.get("pretrained"):  # a resumed run has its own weights
        load_pretrained(model, cfg.model.pretrained, data.taxonomy)
    return model.to(device, memory_format=torch.channels_last if cfg.train.channels_last else None)


def wrap_model(cfg: DictConfig, model: torch.nn.Module, dist_info: DistInfo) -> torch.nn.Module:
    """channels-last inputs, ``torch.compile`` and DDP around the bare model, as configured."""
    if cfg.train.channels_last:  # converts the images; the weights were converted already
        model = ChannelsLastInputs(model)
    if cfg.train.compile:
        model = torch.compile(model)
    if dist_info.is_distributed:
        device = dist_info.device
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def restore(run: Run, ckpt: dict, path: Path) -> None:
    """Continue exactly where the checkpoint left off: weights, optimizers, scaler, EMA, GradNorm,
    RNG of this rank, loop position, early-stopping count and the open logging window."""
    run.raw_model.load_state_dict(ckpt["model"])
    if "loss" in ckpt:
        run.loss_fn.load_state_dict(ckpt["loss"])
    optimizer_state = ckpt["optimizer"]
    if "optimizers" not in optimizer_state:  # a single-optimizer checkpoint of an earlier layout
        optimizer_state = {"names": ["default"], "optimizers": [optimizer_state]}
    try:
        run.optimizer.load_state_dict(optimizer_state)
    except ValueError as err:
        raise CheckpointError(f"cannot resume from {path}: {err}") from err
    run.scaler.load_state_dict(ckpt["scaler"])
    run.ema.load_state_dict(ckpt.get("ema"))
    run.early_stop.load_state_dict(ckpt.get("early_stop", {}))
    run.state = TrainState(**ckpt["train_state"])
    if ckpt.get("window") is not None:
        run.window.load_state_dict(ckpt["window"], is_main=run.dist.is_main)
    rng = ckpt["rng"]
    restore_rng(rng[run.dist.rank] if len(rng) == run.dist.world_size else rng[0])
    run.resumed_from = path


def build_logger(
    cfg: DictConfig, run_dir: Path, dist_info: DistInfo, resumed: dict | None, state: TrainState
):
    """W&B and ``metrics.jsonl`` on rank 0; a logger that does nothing elsewhere."""
    if not dist_info.is_main:
        return NullLogger()
    return RunLogger(
        run_dir,
        config=OmegaConf.to_container(cfg, resolve=True),
        wandb_cfg=cfg.logger.wandb,
        resume_step=state.step if resumed is not None else None,
        run_id=resumed.get("wandb_run_id") if resumed is not None else None,
        make_plots=cfg.logger.plots,
    )


def build_grad_clip(max_norm: float | None):
    """``params -> total gradient norm``; clips to ``max_norm`` when set (the guard reads the norm)."""
    if max_norm is None:
        return lambda params: torch.nn.utils.get_total_norm([p.grad for p in params])
    return lambda params: torch.nn.utils.clip_grad_norm_(params, max_norm)


def build_optimizers(cfg: DictConfig, model: torch.nn.Module, world_size: int) -> Optimizers:
    """The optimizers, their LRs rescaled to the global batch when ``optimizer.lr_scaling`` asks."""
    optimizer = build_optimizer(model, cfg.optimizer)
    global_batch = cfg.data.batch_size * world_size * cfg.train.accumulate
    rule, reference = cfg.optimizer.lr_scaling, cfg.optimizer.reference_batch_size
    factor = scale_lr_for_batch(optimizer, rule, global_batch, reference)
    if rule != "none":
        log.info(
            "optimizer.lr_scaling=%s: global batch %d / reference %d -> LR x %.4g",
            rule,
            global_batch,
            reference,
            factor,
        )
    return optimizer


def build_step_parts(
    cfg: DictConfig, data: DataBundle, model: torch.nn.Module, plan: Plan, dist_info: DistInfo
):
    """The loss, the layer GradNorm balances on, and the step's batch augmentation."""
    taxonomy, device = data.taxonomy, dist_info.device
    loss_fn = build_loss(cfg.loss, taxonomy, data.class_counts, total_steps=plan.total_steps).to(device)
    # GradNorm balances the ranks' gradients on the last layer that all heads share
    shared_params = list(model.shared_parameters()) if hasattr(model, "shared_parameters") else []
    if cfg.loss.gradnorm.enabled and not shared_params:
        raise ConfigError(f"loss.gradnorm needs {type(model).__name__}.shared_parameters(); it has none")
    transform = build_train_batch_transform(
        cfg,
        data.step_transform,
        task_keys=taxonomy.task_keys,
        null_index=taxonomy.null_index,
        meta_components=list(data.meta_dims),
        total_steps=plan.total_steps,
        device=device,
        rank=dist_info.rank,
    )
    return loss_fn, shared_params, transform


def start_process(cfg: DictConfig, run_dir: Path) -> tuple[StopSignals, DistInfo, object]:
    """The config checked, the run directory, stop handlers, the process group and its control group,
    and the log level of this rank."""
    check_config(cfg)  # every check that needs no data, before anything starts
    run_dir.mkdir(parents=True, exist_ok=True)
    signals = StopSignals().install()  # before any loader worker is forked: workers inherit handlers
    if "TORCHELASTIC_RUN_ID" in os.environ:
        watch_parent()  # a killed torchrun launcher stops its ranks instead of leaving them unsupervised
    dist_info = init_distributed(cfg.train.device)
    control = make_control_group()
    level = cfg.log_level if dist_info.is_main else "WARNING"
    logging.getLogger().setLevel(level)
    log.setLevel(level)
    return signals, dist_info, control


def build_run_data(
    cfg: DictConfig, run_dir: Path, dist_info: DistInfo, resumed: tuple[dict, Path] | None
) -> DataBundle:
    """The run's data, seeded; a resumed run's label space must be the one built now (rank 0 saves it)."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = dist_info.device
    data = build_data(
        cfg.data,
        cfg.augmentation,
        run_dir=run_dir,
        seed=cfg.seed,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        pin_memory=device.type == "cuda",
    )
    if resumed is not None and Taxonomy.from_dict(resumed[0]["taxonomy"]) != data.taxonomy:
        raise CheckpointError(
            f"the label space of {resumed[1]} differs from the one built from the data now; the dataset "
            "changed since this run started. Start a new run (another name= or output directory)."
        )
    if dist_info.is_main:
        data.taxonomy.save(run_dir / "taxonomy.json")
    return data


def build_run(cfg: DictConfig, run_dir: Path) -> Run:
    """Setup, in order: process group, resume point, data, model, optimizers, loss, EMA, logger."""
    signals, dist_info, control = start_process(cfg, run_dir)
    resumed = find_resume(cfg, run_dir)
    if cfg.data.batch_size == "auto":
        resolve_auto_batch(cfg, resumed, dist_info, control)
    if resumed is not None:  # refuses unsafe changes, logs the safe ones
        check_resume(resumed[0]["config"], OmegaConf.to_container(cfg, resolve=True), where=str(run_dir))
    data = build_run_data(cfg, run_dir, dist_info, resumed)
    taxonomy, device = data.taxonomy, dist_info.device
    raw_model = build_model_for(cfg, data, device, fresh=resumed is None)
    optimizer = build_optimizers(cfg, raw_model, dist_info.world_size)
    autocast, scaler = build_precision(cfg.train.precision, device)
    plan = plan_steps(cfg, data)
    loss_fn, shared_params, transform = build_step_parts(cfg, data, raw_model, plan, dist_info)
    early = cfg.train.early_stop
    monitor = cfg.checkpoint.monitor or f"val/top1/{taxonomy.task_keys[-1]}"
    run = Run(
        cfg=cfg,
        run_dir=run_dir,
        dist=dist_info,
        data=data,
        taxonomy=taxonomy,
        raw_model=raw_model,
        model=raw_model,
        optimizer=optimizer,
        scaler=scaler,
        loss_fn=loss_fn,
        ema=build_ema(cfg.train.ema, raw_model),
        guard=build_guard(cfg.train.max_bad_steps, device, check_grad_norm=not scaler.is_enabled()),
        transform=transform,
        autocast=autocast,
        no_sync=nullcontext,
        schedule=build_lr_schedule(cfg.scheduler, plan.total_steps),
        plan=plan,
        cadence=Cadence(
            plan.total_steps, cfg.train.log_every, cfg.train.val_every, cfg.checkpoint.every_steps
        ),
        early_stop=EarlyStopping(early.monitor, early.mode, early.patience, early.min_delta),
        window=LogWindow(taxonomy.num_tasks, device),
        logger=NullLogger(),
        signals=signals,
        control=control,
        shared_params=shared_params,
        clip_grads=build_grad_clip(cfg.train.grad_clip),
        monitor=monitor,
        monitor_sign=1.0 if cfg.checkpoint.monitor_mode == "max" else -1.0,
    )
    if resumed is not None:
        restore(run, *resumed)
    else:
        torch.manual_seed(cfg.seed + dist_info.rank)  # dropout differs per rank; weights are identical
    run.model = wrap_model(cfg, raw_model, dist_info)
    if dist_info.is_distributed:
        run.no_sync = run.model.no_sync
    run.logger = build_logger(cfg, run_dir, dist_info, resumed[0] if resumed else None, run.state)
    run.logger.run_id = broadcast_object(run.logger.run_id)
    return run


def describe_run(run: Run) -> str:
    plan, cfg = run.plan, run.cfg
    groups = ", ".join(
        f"{g['name']} ({sum(p.numel() for p in g['params'])})" for g in run.optimizer.param_groups
    )
    return (
        f"run dir {run.run_dir} | {type(run.raw_model).__name__} | "
        f"{sum(p.numel() for p in run.raw_model.parameters())} params | {plan.total_steps} steps "
        f"({plan.steps_per_epoch} per epoch, {plan.micro_per_epoch} micro-batches of {cfg.data.batch_size} x "
        f"{run.dist.world_size} ranks, accumulate {plan.accumulate}) | precision {cfg.train.precision} | "
        f"device {run.device} | EMA {'on' if run.ema.module is not None else 'off'} | "
        f"parameter groups: {groups}"
    )


def checkpoint_payload(run: Run, rng: list, window: dict) -> dict:
    """Everything ``restore`` needs, plus what evaluation and export read (config, taxonomy, metadata)."""
    return {
        "version": 2,
        "model": run.raw_model.state_dict(),
        "ema": run.ema.state_dict(),
        "preferred_weights": "ema" if run.monitor.startswith("val_ema/") else "model",
        "loss": run.loss_fn.state_dict(),  # GradNorm task weights and their optimizer
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "train_state": asdict(run.state),
        "early_stop": run.early_stop.state_dict(),
        "window": window,
        "rng": rng,
        "config": OmegaConf.to_container(run.cfg, resolve=True),
        "taxonomy": run.taxonomy.to_dict(),
        "meta_dims": dict(run.data.meta_dims),
        "wandb_run_id": run.logger.run_id,
    }
