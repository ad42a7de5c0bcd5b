#!/usr/bin/env bash
# Start the Ray head on this node. Extra arguments go to `ray start`, e.g. --num-gpus=8.
#   PORT=6379 DASHBOARD=false launch/start_head.sh
# DASHBOARD=true is needed for `ray job submit` (and `pip install "ray[default]"`).
set -euo pipefail
export RAY_USAGE_STATS_ENABLED=0
exec ray start --head --port="${PORT:-6379}" --include-dashboard="${DASHBOARD:-false}" "$@"
