#!/usr/bin/env bash
# Create the TPU VM slice (directly, or through a queued resource with QUEUED=1).
#   DRY_RUN=1 launch/create.sh      # print the gcloud command only
source "$(dirname "$0")/common.sh"

if [[ "${QUEUED}" == "1" ]]; then
  run gcloud compute tpus queued-resources create "${QUEUED_ID}" --node-id="${TPU_NAME}" \
    --zone="${ZONE}" "${PROJECT_FLAG[@]}" --accelerator-type="${ACCELERATOR_TYPE}" \
    --runtime-version="${RUNTIME_VERSION}"
else
  run gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}"
fi
