"""Channels-last execution: the whole model and every image batch in NHWC memory layout.

Convolutions (and their cuDNN / oneDNN kernels) run faster on channels-last tensors, especially with
mixed precision on tensor cores. The trainer converts the model's weights once (``model.to(memory_format=
torch.channels_last)``) and wraps the model in ``ChannelsLastInputs``, so the step itself never checks a
flag; the wrapper holds no parameters, so ``state_dict`` names do not change for the wrapped model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class ChannelsLastInputs(nn.Module):
    """Calls ``model`` with the images converted to ``torch.channels_last``; everything else unchanged."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(
        self,
        images: torch.Tensor,
        meta: Mapping[str, torch.Tensor] | None = None,
        meta_valid: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        return self.model(images.contiguous(memory_format=torch.channels_last), meta, meta_valid)
