#!/usr/bin/env bash
# Copy this checkout to every worker and install the pinned stack with libtpu.
# With BUCKET=name, also mount gs://name at /mnt/name on every worker (gcsfuse), so
# that all hosts share the workdir: launch/run.sh CONFIG /mnt/name/RUN.
#   DRY_RUN=1 launch/setup.sh
source "$(dirname "$0")/common.sh"

archive="/tmp/${TPU_NAME}-dream_jax.tar.gz"
root="$(cd "$(dirname "$0")/.." && pwd)"
run tar -czf "${archive}" -C "${root}" --exclude=.venv --exclude=.git --exclude=workdirs .
run gcloud compute tpus tpu-vm scp "${archive}" "${TPU_NAME}:/tmp/dream_jax.tar.gz" \
  --zone="${ZONE}" "${PROJECT_FLAG[@]}" --worker=all
on_workers all "mkdir -p ${REPO_DIR} && tar -xzf /tmp/dream_jax.tar.gz -C ${REPO_DIR} && \
cd ${REPO_DIR} && python3 -m venv .venv && . .venv/bin/activate && \
pip install -q -r requirements.txt 'jax[tpu]==${JAX_VERSION}' -e ."
if [[ -n "${BUCKET:-}" ]]; then
  on_workers all "sudo mkdir -p /mnt/${BUCKET} && sudo chown \$USER /mnt/${BUCKET} && \
gcsfuse --implicit-dirs ${BUCKET} /mnt/${BUCKET}"
fi
