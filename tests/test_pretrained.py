"""Pretrained weights: our checkpoints into another label space, timm checkpoints into the timm wrapper,
relative position tables resized, and everything skipped listed in the report and the log."""

from __future__ import annotations

import logging

import timm
import torch
from omegaconf import OmegaConf

from linnaeus.models import build_model
from linnaeus.models.pretrained import load_pretrained
from tests.test_heads import make_taxonomy
from tests.test_models import META_DIMS, REPO, load_cfg

SOURCE_CLASSES = [3, 5, 7, 11]
TARGET_CLASSES = [4, 6, 9, 13]


def build(num_classes, seed, taxonomy=None, **overrides):
    torch.manual_seed(seed)
    cfg = OmegaConf.merge(load_cfg(), overrides)
    return build_model(cfg, num_classes, META_DIMS, taxonomy)


def save_ours(model, taxonomy, path):
    """Our checkpoint layout (optimizer state and all), as the trainer writes it."""
    torch.save(
        {"version": 1, "model": model.state_dict(), "taxonomy": taxonomy.to_dict(), "optimizer": {}}, path
    )


def test_checkpoint_into_another_label_space_keeps_the_body_and_reinitialises_heads(tmp_path, caplog):
    source_tax, target_tax = make_taxonomy(SOURCE_CLASSES), make_taxonomy(TARGET_CLASSES)
    source = build(SOURCE_CLASSES, 0, source_tax, head="hsoftmax")
    save_ours(source, source_tax, tmp_path / "ckpt.pt")
    target = build(TARGET_CLASSES, 1, target_tax, head="hsoftmax")
    with caplog.at_level(logging.INFO, logger="linnaeus"):
        report = load_pretrained(target, tmp_path / "ckpt.pt", target_tax)

    source_state, target_state = source.state_dict(), target.state_dict()
    body = [k for k in source_state if not k.startswith("heads.")]
    head_keys = sorted(k for k in source_state if k.startswith("heads."))
    assert all(torch.equal(source_state[k], target_state[k]) for k in body)
    assert sorted(report.loaded) == sorted(body)
    assert sorted(report.skipped) == head_keys and report.heads_reinitialised
    assert report.missing == sorted(k for k in target_state if k.startswith("heads."))
    for head in target.heads:  # fresh initialisation: zero bias, std ~0.02 weights
        assert torch.equal(head.fc.bias, torch.zeros_like(head.fc.bias))
        assert 0.01 < head.fc.weight.std() < 0.03
    assert all(name in caplog.text for name in head_keys)


def test_heads_load_only_for_the_same_label_space(tmp_path):
    same_shape_other_names = make_taxonomy(SOURCE_CLASSES, offset=7)
    source_tax = make_taxonomy(SOURCE_CLASSES)
    source = build(SOURCE_CLASSES, 0)
    save_ours(source, source_tax, tmp_path / "ckpt.pt")

    other = build(SOURCE_CLASSES, 1)
    report = load_pretrained(other, tmp_path / "ckpt.pt", same_shape_other_names)
    assert report.heads_reinitialised and all(k.startswith("heads.") for k in report.skipped)
    assert not torch.equal(other.heads[0].fc.weight, source.heads[0].fc.weight)

    same = build(SOURCE_CLASSES, 2)
    report = load_pretrained(same, tmp_path / "ckpt.pt", source_tax)
    assert not report.skipped and not report.missing and not report.heads_reinitialised
    assert torch.equal(same.heads[3].fc.weight, source.heads[3].fc.weight)

    torch.save(source.state_dict(), tmp_path / "plain.pth")  # no taxonomy: heads load when shapes fit
    report = load_pretrained(build(SOURCE_CLASSES, 3), tmp_path / "plain.pth")
    assert not report.skipped and len(report.loaded) == len(source.state_dict())


def test_timm_checkpoint_maps_to_the_backbone_and_resizes_position_embeddings(tmp_path, caplog):
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=10)  # 160 px: 10 x 10 patches
    torch.save({"state_dict": vit.state_dict(), "arch": "test_vit"}, tmp_path / "timm.pth")
    cfg = OmegaConf.merge(
        OmegaConf.load(REPO / "conf/model/timm.yaml"),
        {"name": "test_vit", "model_kwargs": {"img_size": 96}},  # 6 x 6 patches
    )
    model = build_model(cfg, SOURCE_CLASSES, META_DIMS)
    with caplog.at_level(logging.INFO, logger="linnaeus"):
        report = load_pretrained(model, tmp_path / "timm.pth")

    assert report.resized == ["backbone.pos_embed"]
    assert model.backbone.pos_embed.shape == (1, 37, 64)
    assert torch.equal(model.backbone.pos_embed[:, :1], vit.pos_embed[:, :1])  # the class token's entry
    assert set(report.skipped) == {
        "backbone.head.weight",
        "backbone.head.bias",
    }  # timm classifier: ours differ
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert "backbone.pos_embed" in caplog.text and "head.weight" in caplog.text
    assert all(not k.startswith("backbone.") for k in report.missing)


def test_relative_position_tables_are_interpolated_to_another_image_size(tmp_path):
    small = {"stem_dim": 16, "conv_dims": [16, 32], "conv_depths": [1, 1], "attn_dims": [32, 64]}
    v0 = OmegaConf.merge(OmegaConf.load(REPO / "conf/model/mformer_v0_sm.yaml"), small)
    v0.attn_depths = [1, 1]
    torch.manual_seed(0)
    source = build_model(OmegaConf.merge(v0, {"img_size": 224}), SOURCE_CLASSES, META_DIMS)
    torch.save(source.state_dict(), tmp_path / "v0.pt")
    target = build_model(OmegaConf.merge(v0, {"img_size": 128}), SOURCE_CLASSES, META_DIMS)
    report = load_pretrained(target, tmp_path / "v0.pt")

    tables = sorted(k for k in source.state_dict() if k.endswith("relative_position_bias_table"))
    assert sorted(report.resized) == tables and not report.skipped
    src = source.attn_stage1.rel_pos[0].relative_position_bias_table  # (8, 27, 27) -> (8, 15, 15)
    dst = target.attn_stage1.rel_pos[0].relative_position_bias_table
    assert dst.shape == (8, 15, 15)
    assert torch.allclose(dst[:, 7, 7], src[:, 13, 13], atol=1e-6)  # offset 0 stays offset 0
    assert torch.allclose(dst[:, 0, 0], src[:, 0, 0], atol=1e-6)  # the largest offsets map onto each other
