#!/usr/bin/env bash
# Join this node to a Ray cluster: launch/start_worker.sh HEAD_IP:6379 [ray start options]
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 HEAD_IP:PORT [ray start options, e.g. --num-gpus=8]" >&2
    exit 2
fi
head="$1"; shift
export RAY_USAGE_STATS_ENABLED=0
exec ray start --address="$head" "$@"
