"""Run outputs: ``metrics.jsonl``, Weights & Biases (offline by default) and PNG training curves.

Only rank 0 gets a ``RunLogger``; other ranks get a ``NullLogger`` with the same methods, so the
training loop never checks ranks before logging.

In a sweep every job joins one W&B group named after the sweep directory, and a job that SLURM
runs records its job id, array task and restart count in the W&B config (``cluster``) and in
``train.log``, so a requeued job's restarts can be told apart in one W&B run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from linnaeus.errors import OutputError, describe_write_error

log = logging.getLogger(__name__)


class NullLogger:
    """Does nothing; used on non-zero ranks."""

    run_id: str | None = None

    def log(self, metrics: dict, step: int, epoch: int) -> None:
        pass

    def plot(self) -> None:
        pass

    def log_image(self, key: str, path: Path, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def cluster_info(env: Mapping[str, str] = os.environ) -> dict:
    """Where SLURM runs this process: job id, array job and task, restart count, nodes; {} outside SLURM.

    ``restart_count`` counts requeues (pre-emption, timeouts handed back by submitit): 0 on the
    first start, 1 after the first requeue, ...
    """
    if "SLURM_JOB_ID" not in env and "SLURM_JOBID" not in env:
        return {}
    info = {
        "job_id": env.get("SLURM_JOB_ID") or env["SLURM_JOBID"],
        "restart_count": int(env.get("SLURM_RESTART_COUNT") or 0),
    }
    optional = {
        "array_job_id": "SLURM_ARRAY_JOB_ID",
        "array_task_id": "SLURM_ARRAY_TASK_ID",
        "partition": "SLURM_JOB_PARTITION",
        "nodelist": "SLURM_JOB_NODELIST",
        "num_tasks": "SLURM_NTASKS",
        "cluster_name": "SLURM_CLUSTER_NAME",
    }
    for key, name in optional.items():
        if env.get(name):
            info[key] = env[name]
    if "array_task_id" in info:
        info["array_task_id"] = int(info["array_task_id"])
    if "num_tasks" in info:
        info["num_tasks"] = int(info["num_tasks"])
    return info


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's jobs: the sweep directory's last two parts (``demo/multirun``).

    Derived from the directory only, so a requeued job joins the same group; the default
    ``outputs/<name>/multirun`` gives one group per dataset name, ``hydra.sweep.dir=...`` one per sweep.
    """
    parts = Path(sweep_dir).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(sweep_dir)


def _hydra_sweep_dir() -> str | None:
    """The sweep directory when this process is a job of a Hydra multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):  # not started through Hydra
        return None
    if hydra_cfg.mode is None or hydra_cfg.mode.name != "MULTIRUN":
        return None
    return str(hydra_cfg.sweep.dir)


def append_line(path: Path, line: str) -> None:
    """Append one line; on a failed write (disk full) cut the file back to whole lines and raise ``OutputError``."""
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as handle:
            handle.write(line + "\n")
    except OSError as err:
        try:
            os.truncate(path, size)  # no half line for a reader or a resumed run to trip over
        except OSError:
            pass
        raise OutputError(
            describe_write_error(err, path, "metrics")
            + "; training stopped here, and the same command resumes from the last checkpoint"
        ) from err


def _clean(value):
    """JSON-safe scalars: NaN/inf become null so every line parses with any JSON reader."""
    value = float(value)
    return value if math.isfinite(value) else None


class RunLogger(NullLogger):
    def __init__(
        self,
        run_dir: Path,
        *,
        config: dict,
        wandb_cfg,
        resume_step: int | None = None,
        run_id: str | None = None,
        make_plots: bool = True,
    ) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.make_plots = make_plots
        if resume_step is not None:
            self._truncate_after(resume_step)
        else:
            self.metrics_path.unlink(missing_ok=True)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        config = dict(config)
        config.setdefault("cluster", cluster_info())
        if config["cluster"]:
            cluster = config["cluster"]
            array = (
                f" (array {cluster['array_job_id']} task {cluster['array_task_id']})"
                if "array_task_id" in cluster
                else ""
            )
            log.info(
                "SLURM job %s%s, restart %d, nodes %s",
                cluster["job_id"],
                array,
                cluster["restart_count"],
                cluster.get("nodelist", "?"),
            )
        self.wandb = None
        if wandb_cfg.mode != "disabled":
            self.wandb = self._init_wandb(config, wandb_cfg)
            if resume_step is not None:
                self._replay_into_wandb()

    def _replay_into_wandb(self) -> None:
        """Send the kept rows of ``metrics.jsonl`` to the resumed W&B run again.

        A killed attempt often leaves its W&B file short (W&B writes asynchronously), so rows that
        exist in ``metrics.jsonl`` could exist in no W&B file. Replaying them makes the newest W&B
        file hold every step; the W&B server ignores steps it already has for the run.
        """
        for record in read_metrics(self.metrics_path):
            values = {k: v for k, v in record.items() if v is not None and k != "step"}
            self.wandb.log(values, step=int(record["step"]))

    def _truncate_after(self, step: int) -> None:
        """Drop lines logged after the checkpoint we resume from; they will be logged again."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a line cut short by a crash
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.metrics_path)

    def _init_wandb(self, config: dict, wandb_cfg):
        import wandb

        group = wandb_cfg.group
        if group is None and (sweep_dir := _hydra_sweep_dir()) is not None:
            group = sweep_group(sweep_dir)
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(
            project=wandb_cfg.project,
            entity=wandb_cfg.entity,
            group=group,
            tags=list(wandb_cfg.tags),
            name=f"{self.run_dir.parent.name}/{self.run_dir.name}",
            dir=str(self.run_dir),
            mode=wandb_cfg.mode,
            id=self.run_id,
            resume="allow",
            config=config,
        )

    def log(self, metrics: dict, step: int, epoch: int) -> None:
        record = {"step": int(step), "epoch": int(epoch)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        append_line(self.metrics_path, json.dumps(record))
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=int(step))

    def log_image(self, key: str, path: Path, step: int) -> None:
        """An image file already saved in the run directory, also sent to W&B."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=int(step))

    def plot(self) -> None:
        if self.make_plots:
            try:
                plot_curves(self.metrics_path, self.run_dir / "plots")
            except Exception as err:  # a plotting failure must never stop training
                log.warning("could not draw training curves: %s", err)

    def finish(self) -> None:
        self.plot()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def read_metrics(path: Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def plot_curves(metrics_path: Path, out_dir: Path) -> Path:
    """Loss/LR and validation accuracy curves from ``metrics.jsonl`` into ``out_dir/curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    out_dir.mkdir(parents=True, exist_ok=True)

    def series(key: str) -> tuple[list, list]:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        return [p[0] for p in points], [p[1] for p in points]

    keys = sorted({k for r in records for k in r})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("train/loss", "val/loss"):
        axes[0].plot(*series(key), label=key)
    axes[0].set_title("loss")
    axes[1].plot(*series("train/lr"), color="tab:orange")
    axes[1].set_title("learning rate")
    for key in keys:
        if key.startswith(("val/top1/", "val_nometa/top1/")) or key == "val/chain_accuracy":
            style = "--" if key.startswith("val_nometa") else "-"
            axes[2].plot(*series(key), style, marker=".", label=key)
    axes[2].set_title("validation accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = out_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
