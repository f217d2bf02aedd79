#!/usr/bin/env bash
# Prove that a wheel works without the source tree: build citygen's wheel, install it
# (non-editable) into a fresh virtual environment that reuses this Python's packages for torch
# and the dependencies (--system-site-packages), check that `citygen` is imported from the
# venv's site-packages (not a checkout or an editable install), then, from an empty folder, run
# `citygen synth` and a few-step `citygen train` with the default preset (`tiny`, shipped in the
# wheel), compiling the native kernels from the wheel's sources into a fresh cache.
# Usage: bash scripts/check-wheel.sh   (from anywhere; about 2 minutes on 2 cores)
set -euo pipefail
SRC="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
unset PYTHONPATH CITYGEN_NO_CUDA_EXT || true

"$PY" -m pip wheel -q --no-deps "$SRC" -w "$WORK/dist"
WHEEL="$(ls "$WORK"/dist/citygen-*.whl)"
"$PY" -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
# dependencies resolve from the system site-packages; only citygen comes from the wheel
"$VPY" -m pip install -q "$WHEEL"

mkdir "$WORK/run" && cd "$WORK/run"   # no checkout on sys.path
CITYGEN_SRC="$SRC" "$VPY" - <<'PY'
import os
import pathlib
import sysconfig

import citygen
from citygen.config import preset_names

site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
where = pathlib.Path(citygen.__file__).resolve()
assert site in where.parents, f"citygen was imported from {where}, not from the wheel in {site}"
# every preset of the source tree ships in the wheel
shipped = sorted(p.stem for p in (pathlib.Path(os.environ["CITYGEN_SRC"]) / "citygen" / "configs").glob("*.yaml"))
assert shipped and preset_names() == shipped, f"presets in the wheel: {preset_names()}, in the source tree: {shipped}"
print(f"check-wheel: citygen from {where.parent}, presets {preset_names()}")
PY
export TORCH_EXTENSIONS_DIR="$WORK/ext"
"$WORK/venv/bin/citygen" synth "$WORK/run/city"
"$WORK/venv/bin/citygen" train --data "$WORK/run/city/transforms.json" --out "$WORK/run/block" --steps 4 \
  --rays-per-batch 128 --downscale 4 --threads 1 --no-eval --no-progress
"$VPY" - "$WORK/run/block" <<'PY'
import json
import pathlib
import sys

run = pathlib.Path(sys.argv[1])
config = json.loads((run / "config.json").read_text())
assert config["preset"] == "tiny" and config["steps"] == 4, config["preset"]
sidecars = sorted((run / "checkpoints").glob("step_*.json"))
assert sidecars and json.loads(sidecars[-1].read_text())["step"] == 4, sidecars
print(f"check-wheel: trained 4 steps with the default preset, hash backend "
      f"{json.loads(sidecars[-1].read_text()).get('hash_backend')}")
PY
echo "check-wheel: OK ($(basename "$WHEEL"))"
