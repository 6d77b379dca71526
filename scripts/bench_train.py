"""Training-step throughput of a model config on synthetic batches (no data loading).

    python scripts/bench_train.py --model mformer_sm --image-size 224 --batch-size 64 --precision bf16

Times forward, backward and an AdamW step over ``--steps`` steps after ``--warmup`` untimed ones, on
the given device (default: cuda when present), and prints images/s (and peak GPU memory on CUDA).
Four ranks of 10/50/200/1000 classes and three metadata components, as on a mid-sized real dataset.
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()

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
