"""Time and peak memory of the label space and the taxonomy-aware loss targets at 10,000 species.

    python scripts/bench_taxonomy.py [--species 10000] [--batch 256] [--rows-per-species 5]

A synthetic 4-rank tree (about 10 children per parent) is written as label rows, then measured:
building the label space from the rows (``build_taxonomy``), the ``Taxonomy`` constructor alone,
the smoothing targets for one batch at the finest rank, and a forward + backward of the whole loss
(every rank smoothed) and of the soft-label and HXE alternatives. Peak memory is the growth of the
process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before each step),
which counts torch and numpy buffers alike, and tracemalloc's peak of Python-level allocations.
Targets: under 1 s and 200 MB for the label space and for the batch targets.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from linnaeus.data.labels import LabelTable
from linnaeus.data.taxonomy import Taxonomy, build_taxonomy
from linnaeus.losses import build_loss
from linnaeus.losses.hierarchy import taxonomy_smoothing_targets

TASK_KEYS = ["taxa_L40", "taxa_L30", "taxa_L20", "taxa_L10"]
LOSS_DEFAULTS = Path(__file__).resolve().parents[1] / "conf" / "loss" / "ce.yaml"


def synthetic_rows(num_species: int, rows_per_species: int, seed: int = 0) -> LabelTable:
    """Label rows over a random tree: species -> genus -> family -> order, ~10 children per parent."""
    rng = np.random.default_rng(seed)
    sizes = [max(2, num_species // 10**k) for k in (3, 2, 1, 0)]  # orders, families, genera, species
    chain = np.empty((num_species, 4), dtype=np.int64)
    chain[:, 3] = np.arange(num_species)
    for t in (2, 1, 0):  # each class of rank t+1 gets a parent at rank t
        parent_of = rng.integers(0, sizes[t], sizes[t + 1])
        chain[:, t] = parent_of[chain[:, t + 1]]
    taxa = (chain + np.array([1, 100_001, 200_001, 300_001]))[
        np.repeat(np.arange(num_species), rows_per_species)
    ]
    n = len(taxa)
    return LabelTable(
        path=Path("synthetic"), identifiers=np.array([f"{i}.jpg" for i in range(n)], dtype=object),
        task_keys=TASK_KEYS, taxa=taxa,
    )  # fmt: skip


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(fn, repeats: int) -> dict:
    """Median seconds, and the largest peak-RSS growth and tracemalloc peak over the repeats (MB)."""
    times, rss, traced = [], [], []
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _status_kib("VmRSS")
        tracemalloc.start()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        traced.append(tracemalloc.get_traced_memory()[1] / 2**20)
        tracemalloc.stop()
        rss.append((_status_kib("VmHWM") - base) / 1024)
    return {"seconds": statistics.median(times), "rss_mb": max(rss), "traced_mb": max(traced)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--species", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rows-per-species", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a fair, quiet measurement on a shared machine

    table = synthetic_rows(args.species, args.rows_per_species)
    taxonomy, _, _ = build_taxonomy(table)
    state = (taxonomy.task_keys, taxonomy.class_ids, taxonomy.names, taxonomy.parents)
    finest = taxonomy.num_tasks - 1
    gen = torch.Generator().manual_seed(0)
    species = torch.randint(1, taxonomy.num_classes[finest], (args.batch,), generator=gen)
    targets = torch.as_tensor(taxonomy.ancestors[finest])[species]  # (B, T)
    ancestors = torch.as_tensor(taxonomy.ancestors[finest])
    logits = [torch.randn(args.batch, n, generator=gen, requires_grad=True) for n in taxonomy.num_classes]
    base_cfg = OmegaConf.load(LOSS_DEFAULTS)

    def loss_step(**overrides) -> None:
        cfg = OmegaConf.merge(base_cfg, overrides)
        loss, _ = build_loss(cfg, taxonomy)(logits, targets)
        loss.backward()

    cases = {
        "label space from rows (build_taxonomy)": lambda: build_taxonomy(table),
        "Taxonomy(...) from class and parent arrays": lambda: Taxonomy(*state),
        "smoothing targets, finest rank": lambda: taxonomy_smoothing_targets(
            ancestors, targets[:, finest], 0.1, 1.0, taxonomy.null_index
        ),
        "loss fwd+bwd, taxonomy smoothing (all ranks)": lambda: loss_step(taxonomy_smoothing={"alpha": 0.1}),
        "loss fwd+bwd, soft labels (finest)": lambda: loss_step(name="soft_labels"),
        "loss fwd+bwd, hxe (finest)": lambda: loss_step(name="hxe"),
        "loss fwd+bwd, plain ce": lambda: loss_step(),
    }
    print(
        f"{args.species} species, {taxonomy.summary()}; {len(table)} label rows; batch {args.batch}; "
        f"torch {torch.__version__}, 1 thread"
    )
    print("| step | time (ms) | peak RSS growth (MB) | tracemalloc peak (MB) |\n|---|---|---|---|")
    for name, fn in cases.items():
        m = measure(fn, args.repeats)
        print(f"| {name} | {1000 * m['seconds']:.1f} | {m['rss_mb']:.1f} | {m['traced_mb']:.1f} |")


if __name__ == "__main__":
    main()
