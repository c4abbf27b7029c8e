#!/usr/bin/env bash
# Shared settings and the dry-run wrapper for the Cloud TPU scripts.
# Every setting can be overridden from the environment.
set -euo pipefail

TPU_NAME="${TPU_NAME:-dream-tpu}"
ZONE="${ZONE:-us-east5-a}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-128}"     # v5p-128 = 64 chips (topology 4x4x4)
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"
QUEUED="${QUEUED:-0}"                               # 1: create through a queued resource
QUEUED_ID="${QUEUED_ID:-${TPU_NAME}-qr}"
REPO_DIR="${REPO_DIR:-dream_jax}"                   # checkout location on every worker
JAX_VERSION="${JAX_VERSION:-0.10.2}"
DRY_RUN="${DRY_RUN:-0}"

PROJECT_FLAG=()
if [[ -n "${PROJECT}" ]]; then
  PROJECT_FLAG=(--project="${PROJECT}")
fi

# run CMD...: execute, or with DRY_RUN=1 print the exact command (shell-quoted) instead.
run() {
  if [[ "${DRY_RUN}" == "1" ]]; then
    printf '%q' "$1"
    shift
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# on_workers WORKER COMMAND: run a shell command on one worker or on all of them.
on_workers() {
  local worker="$1" command="$2"
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" \
    --worker="${worker}" --command="${command}"
}
