"""Typed schemas for the run configuration.

The YAML files under ``conf/`` hold every default value; these dataclasses only fix the key names
and types, so that a mistyped key or a value of the wrong type fails when Hydra composes the
config, with the key's full name in the message. Nodes whose keys are constructor arguments of
interchangeable callables (``model``, ``optimizer``) are left open here; their builders check them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class SamplerConfig:
    mode: str = MISSING  # random | strict-group | mixed-pairs
    group_rank: str | None = MISSING  # task key whose classes form the groups; null = finest


@dataclass
class MetaMaskConfig:
    full_prob: float = MISSING
    partial_prob: float = MISSING
    components: list[str] | None = MISSING  # maskable components; null = all
    schedule: str = MISSING  # constant | linear | step
    end_factor: float = MISSING
    step_fraction: float = MISSING


@dataclass
class AutoBatchConfig:
    safety: float = MISSING  # fraction of the largest fitting batch that is used
    max: int = MISSING  # largest batch size tried


@dataclass
class DataConfig:
    name: str = MISSING
    labels: str | None = MISSING
    images: str | None = MISSING
    demo: bool = MISSING
    cache_dir: str = MISSING
    task_keys: list[str] | None = MISSING
    meta_components: list[str] | None = MISSING
    image_extension: str | None = MISSING
    image_size: int = MISSING
    val_crop_pct: float = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING
    batch_size: Any = MISSING  # per process; a whole number or "auto" (the largest that fits the GPU)
    val_batch_size: int | None = MISSING
    num_workers: int = MISSING
    prefetch_factor: int = MISSING  # batches each loader worker prepares ahead
    decode: str = MISSING  # cpu (loader workers) | gpu (nvJPEG on the batch's device)
    cache: str = MISSING  # none | ram (decoded once into shared memory)
    ram_cache_dir: str = MISSING  # memory-backed folder holding the RAM cache
    val_fraction: float = MISSING
    split_seed: int = MISSING
    on_conflict: str = MISSING  # error | drop
    check_images: bool = MISSING
    bad_images: str = MISSING  # error | drop
    max_bad_images: int = MISSING
    max_bad_fraction: float = MISSING
    auto_batch: AutoBatchConfig = field(default_factory=AutoBatchConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    meta_mask: MetaMaskConfig = field(default_factory=MetaMaskConfig)


@dataclass
class RandomEraseConfig:
    prob: float = MISSING
    mode: str = MISSING  # pixel | const
    area: list[float] = MISSING  # erased area fraction range


@dataclass
class MixupConfig:
    alpha: float = MISSING
    prob: float = MISSING


@dataclass
class CutmixConfig:
    alpha: float = MISSING
    prob: float = MISSING
    minmax: list[float] | None = MISSING  # box side fraction range; overrides alpha


@dataclass
class AugmentationConfig:
    device: str = MISSING  # cpu (loader workers) | gpu (training step, on the batch's device)
    load_size: int | None = MISSING  # device=gpu: workers resize to this square; null = image_size / 0.875
    scale: list[float] = MISSING
    ratio: list[float] = MISSING
    hflip: float = MISSING
    vflip: float = MISSING
    color_jitter: float = MISSING
    auto_augment: str | None = MISSING  # timm policy name
    random_erase: RandomEraseConfig = field(default_factory=RandomEraseConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    cutmix: CutmixConfig = field(default_factory=CutmixConfig)
    switch_prob: float = MISSING
    group_rank: str | None = MISSING  # task key whose classes are mixed together; null = finest
    exclude_null: bool = MISSING


@dataclass
class TaxonomySmoothingConfig:
    enabled: bool = MISSING
    alpha: float = MISSING
    beta: float = MISSING


@dataclass
class SoftLabelsConfig:
    beta: float = MISSING


@dataclass
class HXEConfig:
    alpha: float = MISSING


@dataclass
class NullLossConfig:
    include_after: float | None = MISSING  # steps (>= 1) or fraction of total steps (< 1); null = never


@dataclass
class ClassWeightsConfig:
    enabled: bool = MISSING
    power: float = MISSING


@dataclass
class GradNormConfig:
    enabled: bool = MISSING
    alpha: float = MISSING
    lr: float = MISSING
    update_every: int = MISSING


@dataclass
class LossConfig:
    name: str = MISSING  # ce | soft_labels | hxe (finest rank's criterion)
    label_smoothing: float = MISSING
    task_weights: list[float] | None = MISSING
    taxonomy_smoothing: TaxonomySmoothingConfig = field(default_factory=TaxonomySmoothingConfig)
    soft_labels: SoftLabelsConfig = field(default_factory=SoftLabelsConfig)
    hxe: HXEConfig = field(default_factory=HXEConfig)
    null: NullLossConfig = field(default_factory=NullLossConfig)
    class_weights: ClassWeightsConfig = field(default_factory=ClassWeightsConfig)
    gradnorm: GradNormConfig = field(default_factory=GradNormConfig)


@dataclass
class SchedulerConfig:
    name: str = MISSING  # cosine | linear | constant | step | wsd
    warmup_steps: int | None = MISSING
    warmup_fraction: float = MISSING
    min_lr_ratio: float = MISSING
    milestones: list[float] = MISSING  # step: steps (>= 1) or fractions of the run (< 1)
    gamma: float = MISSING
    decay_fraction: float = MISSING  # wsd
    decay_shape: str = MISSING  # wsd: linear | cosine | 1-sqrt


@dataclass
class CheckpointConfig:
    every_steps: int = MISSING
    every_minutes: float | None = MISSING  # also checkpoint when this much time passed since the last one
    keep_last: int = MISSING
    auto_resume: bool = MISSING
    monitor: str | None = MISSING  # metric key; null = val top-1 at the finest rank
    monitor_mode: str = MISSING  # max | min


@dataclass
class WandbConfig:
    mode: str = MISSING  # offline | online | disabled
    project: str = MISSING
    entity: str | None = MISSING
    group: str | None = MISSING
    tags: list[str] = MISSING


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = MISSING
    plots: bool = MISSING


@dataclass
class EMAConfig:
    decay: float | None = MISSING  # null = no EMA
    warmup: bool = MISSING
    warmup_power: float = MISSING
    every: int = MISSING  # optimizer steps between updates


@dataclass
class EarlyStopConfig:
    monitor: str | None = MISSING  # null = never stop early
    mode: str = MISSING  # max | min
    patience: int = MISSING  # validations without improvement
    min_delta: float = MISSING


@dataclass
class TrainConfig:
    epochs: int = MISSING
    max_steps: int | None = MISSING
    precision: str = MISSING  # 32 | bf16 | fp16
    accumulate: int = MISSING
    grad_clip: float | None = MISSING
    compile: bool = MISSING
    channels_last: bool = MISSING  # model and images in channels-last memory format
    device: str = MISSING  # auto | cpu | cuda | cuda:N
    log_every: int = MISSING
    val_every: int = MISSING  # steps; 0 = at the end of every epoch
    limit_val_batches: int | None = MISSING
    val_mask_components: bool = MISSING  # also validate with each metadata component masked
    max_bad_steps: int = MISSING  # non-finite steps skipped before the run stops (0: stop at the first)
    ema: EMAConfig = field(default_factory=EMAConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)


@dataclass
class Config:
    name: str = MISSING
    seed: int = MISSING
    log_level: str = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    model: Any = MISSING
    optimizer: Any = MISSING


def run_slug(override_dirname: str, max_len: int = 80) -> str:
    """A directory name for a run, derived from its command-line overrides.

    The same command always maps to the same directory, which is what lets a killed run resume
    by being started again. Path separators are replaced; long names are shortened with a hash.
    """
    if not override_dirname:
        return "default"
    slug = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", override_dirname).strip("_")
    if len(slug) > max_len:
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
        slug = f"{slug[: max_len - 9]}-{digest}"
    return slug


def register_configs() -> None:
    """Register the schema with Hydra and the resolvers the YAML uses. Safe to call twice."""
    ConfigStore.instance().store(name="linnaeus_schema", node=Config)
    if not OmegaConf.has_resolver("run_slug"):
        OmegaConf.register_new_resolver("run_slug", run_slug)
