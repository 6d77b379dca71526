"""Per-image preprocessing: the random training pipeline and the deterministic load/evaluation steps.

Images stay uint8 from the decoder through the loader; ``normalize_images`` turns a batch into
normalised float on its device (``DataBundle.prepare``). The random uint8 pipeline
(``build_train_augment``) draws from torch's global RNG, so one pipeline serves both places it can
run: per sample in the loader workers (``augmentation.device=cpu``), or per sample on the batch's
device inside the training step (``augmentation.device=gpu``, see ``linnaeus.augment.pipeline``).
Run under ``seeded_rng(sample_seed(seed, epoch, index))``, a sample is augmented identically in both
places. Random erasing acts on normalised values, so it always runs in the step
(``StepImageTransform``), from a seed of its own.

Auto-augment policies take timm's names. Two are built from torchvision's tensor ops and run on any
device: ``rand-...-inc1`` (timm's RandAugment grammar: ``m``, ``n``, ``p``, ``mstd``, ``mmax``) and
``original`` (the AutoAugment paper's ImageNet policy). Every other timm policy (``v0``, ``v0r``,
``originalr``, ``3a``, ``rand-...`` without ``inc1``, ``augmix-...``) is timm's own implementation on
PIL images and runs on CPU tensors only; handed a GPU tensor it fails with a message saying so.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

ERASE_MODES = {"const": 0.0, "pixel": "random"}  # erased pixels: zeros, or per-pixel N(0, 1) noise
RAND_KEYS = {"m", "n", "p", "mstd", "mmax", "inc"}
LEVEL_MAX = 10  # timm's magnitude scale is 0..10
BINS_PER_LEVEL = 10


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch, whoever applies it."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**63


@contextmanager
def seeded_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed the global RNGs transforms draw from, restoring them afterwards.

    The CPU generator always (torchvision draws its parameters there, whatever the image's device);
    the image's CUDA generator too, for the few ops that sample on the device (AugMix).
    """
    cuda = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for dev in cuda:
            with torch.cuda.device(dev):
                torch.cuda.manual_seed(seed)
        yield


class RandAugment(nn.Module):
    """timm's RandAugment grammar on torchvision's tensor ops.

    ``num_ops`` times: with probability ``prob``, one op chosen uniformly is applied at a magnitude
    drawn for this op: ``magnitude`` on timm's 0-10 scale plus Gaussian noise of std
    ``magnitude_std`` (uniform in [0, magnitude] when infinite), clipped to [0, min(magnitude_max, 10)].
    The ops are torchvision's RandAugment set (no Invert/SolarizeAdd, plus Identity); their severity
    grows with the magnitude, as in timm's ``inc1`` variants.
    """

    def __init__(
        self,
        *,
        magnitude: float,
        num_ops: int,
        prob: float,
        magnitude_std: float,
        magnitude_max: float,
        fill: list[int],
    ) -> None:
        super().__init__()
        self.magnitude, self.num_ops, self.prob = magnitude, num_ops, prob
        self.magnitude_std, self.magnitude_max = magnitude_std, min(magnitude_max, LEVEL_MAX)
        self.op = v2.RandAugment(
            num_ops=1,
            magnitude=0,
            num_magnitude_bins=LEVEL_MAX * BINS_PER_LEVEL + 1,
            interpolation=v2.InterpolationMode.BILINEAR,
            fill=fill,
        )

    def _draw_magnitude(self) -> float:
        if math.isinf(self.magnitude_std):
            return float(torch.rand(())) * self.magnitude
        if self.magnitude_std > 0:
            return self.magnitude + self.magnitude_std * float(torch.randn(()))
        return self.magnitude

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        for _ in range(self.num_ops):
            if float(torch.rand(())) >= self.prob:
                continue
            level = min(max(self._draw_magnitude(), 0.0), self.magnitude_max)
            self.op.magnitude = round(level * BINS_PER_LEVEL)
            image = self.op(image)
        return image


class TimmPilPolicy(nn.Module):
    """One of timm's PIL-image policies inside the tensor pipeline; CPU tensors only.

    timm draws from Python's ``random`` and NumPy's global RNG; both are seeded from the (seeded)
    torch RNG for the call and restored after it, so the result is a function of the sample's seed.
    """

    def __init__(self, name: str, policy) -> None:
        super().__init__()
        self.name, self.policy = name, policy

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.device.type != "cpu":
            raise RuntimeError(
                f"augmentation.auto_augment={self.name} is timm's PIL implementation and runs on CPU only; "
                "use augmentation.device=cpu, or a tensor policy (rand-...-inc1, original)"
            )
        seed = int(torch.randint(2**31 - 1, ()))
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            out = self.policy(F.to_pil_image(image))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return F.pil_to_tensor(out)


def _parse_rand(name: str) -> dict | None:
    """RandAugment settings from a timm ``rand-...`` string, or None when it needs timm's PIL version."""
    settings = {"m": float(LEVEL_MAX), "n": 2.0, "p": 0.5, "mstd": 0.0, "mmax": float(LEVEL_MAX), "inc": 0.0}
    for part in name.split("-")[1:]:
        key = next((k for k in sorted(RAND_KEYS, key=len, reverse=True) if part.startswith(k)), None)
        if key is None:
            return None
        try:
            settings[key] = float(part[len(key) :])
        except ValueError as err:
            raise ValueError(f"augmentation.auto_augment={name}: cannot read {part!r}") from err
    if settings["inc"] != 1:
        return None
    return settings


def build_auto_augment(name: str, image_size: int, mean: Sequence[float]) -> nn.Module:
    """The policy called ``name`` (timm's naming), as a module on (3, H, W) uint8 tensors."""
    fill = [round(255 * m) for m in mean]
    if name == "original":
        return v2.AutoAugment(
            v2.AutoAugmentPolicy.IMAGENET, interpolation=v2.InterpolationMode.BILINEAR, fill=fill
        )
    settings = _parse_rand(name) if name.startswith("rand") else None
    if settings is not None:
        std = math.inf if settings["mstd"] > 100 else settings["mstd"]
        return RandAugment(
            magnitude=settings["m"],
            num_ops=int(settings["n"]),
            prob=settings["p"],
            magnitude_std=std,
            magnitude_max=settings["mmax"],
            fill=fill,
        )
    from timm.data.auto_augment import (
        augment_and_mix_transform,
        auto_augment_transform,
        rand_augment_transform,
    )
    from timm.data.auto_augment import posterize as timm_posterize

    hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(fill)}
    builder = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform}.get(
        name.split("-")[0], auto_augment_transform
    )
    try:
        policy = builder(name, hparams)
    except (AssertionError, KeyError, ValueError) as err:
        raise ValueError(
            f"augmentation.auto_augment={name!r} is not a timm policy ({err or 'unknown name'}); "
            "e.g. rand-m9-mstd0.5-inc1, original, v0, augmix-m5-w3, or null"
        ) from err
    # timm's posterize can ask Pillow for 0 bits, which recent Pillow rejects: swap in one that accepts it
    ops = getattr(policy, "ops", None) or [op for sub in getattr(policy, "policy", []) for op in sub]
    for op in ops:
        if getattr(op, "aug_fn", None) is timm_posterize:
            op.aug_fn = _posterize
    return TimmPilPolicy(name, policy)


def _posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, also for 0 bits kept (a black image), which newer Pillow refuses."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


class Pipeline(v2.Compose):
    """``v2.Compose`` for one image tensor: each step's ``forward`` in turn, without Compose's
    handling of several inputs and nn.Module's call machinery (a few us per step and image)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        for step in self.transforms:
            image = step.forward(image)
        return image


class ResizedCrop(nn.Module):
    """Random resized crop to ``size`` x ``size`` on a (..., C, H, W) tensor of any device.

    Draws its parameters exactly as torchvision's ``RandomResizedCrop`` does (same RNG calls, so the
    same crops for the same seed): up to 10 tries of an area fraction in ``scale`` and a log-uniform
    aspect ratio in ``ratio``, then a uniform position; after 10 misses the centre crop at the nearest
    allowed ratio. It slices the box and calls torchvision's resize kernel directly, without v2's
    per-call input handling (about 40-70 us per image, most of a 32 px loader's time). ``scale = ratio = (1, 1)`` is the deterministic
    centre square resized to ``size`` (the outcome of those draws), drawing nothing.
    """

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float]) -> None:
        super().__init__()
        self.size = [size, size]
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.log_ratio = torch.log(torch.tensor(self.ratio)).tolist()  # float32 values, as torchvision's
        self.fixed = self.scale == (1.0, 1.0) and self.ratio == (1.0, 1.0)

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) for an image of ``height`` x ``width``."""
        if not self.fixed:
            area = height * width
            for _ in range(10):
                target = area * torch.empty(1).uniform_(*self.scale).item()
                aspect = math.exp(torch.empty(1).uniform_(*self.log_ratio).item())
                w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
                if 0 < w <= width and 0 < h <= height:
                    top = int(torch.randint(0, height - h + 1, size=(1,)).item())
                    left = int(torch.randint(0, width - w + 1, size=(1,)).item())
                    return top, left, h, w
        shape = width / height
        h, w = height, width
        if shape < self.ratio[0]:
            h = round(width / self.ratio[0])
        elif shape > self.ratio[1]:
            w = round(height * self.ratio[1])
        return (height - h) // 2, (width - w) // 2, h, w

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        if self.fixed and height == width == self.size[0]:
            return image  # the centre square is the whole image, at the output size already
        top, left, h, w = self.box(height, width)
        # the box lies inside the image, so a slice is the crop; resize_image returns it as it is when
        # it has the output size already
        crop = image[..., top : top + h, left : left + w]
        if crop.stride(-3) == 1 and crop.shape[-3] > 1 and not crop.is_contiguous():
            # (H, W, C) memory, as decoders return pixels: a box of it is not channels-last contiguous,
            # which sends resize down a slow path that transposes (172 us against 80 us, 200 -> 224 px
            # on a 2-core VM); a plain copy of the box first keeps the fast one (the same pixels)
            crop = crop.movedim(-3, -1).contiguous().movedim(-1, -3)
        return F.resize_image(crop, self.size, antialias=True)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}"


class Flip(nn.Module):
    """Flip a (..., C, H, W) tensor along ``dim`` (-1 horizontal, -2 vertical) with probability ``p``;
    one draw, as torchvision's random flips make it."""

    def __init__(self, p: float, dim: int) -> None:
        super().__init__()
        self.p, self.dim = p, dim

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(1).item() >= self.p:
            return image
        return image.flip(self.dim)

    def extra_repr(self) -> str:
        return f"p={self.p}, dim={self.dim}"


DETERMINISTIC_STEPS = (v2.Resize, v2.CenterCrop, v2.Identity, v2.ToDtype, v2.Normalize)


def is_deterministic(transform) -> bool:
    """Whether ``transform`` is built only of steps that draw no random numbers (then nothing needs
    seeding per sample); anything unknown counts as random."""
    if isinstance(transform, v2.Compose):
        return all(is_deterministic(t) for t in transform.transforms)
    if isinstance(transform, ResizedCrop):
        return transform.fixed
    return isinstance(transform, DETERMINISTIC_STEPS)


def keeps_its_output_size(transform) -> bool:
    """Whether ``transform`` returns an image of the size it makes unchanged (the very tensor): then an
    image decoded at that size needs no call to it. Only a fixed ``ResizedCrop`` (``augmentation=none``
    in the workers) and pipelines of them count; anything else may change pixels or size."""
    if isinstance(transform, v2.Compose):
        steps = transform.transforms
        return (
            bool(steps)
            and all(keeps_its_output_size(t) for t in steps)
            and len({tuple(t.size) for t in steps}) == 1
        )
    return isinstance(transform, ResizedCrop) and transform.fixed


def build_train_augment(aug_cfg, image_size: int, mean: Sequence[float]) -> v2.Compose:
    """Random resized crop, flips, auto-augment policy, colour jitter: (3, H, W) uint8 in,
    (3, image_size, image_size) uint8 out; on any device. Normalisation and random erasing follow
    on the batch's device (``normalize_images``, ``StepImageTransform``)."""
    steps: list = [ResizedCrop(image_size, aug_cfg.scale, aug_cfg.ratio)]
    if aug_cfg.hflip > 0:
        steps.append(Flip(aug_cfg.hflip, dim=-1))
    if aug_cfg.vflip > 0:
        steps.append(Flip(aug_cfg.vflip, dim=-2))
    if aug_cfg.auto_augment:
        steps.append(build_auto_augment(aug_cfg.auto_augment, image_size, mean))
    if aug_cfg.color_jitter > 0:
        s = aug_cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s))
    return Pipeline(steps)


def build_random_erase(aug_cfg) -> v2.RandomErasing | None:
    """Random erasing of normalised images (None when off)."""
    erase = aug_cfg.random_erase
    if erase.mode not in ERASE_MODES:
        raise ValueError(
            f"augmentation.random_erase.mode={erase.mode!r}; valid modes: {', '.join(ERASE_MODES)}"
        )
    if erase.prob <= 0:
        return None
    return v2.RandomErasing(
        p=erase.prob, scale=tuple(erase.area), ratio=(0.3, 1 / 0.3), value=ERASE_MODES[erase.mode]
    )


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> contiguous float32 ``(x / 255 - mean) / std``, on the images' device.

    One pass casts (and, from channels-last memory, transposes) the pixels, a second scales and shifts
    them in place: half the time of a cast, a division and a normalisation, and a channels-last batch
    costs no extra pass to come out contiguous."""
    scale, shift = _normalize_affine(tuple(mean), tuple(std), images.device)
    out = images.to(torch.float32, memory_format=torch.contiguous_format)
    return out.mul_(scale).add_(shift)


@lru_cache(maxsize=16)
def _normalize_affine(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``normalize_images``'s x * scale + shift as (3, 1, 1) tensors on ``device``, made once per device
    (no host-to-device copy in the step)."""
    std_t = torch.tensor(std, dtype=torch.float64).view(-1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float64).view(-1, 1, 1)
    scale, shift = 1 / (255 * std_t), -mean_t / std_t
    return scale.to(device, torch.float32), shift.to(device, torch.float32)


def quantize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The inverse of ``normalize_images`` back to uint8; exact on its outputs (the error is ~1e-5 of a level)."""
    scale, shift = _normalize_affine(tuple(mean), tuple(std), images.device)
    return images.sub(shift).div_(scale).round_().clamp_(0, 255).to(torch.uint8)


def erase_seed(seed: int) -> int:
    """The seed random erasing draws from for a sample whose augmentation seed is ``seed``."""
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**63


class StepImageTransform:
    """The per-sample image augmentation the training step applies, to normalised float images.

    ``augment`` (``augmentation.device=gpu``): the uint8 pipeline, run on the image quantised back to
    uint8 (exact) and normalised again. ``erase``: random erasing, which acts on normalised values and
    so always runs here, after ``DataBundle.prepare``. Each part draws from its own seed, so a sample
    gets the same image whichever side ran ``augment``.
    """

    def __init__(
        self,
        augment: v2.Compose | None,
        erase: v2.RandomErasing | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.augment, self.erase = augment, erase
        self.mean, self.std = list(mean), list(std)

    @property
    def transforms(self) -> list:
        return list(self.augment.transforms) if self.augment is not None else []

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """(3, L, L) normalised float -> (3, S, S) normalised float, a function of ``seed``."""
        if self.augment is not None:
            with seeded_rng(seed, image.device):
                image = normalize_images(
                    self.augment(quantize_images(image, self.mean, self.std)), self.mean, self.std
                )
        if self.erase is not None:
            with seeded_rng(erase_seed(seed), image.device):
                image = self.erase(image)
        return image


def build_resize_crop(resize: int, crop: int) -> v2.Compose:
    """Deterministic: resize the short side to ``resize`` and centre-crop a ``crop`` square; stays uint8."""
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop)])


def build_load_transform(size: int) -> v2.Compose:
    """Deterministic: resize the short side to ``size`` and centre-crop a square; stays uint8."""
    return build_resize_crop(size, size)


def build_image_transforms(
    aug_cfg, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[v2.Compose, StepImageTransform | None]:
    """(what the loader workers apply to a training image, what the training step applies on the device).

    Workers always hand over uint8 images; ``DataBundle.prepare`` normalises them on the device.
    ``augmentation.device=cpu``: workers run the uint8 random pipeline; the step only random erasing
    (None when that is off). ``augmentation.device=gpu``: workers only resize to ``load_size`` (a
    fixed size, so images batch); the step runs the same random pipeline on the batch's device.
    """
    augment = build_train_augment(aug_cfg, image_size, mean)
    erase = build_random_erase(aug_cfg)
    if aug_cfg.device == "cpu":
        return augment, None if erase is None else StepImageTransform(None, erase, mean, std)
    if aug_cfg.device == "gpu":
        load = build_load_transform(load_size_for(aug_cfg, image_size))
        return load, StepImageTransform(augment, erase, mean, std)
    raise ValueError(f"augmentation.device must be cpu or gpu, got {aug_cfg.device!r}")


def load_size_for(aug_cfg, image_size: int) -> int:
    """``augmentation.load_size``, or by default ``image_size / 0.875`` (256 px for 224)."""
    return aug_cfg.load_size or math.floor(image_size / 0.875 + 0.5)


def eval_resize_for(image_size: int, crop_pct: float) -> int:
    """The short side validation resizes to before its centre crop."""
    return math.floor(image_size / crop_pct + 0.5)


def train_min_side(aug_cfg, image_size: int) -> int:
    """The short side a training image must keep when decoded so that no crop is upsampled more than
    at full size: ``load_size`` when the device augments, else what the smallest random crop needs."""
    if aug_cfg.device == "gpu":
        return load_size_for(aug_cfg, image_size)
    shrink = math.sqrt(min(aug_cfg.scale) * min(min(aug_cfg.ratio), 1 / max(aug_cfg.ratio), 1.0))
    return math.ceil(image_size / max(shrink, 1e-3))


def build_eval_load_transform(image_size: int, crop_pct: float = 1.0) -> v2.Compose:
    """Validation in the loader: resize the short side to image_size / crop_pct, centre-crop; uint8."""
    return build_resize_crop(eval_resize_for(image_size, crop_pct), image_size)


def build_eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 1.0
) -> v2.Compose:
    """Resize the short side to image_size / crop_pct, centre-crop, normalise; no randomness.

    For single images (prediction, export); the loader stops at uint8 (``build_eval_load_transform``)
    and ``DataBundle.prepare`` normalises the batch on its device, with the same result.
    """
    return v2.Compose(
        [
            build_eval_load_transform(image_size, crop_pct),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )
