"""Start-up checks of the whole run configuration, before any data is read or process group formed.

``check_config(cfg)`` raises one ``ConfigError`` listing every problem it finds, each as
``key=value: what is wrong; how to fix it``. It needs no data: value ranges, choices, files that
must exist (``data.labels``, ``model.pretrained``), the model's keys and the device.
"""

from __future__ import annotations

import difflib
import inspect
import math
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from linnaeus.errors import ConfigError

ABSENT = object()  # key not in the config (older or newer configs lack some keys)
UNSET = object()  # key present but ??? (mandatory, not given)
PRECISIONS = ("32", "bf16", "fp16")
PRECISION_HINTS = {"16": "fp16", "16-mixed": "fp16", "half": "fp16", "float16": "fp16", "bfloat16": "bf16",
                   "bf16-mixed": "bf16", "fp32": "32", "float32": "32", "32-true": "32", "full": "32"}  # fmt: skip
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _get(cfg: DictConfig, key: str) -> Any:
    """The value at dotted ``key``; ``ABSENT`` when there is no such key, ``UNSET`` for ``???``."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return ABSENT
        if OmegaConf.is_missing(node, part):
            return UNSET
        node = node[part]
        if i < len(parts) - 1 and node is None:
            return ABSENT
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value if value else "''"
    if value is None:
        return "null"
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    """Collects problems as ``key=value: message`` lines."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.problems: list[str] = []

    def add(self, key: str, value: Any, message: str) -> None:
        self.problems.append(f"{key}={_show(value)}: {message}")

    def value(self, key: str) -> Any:
        return _get(self.cfg, key)

    def int_at_least(self, key: str, low: int, example: str | None = None, optional: bool = False) -> None:
        value = self.value(key)
        if value is ABSENT or value is UNSET or (optional and value is None):
            return
        if not _is_int(value) or value < low:
            hint = f" (e.g. {key}={example})" if example else ""
            allowed = " or null" if optional else ""
            self.add(key, value, f"must be an integer >= {low}{allowed}{hint}")

    def number_in(
        self,
        key: str,
        low: float | None,
        high: float | None,
        *,
        low_open: bool = False,
        high_open: bool = False,
        optional: bool = False,
        example: str | None = None,
    ) -> None:
        value = self.value(key)
        if value is ABSENT or value is UNSET or (optional and value is None):
            return
        ok = _is_number(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
            hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
            if low is not None and high is not None:
                where = f"in {lo}, {hi}"
            elif low is not None:
                where = f"> {low:g}" if low_open else f">= {low:g}"
            else:
                where = f"< {high:g}" if high_open else f"<= {high:g}"
            hint = f" (e.g. {key}={example})" if example else ""
            self.add(key, value, f"must be a number {where}{' or null' if optional else ''}{hint}")

    def choice(self, key: str, choices: Sequence[str], optional: bool = False) -> None:
        value = self.value(key)
        if value is ABSENT or value is UNSET or (optional and value is None):
            return
        if value not in choices:
            close = difflib.get_close_matches(str(value), list(choices), n=1)
            hint = f"; did you mean {key}={close[0]}?" if close else ""
            self.add(key, value, f"must be one of {', '.join(choices)}{hint}")

    def pair(
        self, key: str, check: Callable[[float, float], bool], rule: str, optional: bool = False
    ) -> None:
        value = self.value(key)
        if value is ABSENT or value is UNSET or (optional and value is None):
            return
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(_is_number(v) for v in value)
            or not check(*value)
        ):
            self.add(key, value, f"must be two numbers [low, high] with {rule}")


# ---------------------------------------------------------------------- groups of checks
def _check_data(c: _Checker) -> None:
    batch = c.value("data.batch_size")
    if batch is not ABSENT and batch is not UNSET:
        is_auto = isinstance(batch, str) and batch.strip().lower() == "auto"
        as_int = int(batch) if isinstance(batch, str) and batch.strip().isdigit() else batch
        if not is_auto and (not _is_int(as_int) or as_int < 1):
            c.add(
                "data.batch_size",
                batch,
                "must be a positive integer (per process) or auto, e.g. data.batch_size=64",
            )
    c.int_at_least("data.val_batch_size", 1, "128", optional=True)
    c.int_at_least("data.num_workers", 0, "4")
    c.int_at_least("data.image_size", 1, "224")
    c.number_in("data.val_fraction", 0, 1, high_open=True, example="0.2")
    c.number_in("data.val_crop_pct", 0, 1, low_open=True, example="0.875")
    for key in ("data.mean", "data.std"):
        value = c.value(key)
        if value is ABSENT or value is UNSET:
            continue
        if not isinstance(value, list) or len(value) != 3 or not all(_is_number(v) for v in value):
            c.add(key, value, "must be three numbers, one per RGB channel")
        elif key == "data.std" and min(value) <= 0:
            c.add(key, value, "every channel's standard deviation must be > 0")
    c.choice("data.on_conflict", ("error", "drop"))
    c.choice("data.bad_images", ("error", "drop"))
    c.int_at_least("data.max_bad_images", 0, "100")
    c.number_in("data.max_bad_fraction", 0, 1, example="0.01")
    c.choice("data.sampler.mode", ("random", "strict-group", "mixed-pairs"))
    for key in ("data.meta_mask.full_prob", "data.meta_mask.partial_prob", "data.meta_mask.step_fraction"):
        c.number_in(key, 0, 1)
    c.number_in("data.meta_mask.end_factor", 0, None)
    c.choice("data.meta_mask.schedule", ("constant", "linear", "step"))

    demo = c.value("data.demo")
    if demo is True and c.value("data.labels") in (None, ABSENT):
        return  # the generated demo dataset
    hint = "set data.labels=DIR/labels.h5 data.images=DIR/images.h5 (build them with python -m linnaeus.data.build)"
    unset = [key for key in ("data.labels", "data.images") if c.value(key) in (UNSET, None, "")]
    if unset:
        c.problems.append(f"{' and '.join(unset)} not set: required with data=h5; {hint}")
    for key in ("data.labels", "data.images"):
        value = c.value(key)
        if value in (ABSENT, UNSET, None, ""):
            continue
        path = Path(str(value)).expanduser()
        if not path.exists():
            c.add(key, value, f"no such {'file' if key == 'data.labels' else 'file or folder'}; {hint}")
        elif key == "data.labels" and not path.is_file():
            c.add(key, value, "is a folder; give the labels.h5 file inside it")


def _check_train(c: _Checker) -> None:
    precision = c.value("train.precision")
    if precision is not ABSENT and precision is not UNSET and str(precision) not in PRECISIONS:
        hint = PRECISION_HINTS.get(str(precision).lower())
        fix = f"; did you mean train.precision={hint}?" if hint else ""
        c.add("train.precision", precision, f"must be one of {', '.join(PRECISIONS)}{fix}")
    c.int_at_least("train.epochs", 0, "10")
    c.int_at_least("train.max_steps", 1, "1000", optional=True)
    if c.value("train.epochs") == 0 and c.value("train.max_steps") is None:
        c.add(
            "train.epochs",
            0,
            "with train.max_steps=null nothing would be trained; set train.epochs or train.max_steps",
        )
    c.int_at_least("train.accumulate", 1, "4")
    c.int_at_least("train.log_every", 1, "10")
    c.int_at_least("train.val_every", 0, "500")
    c.int_at_least("train.limit_val_batches", 1, "50", optional=True)
    c.number_in("train.grad_clip", 0, None, low_open=True, optional=True, example="1.0")
    c.int_at_least("train.max_bad_steps", 0, "10")
    c.number_in("train.ema.decay", 0, 1, low_open=True, high_open=True, optional=True, example="0.999")
    c.int_at_least("train.ema.every", 1, "1")
    c.choice("train.early_stop.mode", ("max", "min"))
    c.int_at_least("train.early_stop.patience", 1, "5")
    c.number_in("train.early_stop.min_delta", 0, None)
    _check_device(c)


def _check_device(c: _Checker) -> None:
    device = c.value("train.device")
    if device is ABSENT or device is UNSET:
        return
    text = str(device)
    if text in ("auto", "cpu"):
        return
    if text == "cuda" or text.startswith("cuda:"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            c.add(
                "train.device", device, "no CUDA GPU is visible to this process; use train.device=auto or cpu"
            )
        elif text != "cuda":
            index = text.split(":", 1)[1]
            if not index.isdigit() or int(index) >= count:
                c.add("train.device", device, f"this machine has {count} GPU(s): cuda:0 .. cuda:{count - 1}")
        return
    c.add("train.device", device, "must be auto, cpu, cuda or cuda:N")


def _check_checkpoint(c: _Checker) -> None:
    c.int_at_least("checkpoint.every_steps", 1, "500")
    c.number_in("checkpoint.every_minutes", 0, None, low_open=True, optional=True, example="30")
    c.int_at_least("checkpoint.keep_last", 1, "3")
    c.choice("checkpoint.monitor_mode", ("max", "min"))


def _check_optimizer(c: _Checker) -> None:
    lr = c.value("optimizer.lr")
    if lr is not ABSENT and lr is not UNSET and (not _is_number(lr) or lr <= 0):
        c.add("optimizer.lr", lr, "the learning rate must be a number > 0, e.g. optimizer.lr=1e-3")
    c.number_in("optimizer.weight_decay", 0, None, example="0.05")
    c.number_in("optimizer.eps", 0, None, low_open=True, example="1e-8")
    c.number_in("optimizer.momentum", 0, 1, high_open=True, example="0.9")
    c.pair("optimizer.betas", lambda a, b: 0 <= a < 1 and 0 <= b < 1, "both in [0, 1), e.g. [0.9, 0.999]")
    c.number_in("optimizer.layer_decay", 0, 1, low_open=True, optional=True, example="0.75")
    c.choice("optimizer.lr_scaling", ("none", "linear", "sqrt"))
    c.int_at_least("optimizer.reference_batch_size", 1, "256")
    groups = c.value("optimizer.groups")
    if isinstance(groups, list):
        for i, group in enumerate(groups):
            if (
                isinstance(group, dict)
                and "lr" in group
                and (not _is_number(group["lr"]) or group["lr"] <= 0)
            ):
                c.add(f"optimizer.groups[{i}].lr", group["lr"], "must be a number > 0")
    _check_constructor_keys(c, "optimizer", skip=("params",))


def _check_constructor_keys(c: _Checker, node: str, skip: Sequence[str] = ()) -> None:
    """Keys of a ``_target_`` node that its callable does not accept (typos, ``+optimizer.foo=...``)."""
    target = c.value(f"{node}._target_")
    if not isinstance(target, str):
        return
    try:
        import hydra

        builder = hydra.utils.get_object(target)
        params = inspect.signature(builder).parameters
    except Exception as err:
        c.add(f"{node}._target_", target, f"cannot be imported ({type(err).__name__}: {err})")
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    framework: tuple[str, ...] = ("_target_", "_partial_", "_convert_", "_recursive_")
    if node == "optimizer":
        from linnaeus import optim

        framework += tuple(getattr(optim, "FRAMEWORK_KEYS", ()))
    keys = c.value(node)
    valid = [name for name in params if name not in skip]
    for key in keys if isinstance(keys, dict) else {}:
        if key not in framework and key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {node}.{close[0]}?" if close else f"; valid keys: {', '.join(valid)}"
            c.add(f"{node}.{key}", keys[key], f"is not an argument of {target}{hint}")


def _check_scheduler(c: _Checker) -> None:
    try:
        from linnaeus.schedule import SCHEDULES
    except ImportError:
        SCHEDULES = ("cosine", "linear", "constant")
    c.choice("scheduler.name", tuple(SCHEDULES))
    c.int_at_least("scheduler.warmup_steps", 0, "500", optional=True)
    c.number_in("scheduler.warmup_fraction", 0, 1, high_open=True, example="0.05")
    c.number_in("scheduler.min_lr_ratio", 0, 1, example="0.01")
    c.number_in("scheduler.gamma", 0, None, low_open=True, example="0.1")
    c.number_in("scheduler.decay_fraction", 0, 1, example="0.2")
    c.choice("scheduler.decay_shape", ("linear", "cosine", "1-sqrt"))
    milestones = c.value("scheduler.milestones")
    if isinstance(milestones, list) and not all(_is_number(m) and m > 0 for m in milestones):
        c.add("scheduler.milestones", milestones, "must be steps (>= 1) or fractions of the run (0 < f < 1)")


def _check_loss(c: _Checker) -> None:
    c.choice("loss.name", ("ce", "soft_labels", "hxe"))
    c.number_in("loss.label_smoothing", 0, 1, high_open=True, example="0.1")
    c.number_in("loss.taxonomy_smoothing.alpha", 0, 1, high_open=True, example="0.1")
    c.number_in("loss.taxonomy_smoothing.beta", 0, None, example="1.0")
    c.number_in("loss.soft_labels.beta", 0, None, low_open=True, example="2.0")
    c.number_in("loss.hxe.alpha", 0, None, example="0.1")
    c.number_in("loss.class_weights.power", 0, None, example="0.5")
    c.number_in("loss.gradnorm.alpha", 0, None, example="1.5")
    c.number_in("loss.gradnorm.lr", 0, None, low_open=True, example="0.025")
    c.int_at_least("loss.gradnorm.update_every", 1, "1")
    c.number_in("loss.null.include_after", 0, None, low_open=True, optional=True)
    weights = c.value("loss.task_weights")
    if isinstance(weights, list) and (not all(_is_number(w) and w >= 0 for w in weights) or not any(weights)):
        c.add("loss.task_weights", weights, "must be numbers >= 0, one per rank, not all 0")


def _check_augmentation(c: _Checker) -> None:
    c.choice("augmentation.device", ("cpu", "gpu"))
    for key in ("hflip", "vflip", "random_erase.prob", "mixup.prob", "cutmix.prob", "switch_prob"):
        c.number_in(f"augmentation.{key}", 0, 1)
    c.number_in("augmentation.color_jitter", 0, None)
    c.number_in("augmentation.mixup.alpha", 0, None, low_open=True, example="0.8")
    c.number_in("augmentation.cutmix.alpha", 0, None, low_open=True, example="1.0")
    c.pair("augmentation.scale", lambda a, b: 0 < a <= b <= 1, "0 < low <= high <= 1, e.g. [0.08, 1.0]")
    c.pair("augmentation.ratio", lambda a, b: 0 < a <= b, "0 < low <= high, e.g. [0.75, 1.3333]")
    c.pair("augmentation.random_erase.area", lambda a, b: 0 < a <= b <= 1, "0 < low <= high <= 1")
    c.pair("augmentation.cutmix.minmax", lambda a, b: 0 < a <= b <= 1, "0 < low <= high <= 1", optional=True)
    c.choice("augmentation.random_erase.mode", ("pixel", "const"))
    c.int_at_least("augmentation.load_size", 1, optional=True)


def _check_model(c: _Checker) -> None:
    model = c.value("model")
    if not isinstance(model, dict):
        return
    from linnaeus.models import check_model_keys

    try:
        check_model_keys(model)
    except ConfigError as err:
        c.problems.append(str(err))
    target = str(model.get("_target_", ""))
    name = model.get("name")
    if "timm" in target.lower() and isinstance(name, str):
        import timm

        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            c.add("model.name", name, f"is not a timm model (see timm.list_models()){hint}")
    pretrained = model.get("pretrained")
    if pretrained not in (None, ""):
        problem = weights_file_problem(Path(str(pretrained)).expanduser())
        if problem:
            c.add("model.pretrained", pretrained, f"{problem}; give a weights file or model.pretrained=null")


def weights_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a weights file (missing, a folder, empty, neither torch.save nor safetensors)."""
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "is a folder, not a weights file"
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as handle:
        head = handle.read(16)
    if path.suffix == ".safetensors":
        header = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
        return None if 0 < header < size and head[8:9] == b"{" else "is not a valid safetensors file"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                if any(name.endswith("data.pkl") for name in archive.namelist()):
                    return None
        except zipfile.BadZipFile:
            return "is a damaged zip/torch.save file"
        return "is a zip file but not one written by torch.save"
    if head[:1] == b"\x80":  # the legacy (pre-1.6) torch.save format is a pickle stream
        return None
    return "is not a checkpoint (neither a torch.save file nor .safetensors)"


def _check_misc(c: _Checker) -> None:
    c.choice("log_level", LOG_LEVELS)
    c.choice("logger.wandb.mode", ("offline", "online", "disabled"))


CHECKS = (_check_data, _check_train, _check_checkpoint, _check_optimizer, _check_scheduler, _check_loss,
          _check_augmentation, _check_model, _check_misc)  # fmt: skip


def config_problems(cfg: DictConfig | dict) -> list[str]:
    """Every problem found, one ``key=value: message`` string each."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    checker = _Checker(cfg)
    for check in CHECKS:
        check(checker)
    return checker.problems


def check_config(cfg: DictConfig | dict) -> None:
    """Raise a one-line ``ConfigError`` naming every invalid key, its value and the fix; else return."""
    problems = config_problems(cfg)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} configuration problems: " + "; ".join(problems))
