"""Efficiency switches: gradient checkpointing (same gradients, fewer saved activations), channels-last
execution (same outputs) and torch.compile (same outputs and gradients as eager; slow on CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from linnaeus.models import build_model
from linnaeus.models.memory_format import ChannelsLastInputs
from tests.test_heads import make_taxonomy
from tests.test_models import META_DIMS, NUM_CLASSES, REPO, make_meta

# One small model per family, small enough for CPU.
TINY = {
    "mformer_xs": {},
    "mformer_v0_sm": {
        "stem_dim": 16,
        "conv_dims": [16, 32],
        "conv_depths": [1, 2],
        "attn_dims": [32, 64],
        "attn_depths": [2, 1],
        "drop_path_rate": 0.1,
    },
    "timm": {"name": "test_convnext", "drop_path_rate": 0.1, "meta": {"fusion": "tokens"}},
}


def tiny_model(name: str, **overrides) -> torch.nn.Module:
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml"), TINY[name], overrides)
    torch.manual_seed(0)
    return build_model(cfg, NUM_CLASSES, META_DIMS, make_taxonomy(NUM_CLASSES))


def loss_and_saved_bytes(model: torch.nn.Module, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Training loss on a fixed batch, and the bytes autograd kept for backward outside checkpointed blocks."""
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 32, 32, generator=g)
    targets = torch.randint(0, 3, (4,), generator=g)
    torch.manual_seed(seed)  # the same drop-path draws in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(images, *make_meta(4))
    return sum(F.cross_entropy(t, targets) for t in logits), sum(saved)


@pytest.mark.parametrize("name", sorted(TINY))
def test_grad_checkpointing_gives_identical_gradients_with_fewer_saved_activations(name):
    plain = tiny_model(name, head="hsoftmax").train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.grad_checkpointing

    loss_a, bytes_a = loss_and_saved_bytes(plain)
    loss_b, bytes_b = loss_and_saved_bytes(checkpointed)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    assert bytes_b < 0.8 * bytes_a  # timm's ConvNeXt keeps its stem and downsamplers unchecked
    grads_b = dict(checkpointed.named_parameters())
    for param_name, param in plain.named_parameters():
        assert torch.allclose(param.grad, grads_b[param_name].grad, rtol=1e-5, atol=1e-7), param_name


def test_grad_checkpointing_is_a_config_key():
    assert tiny_model("mformer_xs", grad_checkpointing=True).grad_checkpointing
    timm_model = tiny_model("timm", grad_checkpointing=True)
    assert all(stage.grad_checkpointing for stage in timm_model.backbone.stages)  # timm's own switch


@pytest.mark.parametrize("name", sorted(TINY))
def test_channels_last_gives_the_same_outputs(name):
    model = tiny_model(name).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images, *make_meta(2))
        wrapped = ChannelsLastInputs(copy.deepcopy(model))
        got = wrapped(images, *make_meta(2))
    conv = next(m for m in wrapped.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert wrapped.model.state_dict().keys() == model.state_dict().keys()
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, head", [("mformer_xs", "conditional"), ("mformer_v0_sm", "hsoftmax"), ("timm", "linear")]
)
def test_compiled_model_matches_eager(name, head):
    model = tiny_model(name, head=head, drop_path_rate=0.0).train()
    compiled = torch.compile(copy.deepcopy(model))
    loss_a, _ = loss_and_saved_bytes(model)
    loss_b, _ = loss_and_saved_bytes(compiled)
    loss_a.backward()
    loss_b.backward()
    assert torch.allclose(loss_a, loss_b, rtol=1e-4)
    grads_b = dict(compiled.named_parameters())
    for param_name, param in model.named_parameters():
        assert torch.allclose(param.grad, grads_b[f"_orig_mod.{param_name}"].grad, rtol=1e-3, atol=1e-5)
