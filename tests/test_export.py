"""Exported models (ONNX, TorchScript, torch.export) compute what the eager model computes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from linnaeus import export
from linnaeus.data.taxonomy import Taxonomy
from linnaeus.inference import load_run
from tests.conftest import REPO
from tests.fake_checkpoint import make_checkpoint

MODELS = {
    "mformer_xs": ["model=mformer_xs"],
    "mformer_v0": [
        "model=mformer_v0_sm",
        "model.stem_dim=16",
        "model.conv_dims=[16,32]",
        "model.conv_depths=[1,1]",
        "model.attn_dims=[32,64]",
        "model.attn_depths=[1,1]",
        "model.num_heads=[2,2]",
        "model.img_size=32",
    ],
    "timm_resnet10t": ["model=timm", "model.name=resnet10t", "model.drop_path_rate=null"],
}
TOLERANCE = 1e-4  # fp32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, demo_cache) -> dict:
    root = tmp_path_factory.mktemp("export_ckpts")
    return {name: make_checkpoint(root / f"{name}.pt", overrides) for name, overrides in MODELS.items()}


def export_cfg(checkpoint, fmt: str, out) -> OmegaConf:
    return OmegaConf.create(
        {
            "checkpoint": str(checkpoint),
            "format": fmt,
            "out": str(out),
            "weights": "auto",
            "verify": False,
            "tolerance": TOLERANCE,
        }  # fmt: skip
    )


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported"])
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_model_equals_eager(checkpoints, tmp_path, name, fmt):
    if fmt == "onnx":  # the export extra: pip install -e '.[export]' (make setup installs it)
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    out = tmp_path / "export"
    path = export.main(export_cfg(checkpoints[name], fmt, out))
    assert path == out / export.FILES[fmt] and path.is_file()

    run = load_run(checkpoints[name])
    wrapper = export.ExportWrapper(run.model, run.meta_dims, run.taxonomy.num_classes, 0).eval()
    # another batch size than the one traced: the batch dimension is dynamic
    inputs = export.example_inputs(wrapper, run.cfg.data.image_size, batch=5, seed=7)
    with torch.no_grad():
        expected = wrapper(*inputs)
        direct = run.model(inputs[0], *_meta_dicts(run.meta_dims, inputs))
    got = export.run_exported(path, inputs)
    assert len(got) == run.taxonomy.num_tasks
    for t, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == (5, run.taxonomy.num_classes[t])
        assert torch.isinf(a[:, 0]).all() and torch.isfinite(a[:, 1:]).all()  # the null class: probability 0
        assert (a[:, 1:] - b[:, 1:]).abs().max() <= TOLERANCE
        assert torch.allclose(a[:, 1:].exp().sum(dim=1), torch.ones(5), atol=1e-5)
        # the wrapper is the model's own softmax over the real classes
        own = torch.log_softmax(direct[t][:, 1:].float(), dim=1)
        assert (b[:, 1:] - own).abs().max() <= 1e-5

    assert Taxonomy.load(out / "taxonomy.json") == run.taxonomy
    info = json.loads((out / "preprocessing.json").read_text())
    data = run.cfg.data
    assert info["image"]["size"] == data.image_size and info["image"]["mean"] == list(data.mean)
    assert info["image"]["std"] == list(data.std) and info["image"]["crop_pct"] == data.val_crop_pct
    assert [c["name"] for c in info["metadata"]] == list(run.meta_dims)
    widths = [c["columns"][1] - c["columns"][0] for c in info["metadata"]]
    assert widths == list(run.meta_dims.values())
    assert info["inputs"][1]["shape"] == ["batch", sum(widths)]
    assert [o["task_key"] for o in info["outputs"]] == run.taxonomy.task_keys
    elevation = next(c for c in info["metadata"] if c["name"] == "elevation_main")
    assert elevation["scales"] == [100.0, 1000.0, 10000.0]  # read from the demo labels file


def _meta_dicts(meta_dims, inputs):
    names, widths = list(meta_dims), list(meta_dims.values())
    values = dict(zip(names, inputs[1].split(widths, dim=1)))
    valid = dict(zip(names, inputs[2].unbind(dim=1)))
    return values, valid


def test_export_command_writes_the_files_and_verifies_them(checkpoints, tmp_path):
    out = tmp_path / "ts"
    cmd = [sys.executable, "-m", "linnaeus.export", f"checkpoint={checkpoints['mformer_xs']}",
           "format=torchscript", f"out={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["model.ts", "preprocessing.json", "taxonomy.json"]
    verified = json.loads((out / "preprocessing.json").read_text())["verified"]
    assert verified["format"] == "torchscript" and verified["max_abs_diff"] <= TOLERANCE


def test_weights_auto_prefers_ema_and_model_forces_the_live_weights(tmp_path, demo_cache):
    path = make_checkpoint(tmp_path / "ema.pt", ["model=mformer_xs"], ema=True)
    saved = torch.load(path, weights_only=True)
    key = next(k for k, v in saved["model"].items() if v.is_floating_point())
    auto, live = load_run(path, weights="auto"), load_run(path, weights="model")
    assert auto.weights == "ema" and live.weights == "model"
    assert torch.equal(auto.model.state_dict()[key], saved["ema"][key])
    assert torch.equal(live.model.state_dict()[key], saved["model"][key])
    assert not torch.equal(saved["ema"][key], saved["model"][key])
