#!/usr/bin/env bash
# Multi-host on one machine: N processes on loopback, each with its own CPU devices.
#
#   launch/local_multiprocess.sh N CONFIG WORKDIR [--config.x=y ...]
#
# Each process calls jax.distributed.initialize with the loopback coordinator; the global batch is
# split over processes exactly as on a TPU pod slice.
set -euo pipefail
N=$1; CONFIG=$2; WORKDIR=$3; shift 3
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu python -m gleam_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="127.0.0.1:$PORT" --num_processes="$N" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
