"""Models: every config in conf/model builds, trains a step, documents its size; RoPE, attention and the
metadata path checked against references and invariants."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from linnaeus.models import RUNTIME_ARGS, TRAINER_KEYS, build_model, count_parameters
from linnaeus.models.heads import LinearHead, build_head
from linnaeus.models.layers import Attention, Downsample, MetaEmbedding, RoPE2D, apply_rope
from linnaeus.optim import split_decay_groups

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = sorted((REPO / "conf" / "model").glob("*.yaml"))
NUM_CLASSES = [3, 5, 7, 11]
META_DIMS = {"spatial": 3, "temporal": 2, "elevation_main": 4}
# Small enough for a real forward/backward on CPU; the others are built on the meta device.
CPU_CONFIGS = {"mformer_xs", "mformer_sm", "mformer_v0_sm", "timm"}


def load_cfg(name: str = "mformer_xs", **overrides):
    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def make_meta(batch: int, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    meta = {name: torch.randn(batch, dim, generator=g) for name, dim in META_DIMS.items()}
    valid = {name: torch.ones(batch, dtype=torch.bool) for name in META_DIMS}
    return meta, valid


def test_model_configs_found():
    assert {p.stem for p in MODEL_CONFIGS} >= {f"mformer_{s}" for s in ("xs", "sm", "md", "lg", "xl")} | {
        f"mformer_v0_{s}" for s in ("sm", "md", "lg")
    } | {"timm"}


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.stem)
def test_config_builds_with_documented_size_and_writes_out_every_key(path):
    cfg = OmegaConf.load(path)
    # Every constructor key (and every trainer key of the model node) is written out, so the YAML is the
    # one place defaults live.
    target = cfg._target_.rsplit(".", 1)
    model_cls = getattr(__import__(target[0], fromlist=[target[1]]), target[1])
    expected = set(inspect.signature(model_cls).parameters) - set(RUNTIME_ARGS) | set(TRAINER_KEYS)
    assert set(cfg) - {"_target_"} == expected

    # The meta device gives shapes without allocating or computing, so even xl takes well under a second.
    with torch.device("meta"):
        model = build_model(cfg, NUM_CLASSES, META_DIMS)
    meta, valid = ({name: t.to("meta") for name, t in tensors.items()} for tensors in make_meta(2))
    images = torch.zeros(2, 3, 32, 32, device="meta")
    assert [tuple(t.shape) for t in model(images, meta, valid)] == [(2, n) for n in NUM_CLASSES]
    features = model.forward_features(images)
    assert features.shape == (2, model.num_features)
    assert [tuple(t.shape) for t in model.forward_head(features)] == [(2, n) for n in NUM_CLASSES]
    assert model.no_weight_decay() <= dict(model.named_parameters()).keys()
    own = {id(p) for p in model.parameters()}
    assert model.shared_parameters() and all(id(p) in own for p in model.shared_parameters())

    header = re.search(r"^# ([\d,]+) parameters", path.read_text(), re.MULTILINE)
    assert header is not None, f"{path.name} lacks its '# N parameters' comment"
    assert count_parameters(model) == int(header.group(1).replace(",", ""))


@pytest.mark.parametrize("path", [p for p in MODEL_CONFIGS if p.stem in CPU_CONFIGS], ids=lambda p: p.stem)
def test_train_step_reaches_every_parameter_with_a_finite_gradient(path):
    torch.manual_seed(0)
    model = build_model(OmegaConf.load(path), NUM_CLASSES, META_DIMS).train()
    meta, valid = make_meta(2)
    for name in META_DIMS:  # one valid and one missing row, so both metadata paths carry gradient
        valid[name][1] = False
        meta[name][1] = float("nan")
    logits = model(torch.randn(2, 3, 32, 32), meta, valid)
    assert [tuple(t.shape) for t in logits] == [(2, n) for n in NUM_CLASSES]
    assert all(torch.isfinite(t).all() for t in logits)

    loss = sum(F.cross_entropy(t, torch.tensor([0, 1])) for t in logits)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert model.shared_parameters()[0].grad.abs().sum() > 0
    if hasattr(model, "fuse_logits"):
        assert model.fuse_logits.grad.abs().sum() > 0


def test_drop_path_grows_linearly_to_the_configured_rate():
    model = build_model(load_cfg(drop_path_rate=0.3), NUM_CLASSES, META_DIMS)
    rates = [
        getattr(block.drop_path, "drop_prob", 0.0)
        for stage in (
            model.conv_stage1,
            model.conv_stage2,
            model.attn_stage1.blocks,
            model.attn_stage2.blocks,
        )
        for block in stage
    ]
    assert rates == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])  # xs: 1 + 1 + 2 + 1 blocks


def test_rope_scores_depend_only_on_relative_offset_and_norms_are_kept():
    g = torch.Generator().manual_seed(0)
    head_dim, height, width = 16, 6, 7
    rope = RoPE2D(head_dim, theta=100.0)
    cos, sin = rope((height, width), torch.device("cpu"))
    assert cos.shape == (height * width, head_dim // 2)
    assert rope((height, width), torch.device("cpu"))[0] is cos  # cached per grid

    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    q_at = apply_rope(q.expand(height * width, -1), cos, sin).reshape(height, width, head_dim)
    k_at = apply_rope(k.expand(height * width, -1), cos, sin).reshape(height, width, head_dim)

    dr, dc = 2, -3
    scores = torch.stack([q_at[r, c] @ k_at[r + dr, c + dc] for r, c in [(0, 3), (1, 5), (3, 4), (2, 6)]])
    assert torch.allclose(scores, scores[0].expand(4), atol=1e-5)
    assert (q_at[0, 3] @ k_at[1, 3] - scores[0]).abs() > 1e-3  # another offset, another score

    # Row moves rotate only the first half of the channels, column moves only the second half.
    half = head_dim // 2
    assert torch.allclose(q_at[0, 0], q)
    assert torch.allclose(q_at[4, 0, half:], q[half:]) and not torch.allclose(q_at[4, 0, :half], q[:half])
    assert torch.allclose(q_at[0, 5, :half], q[:half]) and not torch.allclose(q_at[0, 5, half:], q[half:])

    x = torch.randn(2, 3, height * width, head_dim, generator=g)
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_attention_equals_explicit_softmax_reference_with_rotated_image_tokens():
    torch.manual_seed(0)
    dim, heads, prefix, (height, width) = 32, 4, 3, (3, 4)
    head_dim, tokens = dim // heads, prefix + height * width
    attention = Attention(dim, num_heads=heads)
    x = torch.randn(2, tokens, dim)
    out = attention(x, RoPE2D(head_dim, theta=100.0)((height, width), x.device), num_prefix=prefix)

    # Reference: rotation written with complex numbers, attention written out per head.
    axis = torch.tensor([100.0 ** (-2 * i / (head_dim // 2)) for i in range(head_dim // 4)])
    rows = torch.tensor([i // width for i in range(height * width)], dtype=torch.float32)
    cols = torch.tensor([i % width for i in range(height * width)], dtype=torch.float32)
    phase = torch.polar(torch.ones(1), torch.cat((rows[:, None] * axis, cols[:, None] * axis), dim=1))

    def rotate(t: torch.Tensor) -> torch.Tensor:  # (B, heads, N, head_dim)
        image = torch.view_as_complex(
            t[:, :, prefix:].reshape(*t.shape[:2], -1, head_dim // 2, 2).contiguous()
        )
        image = torch.view_as_real(image * phase).flatten(-2)
        return torch.cat((t[:, :, :prefix], image), dim=2)

    qkv = x @ attention.qkv.weight.T + attention.qkv.bias
    q, k, v = (t.reshape(2, tokens, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    weights = torch.softmax(rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    merged = (weights @ v).transpose(1, 2).reshape(2, tokens, dim)
    reference = merged @ attention.proj.weight.T + attention.proj.bias
    assert torch.allclose(out, reference, atol=1e-5)


def test_meta_embedding_uses_missing_token_for_invalid_rows():
    embed = MetaEmbedding(3, 8, hidden_dim=16)
    values = torch.tensor([[1.0, 2.0, 3.0], [float("nan"), 5.0, 6.0]])
    tokens = embed(values, torch.tensor([True, False]))
    assert torch.equal(tokens[1], embed.missing.detach())
    assert torch.isfinite(tokens).all() and not torch.equal(tokens[0], tokens[1])


def test_invalid_metadata_is_ignored_and_valid_metadata_is_used():
    torch.manual_seed(0)
    # A layer scale of 1 (instead of 1e-6) makes the metadata's effect on the logits large enough to see.
    model = build_model(load_cfg(layer_scale_init=1.0), NUM_CLASSES, META_DIMS).eval()
    images = torch.randn(2, 3, 32, 32)
    meta, valid = make_meta(2)
    valid["spatial"][1] = False
    valid["temporal"][0] = False
    with torch.no_grad():
        base = model(images, meta, valid)

        junk = {name: v.clone() for name, v in meta.items()}
        junk["spatial"][1] = float("nan")
        junk["temporal"][0] = 1e4
        assert all(torch.equal(a, b) for a, b in zip(base, model(images, junk, valid)))

        moved = {name: v.clone() for name, v in meta.items()}
        moved["spatial"][0] += 1.0
        changed = model(images, moved, valid)
        assert all((a[0] - b[0]).abs().max() > 1e-4 for a, b in zip(base, changed))
        assert all(torch.allclose(a[1], b[1], atol=1e-6) for a, b in zip(base, changed))

        # An absent component is missing everywhere; absent validity flags mean valid.
        without = {name: v for name, v in meta.items() if name != "elevation_main"}
        all_invalid = {**valid, "elevation_main": torch.zeros(2, dtype=torch.bool)}
        assert all(
            torch.equal(a, b) for a, b in zip(model(images, without, valid), model(images, meta, all_invalid))
        )
        no_flags = {name: v for name, v in valid.items() if name != "elevation_main"}
        assert all(torch.equal(a, b) for a, b in zip(base, model(images, meta, no_flags)))


@pytest.mark.parametrize(
    "meta_dims, overrides",
    [(META_DIMS, {"meta": {"enabled": False}}), ({}, {})],
    ids=["meta_disabled", "no_meta_dims"],
)
def test_model_without_metadata_ignores_meta_inputs(meta_dims, overrides):
    torch.manual_seed(0)
    model = build_model(load_cfg(layer_scale_init=1.0, **overrides), NUM_CLASSES, meta_dims).eval()
    assert not any(isinstance(m, MetaEmbedding) for m in model.modules())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = [model(images, *make_meta(2, seed)) for seed in (0, 1)] + [model(images)]
    for other in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outputs[0], other))


@pytest.mark.parametrize(
    "overrides, key",
    [({"foo": 1}, "model.foo"), ({"meta": {"foo": 1}}, "model.meta.foo")],
)
def test_unknown_model_key_fails_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=re.escape(key)) as err:
        build_model(load_cfg(**overrides), NUM_CLASSES, META_DIMS)
    assert "hidden_dim" in str(err.value) if "meta" in key else "conv_dims" in str(err.value)


def test_heads_registry():
    head = build_head("linear", 16, 4)
    assert isinstance(head, LinearHead) and head(torch.zeros(3, 16)).shape == (3, 4)
    assert torch.equal(head.fc.bias, torch.zeros(4))
    with pytest.raises(ValueError, match="linear"):
        build_head("bogus", 16, 4)


def test_no_weight_decay_names_tokens_and_missing_embeddings():
    model = build_model(load_cfg(), NUM_CLASSES, META_DIMS)
    names = model.no_weight_decay()
    assert names <= dict(model.named_parameters()).keys()
    assert len(names) == 2 + 2 * len(META_DIMS) + 1  # two class tokens, missing tokens per stage, fusion
    decay, no_decay = split_decay_groups(model, 0.05)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert all(id(model.get_parameter(n)) in no_decay_ids for n in names)
    assert all(p.ndim > 1 for p in decay["params"])


@pytest.mark.parametrize("size, grid", [(1, (1, 1)), (7, (4, 4)), (6, (3, 3))])
def test_downsample_pads_odd_grids(size, grid):
    assert Downsample(8, 16)(torch.zeros(1, 8, size, size)).shape == (1, 16, *grid)


@pytest.mark.parametrize("image_size", [224, 40])
def test_xs_runs_at_full_and_odd_resolutions(image_size):
    model = build_model(load_cfg(), NUM_CLASSES, META_DIMS).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, image_size, image_size), *make_meta(1))
    assert [tuple(t.shape) for t in logits] == [(1, n) for n in NUM_CLASSES]
    assert all(torch.isfinite(t).all() for t in logits)
