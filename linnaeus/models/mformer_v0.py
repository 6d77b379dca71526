"""mFormerV0: MetaFormer-style hybrid. Conv stem and MBConv stages (squeeze-excitation) for the
high-resolution part, transformer stages with a learned relative position bias and metadata tokens for
the low-resolution part, and one classification head per taxonomic rank."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from linnaeus.models.heads import HeadPerTask
from linnaeus.models.hybrid import HybridClassifier, check_stages, stage_drop_paths
from linnaeus.models.layers import init_weights
from linnaeus.models.mbconv import ConvStem, MBConvBlock
from linnaeus.models.meta import meta_settings


class MFormerV0(HybridClassifier):
    """Hybrid MBConv / relative-position transformer classifier with metadata tokens and per-rank heads.

    Resolution schedule (input ``S``): stem ``S/2`` -> MBConv stage 1 ``S/4`` -> MBConv stage 2 ``S/8`` ->
    attention stage 1 ``S/16`` -> attention stage 2 ``S/32`` (odd sizes round up). Each MBConv stage
    downsamples in its first block, so ``down1`` is an identity. The relative position tables are sized
    for ``img_size``; other sizes reuse them (clipped offsets). Metadata tokens and the fusion of both
    stages' class tokens work as in mFormerV1 (see ``HybridClassifier``).
    """

    # Parameters with more than one dimension that are learned constants, not weights: no weight decay.
    NO_DECAY_SUFFIXES = (
        *HybridClassifier.NO_DECAY_SUFFIXES,
        "relative_position_bias_table",
        "prefix_to_image",
        "image_to_prefix",
        "prefix_to_prefix",
    )

    def __init__(
        self,
        num_classes: Sequence[int],
        meta_dims: Mapping[str, int],
        *,
        parents: Sequence[np.ndarray | None] | None = None,
        stem_dim: int = 64,
        conv_dims: Sequence[int] = (96, 192),
        conv_depths: Sequence[int] = (2, 3),
        attn_dims: Sequence[int] = (384, 768),
        attn_depths: Sequence[int] = (5, 2),
        num_heads: Sequence[int] = (8, 8),
        expand_ratio: float = 4.0,
        se_ratio: float = 0.25,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        layer_scale_init: float | None = None,
        img_size: int = 224,
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

        def conv_stage(stage: int, in_dim: int, dim: int) -> nn.Sequential:
            return nn.Sequential(
                *(
                    MBConvBlock(
                        in_dim if i == 0 else dim,
                        dim,
                        stride=2 if i == 0 else 1,
                        expand_ratio=expand_ratio,
                        se_ratio=se_ratio,
                        drop_path=p,
                    )
                    for i, p in enumerate(rates[stage])
                )
            )

        def rel_pos_grid(stride: int) -> dict:
            side = math.ceil(img_size / stride)
            return {"rel_pos_grid": (side, side)}

        self.stem = ConvStem(in_chans, stem_dim)
        self.conv_stage1 = conv_stage(0, stem_dim, conv_dims[0])
        self.down1 = nn.Identity()  # the first MBConv block of stage 2 downsamples
        self.conv_stage2 = conv_stage(1, conv_dims[0], conv_dims[1])
        self.build_attention(
            conv_dims[1],
            attn_dims,
            num_heads,
            rates[2:],
            [rel_pos_grid(16), rel_pos_grid(32)],
            meta_hidden_dim=settings["hidden_dim"],
            mlp_ratio=mlp_ratio,
            layer_scale_init=layer_scale_init,
        )
        self.apply(_init_weights)
        self.add_heads(parents, head, head_per_task, head_routing, head_temperature)


def _init_weights(module: nn.Module) -> None:
    """He-normal convs (BatchNorm follows them); linears as in mFormerV1 (``init_weights``)."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    else:
        init_weights(module)
