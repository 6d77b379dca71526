"""Image augmentation (one pipeline in workers or on the device), metadata masking, and CLI runs with both."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from linnaeus.augment.meta_mask import MetaMask, NoMetaMask, build_meta_mask, schedule_factor
from linnaeus.augment.pipeline import AugmentOnDevice, build_train_batch_transform
from linnaeus.config import register_configs
from linnaeus.data.dataset import TaxonDataset
from linnaeus.data.prepare import PrepareBatch
from linnaeus.data.transforms import (
    RandAugment,
    TimmPilPolicy,
    build_auto_augment,
    build_eval_transform,
    build_image_transforms,
    normalize_images,
    quantize_images,
)
from linnaeus.logger import read_metrics
from tests.conftest import REPO

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
AUG_OPTIONS = sorted(p.stem for p in (REPO / "conf" / "augmentation").glob("*.yaml"))


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("config", overrides=list(overrides))


class MemoryStore:
    """An image store holding decoded (3, H, W) uint8 tensors."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def read(self, row: int, identifier: str) -> torch.Tensor:
        return self.images[row].clone()


def make_dataset(images: torch.Tensor, transform, seed: int = 3) -> TaxonDataset:
    n = len(images)
    return TaxonDataset(
        MemoryStore(images),
        np.array([f"img{i}" for i in range(n)]),
        np.arange(n),
        np.ones((n, 2), dtype=np.int64),
        meta={"spatial": np.zeros((n, 3), np.float32)},
        meta_valid={"spatial": np.ones(n, bool)},
        transform=transform,
        seed=seed,
    )


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("option", AUG_OPTIONS)
def test_every_augmentation_option_builds_a_pipeline(option):
    cfg = compose_cfg(f"augmentation={option}")
    worker, step = build_image_transforms(cfg.augmentation, 16, MEAN, STD)
    out = worker(random_images(1, 40)[0])
    assert (step is None) == (cfg.augmentation.random_erase.prob == 0)  # erasing runs in the step
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8  # uint8 until the batch's device
    if step is not None:
        erased = step(normalize_images(out, MEAN, STD), 123)
        assert erased.shape == (3, 16, 16) and erased.dtype == torch.float32


@pytest.mark.parametrize(
    "overrides",
    [
        ["augmentation=default", "augmentation.color_jitter=0.4", "augmentation.vflip=0.5"],
        ["augmentation=strong", "augmentation.random_erase.prob=0.7"],
        ["augmentation=strong", "augmentation.random_erase.mode=const", "augmentation.auto_augment=original"],
        ["augmentation=default", "augmentation.auto_augment=v0"],  # timm's PIL policy, CPU tensors
    ],
    ids=["jitter", "randaugment", "autoaugment", "timm-v0"],
)
def test_device_path_equals_the_per_sample_worker_path(overrides):
    """augmentation.device=gpu applies the workers' pipeline on the batch, seeded the same way.

    Both go through ``DataBundle.prepare`` (normalisation) and then the step's per-sample transform:
    random erasing only (device=cpu), or quantise back to uint8, the random pipeline, normalise and
    erase (device=gpu)."""
    cpu = compose_cfg(*overrides, "augmentation.device=cpu")
    gpu = compose_cfg(*overrides, "augmentation.device=gpu", "augmentation.load_size=24")
    images = random_images(6, 24)  # already at load_size, so the workers' resize changes nothing
    worker_cpu, step_cpu = build_image_transforms(cpu.augmentation, 16, MEAN, STD)
    worker_gpu, step_gpu = build_image_transforms(gpu.augmentation, 16, MEAN, STD)
    per_sample, loaded = make_dataset(images, worker_cpu), make_dataset(images, worker_gpu)
    prepare = PrepareBatch(MEAN, STD)
    erase_only = AugmentOnDevice(step_cpu, seed=3) if step_cpu is not None else None
    on_device = AugmentOnDevice(step_gpu, seed=3)
    order = [4, 1, 0, 5, 3, 2]
    for epoch in (0, 1):
        augmented = prepare(default_collate([per_sample[(i, epoch)] for i in order]))
        assert augmented["images"].dtype == torch.float32
        expected = augmented["images"]
        if erase_only is not None:
            expected = erase_only(expected, augmented["index"], epoch)
        batch = default_collate([loaded[(i, epoch)] for i in order])
        assert torch.equal(batch["images"], images[order])
        batch = prepare(batch)
        assert torch.equal(quantize_images(batch["images"], MEAN, STD), images[order])  # exact round trip
        assert torch.equal(on_device(batch["images"], batch["index"], epoch), expected)
    # and it is random: samples and epochs differ
    assert not torch.equal(per_sample[(0, 0)]["images"], per_sample[(0, 1)]["images"])


def test_validation_transform_is_deterministic():
    transform = build_eval_transform(16, MEAN, STD, crop_pct=0.875)
    image = random_images(1, 30)[0]
    torch.manual_seed(0)
    a = transform(image)
    torch.manual_seed(1)
    b = transform(image)
    assert torch.equal(a, b) and a.shape == (3, 16, 16)
    dataset = make_dataset(random_images(2, 30), transform)
    assert torch.equal(dataset[(1, 0)]["images"], dataset[(1, 5)]["images"])


def test_auto_augment_names():
    ra = build_auto_augment("rand-m7-n3-mstd0.5-inc1", 32, MEAN)
    assert isinstance(ra, RandAugment)
    assert (ra.magnitude, ra.num_ops, ra.prob, ra.magnitude_std) == (7.0, 3, 0.5, 0.5)
    assert math.isinf(build_auto_augment("rand-m9-mstd101-inc1", 32, MEAN).magnitude_std)
    assert isinstance(build_auto_augment("original", 32, MEAN), v2.AutoAugment)
    for name in ("v0", "originalr", "rand-m9-mstd0.5", "augmix-m5-w3"):
        assert isinstance(build_auto_augment(name, 32, MEAN), TimmPilPolicy), name
    with pytest.raises(ValueError, match="augmentation.auto_augment='nope'"):
        build_auto_augment("nope", 32, MEAN)
    image = random_images(1, 20)[0]
    assert torch.equal(build_auto_augment("rand-m9-p0-inc1", 32, MEAN)(image), image)  # ops never applied
    with pytest.raises(RuntimeError, match="CPU only"):
        build_auto_augment("v0", 32, MEAN)(torch.zeros(3, 8, 8, dtype=torch.uint8, device="meta"))


def test_pil_policy_on_an_accelerator_fails_at_setup():
    cfg = compose_cfg("augmentation.device=gpu", "augmentation.auto_augment=v0")
    _, step = build_image_transforms(cfg.augmentation, 16, MEAN, STD)
    with pytest.raises(ValueError, match="auto_augment=v0 is timm's PIL implementation"):
        build_train_batch_transform(
            cfg,
            step,
            task_keys=["a", "b"],
            null_index=0,
            meta_components=[],
            total_steps=10,
            device=torch.device("cuda"),
        )


def test_random_erasing_modes():
    cfg = compose_cfg(
        "augmentation=none", "augmentation.random_erase.prob=1.0", "augmentation.random_erase.mode=const"
    )
    worker, step = build_image_transforms(cfg.augmentation, 20, MEAN, STD)
    image = torch.full((3, 20, 20), 255, dtype=torch.uint8)
    assert torch.equal(worker(image), image)  # the workers leave erasing to the step
    for seed in range(5):
        erased = step(normalize_images(image, MEAN, STD), seed)
        erased = (erased == 0).all(0).float().mean().item()  # const erases to 0 after normalising
        assert 0.01 <= erased <= 0.4  # area drawn in [0.02, 0.33], box sides rounded to pixels
    bad = compose_cfg("augmentation.random_erase.prob=0.5", "augmentation.random_erase.mode=rand")
    with pytest.raises(ValueError, match="augmentation.random_erase.mode='rand'"):
        build_image_transforms(bad.augmentation, 20, MEAN, STD)


# ---------------------------------------------------------------- metadata masking


def mask_cfg(**overrides):
    cfg = OmegaConf.create(
        {
            "full_prob": 0.0,
            "partial_prob": 0.0,
            "components": None,
            "schedule": "constant",
            "end_factor": 0.0,
            "step_fraction": 0.5,
        }
    )
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def within_binomial(count: int, trials: int, p: float) -> bool:
    return abs(count - trials * p) <= 4.5 * math.sqrt(trials * p * (1 - p)) + 1


def test_meta_masking_probabilities_and_whitelist():
    names = ["spatial", "temporal", "elevation_main"]
    mask = build_meta_mask(
        mask_cfg(full_prob=0.3, partial_prob=0.2, components=["spatial", "temporal"]), names, total_steps=100
    )
    n = 20_000
    meta = {"spatial": torch.randn(n, 3), "temporal": torch.randn(n, 2), "elevation_main": torch.randn(n, 6)}
    valid = {k: torch.ones(n, dtype=torch.bool) for k in names}
    out_meta, out_valid = mask(meta, valid, step=0, rng=np.random.default_rng(0))
    masked = {k: ~out_valid[k] for k in names}
    full, partial = 0.3, 0.2
    assert within_binomial(int(masked["spatial"].sum()), n, full + (1 - full) * partial)
    assert within_binomial(int(masked["temporal"].sum()), n, full + (1 - full) * partial)
    both = masked["spatial"] & masked["temporal"]
    assert within_binomial(int(both.sum()), n, full + (1 - full) * partial**2)
    assert not masked["elevation_main"].any()
    assert torch.equal(out_meta["elevation_main"], meta["elevation_main"])
    for k in ("spatial", "temporal"):
        assert (out_meta[k][masked[k]] == 0).all()
        assert torch.equal(out_meta[k][~masked[k]], meta[k][~masked[k]])
    # a component that was already missing stays missing
    valid["spatial"][:10] = False
    _, out_valid = mask(meta, valid, step=0, rng=np.random.default_rng(1))
    assert not out_valid["spatial"][:10].any()


def test_meta_masking_schedules():
    kw = dict(end_factor=0.2, step_fraction=0.25)
    assert [schedule_factor(s, 100, name="constant", **kw) for s in (0, 50, 100)] == [1.0, 1.0, 1.0]
    assert [schedule_factor(s, 100, name="linear", **kw) for s in (0, 50, 100, 200)] == pytest.approx(
        [1.0, 0.6, 0.2, 0.2]
    )
    assert [schedule_factor(s, 100, name="step", **kw) for s in (0, 24, 25, 99)] == [1.0, 1.0, 0.2, 0.2]
    mask = build_meta_mask(
        mask_cfg(full_prob=0.8, partial_prob=0.4, schedule="linear", end_factor=2.0),
        ["spatial"],
        total_steps=10,
    )
    assert isinstance(mask, MetaMask)
    assert mask.probabilities(0) == pytest.approx((0.8, 0.4))
    assert mask.probabilities(5) == pytest.approx((1.0, 0.6))  # 0.8 x 1.5 clipped to 1
    # the empirical rate follows the schedule
    n = 20_000
    meta, valid = {"spatial": torch.ones(n, 3)}, {"spatial": torch.ones(n, dtype=torch.bool)}
    decay = build_meta_mask(mask_cfg(full_prob=0.5, schedule="linear"), ["spatial"], total_steps=10)
    _, out = decay(meta, valid, step=8, rng=np.random.default_rng(0))
    assert within_binomial(int((~out["spatial"]).sum()), n, 0.1)


def test_meta_mask_config_errors_and_identity():
    assert isinstance(build_meta_mask(mask_cfg(), ["spatial"], 10), NoMetaMask)
    with pytest.raises(ValueError, match="data.meta_mask.components"):
        build_meta_mask(mask_cfg(full_prob=0.1, components=["altitude"]), ["spatial"], 10)
    with pytest.raises(ValueError, match="data.meta_mask.schedule='cosine'"):
        build_meta_mask(mask_cfg(schedule="cosine"), ["spatial"], 10)
    with pytest.raises(ValueError, match="data.meta_mask.full_prob"):
        build_meta_mask(mask_cfg(full_prob=1.5), ["spatial"], 10)


def test_train_batch_transform_is_seeded_per_step():
    cfg = compose_cfg(
        "augmentation.device=gpu",
        "augmentation.mixup.prob=1.0",
        "data.meta_mask.partial_prob=0.5",
        "augmentation.load_size=24",
    )
    _, step = build_image_transforms(cfg.augmentation, 16, MEAN, STD)
    transform = build_train_batch_transform(
        cfg,
        step,
        task_keys=["a", "b"],
        null_index=0,
        meta_components=["spatial"],
        total_steps=10,
        device=torch.device("cpu"),
    )
    batch = {
        "images": normalize_images(random_images(8, 24), MEAN, STD),  # as DataBundle.prepare returns them
        "targets": torch.tensor([[1, 1], [1, 1], [1, 2], [1, 2], [2, 3], [2, 3], [2, 4], [2, 4]]),
        "meta": {"spatial": torch.randn(8, 3)},
        "meta_valid": {"spatial": torch.ones(8, dtype=torch.bool)},
        "index": torch.arange(8),
    }
    a = transform(batch, step=3, epoch=0, micro=3)
    b = transform(batch, step=3, epoch=0, micro=3)
    c = transform(batch, step=4, epoch=0, micro=4)
    assert a["images"].shape == (8, 3, 16, 16)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["lam"], b["lam"])
    assert torch.equal(a["meta_valid"]["spatial"], b["meta_valid"]["spatial"])
    assert not torch.equal(a["lam"], c["lam"])
    assert (a["lam"] < 1).all() and torch.equal(a["targets_b"], batch["targets"])  # pairs share every label


# ---------------------------------------------------------------- the command line

FAST = ["debug=fast", "model=mformer_xs", "logger.wandb.mode=disabled"]
MIXING = ["augmentation=strong", "augmentation.mixup.prob=0.5", "augmentation.cutmix.prob=0.5"]
RUNS = {
    "cpu": [*MIXING, "augmentation.device=cpu"],
    "gpu": [*MIXING, "augmentation.device=gpu"],
    "mask": ["data.meta_mask.full_prob=0.5", "train.val_mask_components=true"],
}


@pytest.fixture(scope="module", autouse=True)
def cli_procs(tmp_path_factory, demo_cache):
    """Start the runs of ``RUNS`` when this module starts, one thread each, so they overlap its unit tests."""
    root = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, overrides in RUNS.items():
        cmd = [sys.executable, "train.py", *FAST, f"hydra.run.dir={root / name}", *overrides]
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[name] = (root / name, cmd, subprocess.Popen(cmd, cwd=REPO, env=env, **pipes))
    yield procs
    for _, _, proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def cli_runs(cli_procs) -> dict[str, Path]:
    """The finished runs' directories."""
    for _, cmd, proc in cli_procs.values():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-3000:]}\n{err[-5000:]}"
    return {name: run_dir for name, (run_dir, _, _) in cli_procs.items()}


def check_run(run_dir: Path) -> list[dict]:
    records = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(loss is not None and math.isfinite(loss) for loss in losses)
    with Image.open(run_dir / "plots" / "augmented_samples.png") as grid:
        assert grid.format == "PNG" and grid.width > 300 and grid.height > 100
    return records


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_cli_strong_augmentation_with_mixing(cli_runs, device):
    run_dir = cli_runs[device]
    check_run(run_dir)
    log_text = (run_dir / "train.log").read_text()
    where = "in the loader workers" if device == "cpu" else "on the batch's device"
    assert f"augmentation per sample {where}" in log_text
    assert "batch mixed with p=0.5" in log_text
    assert "auto_augment: rand-m9-mstd0.5-inc1" in (run_dir / ".hydra" / "config.yaml").read_text()


def test_cli_metadata_masking_and_per_component_validation(cli_runs):
    records = check_run(cli_runs["mask"])
    last = [r for r in records if "val/top1/taxa_L10" in r][-1]
    for component in ("spatial", "temporal", "elevation_main"):
        assert 0.0 <= last[f"val_no_{component}/top1/taxa_L10"] <= 1.0
    assert "full p=0.5" in (cli_runs["mask"] / "train.log").read_text()
