"""Parameters, GFLOPs and (on a GPU) training throughput of every model config, as a Markdown table.

    python scripts/bench_models.py                          # parameters and GFLOPs at 224 and 384 px
    python scripts/bench_models.py --throughput --device cuda   # adds training images/s (GPU only)

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass of batch 1 with the
model and inputs on the meta device (shapes only: nothing is computed, so even xl at 384 px takes a
second). The counter reports 2 x multiply-accumulates (timm's "GMACs" are half of these numbers) and counts
matrix products, convolutions and attention; elementwise work (norms, activations) is not counted.
Every model has 4 ranks of 3/5/7/11 classes and 3 metadata components (spatial 3, temporal 2,
elevation_main 4), linear heads, as in the configs' parameter comments.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from linnaeus.models import build_model, count_parameters

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = [3, 5, 7, 11]
META_DIMS = {"spatial": 3, "temporal": 2, "elevation_main": 4}


def inputs(batch: int, size: int, device: str | torch.device) -> tuple[torch.Tensor, dict, dict]:
    images = torch.randn(batch, 3, size, size, device=device)
    meta = {name: torch.randn(batch, dim, device=device) for name, dim in META_DIMS.items()}
    valid = {name: torch.ones(batch, dtype=torch.bool, device=device) for name in META_DIMS}
    return images, meta, valid


def count_flops(cfg, size: int) -> int:
    """FLOPs of one forward pass at ``size`` px, batch 1, on the meta device."""
    with torch.device("meta"):
        model = build_model(cfg, NUM_CLASSES, META_DIMS).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs(1, size, "meta"))
    return counter.get_total_flops()


def train_throughput(cfg, size: int, batch: int, steps: int, device: str) -> float:
    """Training images/s: bf16 autocast, channels-last, AdamW, after a few warm-up steps."""
    model = build_model(cfg, NUM_CLASSES, META_DIMS).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, meta, valid = inputs(batch, size, device)
    images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.zeros(batch, dtype=torch.long, device=device)

    def step() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = sum(F.cross_entropy(t, targets) for t in model(images, meta, valid))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize() if device.startswith("cuda") else None
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize() if device.startswith("cuda") else None
    return batch * steps / (time.perf_counter() - start)


def order(name: str) -> tuple[str, int]:
    """Family first, then size: xs, sm, md, lg, xl."""
    family, _, size = name.rpartition("_")
    sizes = ["xs", "sm", "md", "lg", "xl"]
    return (family, sizes.index(size)) if size in sizes else (name, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", help="config names (default: every file in conf/model)")
    parser.add_argument("--sizes", nargs="*", type=int, default=[224, 384])
    parser.add_argument("--throughput", action="store_true", help="also measure training images/s")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.throughput and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        parser.error("--throughput is measured on a GPU only (--device cuda with CUDA available)")

    names = args.configs or sorted((p.stem for p in (REPO / "conf" / "model").glob("*.yaml")), key=order)
    size_cols = " | ".join(f"GFLOPs {s} px" for s in args.sizes)
    print(f"| config | model | parameters | {size_cols} | train images/s ({args.sizes[0]} px, GPU) |")
    print("|---|---|---:|" + "---:|" * len(args.sizes) + "---:|")
    for name in names:
        cfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
        with torch.device("meta"):
            params = count_parameters(build_model(cfg, NUM_CLASSES, META_DIMS))
        flops = " | ".join(f"{count_flops(cfg, size) / 1e9:.2f}" for size in args.sizes)
        speed = "—"
        if args.throughput:
            speed = f"{train_throughput(cfg, args.sizes[0], args.batch, args.steps, args.device):.0f}"
        model = cfg._target_.rsplit(".", 1)[1] + (f" `{cfg.name}`" if "name" in cfg else "")
        print(f"| `{name}` | {model} | {params / 1e6:.1f} M | {flops} | {speed} |", flush=True)


if __name__ == "__main__":
    main()
