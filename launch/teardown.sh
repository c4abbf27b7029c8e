#!/usr/bin/env bash
# Delete the slice (and its queued resource with QUEUED=1).
#   DRY_RUN=1 launch/teardown.sh
source "$(dirname "$0")/common.sh"

if [[ "${QUEUED}" == "1" ]]; then
  run gcloud compute tpus queued-resources delete "${QUEUED_ID}" --zone="${ZONE}" \
    "${PROJECT_FLAG[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" --quiet
fi
