#!/usr/bin/env bash
# The wheels a GPU machine with its own PyTorch image (Python 3.12, torch, torchvision, timm, h5py,
# scikit-image) lacks to run scripts/bench_gpu.py: Hydra, OmegaConf and its ANTLR runtime, simplejpeg,
# at the versions this checkout's .venv holds. Written to .whl/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version() { "$PY" -m pip show "$1" | sed -n 's/^Version: //p'; }
rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "hydra-core==$(version hydra-core)" "omegaconf==$(version omegaconf)" "simplejpeg==$(version simplejpeg)"
# published as a source archive only; pure Python, so a wheel built here installs anywhere
"$PY" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
ls -l .whl
