"""The hybrid trunk of mFormerV0 and mFormerV1: conv stages at high resolution, transformer stages with
metadata tokens at low resolution, and the fusion of both attention stages' class tokens.

The two versions differ in their blocks (ConvNeXt vs MBConv, 2-D RoPE vs a learned relative position
bias) and build their conv part themselves; the attention stages, the class-token fusion and the forward
pass live here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from linnaeus.models.base import TaxonClassifier
from linnaeus.models.layers import Downsample, MetaEmbedding, RoPE2D, TransformerBlock, run_blocks
from linnaeus.models.meta import MetaInputs, gather_meta_inputs
from linnaeus.models.relpos import RelativePositionBias


def check_stages(conv_dims, conv_depths, attn_dims, attn_depths, num_heads) -> None:
    """Every per-stage setting has one entry per stage: two conv stages, two attention stages."""
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


def stage_drop_paths(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic-depth rate of every block, grouped by stage.

    The rate grows linearly with depth across all stages, as in ConvNeXt and DeiT. Plain Python rather
    than ``torch.linspace``, so the model can also be built on the meta device.
    """
    total = sum(depths)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    return [rates[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(len(depths))]


class AttentionStage(nn.Module):
    """Transformer blocks over ``[cls, one token per metadata component, image tokens]``.

    Each stage has its own class token and metadata embeddings at its own width, so metadata is
    re-injected after every downsampling instead of being carried through it. Image tokens get their
    positions from 2-D RoPE (``rope_theta``, mFormerV1) or from a learned relative position bias per block,
    sized for ``rel_pos_grid`` (mFormerV0; prefix tokens have their own bias entries, see
    ``RelativePositionBias``). ``drop_paths`` holds one stochastic-depth rate per block.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        meta_dims: Mapping[str, int],
        meta_hidden_dim: int,
        mlp_ratio: float,
        drop_paths: Sequence[float],
        layer_scale_init: float | None,
        rope_theta: float | None = None,
        rel_pos_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if (rope_theta is None) == (rel_pos_grid is None):
            raise ValueError("an attention stage needs exactly one of rope_theta and rel_pos_grid")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        trunc_normal_(self.cls_token, std=0.02)
        self.meta_embed = nn.ModuleDict(
            {name: MetaEmbedding(width, dim, meta_hidden_dim) for name, width in meta_dims.items()}
        )
        self.rope = None if rope_theta is None else RoPE2D(dim // num_heads, theta=rope_theta)
        self.rel_pos = None
        if rel_pos_grid is not None:
            num_prefix = 1 + len(meta_dims)
            self.rel_pos = nn.ModuleList(
                RelativePositionBias(num_heads, grid=rel_pos_grid, num_prefix=num_prefix) for _ in drop_paths
            )
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim, num_heads=num_heads, mlp_ratio=mlp_ratio, drop_path=p, layer_scale_init=layer_scale_init
            )
            for p in drop_paths
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
        if self.rel_pos is None:
            rope = self.rope(grid, x.device)
            x = run_blocks(self.blocks, x, rope, num_prefix, use_checkpoint=use_checkpoint)
        else:
            for block, rel_pos in zip(self.blocks, self.rel_pos):
                args = (x, None, num_prefix, rel_pos(grid))
                x = checkpoint(block, *args, use_reentrant=False) if use_checkpoint else block(*args)
        return x[:, num_prefix:], x[:, 0]


class HybridClassifier(TaxonClassifier):
    """Conv stages, then attention stages with metadata tokens, then fused class tokens and per-rank heads.

    Resolution schedule (input ``S``): the conv part (``stem``, ``conv_stage1``, ``down1``, ``conv_stage2``)
    brings the image to ``S/8``; ``down2`` -> attention stage 1 at ``S/16`` -> ``down3`` -> attention stage
    2 at ``S/32``. Convolutions handle the large early grids cheaply; attention runs where the grid is small
    and lets image, class and metadata tokens interact. The final feature fuses the class tokens of both
    attention stages, so the finer stage-1 view of the image reaches the heads directly.

    Subclasses build the conv part in ``__init__`` (``down1`` is an ``nn.Identity`` where the second conv
    stage downsamples itself), then call ``build_attention``: modules are created in forward order, which
    fixes the order of the parameters (checkpoints, optimiser state) and of their random initialisation.
    """

    NO_DECAY_SUFFIXES = ("cls_token", ".missing", "fuse_logits")

    stem: nn.Module
    conv_stage1: nn.Module
    down1: nn.Module
    conv_stage2: nn.Module

    def build_attention(
        self,
        in_dim: int,
        dims: Sequence[int],
        num_heads: Sequence[int],
        drop_paths: Sequence[Sequence[float]],
        positions: Sequence[Mapping],
        *,
        meta_hidden_dim: int,
        mlp_ratio: float,
        layer_scale_init: float | None,
    ) -> None:
        """``down2``, both attention stages and the class-token fusion after a conv part ``in_dim`` wide.

        ``dims``, ``num_heads``, ``drop_paths`` (one rate per block) and ``positions`` (the stage's
        position keywords, see ``AttentionStage``) have one entry per attention stage.
        """

        def stage(i: int) -> AttentionStage:
            return AttentionStage(
                dims[i],
                num_heads=num_heads[i],
                meta_dims=self.meta_dims,
                meta_hidden_dim=meta_hidden_dim,
                mlp_ratio=mlp_ratio,
                drop_paths=drop_paths[i],
                layer_scale_init=layer_scale_init,
                **positions[i],
            )

        self.down2 = Downsample(in_dim, dims[0])
        self.attn_stage1 = stage(0)
        self.down3 = Downsample(dims[0], dims[1])
        self.attn_stage2 = stage(1)
        # Pre-norm blocks leave the residual stream unnormalised, so cls_1 is normalised before its
        # projection; the fusion weights start equal (zero logits) and are learned.
        self.cls1_proj = nn.Sequential(nn.LayerNorm(dims[0]), nn.Linear(dims[0], dims[1]))
        self.fuse_logits = nn.Parameter(torch.zeros(2))
        self.norm = nn.LayerNorm(dims[1])
        self.num_features = dims[1]

    def layer_order(self) -> list[str]:
        """Stem, every conv block, each downsampling, then each attention stage (its tokens and metadata
        embeddings with its first block) and every attention block."""
        order = ["stem"]
        for name in ("conv_stage1", "down1", "conv_stage2", "down2", "attn_stage1", "down3", "attn_stage2"):
            module = getattr(self, name)
            if not any(True for _ in module.parameters()):
                continue  # e.g. an identity downsampling
            blocks = getattr(module, "blocks", None)
            if blocks is not None:  # attention stage: tokens and metadata embeddings, then its blocks
                order += [name] + [f"{name}.blocks.{i}" for i in range(len(blocks))]
            elif isinstance(module, nn.Sequential) and name.startswith("conv_stage"):
                order += [f"{name}.{i}" for i in range(len(module))]
            else:
                order.append(name)
        return order

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
