"""Training-step throughput of a model config on synthetic batches (no data loading).

    python scripts/bench_train.py --model mformer_sm --image-size 224 --batch-size 64 --precision bf16

Times forward, backward and an AdamW step over ``--steps`` steps after ``--warmup`` untimed ones, on
the given device (default: cuda when present), and prints images/s (and peak GPU memory on CUDA).
``--mfu`` also counts one step's FLOPs (torch's FlopCounterMode: matrix products, convolutions and
attention, forward and backward) and reports GFLOPs per image, achieved TFLOP/s and the model FLOPs
utilisation against the device's dense bf16/fp16 peak (``--peak-tflops``, default a data-sheet value
for known GPUs).
Four ranks of 10/50/200/1000 classes and three metadata components, as on a mid-sized real dataset.

    python scripts/bench_train.py --compare-bare                 # mformer_xs and timm resnet18, demo data

``--compare-bare`` measures the framework's overhead instead: for each of ``--bare-models`` it runs our
trainer (``python train.py``, images/s from ``metrics.jsonl``, the first logging window left out) and a
plain PyTorch loop in this process with the same model, the same loader (``build_data``: same data,
batch size, workers and augmentation; contiguous batches, as a plain loop takes them) and the same AdamW settings and gradient clipping, but none
of our training code (no schedule, metrics, checkpoint cadence, loss objects or batch transform), and
prints the ratio of their images/s (the best of ``--rounds`` interleaved rounds of each side).

    python scripts/bench_train.py --compare-end-to-end           # Fashion-MNIST, data.cache=ram vs ImageFolder

``--compare-end-to-end`` times whole runs instead, from process start to exit (imports, start-up, cache
filling, training, a validation pass after every epoch, final reports): ``--per-class`` Fashion-MNIST
images of each of its 10 classes as a three-rank folder tree (``scripts/make_fashion_tree.py``; 28 px
PNGs, trained at 32 px), built into labels.h5 + images.h5, trained for ``--epochs`` epochs by
``python train.py ... data.cache=ram`` (other keys at their defaults, ``data.check_images`` included),
against a plain PyTorch script in its own process on the same files: torchvision's ``ImageFolder``
(one class per leaf folder, mapped to per-rank targets) + ``DataLoader`` with the same uint8
augmentation, normalised in the workers, a random ``data.val_fraction`` of the images held out and
resized + centre-cropped as ours, the same model, AdamW settings, gradient clipping, batch size,
workers and epochs, cross-entropy on every rank and top-1 at the finest rank after every epoch, but
no schedule, checkpoints or reports. Both sides run under each of ``--settings``
(``WORKERS:THREADS``: loader workers, and torch threads in the main process through
``OMP_NUM_THREADS``, ``auto`` for torch's default of every core; default ``2:1 2:auto 0:auto``),
``--rounds`` times, interleaved. The best wall time of each side and setting is reported with the
ratio plain / ours (> 1: ours is faster) and each side's final validation top-1, and then the best
setting of each side against the other's: with the images in RAM our loader needs no workers, while
the ImageFolder script may be fastest with its workers decoding, so each side is compared at its
best.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf

from linnaeus.models import build_model, count_parameters
from linnaeus.optim import build_optimizer

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = [11, 51, 201, 1001]  # including the null class of each rank
META_DIMS = {"spatial": 3, "temporal": 2, "elevation_main": 6}
DTYPES = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for --mfu
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}


def peak_tflops(device: torch.device, precision: str, given: float | None) -> float | None:
    """The device's peak for ``precision``: ``given``, else the data-sheet value for a known GPU at
    bf16/fp16; None when unknown (the achieved TFLOP/s are still reported)."""
    if given is not None:
        return given
    if device.type != "cuda" or precision == "32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def step_flops(step) -> int:
    """FLOPs of one call of ``step`` (forward and backward; matrix products and convolutions, as
    torch's FlopCounterMode counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_overrides(spec: str) -> list[str]:
    if spec.startswith("timm:"):
        return ["model=timm", f"model.name={spec.split(':', 1)[1]}"]
    return [f"model={spec}"]


def trainer_rate(overrides: list[str], steps: int, log_every: int, run_dir: Path) -> float:
    """images/s our trainer logs, averaged over its logging windows after the first."""
    command = [
        sys.executable, "train.py", *overrides, f"train.max_steps={steps}", f"train.log_every={log_every}",
        "train.limit_val_batches=1", "checkpoint.every_steps=1000000", "logger.wandb.mode=disabled",
        "logger.progress_bar=false", "logger.plots=false", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/images_per_s"] for r in rows if "perf/images_per_s" in r][1:]
    return sum(rates) / len(rates)


def bare_rate(overrides: list[str], steps: int, warmup: int) -> float:
    """images/s of a plain loop: our loader and model, torch's AdamW, cross-entropy per rank."""
    from hydra import compose, initialize_config_dir

    from linnaeus.config import register_configs
    from linnaeus.data.loader import build_data

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_data(  # contiguous batches, as a plain loop expects them (the workers transpose)
        cfg.data, cfg.augmentation, run_dir=None, seed=cfg.seed, pin_memory=device.type == "cuda",
        channels_last=False,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.taxonomy.num_classes, data.meta_dims, data.taxonomy).to(device)
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay
    )
    mean = torch.tensor(list(cfg.data.mean), device=device).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.data.std), device=device).view(1, 3, 1, 1)
    null = data.taxonomy.null_index
    model.train()
    step, epoch, images, start = 0, 0, 0, time.perf_counter()
    while step < steps:
        data.train_batches.set_epoch(epoch)
        for batch in data.train_loader:
            if step == warmup:
                synchronize(device)
                images, start = 0, time.perf_counter()
            x = batch["images"].to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
            meta = {k: v.to(device, non_blocking=True) for k, v in batch["meta"].items()}
            valid = {k: v.to(device, non_blocking=True) for k, v in batch["meta_valid"].items()}
            targets = batch["targets"].to(device, non_blocking=True)
            logits = model(x, meta, valid)
            loss = sum(
                torch.nn.functional.cross_entropy(out, targets[:, t], ignore_index=null)
                for t, out in enumerate(logits)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            step += 1
            images += x.shape[0]
            if step >= steps:
                break
        epoch += 1
    synchronize(device)
    return images / (time.perf_counter() - start)


def compare_bare(args) -> None:
    steps, log_every = args.warmup + args.steps, args.warmup
    print(f"load average before: {os.getloadavg()}")
    results = []
    for spec in args.bare_models:
        overrides = [
            "data=demo", *model_overrides(spec), f"data.image_size={args.image_size}",
            f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}", "data.check_images=false",
        ]  # fmt: skip
        ours = bare = 0.0
        for round_ in range(args.rounds):  # interleaved, alternating which side goes first; best of each
            for side in ("ours", "bare") if round_ % 2 == 0 else ("bare", "ours"):
                if side == "ours":
                    with tempfile.TemporaryDirectory() as tmp:
                        ours = max(ours, trainer_rate(overrides, steps, log_every, Path(tmp) / "run"))
                else:
                    bare = max(bare, bare_rate(overrides, steps, args.warmup))
        results.append({"model": spec, "trainer_images_s": ours, "bare_images_s": bare, "ratio": ours / bare})
        print(
            f"{spec:16s} trainer {ours:8.1f} images/s   bare loop {bare:8.1f} images/s   ratio {ours / bare:.3f}"
        )
    print(f"load average after: {os.getloadavg()}")
    print(json.dumps(results))


def final_val_top1(run_dir: Path) -> float:
    """The last val/top1 at the finest rank in a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in rows for k in r if k.startswith("val/top1/taxa_L")}
    finest = min(keys, key=lambda k: int(k.rsplit("L", 1)[1]))
    return [r[finest] for r in rows if finest in r][-1]


def timed_command(
    command: list[str], env: dict[str, str], timeout: float, cache_dir: Path | None = None
) -> tuple[float, str]:
    """(wall-clock seconds from start to exit, stdout) of ``command`` run from the repository; it must
    exit with 0 within ``timeout`` s, or it is killed with every process it started, and the RAM cache
    files that appeared in ``cache_dir`` meanwhile are removed."""
    before = set(cache_dir.glob("*linnaeus-cache-*")) if cache_dir is not None else set()
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException as error:  # a hang or Ctrl-C; its own session, so Ctrl-C does not reach it
        os.killpg(proc.pid, signal.SIGKILL)  # our trainer only records SIGTERM
        proc.communicate()
        left = set(cache_dir.glob("*linnaeus-cache-*")) - before if cache_dir is not None else set()
        for file in left:
            file.unlink(missing_ok=True)
        if isinstance(error, subprocess.TimeoutExpired):
            raise SystemExit(
                f"{' '.join(command)} was still running after {timeout:.0f} s (hung?): killed"
            ) from None
        raise
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return elapsed, stdout


def plain_imagefolder_loop(spec_file: str) -> None:
    """A plain PyTorch training script over an image folder tree, settings from ``spec_file``; prints
    each epoch's validation top-1 at the finest rank as a JSON line."""
    import numpy as np
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from linnaeus.data.taxonomy import NULL_NAME, Taxonomy
    from linnaeus.data.transforms import build_train_augment

    spec = OmegaConf.load(spec_file)
    root = spec.tree
    leaves = sorted(os.path.relpath(folder, root) for folder, subdirs, _ in os.walk(root) if not subdirs)
    chains = [Path(leaf).parts for leaf in leaves]  # coarse to fine, one per leaf folder
    ranks = len(chains[0])
    names = [sorted({chain[r] for chain in chains}) for r in range(ranks)]
    # leaf class -> class index at every rank (0 is each rank's null class, as in our label space)
    lookup = torch.tensor([[names[r].index(chain[r]) + 1 for r in range(ranks)] for chain in chains])
    parent_name = {(r, chain[r]): chain[r - 1] for chain in chains for r in range(1, ranks)}
    parents = [None] + [
        np.array([0] + [names[r - 1].index(parent_name[r, n]) + 1 for n in names[r]]) for r in range(1, ranks)
    ]
    taxonomy = Taxonomy(
        [f"taxa_L{10 * (ranks - r)}" for r in range(ranks)],
        [np.arange(len(n) + 1) for n in names],
        [[NULL_NAME, *n] for n in names],
        parents,
    )

    class LeafFolders(ImageFolder):
        """One class per leaf folder (ImageFolder's own classes are the top-level folders)."""

        def find_classes(self, directory):
            return leaves, {leaf: i for i, leaf in enumerate(leaves)}

    data = spec.data
    mean, std, size = list(data.mean), list(data.std), data.image_size
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train_transform = v2.Compose(
        [v2.PILToTensor(), build_train_augment(spec.augmentation, size, mean), *normalize]
    )
    val_transform = v2.Compose(
        [v2.PILToTensor(), v2.Resize(spec.val_resize, antialias=True), v2.CenterCrop(size), *normalize]
    )
    train_set, val_set = (
        LeafFolders(root, transform=train_transform),
        LeafFolders(root, transform=val_transform),
    )
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(spec.seed)).tolist()
    held_out = round(data.val_fraction * len(order))
    train_set, val_set = Subset(train_set, order[held_out:]), Subset(val_set, order[:held_out])

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workers = spec.workers
    common = dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    train_loader = DataLoader(train_set, batch_size=data.batch_size, shuffle=True, **common)
    val_loader = DataLoader(val_set, batch_size=data.val_batch_size or 2 * data.batch_size, **common)

    torch.manual_seed(spec.seed)
    model = build_model(spec.model, taxonomy.num_classes, {}, taxonomy).to(device)
    opt = spec.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay
    )
    lookup = lookup.to(device)
    null = taxonomy.null_index
    for epoch in range(spec.epochs):
        model.train()
        for images, leaf in train_loader:
            images, targets = images.to(device, non_blocking=True), lookup[leaf.to(device)]
            logits = model(images, {}, {})
            loss = sum(
                torch.nn.functional.cross_entropy(out, targets[:, t], ignore_index=null)
                for t, out in enumerate(logits)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spec.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            optimizer.step()
        model.eval()
        correct = 0
        with torch.inference_mode():
            for images, leaf in val_loader:
                finest = model(images.to(device, non_blocking=True), {}, {})[-1]
                predicted = finest[:, 1:].argmax(1) + 1  # never the null class, as our metrics
                correct += int((predicted == lookup[leaf.to(device), -1]).sum())
        line = {
            "epoch": epoch,
            "val_top1": correct / len(val_set),
            "train": len(train_set),
            "val": len(val_set),
        }
        print(json.dumps(line), flush=True)


def setting_env(threads: str) -> dict[str, str]:
    """The environment of a run with ``threads`` torch threads ("auto": torch's default, all cores)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return env if threads == "auto" else {**env, "OMP_NUM_THREADS": threads}


def parse_settings(settings: list[str]) -> list[tuple[int, str]]:
    """``WORKERS:THREADS`` strings -> (loader workers, torch threads or "auto")."""
    parsed = []
    for setting in settings:
        workers, _, threads = setting.partition(":")
        if not workers.isdigit() or not (threads == "auto" or threads.isdigit()):
            raise SystemExit(f"--settings {setting!r}: expected WORKERS:THREADS, e.g. 2:1 or 0:auto")
        parsed.append((int(workers), threads))
    return parsed


def compare_end_to_end(args) -> None:
    """Every side run once per round and setting, rounds interleaved; the best of ``--rounds`` is
    reported per side and setting (a busy machine only ever makes a run slower)."""
    from hydra import compose, initialize_config_dir

    from linnaeus.config import register_configs
    from linnaeus.data.build import main as build_main
    from linnaeus.data.transforms import eval_resize_for

    sys.path.insert(0, str(REPO / "scripts"))
    from make_fashion_tree import SOURCE, make_tree

    if not (SOURCE / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"Fashion-MNIST is missing from {SOURCE} (apt-get install dataset-fashion-mnist)")
    model = args.model or "mformer_xs"
    settings = parse_settings(args.settings)
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tree, built = tmp / "fashion", tmp / "built"
        count = make_tree(tree, args.per_class)
        if build_main(["folder", str(tree), "--out", str(built), "--workers", "2"]) != 0:
            raise SystemExit(f"building {tree} failed")
        overrides = [
            "data=h5", f"data.labels={built / 'labels.h5'}", f"data.images={built / 'images.h5'}",
            "data.cache=ram", *model_overrides(model), "data.image_size=32",
            f"data.batch_size={args.batch_size}", f"train.epochs={args.epochs}",
        ]  # fmt: skip
        register_configs()
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            cfg = compose("config", overrides=overrides)
        spec = {
            "tree": str(tree),
            "epochs": args.epochs,
            "seed": cfg.seed,
            "grad_clip": cfg.train.grad_clip,
            "val_resize": eval_resize_for(cfg.data.image_size, cfg.data.val_crop_pct),
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "augmentation": OmegaConf.to_container(cfg.augmentation, resolve=True),
            "optimizer": {k: OmegaConf.to_container(cfg.optimizer, resolve=True)[k]
                          for k in ("lr", "betas", "eps", "weight_decay")},
            "data": {k: OmegaConf.to_container(cfg.data, resolve=True)[k]
                     for k in ("mean", "std", "image_size", "batch_size", "val_batch_size", "val_fraction")},
        }  # fmt: skip
        cache_dir = Path(cfg.data.ram_cache_dir)
        trainer_command = [
            sys.executable, "train.py", *overrides, "logger.wandb.mode=disabled", "logger.progress_bar=false",
            "logger.plots=false", "checkpoint.every_steps=1000000",
        ]  # fmt: skip
        spec_files = {}
        for workers in {w for w, _ in settings}:
            spec_files[workers] = tmp / f"plain_spec_{workers}.yaml"
            OmegaConf.save(OmegaConf.create({**spec, "workers": workers}), spec_files[workers])
        plain_command = [sys.executable, str(Path(__file__).resolve()), "--plain-imagefolder-loop"]
        print(f"Fashion-MNIST: {count} images, 10 classes in 3 ranks | {model}, 32 px, batch {args.batch_size}, "
              f"{args.epochs} epochs | settings (loader workers:torch threads): {' '.join(args.settings)}")  # fmt: skip
        print(f"ours:  {' '.join(trainer_command)} data.num_workers=W hydra.run.dir=...")
        print(f"plain: {' '.join(plain_command)} SPEC (workers W)")
        runs: dict[tuple[str, int, str], list[dict]] = {}
        for round_ in range(args.rounds):
            for n, (workers, threads) in enumerate(settings):
                env = setting_env(threads)
                run_dir = tmp / f"run{round_}_{n}"  # fresh: an existing run directory would be resumed
                seconds, _ = timed_command(
                    [*trainer_command, f"data.num_workers={workers}", f"hydra.run.dir={run_dir}"],
                    env, args.run_timeout, cache_dir,
                )  # fmt: skip
                split = json.loads((run_dir / "split.json").read_text())
                runs.setdefault(("ours", workers, threads), []).append(
                    {"s": seconds, "val_top1": final_val_top1(run_dir), "train": split["train"], "val": split["val"]}
                )  # fmt: skip
                seconds, stdout = timed_command(
                    [*plain_command, str(spec_files[workers])], env, args.run_timeout
                )
                last = json.loads(stdout.strip().splitlines()[-1])
                runs.setdefault(("plain", workers, threads), []).append(
                    {"s": seconds, "val_top1": last["val_top1"], "train": last["train"], "val": last["val"]}
                )
                ours, plain = runs["ours", workers, threads][-1], runs["plain", workers, threads][-1]
                print(
                    f"round {round_ + 1} of {args.rounds}, {workers} workers, threads {threads:4s}: "
                    f"ours {ours['s']:6.1f} s (val top-1 {ours['val_top1']:.3f}, {ours['train']}/{ours['val']} "
                    f"train/val)   plain {plain['s']:6.1f} s (val top-1 {plain['val_top1']:.3f}, "
                    f"{plain['train']}/{plain['val']})   load average {os.getloadavg()[0]:.2f}"
                )
    best = {key: min(r["s"] for r in rs) for key, rs in runs.items()}
    rows = []
    for workers, threads in settings:
        ours, plain = best["ours", workers, threads], best["plain", workers, threads]
        rows.append({"workers": workers, "threads": threads, "ours_best_s": ours, "plain_best_s": plain,
                     "ratio_plain_over_ours": plain / ours})  # fmt: skip
        print(f"{workers} workers, threads {threads:4s}: best ours {ours:6.1f} s   plain {plain:6.1f} s   "
              f"ratio plain/ours {plain / ours:.3f}")  # fmt: skip
    ours_key = min((k for k in best if k[0] == "ours"), key=best.get)
    plain_key = min((k for k in best if k[0] == "plain"), key=best.get)
    ratio = best[plain_key] / best[ours_key]
    print(
        f"best setting of each: ours {best[ours_key]:.1f} s ({ours_key[1]} workers, threads {ours_key[2]})   "
        f"plain {best[plain_key]:.1f} s ({plain_key[1]} workers, threads {plain_key[2]})   "
        f"ratio plain/ours {ratio:.3f} (> 1: ours is faster)"
    )
    print(f"load average after: {os.getloadavg()}")
    result = {
        "dataset": "fashion-mnist", "images": count, "model": model, "image_size": 32,
        "batch_size": args.batch_size, "epochs": args.epochs, "settings": rows,
        "runs": {f"{side} {w}:{t}": rs for (side, w, t), rs in runs.items()},
        "best_of_each": {"ours": list(ours_key[1:]), "plain": list(plain_key[1:]),
                         "ratio_plain_over_ours": ratio},
    }  # fmt: skip
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=None,
        help="a file name in conf/model/ without .yaml (default mformer_sm; --compare-end-to-end: "
        "mformer_xs, and timm:NAME for model=timm model.name=NAME)",
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64, help="also --compare-end-to-end")
    parser.add_argument("--precision", choices=list(DTYPES), default="32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--mfu",
        action="store_true",
        help="count one step's FLOPs (FlopCounterMode) and report achieved TFLOP/s and model FLOPs utilisation",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="--mfu: the device's peak (default: data sheet, known GPUs)",
    )
    parser.add_argument("--compare-bare", action="store_true", help="our trainer vs a plain PyTorch loop")
    parser.add_argument(
        "--bare-models",
        nargs="+",
        default=["mformer_xs", "timm:resnet18"],
        help="--compare-bare: conf/model names; timm:NAME for model=timm model.name=NAME",
    )
    parser.add_argument("--workers", type=int, default=2, help="--compare-bare: data.num_workers")
    parser.add_argument(
        "--compare-end-to-end",
        action="store_true",
        help="whole runs: our trainer with data.cache=ram vs a plain ImageFolder script, Fashion-MNIST",
    )
    parser.add_argument(
        "--per-class", type=int, default=200, help="--compare-end-to-end: Fashion-MNIST images per class"
    )
    parser.add_argument("--epochs", type=int, default=5, help="--compare-end-to-end: training epochs")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["2:1", "2:auto", "0:auto"],
        help="--compare-end-to-end: WORKERS:THREADS settings both sides run under (THREADS: a number or auto)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="--compare-bare / --compare-end-to-end: interleaved rounds; the best of each side is reported",
    )
    parser.add_argument(
        "--run-timeout",
        type=float,
        default=1800,
        help="--compare-end-to-end: seconds before a run counts as hung",
    )
    parser.add_argument("--plain-imagefolder-loop", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_imagefolder_loop:
        plain_imagefolder_loop(args.plain_imagefolder_loop)
        return
    if args.compare_bare:
        compare_bare(args)
        return
    if args.compare_end_to_end:
        compare_end_to_end(args)
        return
    args.model = args.model or "mformer_sm"

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{args.model}.yaml")
    model = build_model(cfg, NUM_CLASSES, META_DIMS).to(device)
    optimizer = build_optimizer(model, OmegaConf.create({"_target_": "torch.optim.AdamW", "lr": 1e-4}))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    dtype = DTYPES[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

    b, s = args.batch_size, args.image_size
    images = torch.randn(b, 3, s, s, device=device).to(memory_format=memory_format)
    meta = {k: torch.randn(b, d, device=device) for k, d in META_DIMS.items()}
    valid = {k: torch.ones(b, dtype=torch.bool, device=device) for k in META_DIMS}
    targets = [torch.randint(1, n, (b,), device=device) for n in NUM_CLASSES]

    def step() -> None:
        with autocast:
            logits = model(images, meta, valid)
            loss = sum(torch.nn.functional.cross_entropy(out.float(), t) for out, t in zip(logits, targets))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    flops = step_flops(step) if args.mfu else None
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    result = {
        "model": args.model,
        "parameters": count_parameters(model),
        "image_size": s,
        "batch_size": b,
        "precision": args.precision,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()}",
        "images_per_s": round(b * args.steps / elapsed, 1),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if flops is not None:
        achieved = flops * args.steps / elapsed / 1e12
        peak = peak_tflops(device, args.precision, args.peak_tflops)
        result.update(
            gflops_per_image=round(flops / b / 1e9, 2),
            achieved_tflops=round(achieved, 2),
            peak_tflops=peak,
            mfu=round(achieved / peak, 4) if peak else None,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
