"""mFormerV0 (MBConv + relative position bias) and the timm wrapper (late metadata fusion): the parts they
do not share with mFormerV1."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from timm.layers import SqueezeExcite

from linnaeus.models import build_model
from linnaeus.models.mbconv import MBConvBlock
from linnaeus.models.relpos import RelativePositionBias
from linnaeus.optim import split_decay_groups
from tests.test_efficiency import tiny_model
from tests.test_models import META_DIMS, NUM_CLASSES, REPO, make_meta


def test_relative_position_bias_depends_on_offsets_and_gives_prefix_tokens_their_own_entries():
    torch.manual_seed(0)
    prefix, heads = 2, 3
    rel = RelativePositionBias(heads, grid=(3, 3), num_prefix=prefix)
    bias = rel((5, 4))  # larger than the table's 3 x 3 grid: offsets beyond +-2 are clipped
    assert bias.shape == (heads, prefix + 20, prefix + 20)
    table = rel.relative_position_bias_table  # (heads, 5, 5), offset (0, 0) at [2, 2]

    def at(r: int, c: int) -> int:
        return prefix + r * 4 + c

    assert torch.equal(bias[:, at(1, 1), at(2, 3)], bias[:, at(3, 0), at(4, 2)])  # same offset (-1, -2)
    assert torch.equal(bias[:, at(1, 1), at(2, 3)], table[:, 2 - 1, 2 - 2])
    assert torch.equal(bias[:, at(4, 0), at(0, 0)], table[:, 4, 2])  # offset (4, 0) clipped to (2, 0)
    assert not torch.equal(bias[:, at(0, 0), at(0, 1)], bias[:, at(0, 0), at(1, 0)])
    assert torch.equal(bias[:, :prefix, :prefix], rel.prefix_to_prefix)
    assert torch.equal(bias[:, 1, prefix:], rel.prefix_to_image[:, 1:2].expand(heads, 20))
    assert torch.equal(bias[:, prefix:, 0], rel.image_to_prefix[:, 0:1].expand(heads, 20))


@pytest.mark.parametrize("size, grid", [(32, 16), (33, 17), (8, 4)])
def test_mbconv_block_halves_odd_sizes_like_its_shortcut(size, grid):
    block = MBConvBlock(8, 16, stride=2)
    assert block(torch.randn(2, 8, size, size)).shape == (2, 16, grid, grid)
    assert isinstance(block.se, SqueezeExcite)


def test_v0_has_squeeze_excitation_in_every_mbconv_and_no_decay_on_position_biases():
    cfg = OmegaConf.load(REPO / "conf/model/mformer_v0_sm.yaml")
    with torch.device("meta"):
        model = build_model(cfg, NUM_CLASSES, META_DIMS)
    blocks = [m for m in model.modules() if isinstance(m, MBConvBlock)]
    assert len(blocks) == sum(cfg.conv_depths) and all(isinstance(b.se, SqueezeExcite) for b in blocks)
    tables = [m for m in model.modules() if isinstance(m, RelativePositionBias)]
    assert len(tables) == sum(cfg.attn_depths)
    assert tables[0].relative_position_bias_table.shape == (8, 27, 27)  # 224 px / 16 = 14 x 14 grid
    assert tables[-1].relative_position_bias_table.shape == (8, 13, 13)  # 7 x 7
    decay, _ = split_decay_groups(model, 0.05)
    decayed = {id(p) for p in decay["params"]}
    assert not any(id(t.relative_position_bias_table) in decayed for t in tables)


@pytest.mark.parametrize("size", [224, 40])
def test_v0_sm_runs_at_full_and_odd_resolutions(size):
    torch.manual_seed(0)
    model = build_model(OmegaConf.load(REPO / "conf/model/mformer_v0_sm.yaml"), NUM_CLASSES, META_DIMS).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, size, size), *make_meta(1))
    assert [tuple(t.shape) for t in logits] == [(1, n) for n in NUM_CLASSES]
    assert all(torch.isfinite(t).all() for t in logits)


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("mformer_v0_sm", {"layer_scale_init": None}),
        ("timm", {"meta": {"fusion": "concat"}}),
        ("timm", {"meta": {"fusion": "tokens"}}),
    ],
    ids=["v0", "timm_concat", "timm_tokens"],
)
def test_metadata_is_used_when_valid_and_ignored_when_missing(name, overrides):
    model = tiny_model(name, **overrides).eval()
    images = torch.randn(2, 3, 32, 32)
    meta, valid = make_meta(2)
    valid["spatial"][1] = False
    with torch.no_grad():
        base = model(images, meta, valid)
        junk = {k: v.clone() for k, v in meta.items()}
        junk["spatial"][1] = float("nan")
        assert all(torch.equal(a, b) for a, b in zip(base, model(images, junk, valid)))
        moved = {k: v.clone() for k, v in meta.items()}
        moved["spatial"][0] += 1.0
        changed = model(images, moved, valid)
    assert all((a[0] - b[0]).abs().max() > 1e-5 for a, b in zip(base, changed))
    assert all(torch.allclose(a[1], b[1], atol=1e-6) for a, b in zip(base, changed))


def test_timm_fusion_widths_and_bad_fusion_name():
    concat, tokens = (
        tiny_model("timm", meta={"fusion": "concat"}),
        tiny_model("timm", meta={"fusion": "tokens"}),
    )
    assert concat.num_features == concat.backbone.num_features
    assert concat.fuse.in_features == concat.backbone.num_features + 256 * len(META_DIMS)
    assert tokens.num_features == 256 and tokens.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    without = build_model(
        OmegaConf.merge(OmegaConf.load(REPO / "conf/model/timm.yaml"), {"name": "test_convnext"}),
        NUM_CLASSES,
        {},
    )
    assert without.fuse is None and without.num_features == without.backbone.num_features
    with pytest.raises(ValueError, match="model.meta.fusion"):
        tiny_model("timm", meta={"fusion": "late"})
