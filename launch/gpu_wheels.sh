#!/usr/bin/env bash
# For a GPU machine that cannot reach a package registry and whose Python 3.12 (x86-64) has jax[cuda],
# flax, optax, orbax, torch, transformers and numpy: the wheels of gleam_jax's other dependencies,
# downloaded where a registry is reachable into .whl/ (ignored by git; ~22 MB), to copy along with
# the checkout, and in .whl/fallback/ the flax and optax it is tested with.
#
#   bash launch/gpu_wheels.sh            # then, on the GPU machine: bash launch/gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(grain==0.2.18 array_record==0.8.6 tensorflow-datasets==4.9.10 scann==1.4.2 ml_collections==1.1.0
        tensorboardX==2.6.5 importlib_resources==7.1.0 portpicker==1.6.0 dm-tree==0.1.10 immutabledict==4.3.1
        simple_parsing==0.1.9 tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2)
mkdir -p .whl
for wheel in "${WHEELS[@]}"; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$wheel"
done
"$PYTHON" -m pip wheel -q --no-deps -w .whl promise==2.3  # pure Python, published as a source archive only
# The flax and optax the project is tested with, installed there only if a benchmark fails with the
# machine's own (gpu_bench.sh); pure Python.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d .whl/fallback flax==0.12.8 optax==0.2.8
ls .whl .whl/fallback
