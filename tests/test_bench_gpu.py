"""scripts/bench_gpu.py, the one-run GPU measurement script, rehearsed on the CPU so it cannot rot
between the rare runs on a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_script_rehearses_every_step_on_the_cpu(tmp_path):
    pytest.importorskip("skimage")  # the photographs (pip install -e .[bench])
    proc = subprocess.run(
        [sys.executable, "scripts/bench_gpu.py", "--quick", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_results.json").read_text())
    synthetic = results["synthetic"]["32"]
    assert synthetic["images_per_s"] > 0 and synthetic["gflops_per_image"] > 0
    assert synthetic["achieved_tflops"] > 0 and synthetic["mfu"] is None  # no peak known for a CPU
    cpu = results["trainer"]["CPU decode"]
    assert (
        cpu["exit"] == 0 and cpu["images_per_s"] > 0 and len(cpu["images_per_s_rows"]) == 2
    )  # 10 steps, every 5
    assert results["trainer"]["GPU decode (nvJPEG), augmentation on the GPU"] == {"skipped": "needs CUDA"}
    assert results["auto_batch"] == {"skipped": "needs CUDA"}
    table = (tmp_path / "gpu_results.md").read_text()
    assert "| trainer, CPU decode |" in table and "needs CUDA" in table
