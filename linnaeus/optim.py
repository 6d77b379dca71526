"""Optimizers over disjoint parameter groups, weight-decay rules and layer-wise LR decay.

The ``optimizer`` config node names the default optimizer (``_target_`` and its arguments) and may
list ``groups``: each selects parameters by name globs (``match``/``exclude``) and number of
dimensions (``ndim``) and gets its own optimizer class, LR and weight decay (e.g. Muon for the 2-D
matrices of the attention stages, AdamW for the rest). Parameters no group selects go to the
default optimizer. Every trainable parameter ends up in exactly one optimizer; a parameter selected
twice, or by nothing when there is no default, stops the run at start-up with the names listed.

Within every optimizer, matrices and kernels decay while biases, norms, tokens and embeddings do
not; with ``layer_decay`` each model layer's LR is scaled by ``layer_decay ** (depth from the top)``.
Every torch param group remembers ``base_lr`` and ``lr_scale``; the trainer sets
``lr = base_lr * lr_scale * schedule(step)``.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
from collections.abc import Iterator

import hydra
import torch
from omegaconf import OmegaConf
from torch import nn

from linnaeus.errors import ConfigError

log = logging.getLogger(__name__)
NO_DECAY_NAME_PARTS = ("token", "pos_embed", "missing", "norm", "bias")
# keys of the optimizer node that configure linnaeus, not the optimizer class
FRAMEWORK_KEYS = ("_target_", "groups", "layer_decay", "fused", "lr_scaling", "reference_batch_size")
GROUP_KEYS = ("name", "match", "exclude", "ndim", "lr_scale", "_target_")


class ParameterGroupError(ConfigError):
    """The optimizer groups do not partition the model's parameters."""


class Optimizers:
    """Several optimizers stepped as one (each over its own parameters)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], names: list[str]) -> None:
        self.optimizers = optimizers
        self.names = names

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def set_lr(self, multiplier: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * group["lr_scale"] * multiplier

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"names": list(self.names), "optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("names") != self.names:
            raise ConfigError(
                f"the checkpoint holds optimizers {state.get('names')}, this configuration builds {self.names}"
            )
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)


def _as_dict(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def is_no_decay(name: str, param: nn.Parameter, skip: set[str]) -> bool:
    return param.ndim <= 1 or name in skip or any(part in name for part in NO_DECAY_NAME_PARTS)


def split_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices and kernels decay; biases, norms, tokens and embeddings do not."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if is_no_decay(name, param, skip) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def _selects(spec: dict, name: str, param: nn.Parameter) -> bool:
    match = spec.get("match") or ["*"]
    if not any(fnmatch.fnmatchcase(name, pattern) for pattern in match):
        return False
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in spec.get("exclude") or []):
        return False
    return spec.get("ndim") is None or param.ndim == spec["ndim"]


def assign_parameters(model: nn.Module, groups: list[dict], has_default: bool) -> dict[str, list[str]]:
    """Group name -> parameter names (``default`` for the rest); every trainable parameter exactly once."""
    assigned: dict[str, list[str]] = {spec["name"]: [] for spec in groups}
    assigned["default"] = []
    twice, unmatched = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        hits = [spec["name"] for spec in groups if _selects(spec, name, param)]
        if len(hits) > 1:
            twice.append(f"{name} ({', '.join(hits)})")
        elif hits:
            assigned[hits[0]].append(name)
        elif has_default:
            assigned["default"].append(name)
        else:
            unmatched.append(name)
    problems = []
    if twice:
        problems.append(f"selected by more than one of optimizer.groups: {', '.join(twice)}")
    if unmatched:
        problems.append(
            f"selected by no group and optimizer._target_ is null: {', '.join(unmatched)} "
            "(add a group that matches them or set optimizer._target_)"
        )
    if problems:
        raise ParameterGroupError(
            "every parameter must be in exactly one optimizer group; " + "; ".join(problems)
        )
    return assigned


def layer_scales(model: nn.Module, layer_decay: float | None) -> dict[str, float]:
    """LR scale per parameter name: ``layer_decay ** (num_layers - 1 - layer)``; 1 everywhere when off."""
    names = [n for n, _ in model.named_parameters()]
    if layer_decay is None or layer_decay == 1.0:
        return dict.fromkeys(names, 1.0)
    if not hasattr(model, "layer_ids"):
        raise ConfigError(f"optimizer.layer_decay needs {type(model).__name__}.layer_ids(); it has none")
    ids = model.layer_ids()
    top = max(ids.values())
    return {n: layer_decay ** (top - ids[n]) for n in names}


def _construct(target: str, param_groups: list[dict], kwargs: dict, fused: str | bool, label: str):
    cls = hydra.utils.get_class(target)
    kwargs = dict(kwargs)
    accepts_fused = "fused" in inspect.signature(cls.__init__).parameters
    want_fused = fused is True or (fused == "auto" and accepts_fused)
    if want_fused and accepts_fused:
        try:
            return cls(param_groups, fused=True, **kwargs), True
        except (RuntimeError, ValueError, TypeError) as err:
            if fused is True:
                raise ConfigError(f"optimizer {label} ({target}) cannot run fused here: {err}") from err
            log.info(
                "optimizer %s (%s): fused implementation unavailable (%s); using the default one",
                label,
                target,
                err,
            )
    elif fused is True:
        raise ConfigError(
            f"optimizer {label} ({target}) has no fused implementation; set optimizer.fused=auto"
        )
    try:
        return cls(param_groups, **kwargs), False
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build optimizer {label} ({target}) from {sorted(kwargs)}: {err}") from err


def build_optimizer(model: nn.Module, optim_cfg) -> Optimizers:
    """The optimizers the ``optimizer`` node describes, over a partition of ``model``'s parameters."""
    cfg = _as_dict(optim_cfg)
    default_target = cfg.get("_target_")
    default_kwargs = {k: v for k, v in cfg.items() if k not in FRAMEWORK_KEYS}
    groups = [dict(g) for g in cfg.get("groups") or []]
    for i, spec in enumerate(groups):
        spec.setdefault("name", f"group{i}")
        if not spec.get("_target_") and not default_target:
            raise ConfigError(
                f"optimizer.groups[{i}] ({spec['name']}) needs a _target_ (no default optimizer)"
            )
    names = [spec["name"] for spec in groups]
    if len(set(names)) != len(names) or "default" in names:
        raise ConfigError(f"optimizer.groups names must be unique and not 'default', got {names}")
    assigned = assign_parameters(model, groups, has_default=bool(default_target))
    params = dict(model.named_parameters())
    scales = layer_scales(model, cfg.get("layer_decay"))
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    specs = [{"name": "default", "_target_": default_target, **default_kwargs}] if default_target else []
    specs += [
        {**default_kwargs, **spec} if spec.get("_target_") in (None, default_target) else spec
        for spec in groups
    ]

    optimizers, labels = [], []
    for spec in specs:
        members = assigned[spec["name"]]
        if not members:
            log.warning("optimizer group %s selects no parameters; it is left out", spec["name"])
            continue
        target = spec.get("_target_") or default_target
        kwargs = {k: v for k, v in spec.items() if k not in GROUP_KEYS + FRAMEWORK_KEYS}
        weight_decay = kwargs.get("weight_decay", 0.0)
        buckets: dict[tuple, list] = {}
        for name in members:
            no_decay = is_no_decay(name, params[name], skip)
            scale = spec.get("lr_scale", 1.0) * scales[name]
            buckets.setdefault((no_decay, scale), []).append(params[name])
        torch_groups = [
            {
                "params": plist,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scale,
                "name": f"{spec['name']}/{'no_decay' if no_decay else 'decay'}",
            }
            for (no_decay, scale), plist in sorted(buckets.items(), key=lambda kv: (kv[0][0], -kv[0][1]))
        ]
        optimizer, fused = _construct(target, torch_groups, kwargs, cfg.get("fused", "auto"), spec["name"])
        for group in optimizer.param_groups:
            group["base_lr"] = group["lr"]
        optimizers.append(optimizer)
        labels.append(spec["name"])
        log.info(
            "optimizer %s: %s%s over %d tensors (%d parameters), lr %g, weight decay %g",
            spec["name"],
            target,
            " (fused)" if fused else "",
            len(members),
            sum(params[n].numel() for n in members),
            kwargs.get("lr", float("nan")),
            weight_decay,
        )
    return Optimizers(optimizers, labels)


def scale_lr_for_batch(optimizers: Optimizers, rule: str, global_batch: int, reference: int) -> float:
    """Rescale every group's base LR by the global batch: ``none``, ``linear`` or ``sqrt`` of the ratio."""
    ratio = global_batch / reference
    factor = {"none": 1.0, "linear": ratio, "sqrt": ratio**0.5}.get(rule)
    if factor is None:
        raise ConfigError(f"optimizer.lr_scaling must be none, linear or sqrt, got {rule!r}")
    for group in optimizers.param_groups:
        group["base_lr"] *= factor
    return factor
