#!/usr/bin/env bash
# Submit `distattn train` to a Ray cluster's job server (the head runs the dashboard).
#   launch/submit.sh http://HEAD_IP:8265 configs/my_job.yaml --set launch.nodes=2
# Uploads the current directory as the job's working directory; prints the job id.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 http://HEAD_IP:8265 CONFIG [distattn train options]" >&2
    exit 2
fi
address="$1"; shift
exec ray job submit --address "$address" --working-dir . --no-wait -- distattn train "$@"
