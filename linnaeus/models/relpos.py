"""Learned 2-D relative position bias for attention over ``[prefix tokens, image tokens]``.

Image tokens: one learned bias per head for every 2-D offset ``(dr, dc)`` between query and key, from a
table of shape ``(heads, 2 * H - 1, 2 * W - 1)`` for a reference ``H x W`` grid. Smaller grids use the
central part of the table unchanged; offsets beyond the table (larger grids) are clipped to its border
(Shaw et al., 2018), so any image size works. ``load_pretrained`` interpolates tables of another size.

Prefix tokens (class and metadata tokens) have no grid position, so each gets its own learned entries:
one bias for attending from it to any image token, one for any image token attending to it, and one per
prefix-to-prefix pair.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn


def relative_offsets(grid: tuple[int, int], max_offset: tuple[int, int], device=None) -> torch.Tensor:
    """Table indices ``(2, H*W, H*W)``: clipped row and column offsets (query minus key) shifted to >= 0."""
    height, width = grid
    rows = torch.arange(height, device=device).repeat_interleave(width)  # row-major token order
    cols = torch.arange(width, device=device).repeat(height)
    d_row = (rows[:, None] - rows[None, :]).clamp(-max_offset[0], max_offset[0]) + max_offset[0]
    d_col = (cols[:, None] - cols[None, :]).clamp(-max_offset[1], max_offset[1]) + max_offset[1]
    return torch.stack((d_row, d_col))


class RelativePositionBias(nn.Module):
    """Attention bias ``(heads, P + H*W, P + H*W)`` for ``P`` prefix tokens followed by an ``H x W`` grid."""

    def __init__(self, num_heads: int, *, grid: tuple[int, int], num_prefix: int) -> None:
        super().__init__()
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_prefix = num_prefix
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(num_heads, 2 * self.grid[0] - 1, 2 * self.grid[1] - 1)
        )
        self.prefix_to_image = nn.Parameter(torch.zeros(num_heads, num_prefix))
        self.image_to_prefix = nn.Parameter(torch.zeros(num_heads, num_prefix))
        self.prefix_to_prefix = nn.Parameter(torch.zeros(num_heads, num_prefix, num_prefix))
        for param in self.parameters():
            trunc_normal_(param, std=0.02)
        self._cache: dict[tuple, torch.Tensor] = {}

    def offsets(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        key = (int(grid[0]), int(grid[1]), torch.device(device))
        if key in self._cache:
            return self._cache[key]
        table = self.relative_position_bias_table
        max_offset = ((table.shape[1] - 1) // 2, (table.shape[2] - 1) // 2)
        offsets = relative_offsets(key[:2], max_offset, device)
        # Index tensors made under inference_mode cannot be saved for a later backward pass: do not keep them.
        if not torch.is_inference_mode_enabled():
            self._cache[key] = offsets
        return offsets

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        table = self.relative_position_bias_table
        d_row, d_col = self.offsets(grid, table.device)
        image = table[:, d_row, d_col]  # (heads, HW, HW)
        heads, tokens, prefix = image.shape[0], image.shape[1], self.num_prefix
        top = torch.cat(
            (self.prefix_to_prefix, self.prefix_to_image[:, :, None].expand(heads, prefix, tokens)), dim=2
        )  # (heads, P, P + HW)
        bottom = torch.cat(
            (self.image_to_prefix[:, None, :].expand(heads, tokens, prefix), image), dim=2
        )  # (heads, HW, P + HW)
        return torch.cat((top, bottom), dim=1)
