"""Training-step throughput of a model config on synthetic batches (no data loading).

    python scripts/bench_train.py --model mformer_sm --image-size 224 --batch-size 64 --precision bf16

Times forward, backward and an AdamW step over ``--steps`` steps after ``--warmup`` untimed ones, on
the given device (default: cuda when present), and prints images/s (and peak GPU memory on CUDA).
Four ranks of 10/50/200/1000 classes and three metadata components, as on a mid-sized real dataset.

    python scripts/bench_train.py --compare-bare                 # mformer_xs and timm resnet18, demo data

``--compare-bare`` measures the framework's overhead instead: for each of ``--bare-models`` it runs our
trainer (``python train.py``, images/s from ``metrics.jsonl``, the first logging window left out) and a
plain PyTorch loop in this process with the same model, the same loader (``build_data``: same data,
batch size, workers and augmentation) and the same AdamW settings and gradient clipping, but none
of our training code (no schedule, metrics, checkpoint cadence, loss objects or batch transform), and
prints the ratio of their images/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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
    data = build_data(
        cfg.data, cfg.augmentation, run_dir=None, seed=cfg.seed, pin_memory=device.type == "cuda"
    )
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
    import os
    import tempfile

    steps, log_every = args.warmup + args.steps, args.warmup
    print(f"load average before: {os.getloadavg()}")
    results = []
    for spec in args.bare_models:
        overrides = [
            "data=demo", *model_overrides(spec), f"data.image_size={args.image_size}",
            f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}", "data.check_images=false",
        ]  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            ours = trainer_rate(overrides, steps, log_every, Path(tmp) / "run")
        bare = bare_rate(overrides, steps, args.warmup)
        results.append({"model": spec, "trainer_images_s": ours, "bare_images_s": bare, "ratio": ours / bare})
        print(
            f"{spec:16s} trainer {ours:8.1f} images/s   bare loop {bare:8.1f} images/s   ratio {ours / bare:.3f}"
        )
    print(f"load average after: {os.getloadavg()}")
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mformer_sm", help="a file name in conf/model/ without .yaml")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=list(DTYPES), default="32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compare-bare", action="store_true", help="our trainer vs a plain PyTorch loop")
    parser.add_argument(
        "--bare-models",
        nargs="+",
        default=["mformer_xs", "timm:resnet18"],
        help="--compare-bare: conf/model names; timm:NAME for model=timm model.name=NAME",
    )
    parser.add_argument("--workers", type=int, default=2, help="--compare-bare: data.num_workers")
    args = parser.parse_args()
    if args.compare_bare:
        compare_bare(args)
        return

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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
