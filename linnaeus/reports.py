"""Per-class tables, confusion plots and the reliability diagram, from ``linnaeus.confusion`` counts.

``write_reports`` is what both ``python -m linnaeus.evaluate`` and the end of a training run call:

- ``per_class_<task>.csv`` per rank: ``name, id, index, support, top1, top5, precision, recall,
  most_confused_with, most_confused_count`` (+ ``top1_nometa`` when the metadata-masked counts are
  given). ``support`` counts the samples whose label at that rank is known; ``precision`` is over
  those samples too (a sample without a label at a rank has no right answer there). Empty cells are
  undefined ratios (no support, never predicted).
- ``confusion_<task>.png`` per rank. Up to ``max_classes`` classes (default 50): the full matrix, rows
  normalised by the true class's support, with names. Above that a matrix is unreadable (10,000
  species), so the plot shows the ``top_pairs`` most frequent (true, predicted) confusions instead,
  coloured by the rank at which the two classes meet in the tree, beside the classes that wrong
  predictions name most often.
- ``reliability.png``: per rank, accuracy against confidence in the 15 bins that ``ece`` uses.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from linnaeus.confusion import ConfusionCounts, RankConfusion
from linnaeus.data.taxonomy import Taxonomy
from linnaeus.metrics import ECE_BINS, expected_calibration_error

log = logging.getLogger(__name__)

MAX_MATRIX_CLASSES = 50
TOP_PAIRS = 30
ANNOTATE_UP_TO = 20  # classes; above this, counts in the cells would overlap
COLUMNS = [
    "name",
    "id",
    "index",
    "support",
    "top1",
    "top5",
    "precision",
    "recall",
    "most_confused_with",
    "most_confused_count",
]

Counts = ConfusionCounts | Sequence[RankConfusion]


def _as_ranks(counts: Counts | None) -> list[RankConfusion] | None:
    if counts is None:
        return None
    return counts.result() if isinstance(counts, ConfusionCounts) else list(counts)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, NaN where b is 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.full(a.shape, np.nan), where=b > 0)


def most_confused(rank: RankConfusion) -> tuple[np.ndarray, np.ndarray]:
    """Per true class: the most frequent wrong prediction (-1 if none) and how often it was made."""
    other, count = np.full(rank.num_classes, -1), np.zeros(rank.num_classes, dtype=np.int64)
    wrong = rank.true != rank.pred
    true, pred, n = rank.true[wrong], rank.pred[wrong], rank.count[wrong]
    order = np.lexsort((pred, -n, true))  # by true class, then most frequent first (ties: lower index)
    true, pred, n = true[order], pred[order], n[order]
    first = np.ones(len(true), dtype=bool)
    first[1:] = true[1:] != true[:-1]
    other[true[first]], count[true[first]] = pred[first], n[first]
    return other, count


def per_class_rows(
    rank: RankConfusion, taxonomy: Taxonomy, task: int, nometa: RankConfusion | None = None
) -> list[dict]:
    """One row per real class (the null class left out), in class-index order."""
    support, correct, predicted = rank.support(), rank.correct(), rank.predicted()
    top1, top5, precision = (
        _ratio(correct, support),
        _ratio(rank.top5_hits, support),
        _ratio(correct, predicted),
    )
    top1_nometa = None if nometa is None else _ratio(nometa.correct(), nometa.support())
    other, other_count = most_confused(rank)
    names, ids = taxonomy.names[task], taxonomy.class_ids[task]
    rows = []
    for c in range(rank.num_classes):
        if c == taxonomy.null_index:
            continue
        row = {
            "name": names[c],
            "id": int(ids[c]),
            "index": c,
            "support": int(support[c]),
            "top1": top1[c],
            "top5": top5[c],
            "precision": precision[c],
            "recall": top1[c],  # single-label: recall of a class is its top-1 accuracy
            "most_confused_with": names[other[c]] if other[c] >= 0 else "",
            "most_confused_count": int(other_count[c]),
        }
        if top1_nometa is not None:
            row["top1_nometa"] = top1_nometa[c]
        rows.append(row)
    return rows


def _cell(value) -> str | int:
    if isinstance(value, float | np.floating):
        return "" if np.isnan(value) else f"{value:.4f}"
    return value


def write_per_class_csv(path: Path, rows: list[dict]) -> Path:
    columns = COLUMNS + [k for k in (rows[0] if rows else {}) if k not in COLUMNS]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
    return path


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(
    rank: RankConfusion,
    taxonomy: Taxonomy,
    task: int,
    path: Path,
    *,
    max_classes: int = MAX_MATRIX_CLASSES,
    top_pairs: int = TOP_PAIRS,
) -> Path:
    """The full row-normalised matrix for up to ``max_classes`` classes, else the top confused pairs."""
    real = [c for c in range(rank.num_classes) if c != taxonomy.null_index]
    if len(real) <= max_classes:
        return _plot_matrix(rank, taxonomy, task, path, real)
    return _plot_top_pairs(rank, taxonomy, task, path, top_pairs)


def _title(rank: RankConfusion, task_key: str) -> str:
    total, correct = rank.count.sum(), rank.count[rank.true == rank.pred].sum()
    acc = f", top-1 {correct / total:.1%}" if total else ""
    return f"{task_key}: {int(total)} images{acc}"


def _plot_matrix(rank: RankConfusion, taxonomy: Taxonomy, task: int, path: Path, real: list[int]) -> Path:
    plt = _pyplot()
    matrix = rank.dense()[np.ix_(real, real)]  # (n, n), rows = truth
    support = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, support, out=np.full(matrix.shape, np.nan), where=support > 0)
    n = len(real)
    side = min(max(4.5, 0.3 * n + 3.0), 22.0)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    names = [_short(taxonomy.names[task][c]) for c in real]
    font = 8 if n <= 30 else 6
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= ANNOTATE_UP_TO:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    dark = shares[i, j] > 0.6
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(_title(rank, taxonomy.task_keys[task]) + " (row-normalised)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_top_pairs(rank: RankConfusion, taxonomy: Taxonomy, task: int, path: Path, top_pairs: int) -> Path:
    """Left: the most frequent (true, predicted) pairs, coloured by the rank of their lowest common
    ancestor. Right: the classes that most wrong predictions name (a class that absorbs many species
    shows here, while each of its pairs may be rare)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    wrong = rank.true != rank.pred
    true, pred, count = rank.true[wrong], rank.pred[wrong], rank.count[wrong]
    order = np.lexsort((pred, true, -count))[:top_pairs]
    true, pred, count = true[order], pred[order], count[order]
    distance = taxonomy.distance(task, torch.as_tensor(true), torch.as_tensor(pred)).numpy()
    shared = task - distance // 2  # index of the rank of the lowest common ancestor; -1: none shared
    n = len(order)
    fig, (ax, side) = plt.subplots(1, 2, figsize=(14, max(3.5, 0.28 * n + 1.8)), width_ratios=(3, 2))
    cmap = plt.get_cmap("viridis", max(task + 2, 2))
    names = taxonomy.names[task]
    ax.barh(range(n), count, color=[cmap(s + 1) for s in shared])
    ax.set_yticks(
        range(n), [f"{_short(names[a])} → {_short(names[b])}" for a, b in zip(true, pred)], fontsize=7
    )
    ax.invert_yaxis()
    ax.set_xlabel("images (true → predicted)")
    levels = sorted(set(shared.tolist()), reverse=True)
    if levels:
        handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(s + 1)) for s in levels]
        labels = [f"same {taxonomy.task_keys[s]}" if s >= 0 else "no shared ancestor" for s in levels]
        ax.legend(handles, labels, fontsize=7, loc="lower right")

    received = np.bincount(rank.pred[wrong], weights=rank.count[wrong], minlength=rank.num_classes)
    sinks = np.argsort(-received, kind="stable")[:top_pairs]
    sinks = sinks[received[sinks] > 0]
    side.barh(range(len(sinks)), received[sinks], color="tab:red", alpha=0.7)
    side.set_yticks(range(len(sinks)), [_short(names[c]) for c in sinks], fontsize=7)
    side.invert_yaxis()
    side.set_xlabel("wrong predictions naming the class")
    side.set_title("classes predicted most often by mistake", fontsize=9)
    for axis in (ax, side):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))

    errors = int(rank.count[wrong].sum())
    covered = f"{count.sum() / errors:.0%} of {errors} errors" if errors else "no errors"
    ax.set_title(
        f"{_title(rank, taxonomy.task_keys[task])}\n{n} most frequent confusions ({covered}; "
        f"{rank.num_classes - 1} classes, too many for a matrix)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_reliability(ranks: Sequence[RankConfusion], path: Path) -> Path:
    """Accuracy against confidence per rank, with the ECE of each."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ranks), figsize=(3.2 * len(ranks), 3.4), squeeze=False)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / ECE_BINS
    for ax, rank in zip(axes[0], ranks):
        count, confidence, correct = rank.calibration
        accuracy, mean_conf = _ratio(correct, count), _ratio(confidence, count)
        has = count > 0
        ax.bar(centres[has], accuracy[has], width=width, edgecolor="black", linewidth=0.5, label="accuracy")
        ax.bar(centres[has], (mean_conf - accuracy)[has], bottom=accuracy[has], width=width,
               color="tab:red", alpha=0.35, label="gap to confidence")  # fmt: skip
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1)
        ece = expected_calibration_error(torch.as_tensor(rank.calibration))
        ax.set_title(f"{rank.task_key}: ECE {ece:.3f}, n={int(count.sum())}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_reports(
    out_dir: Path,
    confusion: Counts,
    taxonomy: Taxonomy,
    *,
    plots_dir: Path | None = None,
    nometa: Counts | None = None,
    wandb_run=None,
    step: int | None = None,
    prefix: str = "val",
    max_classes: int = MAX_MATRIX_CLASSES,
    top_pairs: int = TOP_PAIRS,
    plots: bool = True,
) -> dict[str, Path]:
    """Write ``per_class_<task>.csv`` into ``out_dir`` and ``confusion_<task>.png`` plus ``reliability.png``
    into ``plots_dir`` (default ``out_dir``); log them to ``wandb_run`` (tables and images) when given.

    ``confusion`` (and ``nometa``, the same view with metadata masked, for a ``top1_nometa`` column) are
    reduced ``ConfusionCounts`` or their ``result()``. Returns the written files by name. A plot that
    fails is reported as a warning and skipped, so reports never end a run that trained. ``plots=False``:
    the tables only.
    """
    ranks, ranks_nometa = _as_ranks(confusion), _as_ranks(nometa)
    out_dir, plots_dir = Path(out_dir), Path(plots_dir or out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    tables = {}
    for t, rank in enumerate(ranks):
        rows = per_class_rows(rank, taxonomy, t, None if ranks_nometa is None else ranks_nometa[t])
        name = f"per_class_{rank.task_key}.csv"
        written[name] = write_per_class_csv(out_dir / name, rows)
        tables[rank.task_key] = rows
    if plots:
        plots_dir.mkdir(parents=True, exist_ok=True)
        for t, rank in enumerate(ranks):
            name = f"confusion_{rank.task_key}.png"
            _draw(written, name, plot_confusion, rank, taxonomy, t, plots_dir / name,
                  max_classes=max_classes, top_pairs=top_pairs)  # fmt: skip
        _draw(written, "reliability.png", plot_reliability, ranks, plots_dir / "reliability.png")
    if wandb_run is not None:
        _log_wandb(wandb_run, tables, written, prefix, step)
    return written


def _draw(written: dict[str, Path], name: str, plot, *args, **kwargs) -> None:
    try:
        written[name] = plot(*args, **kwargs)
    except Exception as err:  # a figure must never cost the numbers already written
        log.warning("could not draw %s: %s", name, err)


def _log_wandb(run, tables: dict[str, list[dict]], written: dict[str, Path], prefix: str, step) -> None:
    import wandb

    payload = {}
    for key, rows in tables.items():
        columns = list(rows[0]) if rows else COLUMNS
        data = [[None if isinstance(v, float) and np.isnan(v) else v for v in row.values()] for row in rows]
        payload[f"{prefix}/per_class/{key}"] = wandb.Table(columns=columns, data=data)
    for name, path in written.items():
        if name.endswith(".png"):
            payload[f"{prefix}/{Path(name).stem.replace('_', '/', 1)}"] = wandb.Image(str(path))
    run.log(payload, **({} if step is None else {"step": int(step)}))
