"""The training loop: setup (``linnaeus.run``), loop, teardown.

`python train.py [overrides]` and `python -m linnaeus.train [overrides]` both land in ``main``. The
loop reads top to bottom: collect a step's micro-batches, ``train_step``, then ask the ``Cadence``
what to do (log, validate, checkpoint, stop) and do it with ``log_train``, ``validate``, ``save``.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NoReturn

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from tqdm import tqdm

from linnaeus.augment import describe
from linnaeus.augment.preview import first_samples, save_sample_grid
from linnaeus.cadence import Actions
from linnaeus.checkpoint import capture_rng, save_checkpoint
from linnaeus.config import register_configs
from linnaeus.confusion import ConfusionCounts
from linnaeus.data.faults import WorkerCrashError, describe_worker_crash, install_crash_trace, is_worker_crash
from linnaeus.dist import agree_flags, cleanup, process_rank
from linnaeus.errors import UserError
from linnaeus.evaluation import evaluate, metadata_views, move_batch
from linnaeus.guard import ADVICE, TrainingDiverged
from linnaeus.reports import write_reports
from linnaeus.run import Run, build_run, checkpoint_payload, describe_run
from linnaeus.rundir import RunLock

log = logging.getLogger("linnaeus")


# ---------------------------------------------------------------------- the step
def train_step(run: Run, micro_batches: list[dict]) -> None:
    """One optimizer step over ``micro_batches`` (gradient accumulation); no host sync."""
    state, count = run.state, len(micro_batches)
    run.optimizer.set_lr(run.schedule(state.step))
    run.loss_fn.set_step(state.step)
    step_loss = torch.zeros((), device=run.device)
    for i, batch in enumerate(micro_batches):
        last = i == count - 1
        batch = run.data.prepare(move_batch(batch, run.device))  # decode / to float / normalise on the device
        batch = run.transform(batch, step=state.step, epoch=state.epoch, micro=state.batch_in_epoch + i)
        with nullcontext() if last else run.no_sync(), run.autocast:
            logits = run.model(batch["images"], batch["meta"], batch["meta_valid"])
            loss, task_losses = run.loss_fn(logits, batch["targets"], batch["targets_b"], batch["lam"])
        if last:  # GradNorm learns from the last micro-batch, before backward frees the graph
            run.loss_fn.update_task_weights(state.step, run.shared_params, loss_scale=run.scaler.get_scale())
        run.scaler.scale(loss / count).backward()
        step_loss += loss.detach().float() / count
        run.window.add(loss / count, task_losses / count, batch["images"].shape[0] * run.dist.world_size)

    for optimizer in run.optimizer:
        run.scaler.unscale_(optimizer)
    grad_norm = run.clip_grads([p for p in run.raw_model.parameters() if p.grad is not None])
    if run.guard.allows(step_loss, grad_norm):
        for optimizer in run.optimizer:
            run.scaler.step(optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.batch_in_epoch += count
    run.window.steps += 1
    run.ema.update(run.raw_model, state.step)


# ---------------------------------------------------------------------- what the cadence asks for
def check_finite(run: Run) -> None:
    """Stop before anything is logged as fine or saved when a step since the last look went bad."""
    bad = int(agree_flags([int(run.guard.bad.item())], run.control)[0])
    if bad:
        last = run.ckpt_dir / "last.pt"
        kept = f"{last} holds the last finite weights" if last.exists() else "no checkpoint was written"
        raise TrainingDiverged(
            f"training diverged: the loss or gradient norm became NaN or infinite at or before step "
            f"{run.state.step} (optimizer.lr={run.cfg.optimizer.lr}); nothing after the last "
            f"checkpoint was saved and {kept}; {ADVICE}"
        )


def log_train(run: Run, bar: tqdm) -> None:
    """Write the ``train/*`` row for the window since the last one, then open a new window."""
    window, state = run.window, run.state
    losses = window.reduced()
    n = window.steps * run.dist.world_size
    elapsed = window.seconds()
    lr = run.optimizer.param_groups[0]["lr"]
    row = {
        "train/loss": losses[0].item() / n,
        "train/lr": lr,
        "perf/images_per_s": window.images / max(elapsed, 1e-9),
    }
    row.update({f"train/loss/{k}": v / n for k, v in zip(run.taxonomy.task_keys, losses[1:].tolist())})
    weights = run.loss_fn.current_task_weights().tolist()
    row.update({f"train/task_weight/{k}": v for k, v in zip(run.taxonomy.task_keys, weights)})
    if len(run.optimizer.names) > 1:
        row.update({f"train/lr/{g['name']}": g["lr"] for g in run.optimizer.param_groups})
    if run.guard.skipped:
        row["train/skipped_steps"] = run.guard.skipped
    run.logger.log(row, state.step, state.epoch)
    bar.set_postfix(loss=f"{row['train/loss']:.3f}", lr=f"{lr:.2e}", img_s=f"{row['perf/images_per_s']:.0f}")
    if bar.disable:
        log.info(
            "step %d/%d loss %.4f lr %.2e %.0f img/s",
            state.step,
            run.plan.total_steps,
            row["train/loss"],
            lr,
            row["perf/images_per_s"],
        )
    window.reset()


def validate(run: Run) -> dict:
    """Validation of the live weights (every metadata view) and of the EMA weights (``val_ema/``).

    The live weights' per-class counts are kept in ``run.confusion`` for the end-of-run reports.
    """
    cfg = run.cfg
    mask_each = list(run.data.meta_dims) if cfg.train.val_mask_components else []
    views = metadata_views(list(run.data.meta_dims), mask_each)
    collect = {
        view: ConfusionCounts(run.taxonomy, run.device) for view in ("val", "val_nometa") if view in views
    }
    common = dict(autocast=run.autocast, limit=cfg.train.limit_val_batches, prepare=run.data.prepare)
    loader, loss_fn, taxonomy, device = run.data.val_loader, run.loss_fn, run.taxonomy, run.device
    metrics = evaluate(run.model, loader, loss_fn, taxonomy, device, views=views, collect=collect, **common)
    if run.ema.module is not None:
        metrics.update(
            evaluate(run.ema.module, loader, loss_fn, taxonomy, device, views={"val_ema": ()}, **common)
        )
    run.confusion = collect
    run.logger.log(metrics, run.state.step, run.state.epoch)
    run.logger.plot()
    shown = {
        k: round(v, 4)
        for k, v in metrics.items()
        if k.startswith(("val/top1", "val_nometa/top1", "val_ema/top1"))
    }
    log.info("step %d validation: %s", run.state.step, shown)
    return metrics


def write_final_reports(run: Run) -> None:
    """Per-class tables and (with ``logger.plots``) confusion plots of the last validation, in
    ``reports/`` and ``plots/``."""
    if not run.dist.is_main or not run.confusion:
        return
    write_reports(
        run.run_dir / "reports",
        run.confusion["val"],
        run.taxonomy,
        plots_dir=run.run_dir / "plots",
        nometa=run.confusion.get("val_nometa"),
        wandb_run=getattr(run.logger, "wandb", None),
        step=run.state.step,
        plots=run.cfg.logger.plots,
    )
    log.info("per-class results of the last validation: %s", run.run_dir / "reports")


def gather_rng(run: Run) -> list:
    """Every rank's RNG state, in rank order (on all ranks)."""
    if not run.dist.is_distributed:
        return [capture_rng()]
    states = [None] * run.dist.world_size
    torch.distributed.all_gather_object(states, capture_rng())
    return states


def weights_are_finite(run: Run) -> bool:
    tensors = [p.detach() for p in run.raw_model.parameters()]
    if run.ema.module is not None:
        tensors += [p.detach() for p in run.ema.module.parameters()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def save(run: Run, metrics: dict | None) -> None:
    """A checkpoint of the whole training state (rank 0 writes it; every rank takes part)."""
    state = run.state
    value = None if metrics is None else metrics.get(run.monitor)
    if metrics is not None and value is None:
        raise KeyError(
            f"checkpoint.monitor={run.monitor!r} is not among the validation metrics: {sorted(metrics)}"
        )
    is_best = value is not None and math.isfinite(value)
    is_best = is_best and (state.best_value is None or run.monitor_sign * (value - state.best_value) > 0)
    if is_best:
        state.best_value = value
    if not weights_are_finite(run):
        raise TrainingDiverged(
            f"the weights at step {state.step} are not finite and were not saved; {ADVICE}"
        )
    window = run.window.state_dict(run.window.reduced())
    rng = gather_rng(run)
    if run.dist.is_main:
        payload = checkpoint_payload(run, rng, window)
        save_checkpoint(payload, run.ckpt_dir, state.step, run.cfg.checkpoint.keep_last, is_best=is_best)


def stop_flags(run: Run, last_save: float) -> dict:
    """The stop and time-based checkpoint requests, agreed by every rank (a CPU all-reduce)."""
    minutes = run.cfg.checkpoint.every_minutes
    time_due = minutes is not None and time.monotonic() - last_save >= 60 * minutes
    stop, save_now, due = agree_flags(
        [run.signals.requested, run.signals.save_requested, time_due], run.control
    )
    run.signals.save_requested = False
    return {"stop_requested": bool(stop), "save_due": bool(save_now or due)}


def act(run: Run, actions: Actions, bar: tqdm) -> dict | None:
    """Do what the cadence asked for after a step; returns the validation metrics when validated."""
    run.window.pause()
    check_finite(run)
    if actions.log:
        log_train(run, bar)
    metrics = validate(run) if actions.validate else None
    stop_early = metrics is not None and run.early_stop.update(metrics, run.state.step)
    if stop_early:
        log.info("%s; rerunning the command does not train further", run.early_stop.describe(run.state.step))
    if actions.save or stop_early:
        save(run, metrics)
    run.window.resume()
    return metrics


# ---------------------------------------------------------------------- the loop
def train(run: Run) -> dict:
    """Train until the last step, an early stop or a stop signal; the last validation's metrics."""
    state, plan, data = run.state, run.plan, run.data
    metrics: dict = {}
    finished = state.step >= plan.total_steps or run.early_stop.stopped
    if finished:
        log.info(
            "run already complete (step %d of %d); start another run to train again",
            state.step,
            plan.total_steps,
        )
    bar = tqdm(
        total=plan.total_steps,
        initial=state.step,
        disable=not (run.dist.is_main and run.cfg.logger.progress_bar),
        dynamic_ncols=True,
    )
    last_save = time.monotonic()
    run.model.train()
    while not finished:
        # the sampler skips the micro-batches a resumed run already trained on in this epoch
        data.train_batches.load_state_dict({"epoch": state.epoch, "start_batch": state.batch_in_epoch})
        data.train_batches.set_epoch(state.epoch)
        micro_batches: list[dict] = []
        for batch in data.train_loader:
            micro_batches.append(batch)
            left_in_epoch = plan.micro_per_epoch - state.batch_in_epoch - len(micro_batches)
            if len(micro_batches) < plan.accumulate and left_in_epoch > 0:
                continue
            train_step(run, micro_batches)
            micro_batches = []
            bar.update(1)
            end_of_epoch = state.batch_in_epoch == plan.micro_per_epoch
            if end_of_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            actions = run.cadence.after_step(
                state.step, end_of_epoch=end_of_epoch, **stop_flags(run, last_save)
            )
            if actions.any:
                metrics = act(run, actions, bar) or metrics
            if actions.save:
                last_save = time.monotonic()
            finished = actions.stop or run.early_stop.stopped
            if finished or end_of_epoch:
                break
    bar.close()
    shutdown_workers(run)  # now, not at interpreter exit; and before a requeue's SIGTERM can reach them
    if metrics and not run.signals.requested:
        write_final_reports(run)
    if run.signals.requested:
        log.info(
            "stopped by %s at step %d of %d; checkpoint saved; run the same command again to resume",
            run.signals.name,
            state.step,
            plan.total_steps,
        )
    return metrics


def train_naming_crashed_images(run: Run) -> dict:
    """``train``, with a loader worker's crash (e.g. a decoder segfault) named by the image it was on."""
    try:
        return train(run)
    except RuntimeError as err:
        if not is_worker_crash(err):
            raise
        shutdown_workers(run)
        datasets = [run.data.train_loader.dataset, run.data.val_loader.dataset]
        raise WorkerCrashError(describe_worker_crash(err, datasets)) from None


def shutdown_workers(run: Run) -> None:
    """Stop the loader workers now, so that a requeue's SIGTERM finds none to kill mid-batch."""
    for loader in (run.data.train_loader, run.data.val_loader):
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


def save_first_batch(run: Run) -> None:
    """The first training batch as the model will see it, as a PNG grid (and in W&B)."""
    cfg, state = run.cfg, run.state
    head = first_samples(run.data.train_loader.dataset, run.data.train_batches, state.epoch)
    head = run.data.prepare(move_batch(head, run.device))
    head = run.transform(head, step=state.step, epoch=state.epoch, micro=0)
    grid = save_sample_grid(head, run.run_dir / "plots/augmented_samples.png", cfg.data.mean, cfg.data.std)
    run.logger.log_image("train/augmented_samples", grid, state.step)


def main(cfg: DictConfig, run_dir: Path | None = None) -> dict:
    if run_dir is None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    with RunLock(run_dir) if process_rank() == 0 else nullcontext():  # one trainer per run directory
        return run_locked(cfg, run_dir)


def run_locked(cfg: DictConfig, run_dir: Path) -> dict:
    run = build_run(cfg, run_dir)
    install_crash_trace(run.data.train_loader.dataset, run.data.val_loader.dataset)
    try:
        if run.resumed_from is not None:
            state = run.state
            log.info(
                "resumed from %s at step %d (epoch %d, batch %d)",
                run.resumed_from,
                state.step,
                state.epoch,
                state.batch_in_epoch,
            )
        log.info("%s", describe_run(run))
        log.info("%s", describe(cfg, run.transform))
        if run.dist.is_main and cfg.logger.plots:
            save_first_batch(run)
        metrics = train_naming_crashed_images(run)
        if not metrics and run.resumed_from is not None:
            log.info("final metrics are in %s", run_dir / "metrics.jsonl")
    finally:
        run.logger.finish()
        cleanup()
    run.signals.hand_over()  # under submitit: requeue the job (it exits here)
    run.signals.restore()
    return metrics


register_configs()


# an absolute path: relative paths would be resolved as a Python package when imported by the shim
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="config")
def hydra_entry(cfg: DictConfig) -> float | None:
    try:
        metrics = main(cfg)
    except UserError as err:
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


def exit_process() -> NoReturn:
    """End the process as a normal exit would, minus tearing down every imported module (about 1.5 s
    with torch and timm loaded, after a run that is over): join the threads that a normal exit joins,
    run the exit handlers (log flushes, RAM cache files deleted, loader workers stopped), flush the
    standard streams, then leave."""
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    hydra_entry()
    exit_process()
