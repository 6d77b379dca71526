"""Export a checkpoint's model with its taxonomy and preprocessing, for inference outside linnaeus.

    python -m linnaeus.export checkpoint=PATH format=onnx|torchscript|exported [out=DIR]

The exported program is ``ExportWrapper``: ``(images, meta, meta_valid)`` -> one log-probability tensor
per rank, coarse to fine:

- ``images`` float32 ``(batch, 3, size, size)``, preprocessed as ``preprocessing.json`` says (the
  checkpoint's validation preprocessing: resize, centre crop, scale to [0, 1], normalise);
- ``meta`` float32 ``(batch, D)``: the metadata components concatenated in the listed order (columns
  given per component), encoded as ``linnaeus.data.encodings`` does;
- ``meta_valid`` bool ``(batch, M)``: one flag per component, False where it is unknown (its columns
  are then ignored). A model without metadata takes ``images`` only.

Outputs ``log_probs_<task>`` ``(batch, C_t)``: log-probabilities over the rank's classes, indexed as in
``taxonomy.json``; index 0 (unknown) has probability 0 (``-inf``), as predictions never name it.

Formats: ``onnx`` (``model.onnx``, torch's ONNX exporter; needs the ``export`` extra: ``pip install -e
.[export]``), ``torchscript`` (``model.ts``, ``torch.jit.trace``) and ``exported`` (``model.pt2``,
``torch.export.save``); the batch dimension stays dynamic in all three. After writing, the file is
loaded and run on fresh inputs against eager PyTorch (``verify=true``); the largest difference goes
into ``preprocessing.json``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from linnaeus.inference import (
    APPS_CONFIG_DIR,
    LoadedRun,
    UsageError,
    load_run,
    metadata_encodings,
    rank_name,
    run_cli,
)

log = logging.getLogger("linnaeus")
FILES = {"onnx": "model.onnx", "torchscript": "model.ts", "exported": "model.pt2"}
EXAMPLE_BATCH = 2  # traced with this batch size; another is used to verify that the batch stays dynamic
VERIFY_BATCH = 3
ONNX_SINGLE_FILE = 1_800_000_000  # bytes of weights above which ONNX keeps them in model.onnx.data


class ExportWrapper(nn.Module):
    """A linnaeus model behind plain tensors: ``(images, meta, meta_valid)`` -> log-probabilities per rank."""

    def __init__(
        self, model: nn.Module, meta_dims: dict[str, int], num_classes: list[int], null_index: int
    ) -> None:
        super().__init__()
        self.model = model
        self.names = list(meta_dims)
        self.widths = [meta_dims[name] for name in self.names]
        for t, n in enumerate(num_classes):
            mask = torch.zeros(n)
            mask[null_index] = float("-inf")  # the null class is never a prediction
            self.register_buffer(f"null_mask_{t}", mask, persistent=False)
        self.num_tasks = len(num_classes)

    def forward(
        self, images: torch.Tensor, meta: torch.Tensor | None = None, meta_valid: torch.Tensor | None = None
    ):
        values, valid = {}, {}
        if self.names:
            values = dict(zip(self.names, meta.split(self.widths, dim=1)))  # (B, w) each
            valid = dict(zip(self.names, meta_valid.to(torch.bool).unbind(dim=1)))  # (B,) each
        logits = self.model(images, values, valid)
        masks = [getattr(self, f"null_mask_{t}") for t in range(self.num_tasks)]
        return tuple(torch.log_softmax(out.float() + mask, dim=1) for out, mask in zip(logits, masks))


def example_inputs(
    wrapper: ExportWrapper, image_size: int, batch: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    if not wrapper.names:
        return (images,)
    meta = torch.randn(batch, sum(wrapper.widths), generator=generator)
    valid = torch.rand(batch, len(wrapper.names), generator=generator) > 0.3
    valid[0] = True  # both branches of every component appear
    valid[-1, 0] = False
    return images, meta, valid


def input_names(wrapper: ExportWrapper) -> list[str]:
    return ["images", "meta", "meta_valid"] if wrapper.names else ["images"]


def export_model(wrapper: ExportWrapper, inputs: tuple[torch.Tensor, ...], fmt: str, path: Path) -> Path:
    """Write ``wrapper`` in format ``fmt`` to ``path`` with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = tuple({0: batch} for _ in inputs)
    warnings.filterwarnings(
        "ignore", message=".*axis name: batch will not be used.*"
    )  # one name, several inputs
    if fmt == "exported":
        program = torch.export.export(wrapper, inputs, dynamic_shapes=dynamic)
        torch.export.save(program, str(path))
    elif fmt == "torchscript":
        with warnings.catch_warnings():  # tracer warnings about shape checks turned into constants
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(wrapper, inputs, check_trace=False)
        traced.save(str(path))
    elif fmt == "onnx":
        try:
            import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
        except ImportError as err:
            raise UsageError("format=onnx needs the export extra: pip install -e '.[export]'") from err
        outputs = [f"log_probs_{t}" for t in range(wrapper.num_tasks)]
        # one self-contained file, unless the weights pass protobuf's 2 GB limit
        size = sum(p.numel() * p.element_size() for p in wrapper.parameters())
        torch.onnx.export(wrapper, inputs, str(path), dynamo=True, input_names=input_names(wrapper),
                          output_names=outputs, dynamic_shapes=dynamic, external_data=size > ONNX_SINGLE_FILE,
                          verbose=False)  # fmt: skip
    else:
        raise UsageError(f"format={fmt!r}; choose one of {', '.join(FILES)}")
    return path


@torch.no_grad()
def run_exported(path: Path, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Load an exported file (by its suffix) and run it; outputs as CPU tensors."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return [torch.from_numpy(o) for o in session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})]
    if path.suffix == ".ts":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still widely deployed
            module = torch.jit.load(str(path))
        return [o.cpu() for o in module(*inputs)]
    if path.suffix == ".pt2":
        return [o.cpu() for o in torch.export.load(str(path)).module()(*inputs)]
    raise ValueError(f"unknown exported file type: {path}")


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest |a - b| over finite entries; inf where the -inf entries differ."""
    worst = 0.0
    for x, y in zip(a, b):
        if not torch.equal(torch.isinf(x), torch.isinf(y)):
            return math.inf
        finite = torch.isfinite(x)
        if finite.any():
            worst = max(worst, float((x[finite] - y[finite]).abs().max()))
    return worst


def preprocessing(run: LoadedRun, wrapper: ExportWrapper) -> dict:
    """What a caller must do to images and metadata before the exported model, and what comes out."""
    data = run.cfg.data
    size, crop = int(data.image_size), float(data.val_crop_pct)
    resize = math.floor(size / crop + 0.5)  # as linnaeus.data.transforms.build_eval_transform
    encodings = metadata_encodings(run.cfg, run.meta_dims)
    components, offset = [], 0
    for i, (name, width) in enumerate(run.meta_dims.items()):
        components.append(
            {"name": name, "columns": [offset, offset + width], "valid_column": i, **encodings[name]}
        )
        offset += width
    inputs = [{"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32"}]
    if wrapper.names:
        inputs += [
            {"name": "meta", "shape": ["batch", offset], "dtype": "float32"},
            {"name": "meta_valid", "shape": ["batch", len(components)], "dtype": "bool"},
        ]
    taxonomy = run.taxonomy
    return {
        "image": {
            "size": size,
            "crop_pct": crop,
            "resize_short_side": resize,
            "interpolation": "bilinear",
            "antialias": True,
            "mean": list(data.mean),
            "std": list(data.std),
            "steps": [
                "decode to RGB",
                f"resize the short side to {resize} px (bilinear, antialiased)",
                f"centre-crop {size}x{size}",
                "to float32 in [0, 1] (divide by 255)",
                "subtract mean and divide by std per channel",
                "layout (batch, 3, height, width)",
            ],
        },
        "inputs": inputs,
        "metadata": components,
        "outputs": [
            {"name": f"log_probs_{t}", "task_key": key, "rank": rank_name(key), "num_classes": n}
            for t, (key, n) in enumerate(zip(taxonomy.task_keys, taxonomy.num_classes))
        ],
        "null_index": taxonomy.null_index,
        "output_meaning": "log-probabilities per rank over the classes of taxonomy.json (same indices); "
        "the null class (unknown) has probability 0 (-inf)",
        "source": {"checkpoint": str(run.path), "step": run.step, "weights": run.weights},
    }


def main(cfg: DictConfig) -> Path:
    fmt = cfg.format
    if fmt not in FILES:
        raise UsageError(f"format={fmt!r}; choose one of {', '.join(FILES)}")
    run = load_run(cfg.checkpoint, weights=cfg.weights, device="cpu")
    model = run.model.float().eval()
    taxonomy = run.taxonomy
    wrapper = ExportWrapper(model, run.meta_dims, taxonomy.num_classes, taxonomy.null_index).eval()
    out = Path(cfg.out).expanduser() if cfg.out else run.run_dir / "export" / run.path.stem
    out.mkdir(parents=True, exist_ok=True)
    size = int(run.cfg.data.image_size)
    path = out / FILES[fmt]
    log.info("exporting %s (step %s, %s weights) as %s to %s", run.path, run.step, run.weights, fmt, path)
    example = example_inputs(wrapper, size, EXAMPLE_BATCH)
    with torch.no_grad():
        wrapper(*example)  # fills the models' per-grid caches before tracing, so they are constants there
        export_model(wrapper, example, fmt, path)
    info = preprocessing(run, wrapper)
    if cfg.verify:
        inputs = example_inputs(wrapper, size, VERIFY_BATCH, seed=1)
        with torch.no_grad():
            expected = list(wrapper(*inputs))
        diff = max_difference(run_exported(path, inputs), expected)
        info["verified"] = {"format": fmt, "batch": VERIFY_BATCH, "max_abs_diff": diff}
        log.info(
            "%s runs like eager PyTorch: max |difference| %.2e over a batch of %d",
            path.name,
            diff,
            VERIFY_BATCH,
        )
        if not diff <= cfg.tolerance:
            raise UsageError(f"{path} differs from eager PyTorch by {diff:.3g} (> tolerance {cfg.tolerance})")
    taxonomy.save(out / "taxonomy.json")
    (out / "preprocessing.json").write_text(json.dumps(info, indent=1))
    log.info("wrote %s, taxonomy.json and preprocessing.json in %s", path.name, out)
    return path


@hydra.main(version_base=None, config_path=APPS_CONFIG_DIR, config_name="export")
def hydra_entry(cfg: DictConfig) -> None:
    run_cli(main, cfg)


if __name__ == "__main__":
    hydra_entry()
