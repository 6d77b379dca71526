"""The parent map that links a finer rank's head to the coarser rank's output."""

from __future__ import annotations

import numpy as np
import torch


def parent_index(parents: np.ndarray, num_classes: int, parent_classes: int | None) -> torch.Tensor:
    """``parents`` ``(C,)`` (each class's parent among the ``parent_classes`` coarser classes) as a long
    tensor; a map that does not match the rank's ``num_classes`` fails here."""
    if len(parents) != num_classes or parent_classes is None:
        raise ValueError(f"parent map of length {len(parents)} for {num_classes} classes")
    return torch.as_tensor(np.asarray(parents), dtype=torch.long)
