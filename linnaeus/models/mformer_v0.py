"""mFormerV0: MetaFormer-style hybrid. Conv stem and MBConv stages (squeeze-excitation) for the
high-resolution part, transformer stages with a learned relative position bias and metadata tokens for
the low-resolution part, and one classification head per taxonomic rank."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from linnaeus.models.heads import HeadPerTask, build_heads
from linnaeus.models.layers import Downsample, MetaEmbedding, TransformerBlock, run_blocks
from linnaeus.models.mbconv import ConvStem, MBConvBlock
from linnaeus.models.meta import MetaInputs, gather_meta_inputs, meta_settings
from linnaeus.models.relpos import RelativePositionBias

# Parameters with more than one dimension that are learned constants, not weights: no weight decay.
NO_DECAY_SUFFIXES = (
    "cls_token",
    ".missing",
    "fuse_logits",
    "relative_position_bias_table",
    "prefix_to_image",
    "image_to_prefix",
    "prefix_to_prefix",
)


class RelPosAttentionStage(nn.Module):
    """Transformer blocks over ``[cls, one token per metadata component, image tokens]``, each block with its
    own relative position bias (prefix tokens have their own bias entries, see ``RelativePositionBias``)."""

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        num_heads: int,
        grid: tuple[int, int],
        meta_dims: Mapping[str, int],
        meta_hidden_dim: int,
        mlp_ratio: float,
        drop_paths: Sequence[float],
        layer_scale_init: float | None,
    ) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.cls_token, std=0.02)
        self.meta_embed = nn.ModuleDict(
            {name: MetaEmbedding(width, dim, meta_hidden_dim) for name, width in meta_dims.items()}
        )
        num_prefix = 1 + len(meta_dims)
        self.rel_pos = nn.ModuleList(
            RelativePositionBias(num_heads, grid=grid, num_prefix=num_prefix) for _ in range(depth)
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                drop_path=drop_paths[i],
                layer_scale_init=layer_scale_init,
            )
            for i in range(depth)
        )

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int], meta_inputs: MetaInputs, use_checkpoint: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens ``(B, H*W, C)`` -> (updated image tokens ``(B, H*W, C)``, class token ``(B, C)``)."""
        batch = x.shape[0]
        prefix = [self.cls_token.expand(batch, -1, -1)]
        for name, embed in self.meta_embed.items():
            values, valid = meta_inputs[name]
            prefix.append(embed(values, valid).unsqueeze(1))  # (B, 1, C)
        num_prefix = len(prefix)
        x = torch.cat([token.to(x.dtype) for token in prefix] + [x], dim=1)  # (B, P + H*W, C)
        for block, rel_pos in zip(self.blocks, self.rel_pos):
            args = (x, None, num_prefix, rel_pos(grid))
            x = checkpoint(block, *args, use_reentrant=False) if use_checkpoint else block(*args)
        return x[:, num_prefix:], x[:, 0]


class MFormerV0(nn.Module):
    """Hybrid MBConv / relative-position transformer classifier with metadata tokens and per-rank heads.

    Resolution schedule (input ``S``): stem ``S/2`` -> MBConv stage 1 ``S/4`` -> MBConv stage 2 ``S/8`` ->
    attention stage 1 ``S/16`` -> attention stage 2 ``S/32`` (odd sizes round up). The relative position
    tables are sized for ``img_size``; other sizes reuse them (clipped offsets). Metadata tokens and the
    fusion of both stages' class tokens work as in mFormerV1.
    """

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
        super().__init__()
        per_stage = {
            "conv_dims": conv_dims,
            "conv_depths": conv_depths,
            "attn_dims": attn_dims,
            "attn_depths": attn_depths,
            "num_heads": num_heads,
        }
        for key, value in per_stage.items():
            if len(value) != 2:
                raise ValueError(f"model.{key} needs two entries (one per stage), got {list(value)}")
        settings = meta_settings(meta)
        self.num_classes = list(num_classes)
        self.meta_dims = dict(meta_dims) if settings["enabled"] else {}
        self.num_features = attn_dims[1]
        self.grad_checkpointing = grad_checkpointing

        depths = [*conv_depths, *attn_depths]
        # Stochastic depth grows linearly with depth across all four stages (plain Python: meta-device safe).
        drop_paths = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        rates = [drop_paths[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(4)]

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

        def attn_stage(stage: int, dim: int, heads: int, stride: int) -> RelPosAttentionStage:
            side = math.ceil(img_size / stride)
            return RelPosAttentionStage(
                dim,
                depth=depths[stage],
                num_heads=heads,
                grid=(side, side),
                meta_dims=self.meta_dims,
                meta_hidden_dim=settings["hidden_dim"],
                mlp_ratio=mlp_ratio,
                drop_paths=rates[stage],
                layer_scale_init=layer_scale_init,
            )

        self.stem = ConvStem(in_chans, stem_dim)
        self.conv_stage1 = conv_stage(0, stem_dim, conv_dims[0])
        self.conv_stage2 = conv_stage(1, conv_dims[0], conv_dims[1])
        self.down2 = Downsample(conv_dims[1], attn_dims[0])
        self.attn_stage1 = attn_stage(2, attn_dims[0], num_heads[0], 16)
        self.down3 = Downsample(attn_dims[0], attn_dims[1])
        self.attn_stage2 = attn_stage(3, attn_dims[1], num_heads[1], 32)

        self.cls1_proj = nn.Sequential(nn.LayerNorm(attn_dims[0]), nn.Linear(attn_dims[0], attn_dims[1]))
        self.fuse_logits = nn.Parameter(torch.zeros(2))
        self.norm = nn.LayerNorm(attn_dims[1])
        self.apply(_init_weights)
        self.heads = build_heads(
            self.num_features,
            self.num_classes,
            parents=parents,
            head=head,
            head_per_task=head_per_task,
            routing=head_routing,
            temperature=head_temperature,
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Class tokens, missing-value embeddings, fusion logits and position biases: learned constants."""
        return {name for name, _ in self.named_parameters() if name.endswith(NO_DECAY_SUFFIXES)}

    def shared_parameters(self) -> list[nn.Parameter]:
        """The last layer every head reads from (the fusion LayerNorm)."""
        return list(self.norm.parameters())

    def forward_features(
        self,
        images: torch.Tensor,
        meta: Mapping[str, torch.Tensor] | None = None,
        meta_valid: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Images ``(B, C, H, W)`` plus metadata -> pooled features ``(B, num_features)``."""
        batch = images.shape[0]
        meta_inputs = gather_meta_inputs(self.meta_dims, meta, meta_valid, batch, images.device)
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()

        x = run_blocks(self.conv_stage1, self.stem(images), use_checkpoint=ckpt)
        x = run_blocks(self.conv_stage2, x, use_checkpoint=ckpt)
        x = self.down2(x)  # (B, C1, H, W)
        grid = (x.shape[-2], x.shape[-1])
        x, cls1 = self.attn_stage1(x.flatten(2).transpose(1, 2), grid, meta_inputs, ckpt)  # (B, H*W, C1)

        x = self.down3(x.transpose(1, 2).reshape(batch, -1, *grid))  # (B, C2, H', W')
        grid = (x.shape[-2], x.shape[-1])
        _, cls2 = self.attn_stage2(x.flatten(2).transpose(1, 2), grid, meta_inputs, ckpt)

        weights = self.fuse_logits.softmax(dim=0)
        return self.norm(weights[0] * self.cls1_proj(cls1) + weights[1] * cls2)

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


def _init_weights(module: nn.Module) -> None:
    """He-normal convs (BatchNorm follows them), truncated-normal linears, zero biases."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
    if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
        nn.init.zeros_(module.bias)
