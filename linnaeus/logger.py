"""Run outputs: ``metrics.jsonl``, Weights & Biases (offline by default) and PNG training curves.

Only rank 0 gets a ``RunLogger``; other ranks get a ``NullLogger`` with the same methods, so the
training loop never checks ranks before logging.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path

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
        self.wandb = None
        if wandb_cfg.mode != "disabled":
            self.wandb = self._init_wandb(config, wandb_cfg)

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
        if group is None:
            try:
                from hydra.core.hydra_config import HydraConfig

                hydra_cfg = HydraConfig.get()
                if hydra_cfg.mode.name == "MULTIRUN":
                    group = Path(hydra_cfg.sweep.dir).name
            except ValueError:
                pass
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
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
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
