"""mFormerV1: ConvNeXt stages for the high-resolution part, RoPE transformer stages with metadata tokens
for the low-resolution part, and one classification head per taxonomic rank."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from timm.layers import LayerNorm2d, trunc_normal_
from torch import nn

from linnaeus.models.heads import HeadPerTask, build_heads
from linnaeus.models.layers import (
    ConvNeXtBlock,
    Downsample,
    MetaEmbedding,
    RoPE2D,
    TransformerBlock,
    run_blocks,
)
from linnaeus.models.meta import MetaInputs, gather_meta_inputs, meta_settings


class AttentionStage(nn.Module):
    """Transformer blocks over ``[cls, one token per metadata component, image tokens]``.

    Each stage has its own class token and metadata embeddings at its own width, so metadata is
    re-injected after every downsampling instead of being carried through it.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        num_heads: int,
        meta_dims: Mapping[str, int],
        meta_hidden_dim: int,
        mlp_ratio: float,
        drop_paths: Sequence[float],
        layer_scale_init: float | None,
        rope_theta: float,
    ) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.cls_token, std=0.02)
        self.meta_embed = nn.ModuleDict(
            {name: MetaEmbedding(width, dim, meta_hidden_dim) for name, width in meta_dims.items()}
        )
        self.rope = RoPE2D(dim // num_heads, theta=rope_theta)
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
        self,
        x: torch.Tensor,
        grid: tuple[int, int],
        meta_inputs: MetaInputs,
        use_checkpoint: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens ``(B, H*W, C)`` -> (updated image tokens ``(B, H*W, C)``, class token ``(B, C)``)."""
        batch = x.shape[0]
        prefix = [self.cls_token.expand(batch, -1, -1)]
        for name, embed in self.meta_embed.items():
            values, valid = meta_inputs[name]
            prefix.append(embed(values, valid).unsqueeze(1))  # (B, 1, C)
        num_prefix = len(prefix)
        x = torch.cat([token.to(x.dtype) for token in prefix] + [x], dim=1)  # (B, P + H*W, C)
        rope = self.rope(grid, x.device)
        x = run_blocks(self.blocks, x, rope, num_prefix, use_checkpoint=use_checkpoint)
        return x[:, num_prefix:], x[:, 0]


class MFormerV1(nn.Module):
    """Hybrid ConvNeXt / RoPE-transformer classifier with metadata tokens and per-rank heads.

    Resolution schedule (input ``S``): stem ``S/4`` -> conv stage 1 -> ``S/8`` conv stage 2 -> ``S/16``
    attention stage 1 -> ``S/32`` attention stage 2. Convolutions handle the large early grids cheaply;
    attention runs where the grid is small and lets image, class and metadata tokens interact. The final
    feature fuses the class tokens of both attention stages, so the finer stage-1 view of the image
    reaches the heads directly.
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
        self.grad_checkpointing = grad_checkpointing
        self.meta_dims = dict(meta_dims) if settings["enabled"] else {}
        self.num_features = attn_dims[1]

        depths = [*conv_depths, *attn_depths]
        # Stochastic depth grows linearly with depth across all four stages, as in ConvNeXt and DeiT.
        # Plain Python rather than torch.linspace, so the model can also be built on the meta device.
        drop_paths = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        starts = [sum(depths[:i]) for i in range(4)]

        def conv_stage(stage: int, dim: int) -> nn.Sequential:
            rates = drop_paths[starts[stage] : starts[stage] + depths[stage]]
            blocks = [
                ConvNeXtBlock(dim, mlp_ratio=mlp_ratio, drop_path=p, layer_scale_init=layer_scale_init)
                for p in rates
            ]
            return nn.Sequential(*blocks)

        def attn_stage(stage: int, dim: int, heads: int) -> AttentionStage:
            return AttentionStage(
                dim,
                depth=depths[stage],
                num_heads=heads,
                meta_dims=self.meta_dims,
                meta_hidden_dim=settings["hidden_dim"],
                mlp_ratio=mlp_ratio,
                drop_paths=drop_paths[starts[stage] : starts[stage] + depths[stage]],
                layer_scale_init=layer_scale_init,
                rope_theta=rope_theta,
            )

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, conv_dims[0], kernel_size=4, stride=4), LayerNorm2d(conv_dims[0])
        )
        self.conv_stage1 = conv_stage(0, conv_dims[0])
        self.down1 = Downsample(conv_dims[0], conv_dims[1])
        self.conv_stage2 = conv_stage(1, conv_dims[1])
        self.down2 = Downsample(conv_dims[1], attn_dims[0])
        self.attn_stage1 = attn_stage(2, attn_dims[0], num_heads[0])
        self.down3 = Downsample(attn_dims[0], attn_dims[1])
        self.attn_stage2 = attn_stage(3, attn_dims[1], num_heads[1])

        # Pre-norm blocks leave the residual stream unnormalised, so cls_1 is normalised before its
        # projection; the fusion weights start equal (zero logits) and are learned.
        self.cls1_proj = nn.Sequential(nn.LayerNorm(attn_dims[0]), nn.Linear(attn_dims[0], attn_dims[1]))
        self.fuse_logits = nn.Parameter(torch.zeros(2))
        self.norm = nn.LayerNorm(attn_dims[1])
        # Initialise the trunk before the heads exist, so heads keep whatever initialisation they define.
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
        """Recompute every block's activations in the backward pass (timm's method name)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Class tokens, missing-value embeddings and fusion logits: learned constants, not weights."""
        return {
            name
            for name, _ in self.named_parameters()
            if name.endswith(("cls_token", ".missing", "fuse_logits"))
        }

    def shared_parameters(self) -> list[nn.Parameter]:
        """The last layer every head reads from (the fusion LayerNorm); GradNorm balances the ranks here."""
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
        x = run_blocks(self.conv_stage2, self.down1(x), use_checkpoint=ckpt)
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
    """Truncated-normal weights (std 0.02) and zero biases for every linear and conv layer."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
