"""The plain head: one linear map from the shared feature to one rank's logits."""

from __future__ import annotations

import torch
from torch import nn

from linnaeus.models.layers import init_weights


class LinearHead(nn.Module):
    """A single linear map from the pooled feature to one rank's logits; ignores the coarser rank."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small weights and zero bias: every class starts equally likely, so the first steps of the
        # loss are not dominated by an arbitrary initial preference.
        init_weights(self.fc)

    def forward(self, features: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(features)  # (B, C)
