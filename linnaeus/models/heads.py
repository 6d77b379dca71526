"""Classification heads: one per task (taxonomic rank), chosen by name so each task can differ."""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import trunc_normal_
from torch import nn


class LinearHead(nn.Module):
    """A single linear map from the pooled feature to one rank's logits."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes)
        # Small weights and zero bias: every class starts equally likely, so the first steps of the
        # loss are not dominated by an arbitrary initial preference.
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)  # (B, C)


HEADS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": LinearHead,
}


def build_head(kind: str, in_dim: int, num_classes: int) -> nn.Module:
    """The head registered under ``kind``; unknown names fail with the list of known ones."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; supported heads: {sorted(HEADS)}")
    return HEADS[kind](in_dim, num_classes)
