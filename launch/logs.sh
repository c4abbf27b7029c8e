#!/usr/bin/env bash
# Follow the training log of worker 0 (WORKER=all shows every host's last lines).
#   DRY_RUN=1 launch/logs.sh
source "$(dirname "$0")/common.sh"

WORKER="${WORKER:-0}"
if [[ "${WORKER}" == "all" ]]; then
  on_workers all "tail -n 5 ~/dream_train.log"
else
  on_workers "${WORKER}" "tail -f ~/dream_train.log"
fi
