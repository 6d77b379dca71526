"""Building blocks shared by the models: ConvNeXt block, 2-D RoPE attention, metadata embedding, and the
default weight initialisation.

Tensors follow two layouts: images and conv feature maps are channels-first ``(B, C, H, W)``;
token sequences are ``(B, N, C)`` with image tokens in row-major grid order (index ``r * W + c``),
which is what ``feature_map.flatten(2).transpose(1, 2)`` produces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerScale(nn.Module):
    """Per-channel residual gain (channels last). A tiny initial value makes each block start close to
    the identity, which is what lets deep stacks train stably without warm-up tricks."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def _layer_scale(dim: int, init_value: float | None) -> nn.Module:
    return LayerScale(dim, init_value) if init_value else nn.Identity()


def init_weights(module: nn.Module) -> None:
    """Truncated-normal weights (std 0.02) and zero biases for a linear or conv layer; other modules keep
    their own initialisation. ``model.apply(init_weights)`` initialises every such layer of a model."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv for spatial mixing, then a per-pixel 4x MLP; cheap at high resolution where
    attention over all pixels would not be."""

    def __init__(
        self,
        dim: int,
        *,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-6,
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls = _layer_scale(dim, layer_scale_init)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C): LayerNorm and Linear act on the last dim
        x = self.ls(self.mlp(self.norm(x))).permute(0, 3, 1, 2)  # (B, C, H, W)
        return residual + self.drop_path(x)


def run_blocks(blocks: nn.Module, x: torch.Tensor, *args, use_checkpoint: bool = False) -> torch.Tensor:
    """``x = block(x, *args)`` for every block; with ``use_checkpoint`` each block's activations are
    recomputed in the backward pass instead of stored (same gradients, less memory, ~30% more compute)."""
    for block in blocks:
        x = checkpoint(block, x, *args, use_reentrant=False) if use_checkpoint else block(x, *args)
    return x


def pad_to_even(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the bottom/right of a ``(B, C, H, W)`` map so a stride-2 conv sees every pixel."""
    height, width = x.shape[-2:]
    return F.pad(x, (0, width % 2, 0, height % 2))


class Downsample(nn.Module):
    """LayerNorm, then a 2x2 stride-2 conv: halves the grid (rounding up) and changes the width.

    Odd grids are padded rather than cropped, so a 7x7 grid becomes 4x4 and a 1x1 grid stays 1x1;
    small test images and odd input sizes therefore never lose their last row or column.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(in_dim)
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(pad_to_even(self.norm(x)))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs ``(x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)``.

    ``x`` is ``(..., N, D)``; ``cos`` and ``sin`` are ``(N, D / 2)``, one angle per pair. The math runs
    in the dtype of ``cos`` (float32 from ``RoPE2D``) and the result is cast back to ``x``'s dtype, so
    half-precision activations still get accurate angles.
    """
    if x.shape[-2] != cos.shape[0] or x.shape[-1] != 2 * cos.shape[1]:
        raise ValueError(f"RoPE tables {tuple(cos.shape)} do not fit tokens {tuple(x.shape)}")
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))  # (..., N, D/2, 2)
    x1, x2 = pairs.unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class RoPE2D(nn.Module):
    """Axial 2-D rotary position embedding for an ``H x W`` token grid.

    The first half of each head's channels is rotated by the row index, the second half by the column
    index, each with the frequencies ``1 / theta^(2i / (D/2))``. Because a rotation by angle ``a`` of the
    query and ``b`` of the key contributes ``cos``/``sin`` of ``a - b`` to their dot product, attention
    scores depend only on the relative offset between tokens, and the grid size can change freely between
    training and evaluation. Tables are built on demand and cached per grid, device and dtype; the module
    has no parameters or buffers, so checkpoints do not depend on the image size.
    """

    def __init__(self, head_dim: int, theta: float = 100.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def frequencies(self, device: torch.device | None = None) -> torch.Tensor:
        axis_dim = self.head_dim // 2
        exponents = torch.arange(0, axis_dim, 2, device=device, dtype=torch.float32) / axis_dim
        return 1.0 / self.theta**exponents  # (D/4,)

    def forward(
        self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``(H * W, D / 2)``, for the row-major tokens of an ``H x W`` grid."""
        height, width = int(grid[0]), int(grid[1])
        key = (height, width, torch.device(device), dtype)
        if key in self._cache:
            return self._cache[key]
        freqs = self.frequencies(device)
        rows = torch.arange(height, device=device, dtype=torch.float32).repeat_interleave(width)
        cols = torch.arange(width, device=device, dtype=torch.float32).repeat(height)
        angles = torch.cat((rows[:, None] * freqs, cols[:, None] * freqs), dim=1)  # (H*W, D/2)
        tables = (angles.cos().to(dtype), angles.sin().to(dtype))
        # Tensors made under inference_mode cannot be saved for a later backward pass: do not keep them.
        if not torch.is_inference_mode_enabled():
            self._cache[key] = tables
        return tables


class Attention(nn.Module):
    """Multi-head self-attention; RoPE rotates queries and keys of the image tokens only.

    The first ``num_prefix`` tokens (class and metadata tokens) have no position on the grid, so they stay
    unrotated and attend to every image token the same way wherever it lies. ``attn_bias`` (``(heads, N, N)``,
    e.g. a relative position bias) is added to the attention scores.
    """

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_prefix: int = 0,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if rope is not None:
            cos, sin = rope
            q = torch.cat((q[:, :, :num_prefix], apply_rope(q[:, :, num_prefix:], cos, sin)), dim=2)
            k = torch.cat((k[:, :, :num_prefix], apply_rope(k[:, :, num_prefix:], cos, sin)), dim=2)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads)
        self.ls1 = _layer_scale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = _layer_scale(dim, layer_scale_init)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        num_prefix: int = 0,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), rope, num_prefix, attn_bias)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class MetaEmbedding(nn.Module):
    """One metadata component (e.g. location, date) -> one token of width ``out_dim``.

    Rows whose validity flag is False get a learned "missing" token instead. Their raw values are zeroed
    before the MLP as well, so NaNs or junk in missing rows can neither change the output nor poison
    gradients; the model can tell "unknown" from any real value.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.LayerNorm(hidden_dim))
        self.block = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.out = nn.Linear(hidden_dim, out_dim)
        self.missing = nn.Parameter(torch.zeros(out_dim))
        trunc_normal_(self.missing, std=0.02)

    def forward(self, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``values`` ``(B, in_dim)``, ``valid`` ``(B,)`` bool -> tokens ``(B, out_dim)``."""
        valid = valid.to(torch.bool).unsqueeze(-1)  # (B, 1)
        values = torch.where(valid, values, torch.zeros_like(values))
        hidden = self.embed(values)
        tokens = self.out(hidden + self.block(hidden))
        return torch.where(valid, tokens, self.missing.to(tokens.dtype))
