"""mFormerV1: ConvNeXt stages for the high-resolution part, RoPE transformer stages with metadata tokens
for the low-resolution part, and one classification head per taxonomic rank."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from timm.layers import LayerNorm2d
from torch import nn

from linnaeus.models.heads import HeadPerTask
from linnaeus.models.hybrid import HybridClassifier, check_stages, stage_drop_paths
from linnaeus.models.layers import ConvNeXtBlock, Downsample, init_weights
from linnaeus.models.meta import meta_settings


class MFormerV1(HybridClassifier):
    """Hybrid ConvNeXt / RoPE-transformer classifier with metadata tokens and per-rank heads.

    Resolution schedule (input ``S``): stem ``S/4`` -> conv stage 1 -> ``S/8`` conv stage 2 -> ``S/16``
    attention stage 1 -> ``S/32`` attention stage 2 (see ``HybridClassifier``).
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        meta_dims: Mapping[str, int],
        *,
        parents: Sequence[np.ndarray | None] | None = None,
        conv_dims: Sequence[int] = (96, 192),
        conv_depths: Sequence[int] = (3, 3),
        attn_dims: Sequence[int] = (384, 768),
        attn_depths: Sequence[int] = (5, 2),
        num_heads: Sequence[int] = (6, 12),
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        layer_scale_init: float | None = 1e-6,
        rope_theta: float = 100.0,
        meta: Mapping | None = None,
        head: str = "linear",
        head_per_task: HeadPerTask = None,
        head_routing: str = "soft",
        head_temperature: float = 1.0,
        grad_checkpointing: bool = False,
        in_chans: int = 3,
    ) -> None:
        check_stages(conv_dims, conv_depths, attn_dims, attn_depths, num_heads)
        settings = meta_settings(meta)
        super().__init__(num_classes, meta_dims if settings["enabled"] else {}, grad_checkpointing)
        rates = stage_drop_paths(drop_path_rate, [*conv_depths, *attn_depths])

        def conv_stage(stage: int, dim: int) -> nn.Sequential:
            blocks = [
                ConvNeXtBlock(dim, mlp_ratio=mlp_ratio, drop_path=p, layer_scale_init=layer_scale_init)
                for p in rates[stage]
            ]
            return nn.Sequential(*blocks)

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, conv_dims[0], kernel_size=4, stride=4), LayerNorm2d(conv_dims[0])
        )
        self.conv_stage1 = conv_stage(0, conv_dims[0])
        self.down1 = Downsample(conv_dims[0], conv_dims[1])
        self.conv_stage2 = conv_stage(1, conv_dims[1])
        self.build_attention(
            conv_dims[1],
            attn_dims,
            num_heads,
            rates[2:],
            [{"rope_theta": rope_theta}] * 2,
            meta_hidden_dim=settings["hidden_dim"],
            mlp_ratio=mlp_ratio,
            layer_scale_init=layer_scale_init,
        )
        # Initialise the trunk before the heads exist, so heads keep whatever initialisation they define.
        self.apply(init_weights)
        self.add_heads(parents, head, head_per_task, head_routing, head_temperature)
