"""Model construction from the ``model`` config node."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import hydra
from omegaconf import OmegaConf
from torch import nn

# Supplied by the trainer from the data, never written in the model YAML.
RUNTIME_ARGS = ("num_classes", "meta_dims")
# Hydra's own instantiate flags may appear in a node; they are not constructor arguments.
HYDRA_KEYS = ("_convert_", "_recursive_", "_partial_")


def build_model(cfg, num_classes: Sequence[int], meta_dims: Mapping[str, int]) -> nn.Module:
    """Build ``cfg._target_`` with the node's keys plus the data-derived ``num_classes``/``meta_dims``.

    Keys are checked against the constructor's signature first, so a typo fails at startup with the
    key's full name (``model.<key>``) and the list of valid keys, rather than a bare ``TypeError``.
    """
    kwargs = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    target = kwargs.pop("_target_", None)
    if target is None:
        raise ValueError(
            "model._target_ is missing: it names the model class, e.g. linnaeus.models.mformer.MFormerV1"
        )
    for key in HYDRA_KEYS:
        kwargs.pop(key, None)
    builder = hydra.utils.get_object(target)

    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = [
            name
            for name, p in params.items()
            if name not in RUNTIME_ARGS and p.kind is not inspect.Parameter.VAR_POSITIONAL
        ]
        unknown = [key for key in kwargs if key not in valid]
        if unknown:
            names = ", ".join(f"model.{key}" for key in unknown)
            raise ValueError(f"unknown key(s) {names} for {target}; valid keys: {valid}")
    return builder(num_classes=list(num_classes), meta_dims=dict(meta_dims), **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["build_model", "count_parameters"]
