"""The interface every linnaeus classifier shares: a pooled feature per image, then one head per rank.

The trainer relies only on what ``TaxonClassifier`` defines: ``forward(images, meta, meta_valid)``
(one logits tensor ``(B, C_t)`` per rank, coarse to fine), ``forward_features``, ``forward_head``,
``num_features``, ``no_weight_decay()``, ``shared_parameters()`` and ``set_grad_checkpointing()``.
A subclass builds its trunk, ending in ``self.norm`` (the last layer every head reads), sets
``num_features``, calls ``add_heads`` last and implements ``forward_features``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from linnaeus.models.heads import HeadPerTask, TaskHeads, build_heads


class TaxonClassifier(nn.Module):
    """Image (plus metadata) classifier with one head per taxonomic rank.

    Subclasses define ``forward_features(images, meta, meta_valid)``: images ``(B, C, H, W)`` plus
    metadata -> features ``(B, num_features)``.
    """

    # Parameters whose names end with one of these are learned constants, not weights: no weight decay.
    NO_DECAY_SUFFIXES: tuple[str, ...] = (".missing",)

    num_features: int
    norm: nn.Module
    heads: TaskHeads

    def __init__(
        self, num_classes: Sequence[int], meta_dims: Mapping[str, int], grad_checkpointing: bool = False
    ) -> None:
        """``meta_dims``: the metadata components the model uses (empty when ``model.meta.enabled`` is off)."""
        super().__init__()
        self.num_classes = list(num_classes)
        self.meta_dims = dict(meta_dims)
        self.grad_checkpointing = grad_checkpointing

    def add_heads(
        self,
        parents: Sequence[np.ndarray | None] | None,
        head: str,
        head_per_task: HeadPerTask,
        routing: str,
        temperature: float,
    ) -> None:
        """One head per rank on the ``num_features``-wide feature (see ``build_heads``). Called after the
        trunk is initialised, so the heads keep whatever initialisation they define."""
        self.heads = build_heads(
            self.num_features,
            self.num_classes,
            parents=parents,
            head=head,
            head_per_task=head_per_task,
            routing=routing,
            temperature=temperature,
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block's activations in the backward pass (timm's method name)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that are learned constants (``NO_DECAY_SUFFIXES``), not weights."""
        return {name for name, _ in self.named_parameters() if name.endswith(self.NO_DECAY_SUFFIXES)}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The last layer every head reads from (``norm``); GradNorm balances the ranks here."""
        return list(self.norm.parameters())

    def layer_order(self) -> list[str]:
        """Module prefixes in forward order, one per layer, for layer-wise LR decay (see ``layer_ids``)."""
        return []

    def layer_ids(self) -> dict[str, int]:
        """Layer index of every parameter, 0 at the input: a parameter takes the index of the longest
        ``layer_order`` prefix it lies under; everything after the trunk (fusion, norm, heads) is the
        top layer."""
        order = self.layer_order()
        top = len(order)
        ids = {}
        for name, _ in self.named_parameters():
            best, best_len = top, -1
            for i, prefix in enumerate(order):
                if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                    best, best_len = i, len(prefix)
            ids[name] = best
        return ids

    def forward_head(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Features ``(B, F)`` -> one logits tensor ``(B, C_t)`` per task, coarse to fine."""
        return self.heads(features)

    def forward(
        self,
        images: torch.Tensor,
        meta: Mapping[str, torch.Tensor] | None = None,
        meta_valid: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        return self.forward_head(self.forward_features(images, meta, meta_valid))
