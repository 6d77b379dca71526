"""Model construction from the ``model`` config node."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence

import hydra
from omegaconf import OmegaConf
from torch import nn

from linnaeus.data.taxonomy import Taxonomy
from linnaeus.errors import ConfigError

# Supplied by the trainer from the data, never written in the model YAML.
RUNTIME_ARGS = ("num_classes", "meta_dims", "parents")
# Hydra's own instantiate flags may appear in a node; they are not constructor arguments.
HYDRA_KEYS = ("_convert_", "_recursive_", "_partial_")
# Keys of every model node that the trainer reads, not the constructor (``pretrained``: a weights file).
TRAINER_KEYS = ("pretrained",)


def resolve_head_per_task(head_per_task, taxonomy: Taxonomy | None):
    """``model.head_per_task`` with task keys (``taxa_L10``) replaced by task indices (coarse = 0)."""
    if not isinstance(head_per_task, Mapping) or taxonomy is None:
        return head_per_task
    resolved = {}
    for key, kind in head_per_task.items():
        if isinstance(key, str) and key in taxonomy.task_keys:
            key = taxonomy.task_keys.index(key)
        elif isinstance(key, str) and not key.lstrip("-").isdigit():
            raise ConfigError(f"model.head_per_task.{key}: not a task; tasks are {taxonomy.task_keys}")
        resolved[int(key)] = kind
    return resolved


def check_model_keys(cfg) -> None:
    """Raise a ``ConfigError`` naming every key of the ``model`` node that its constructor does not take.

    A typo (``model.drop_pth_rate``) or a stray ``+model.foo=1`` fails at startup with the key's full
    name, the closest valid key and the list of valid keys, rather than a bare ``TypeError``.
    """
    kwargs = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    target = kwargs.pop("_target_", None)
    if target is None:
        raise ConfigError(
            "model._target_ is missing: it names the model class, e.g. linnaeus.models.mformer.MFormerV1"
        )
    try:
        builder = hydra.utils.get_object(target)
    except Exception as err:
        raise ConfigError(
            f"model._target_={target}: cannot be imported ({type(err).__name__}: {err})"
        ) from None
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [
        name
        for name, p in params.items()
        if name not in RUNTIME_ARGS and p.kind is not inspect.Parameter.VAR_POSITIONAL
    ]
    unknown = [key for key in kwargs if key not in valid and key not in HYDRA_KEYS + TRAINER_KEYS]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid + list(TRAINER_KEYS), n=1)
            hints.append(f"model.{key}" + (f" (did you mean model.{close[0]}?)" if close else ""))
        raise ConfigError(
            f"unknown key(s) {', '.join(hints)} for {target}; remove them or use one of: "
            f"{', '.join(valid + list(TRAINER_KEYS))}"
        )


def build_model(
    cfg,
    num_classes: Sequence[int],
    meta_dims: Mapping[str, int],
    taxonomy: Taxonomy | None = None,
) -> nn.Module:
    """Build ``cfg._target_`` with the node's keys plus the data-derived ``num_classes``/``meta_dims`` and,
    from ``taxonomy``, the parent maps that hierarchical heads need (``taxonomy.parents``).

    Keys are checked against the constructor's signature first (``check_model_keys``).
    """
    check_model_keys(cfg)
    kwargs = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    target = kwargs.pop("_target_")
    for key in HYDRA_KEYS + TRAINER_KEYS:
        kwargs.pop(key, None)
    builder = hydra.utils.get_object(target)
    if taxonomy is not None:
        if list(taxonomy.num_classes) != list(num_classes):
            raise ValueError(
                f"num_classes {list(num_classes)} differ from the taxonomy's {taxonomy.num_classes}"
            )
        kwargs["parents"] = taxonomy.parents
    if "head_per_task" in kwargs:
        kwargs["head_per_task"] = resolve_head_per_task(kwargs["head_per_task"], taxonomy)
    return builder(num_classes=list(num_classes), meta_dims=dict(meta_dims), **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "RUNTIME_ARGS",
    "TRAINER_KEYS",
    "build_model",
    "check_model_keys",
    "count_parameters",
    "resolve_head_per_task",
]
