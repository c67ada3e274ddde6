#!/usr/bin/env bash
# Run a gleam_jax config on every worker of a Cloud TPU VM slice (multi-host).
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [--config.x=y ...]
#   e.g. launch/tpu_vm.sh gleam-v5e us-west4-a v5litepod-16 configs/c_phase1.py:data=vigor /mnt/runs/run1
#
# Creates the VM if it does not exist, copies this checkout to every worker, installs the package
# and starts the same command on all hosts; `jax.distributed.initialize()` finds the coordinator on
# TPU by itself. WORKDIR must be a directory that every host sees at the same path (a bucket
# mounted with gcsfuse, or Filestore/NFS): all hosts write the checkpoint together and host 0
# writes metrics and reports with ordinary file calls, so a gs:// URL is not accepted.
set -euo pipefail
NAME=$1; ZONE=$2; ACCEL=$3; CONFIG=$4; WORKDIR=$5; shift 5
if [[ $WORKDIR == gs://* ]]; then
  echo "error: WORKDIR=$WORKDIR: mount the bucket on every worker (gcsfuse) and give the mounted path." >&2
  exit 2
fi
VERSION=${TPU_SOFTWARE_VERSION:-v2-alpha-tpuv5-lite}

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" --version "$VERSION"
fi
ARGS=$(printf ' %q' --multihost "--config=$CONFIG" "--workdir=$WORKDIR" "$@")  # quoted for the remote shell
tar czf /tmp/gleam_jax.tgz --exclude=.git --exclude=.venv .
gcloud compute tpus tpu-vm scp /tmp/gleam_jax.tgz "$NAME":~/ --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -e; mkdir -p ~/gleam_jax && tar xzf ~/gleam_jax.tgz -C ~/gleam_jax && cd ~/gleam_jax &&
  python3 -m venv ~/venv && . ~/venv/bin/activate &&
  pip install -q -e . 'jax[tpu]' &&
  python -m gleam_jax.main$ARGS"
