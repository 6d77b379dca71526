"""Any timm model as the image backbone, with late metadata fusion and our per-rank heads (a baseline).

The backbone is ``timm.create_model(name, pretrained=False, num_classes=0)``: its pooled image feature.
Weights never come from the network; ``model.pretrained`` loads a local file (``load_pretrained`` maps a
timm checkpoint's keys onto ``backbone.*``). Metadata joins after the backbone (``model.meta.fusion``):

- ``concat``: one ``MetaEmbedding`` vector per component, concatenated with the image feature, then a Linear
  back to the image feature's width;
- ``tokens``: the image feature projected to a token, one token per component, one transformer block over
  them; the image token's output is the feature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import timm
import torch
from torch import nn

from linnaeus.models.base import TaxonClassifier
from linnaeus.models.heads import HeadPerTask
from linnaeus.models.layers import MetaEmbedding, TransformerBlock, init_weights
from linnaeus.models.meta import gather_meta_inputs, meta_settings

TIMM_META_DEFAULTS = {"enabled": True, "hidden_dim": 64, "fusion": "concat", "dim": 256, "num_heads": 4}
FUSIONS = ("concat", "tokens")


class TimmClassifier(TaxonClassifier):
    """timm image features + late metadata fusion + per-rank heads."""

    def __init__(
        self,
        num_classes: Sequence[int],
        meta_dims: Mapping[str, int],
        *,
        parents: Sequence[np.ndarray | None] | None = None,
        name: str = "convnext_tiny",
        model_kwargs: Mapping | None = None,
        drop_path_rate: float | None = 0.1,
        meta: Mapping | None = None,
        head: str = "linear",
        head_per_task: HeadPerTask = None,
        head_routing: str = "soft",
        head_temperature: float = 1.0,
        grad_checkpointing: bool = False,
        in_chans: int = 3,
    ) -> None:
        settings = meta_settings(meta, TIMM_META_DEFAULTS)
        if settings["fusion"] not in FUSIONS:
            raise ValueError(f"model.meta.fusion must be one of {FUSIONS}, got {settings['fusion']!r}")
        super().__init__(num_classes, meta_dims if settings["enabled"] else {})
        self.fusion = settings["fusion"]
        extra = dict(model_kwargs or {})
        if drop_path_rate is not None:
            extra["drop_path_rate"] = drop_path_rate
        self.backbone = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **extra)
        image_dim = self.backbone.num_features
        dim = settings["dim"]

        self.meta_embed = nn.ModuleDict(
            {
                name: MetaEmbedding(width, dim, settings["hidden_dim"])
                for name, width in self.meta_dims.items()
            }
        )
        self.fuse = self.image_token = self.block = None
        if not self.meta_dims:
            self.num_features = image_dim
        elif self.fusion == "concat":
            self.fuse = nn.Linear(image_dim + dim * len(self.meta_dims), image_dim)
            self.num_features = image_dim
        else:
            self.image_token = nn.Linear(image_dim, dim)
            self.block = TransformerBlock(dim, num_heads=settings["num_heads"])
            self.num_features = dim
        self.norm = nn.LayerNorm(self.num_features)
        for module in (self.meta_embed, self.fuse, self.image_token, self.block):
            if module is not None:  # the backbone keeps timm's own initialisation
                module.apply(init_weights)
        self.add_heads(parents, head, head_per_task, head_routing, head_temperature)
        self.set_grad_checkpointing(grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpointing inside the timm backbone (its own implementation)."""
        super().set_grad_checkpointing(enable)
        self.backbone.set_grad_checkpointing(enable)

    def layer_ids(self) -> dict[str, int]:
        """The backbone's layers as timm groups them (``group_matcher``); fusion, norm and heads on top."""
        from timm.models import group_parameters

        inner = group_parameters(self.backbone, self.backbone.group_matcher(coarse=False), reverse=True)
        top = max(inner.values()) + 1
        return {
            name: inner[name[len("backbone.") :]] if name.startswith("backbone.") else top
            for name, _ in self.named_parameters()
        }

    def no_weight_decay(self) -> set[str]:
        """The backbone's own list (position embeddings, tokens) plus the missing-value embeddings."""
        backbone = getattr(self.backbone, "no_weight_decay", lambda: set())()
        names = {f"backbone.{name}" for name in backbone}
        return (names | super().no_weight_decay()) & dict(self.named_parameters()).keys()

    def forward_features(
        self,
        images: torch.Tensor,
        meta: Mapping[str, torch.Tensor] | None = None,
        meta_valid: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Images ``(B, C, H, W)`` plus metadata -> fused features ``(B, num_features)``."""
        image = self.backbone(images)  # (B, F_img)
        if not self.meta_dims:
            return self.norm(image)
        inputs = gather_meta_inputs(self.meta_dims, meta, meta_valid, images.shape[0], images.device)
        tokens = [embed(*inputs[name]).to(image.dtype) for name, embed in self.meta_embed.items()]
        if self.fusion == "concat":
            return self.norm(self.fuse(torch.cat([image, *tokens], dim=1)))
        x = torch.stack([self.image_token(image), *tokens], dim=1)  # (B, 1 + M, D)
        return self.norm(self.block(x)[:, 0])
