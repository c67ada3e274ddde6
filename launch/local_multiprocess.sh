#!/usr/bin/env bash
# Multi-host on one machine: N processes on loopback, each with its own CPU devices.
#
#   launch/local_multiprocess.sh N CONFIG WORKDIR [--config.x=y ...]
#   e.g. DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh 2 configs/c_phase1.py:tiny /tmp/run
#
# Each process calls jax.distributed.initialize with the loopback coordinator (CPU collectives:
# gloo, jax's default) and reads only its slice of every global batch, exactly as on a TPU pod
# slice; process 0 writes config.json, metrics and reports, all processes write the checkpoint.
# DEVICES_PER_PROCESS (default 4) CPU devices per process (the caller's other XLA_FLAGS are kept);
# PORT (default: a free one) for the coordinator; PYTHON (default: python) the interpreter with
# gleam_jax installed. If one process fails, the others are stopped and the script exits with its
# status.
set -euo pipefail
if (($# < 3)); then
  echo "usage: $0 N CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
N=$1; CONFIG=$2; WORKDIR=$3; shift 3
PYTHON=${PYTHON:-python}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
DEVICES=${DEVICES_PER_PROCESS:-4}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES" \
    "$PYTHON" -m gleam_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" --process_id="$i" "$@" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for ((left = N; left > 0; left--)); do
  rc=0
  wait -n || rc=$?
  if ((rc != 0 && status == 0)); then
    status=$rc
    kill "${pids[@]}" 2>/dev/null || true  # the others would wait for the failed one forever
  fi
done
exit $status
