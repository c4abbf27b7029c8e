#!/usr/bin/env bash
# Start training on all workers at once (one process per host; JAX finds its peers).
#   DRY_RUN=1 launch/run.sh configs/cc12m.py:size=L /mnt/runs/dream_L [--config.x=y ...]
# The workdir must be shared by all hosts (e.g. a bucket mounted with gcsfuse).
source "$(dirname "$0")/common.sh"

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [extra flags...]" >&2
  exit 2
fi
config="$1"
workdir="$2"
shift 2
extra=""
for flag in "$@"; do
  extra+=" $(printf '%q' "${flag}")"
done
on_workers all "cd ${REPO_DIR} && . .venv/bin/activate && \
nohup python -m dream_jax.main --multihost --config=$(printf '%q' "${config}") \
--workdir=$(printf '%q' "${workdir}")${extra} > ~/dream_train.log 2>&1 &"
