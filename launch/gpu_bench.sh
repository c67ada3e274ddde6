#!/usr/bin/env bash
# The accelerator figures of the benchmarks, in one call on a GPU machine (from the repo root, with a
# python3 that has jax[cuda], flax, optax, orbax, torch and transformers; where it cannot reach a
# package registry, the wheels of launch/gpu_wheels.sh copied along in .whl/ are installed first):
#   1. bench.train_step, ours alone: ConvNeXt-B at 384 px in bfloat16, batch 64 -> step time, MFU
#   2. bench.generate, ours alone: Qwen2.5-VL-3B shape in bfloat16, batch 1 and 8 -> decode tok/s
# Logs go to $LOG_DIR (default /tmp). TRAIN_ARGS / GENERATE_ARGS replace
# each benchmark's arguments (e.g. tiny ones for a dry run on a CPU); STEP_TIMEOUT bounds each.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${LOG_DIR:-/tmp}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
TRAIN_ARGS=${TRAIN_ARGS:---config=configs/c_phase1.py:variant=base --config.model.dtype=bfloat16 --config.data.panorama_size=(384,384) --config.data.satellite_size=(384,384) --config.batch_size=64 --steps=10 --repeats=3}
GENERATE_ARGS=${GENERATE_ARGS:---model=qwen2_5_vl_3b --dtype=bfloat16 --batch_sizes=1,8 --new_tokens=64}
STEP_TIMEOUT=${STEP_TIMEOUT:-280}
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv) || true
"$PYTHON" -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
# bench NAME ARGS...: one benchmark under STEP_TIMEOUT, logged to $LOGS/NAME.log. If it fails (not a
# timeout) with the machine's own flax/optax, the versions the project is tested with (.whl/fallback/)
# are installed over them once, and it runs again.
fallback_done=0
bench() {
  local name=$1; shift
  timeout "$STEP_TIMEOUT" "$PYTHON" -m "gleam_jax.bench.$name" --torch=false "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && [ $fallback_done -eq 0 ] && compgen -G ".whl/fallback/*.whl" >/dev/null; then
    fallback_done=1
    echo "== $name failed (exit $rc): installing .whl/fallback/ ($(cd .whl/fallback && echo *.whl)) and running it again"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fallback/*.whl \
      || { echo "installing .whl/fallback/ failed" >&2; return 1; }
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
    timeout "$STEP_TIMEOUT" "$PYTHON" -m "gleam_jax.bench.$name" --torch=false "$@" 2>&1 | tee "$LOGS/$name.fallback.log"
    rc=${PIPESTATUS[0]}
  fi
  return "$rc"
}
status=0
# shellcheck disable=SC2086  # the arguments are words on purpose
bench train_step $TRAIN_ARGS || status=1
# shellcheck disable=SC2086
bench generate --out= $GENERATE_ARGS || status=1
exit $status
