#!/usr/bin/env bash
# TPU pod slice: the same `cm3leon train` on every worker VM of the slice, over ssh.
#
#   launch/tpu_pod.sh CONFIG [section.key=value ...]
#
# Environment:
#   TPU_NAME   the TPU VM slice (required)
#   ZONE       its zone (required); PROJECT optional (default: gcloud's)
#   REPO_DIR   checkout of this repository on every worker (default ~/cm3leon_jax), with
#              the package installed there (pip install -e .)
#   WORKDIR    run directory every worker sees, e.g. gs://bucket/run or a shared mount
#              (default runs/tpu)
#   PYTHON     interpreter on the workers (default python3)
# On TPU VMs `jax.distributed.initialize()` finds the coordinator, process count and id
# itself (CM3LEON_DISTRIBUTED=1 asks for it). A maintenance event or preemption sends
# SIGTERM: the job checkpoints and exits 0; run this script again to resume.
set -eu
if [ $# -lt 1 ]; then
  echo "usage: TPU_NAME=... ZONE=... $0 CONFIG [section.key=value ...]" >&2; exit 2
fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REPO_DIR=${REPO_DIR:-'~/cm3leon_jax'}
WORKDIR=${WORKDIR:-runs/tpu}
PYTHON=${PYTHON:-python3}
args=$(printf ' %q' "$@")
project=()
[ -n "${PROJECT:-}" ] && project=(--project "$PROJECT")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project[@]}" --worker=all \
  --command "cd $REPO_DIR && CM3LEON_DISTRIBUTED=1 $PYTHON -m cm3leon_jax.cli train --workdir $(printf %q "$WORKDIR") --config$args"
