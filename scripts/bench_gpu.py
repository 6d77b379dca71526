"""Every GPU measurement in one run, for a machine with one CUDA device (results in docs/BENCHMARKS.md).

    python scripts/bench_gpu.py --out DIR          # on the GPU machine; DIR/gpu_results.json + .md
    python scripts/bench_gpu.py --quick --out DIR  # a small CPU rehearsal of the same steps

1. Training-step throughput on synthetic batches (``bench_train.py --mfu``): ``mformer_sm`` at 224 px
   in bf16, fp16 and fp32 (TF32 matmuls), images/s, peak memory, GFLOPs per image, achieved TFLOP/s and
   the model FLOPs utilisation against the device's dense bf16 peak.
2. The trainer end to end on real JPEGs: ``--photos`` seeded crops of scikit-image's photographs
   (256 px, quality 90) built into ``images.h5``, ``python train.py ... model=mformer_sm
   data.image_size=224 train.precision=bf16`` for ``--steps`` steps, with the CPU decoding
   (``data.decode=cpu``, the loader augments) and with nvJPEG on the GPU (``data.decode=gpu
   augmentation.device=gpu``); images/s is the median of the run's ``perf/images_per_s`` rows after
   the first, and its MFU uses the FLOPs per image of step 1.
3. ``data.batch_size=auto``: the batch size the trainer finds for ``mformer_sm`` at 224 px in bf16.

Each step runs in its own process with a time limit; a failed step is recorded with the end of its
output and the others still run. ``--quick`` swaps in ``mformer_xs`` at 32 px, a few steps, 200
photos and the CPU (the GPU-only steps are then recorded as skipped), so the script can be checked
on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
    """(exit status, output) of ``command`` run from the repository within ``timeout`` s (124: timed out)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )  # fmt: skip
        code, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as err:
        partial = err.stdout or ""
        code, output = 124, partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    print(f"[{time.perf_counter() - start:6.1f} s, exit {code}] {' '.join(command)}", flush=True)
    return code, output


def last_json(output: str) -> dict | None:
    lines = [line for line in output.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def synthetic(args, precision: str) -> dict:
    """Step 1 for one precision."""
    command = [
        sys.executable, "scripts/bench_train.py", "--model", args.model, "--image-size", str(args.image_size),
        "--batch-size", str(args.batch_size), "--precision", precision, "--steps", str(args.synthetic_steps),
        "--warmup", "5", "--mfu", "--device", args.device,
    ]  # fmt: skip
    code, output = run(command, args.timeout)
    result = last_json(output) if code == 0 else None
    return result if result is not None else {"error": output[-1500:], "exit": code}


def build_photos(root: Path, count: int) -> tuple[Path, Path]:
    """labels.h5 and images.h5 of ``count`` 256 px photo crops (JPEG quality 90)."""
    from bench_loader import photo_tree

    from linnaeus.data.build import main as build_main

    photo_tree(root / "photos", count, size=256)
    if (
        build_main(
            ["folder", str(root / "photos"), "--out", str(root / "built"), "--workers", str(os.cpu_count())]
        )
        != 0
    ):
        raise SystemExit("building the photo dataset failed")
    return root / "built" / "labels.h5", root / "built" / "images.h5"


def trainer(args, labels: Path, images: Path, run_dir: Path, extra: list[str], steps: int) -> dict:
    """Step 2 or 3: one ``train.py`` run; its images/s rows, batch size and log tail."""
    command = [
        sys.executable, "train.py", "data=h5", f"data.labels={labels}", f"data.images={images}",
        f"model={args.model}", f"data.image_size={args.image_size}", f"train.precision={args.train_precision}",
        f"train.max_steps={steps}", "train.log_every=5", "train.limit_val_batches=2",
        f"data.num_workers={args.workers}", "data.check_images=false", "logger.wandb.mode=disabled",
        "logger.progress_bar=false", "logger.plots=false", "checkpoint.every_steps=1000000",
        f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip
    code, output = run(command, args.timeout)
    result: dict = {"overrides": extra, "exit": code}
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    rates = [r["perf/images_per_s"] for r in rows if "perf/images_per_s" in r]
    if rates:
        result["images_per_s_rows"] = rates
        result["images_per_s"] = statistics.median(rates[1:] or rates)  # the first window holds the start-up
    chosen = [line for line in output.splitlines() if "data.batch_size=auto:" in line]
    if chosen:
        result["auto_batch_size_line"] = chosen[-1].split("] - ")[-1]
    if code != 0 or not rates:
        result["log_tail"] = output[-2000:]
    return result


def markdown(results: dict) -> str:
    lines = [f"device: {results['device']} | torch {results['torch']} | {results['started']}", ""]
    lines.append("| step | images/s | GFLOPs/image | TFLOP/s | MFU | peak memory (GiB) |")
    lines.append("|---|---|---|---|---|---|")
    for precision, r in results["synthetic"].items():
        if "error" in r:
            lines.append(f"| synthetic {precision} | failed (exit {r['exit']}) | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        lines.append(
            f"| synthetic {r['model']} {r['image_size']} px, batch {r['batch_size']}, {precision} | "
            f"{r['images_per_s']:,.0f} | {r['gflops_per_image']} | {r['achieved_tflops']} | {mfu} | "
            f"{r.get('peak_memory_gib', '-')} |"
        )
    for name, r in results["trainer"].items():
        if "images_per_s" not in r:
            outcome = r.get("skipped") or f"failed (exit {r.get('exit')})"
            lines.append(f"| trainer, {name} | {outcome} | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        lines.append(f"| trainer, {name} | {r['images_per_s']:,.0f} | | | {mfu} | |")
    auto = results.get("auto_batch", {})
    lines += [
        "",
        f"data.batch_size=auto: {auto.get('auto_batch_size_line') or auto.get('skipped') or 'failed'}",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_results")))
    parser.add_argument("--quick", action="store_true", help="a small CPU rehearsal")
    parser.add_argument("--photos", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=60, help="trainer steps per run")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per step's process")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available() and not args.quick
    args.device = "cuda" if cuda else "cpu"
    if args.quick:
        args.model, args.image_size, args.batch_size, args.synthetic_steps = "mformer_xs", 32, 32, 3
        args.photos, args.steps, args.workers, args.train_precision = min(args.photos, 200), 10, 0, "32"
    else:
        args.model, args.image_size, args.batch_size, args.synthetic_steps = "mformer_sm", 224, 128, 30
        args.workers, args.train_precision = max(1, min(14, (os.cpu_count() or 2) - 2)), "bf16"
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu x{os.cpu_count()}",
        "torch": torch.__version__,
        "quick": args.quick,
    }
    precisions = ["bf16", "fp16", "32"] if cuda else ["32"]
    results["synthetic"] = {p: synthetic(args, p) for p in precisions}
    flops = next(
        (r["gflops_per_image"] for r in results["synthetic"].values() if "gflops_per_image" in r), None
    )
    peak = results["synthetic"].get("bf16", {}).get("peak_tflops")
    with tempfile.TemporaryDirectory() as tmp:
        labels, images = build_photos(Path(tmp), args.photos)
        batch = [f"data.batch_size={args.batch_size}"]
        runs = {"CPU decode": ["data.decode=cpu", *batch]}
        runs["GPU decode (nvJPEG), augmentation on the GPU"] = [
            "data.decode=gpu",
            "augmentation.device=gpu",
            *batch,
        ]
        results["trainer"] = {}
        for n, (name, extra) in enumerate(runs.items()):
            if not cuda and "data.decode=gpu" in extra:
                results["trainer"][name] = {"skipped": "needs CUDA"}
                continue
            result = trainer(args, labels, images, Path(tmp) / f"run{n}", extra, args.steps)
            if flops and peak and "images_per_s" in result:
                result["mfu"] = result["images_per_s"] * flops * 1e9 / (peak * 1e12)
            results["trainer"][name] = result
        results["auto_batch"] = (
            trainer(args, labels, images, Path(tmp) / "auto", ["data.batch_size=auto"], steps=3)
            if cuda
            else {"skipped": "needs CUDA"}
        )
    (args.out / "gpu_results.json").write_text(json.dumps(results, indent=1))
    (args.out / "gpu_results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
