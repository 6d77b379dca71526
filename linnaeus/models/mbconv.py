"""Convolutional building blocks of mFormerV0: the conv stem and the MBConv (inverted residual) block."""

from __future__ import annotations

import torch
from timm.layers import DropPath, SqueezeExcite
from torch import nn


def conv_bn_act(in_dim: int, out_dim: int, *, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias: BatchNorm follows), BatchNorm, GELU; padding keeps ``ceil(size / stride)``."""
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_dim),
        nn.GELU(),
    )


class ConvStem(nn.Module):
    """Two 3x3 convs, the first with stride 2: ``(B, in_chans, S, S)`` -> ``(B, dim, S/2, S/2)``."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_act(in_chans, dim, kernel=3, stride=2)
        self.conv2 = conv_bn_act(dim, dim, kernel=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class MBConvBlock(nn.Module):
    """Inverted residual block (MobileNetV2/EfficientNet) with squeeze-excitation.

    1x1 expansion, 3x3 depthwise conv (carrying the stride), squeeze-excitation on the expanded channels,
    1x1 projection. When the block changes the width or resolution, the shortcut is a 2x2 average pool
    (ceil mode, matching the strided conv on odd sizes) and a 1x1 conv, as in CoAtNet.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        stride: int = 1,
        expand_ratio: float = 4.0,
        se_ratio: float = 0.25,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = int(in_dim * expand_ratio)
        self.expand = conv_bn_act(in_dim, hidden, kernel=1)
        self.dwconv = conv_bn_act(hidden, hidden, kernel=3, stride=stride, groups=hidden)
        # The squeeze width follows the block's input width, as in EfficientNet.
        self.se = SqueezeExcite(hidden, rd_channels=max(8, int(in_dim * se_ratio)), act_layer=nn.GELU)
        self.project = nn.Sequential(nn.Conv2d(hidden, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim))
        if stride == 1 and in_dim == out_dim:
            self.shortcut = nn.Identity()
        else:
            pool = nn.AvgPool2d(stride, ceil_mode=True) if stride > 1 else nn.Identity()
            self.shortcut = nn.Sequential(pool, nn.Conv2d(in_dim, out_dim, 1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.project(self.se(self.dwconv(self.expand(x))))
        return self.shortcut(x) + self.drop_path(branch)
