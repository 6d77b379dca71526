"""Metadata plumbing shared by every model: the ``model.meta`` settings and the ``(values, valid)`` inputs.

The embedding itself (``MetaEmbedding``) lives in ``layers.py``; this module only decides which components
a model uses and turns the batch's ``meta``/``meta_valid`` dicts into one ``(values, valid)`` pair per
component, with absent components marked missing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from linnaeus.errors import ConfigError

META_DEFAULTS = {"enabled": True, "hidden_dim": 64}

MetaInputs = dict[str, tuple[torch.Tensor, torch.Tensor]]


def meta_settings(meta: Mapping | None, defaults: Mapping = META_DEFAULTS) -> dict:
    """``model.meta`` merged over its defaults; a mistyped key fails here with its full name."""
    meta = dict(meta or {})
    unknown = sorted(set(meta) - set(defaults))
    if unknown:
        names = ", ".join(f"model.meta.{key}" for key in unknown)
        raise ConfigError(f"unknown key(s) {names}; valid keys: {sorted(defaults)}")
    return {**defaults, **meta}


def gather_meta_inputs(
    meta_dims: Mapping[str, int],
    meta: Mapping[str, torch.Tensor] | None,
    meta_valid: Mapping[str, torch.Tensor] | None,
    batch: int,
    device: torch.device,
) -> MetaInputs:
    """``(values, valid)`` for every component in ``meta_dims``.

    An absent component counts as missing for every row; absent validity flags count as valid.
    Components the model was not built with are ignored.
    """
    meta, meta_valid = meta or {}, meta_valid or {}
    inputs: MetaInputs = {}
    for name, width in meta_dims.items():
        values = meta.get(name)
        if values is None:
            values = torch.zeros(batch, width, device=device)
            valid = torch.zeros(batch, dtype=torch.bool, device=device)
        else:
            if values.shape != (batch, width):
                raise ValueError(
                    f"metadata '{name}' has shape {tuple(values.shape)}; the model expects ({batch}, {width})"
                )
            valid = meta_valid.get(name)
            if valid is None:
                valid = torch.ones(batch, dtype=torch.bool, device=device)
        inputs[name] = (values, valid)
    return inputs
