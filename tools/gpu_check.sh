#!/usr/bin/env bash
# The checks for a lent GPU machine (torch with CUDA, no internet), in one command, under 8 minutes:
#
#   bash tools/gpu_check.sh [--no-install] [--device cuda|cpu] [--quick] [--parts env,exact,...] [OUT.json]
#
# 1. installs the carried wheelhouse/ (tools/make_wheelhouse.sh makes it where there is internet)
#    with pip --no-index: only what this Python lacks is taken from it; distattn itself comes
#    from this checkout through PYTHONPATH (nothing to build);
# 2. runs tools/gpu_check.py: scheme exactness at W=1, SDPA vs block-kernel TFLOP/s, a bf16
#    training smoke of the default model shape, the delta-rule and linear kernels; each part
#    under a time budget, every result in one JSON file: OUT.json, else $OUT/gpu_check.json when
#    $OUT is set, else runs/gpu_check.json.
#
# --no-install skips step 1; --quick --device cpu is the dry run that proves the script on a CPU.
# --isolate yes|no|auto, --total-budget S, --budget-scale X and --train-steps N pass on to
# tools/gpu_check.py (see its --help).
# PYTHON picks the interpreter (default .venv/bin/python if present, else python3).
# Exit status 0 when every part is ok.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then  # the project's environment where there is one (not on a lent machine), else python3
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
INSTALL=1
OUTFILE=""
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --no-install) INSTALL=0 ;;
        --device|--parts|--isolate|--total-budget|--budget-scale|--train-steps)
            [ $# -ge 2 ] || { echo "gpu_check.sh: $1 needs a value" >&2; exit 2; }
            ARGS+=("$1" "$2"); shift ;;
        --quick) ARGS+=("$1") ;;
        --out) OUTFILE="$2"; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUTFILE="$1" ;;
    esac
    shift
done

LOG=$(mktemp "${TMPDIR:-/tmp}/gpu_check_install.XXXXXX")
trap 'rm -f "$LOG"' EXIT
if [ "$INSTALL" = 1 ]; then
    if [ -f wheelhouse/requirements.txt ]; then
        echo "gpu_check: installing from wheelhouse/ ($(du -sh wheelhouse | cut -f1)): $(tr '\n' ' ' < wheelhouse/requirements.txt)"
        t0=$(date +%s)
        if ! "$PY" -m pip install --no-index --find-links wheelhouse --disable-pip-version-check \
                -r wheelhouse/requirements.txt >"$LOG" 2>&1; then
            # pip could not resolve offline (a dependency the machine lacks and the wheelhouse does not
            # carry): install this Python's wheels as they are, without resolving
            tag=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
            echo "gpu_check: resolving install failed; installing the $tag wheels with --no-deps" | tee -a "$LOG"
            "$PY" -m pip install --no-index --no-deps --disable-pip-version-check \
                wheelhouse/*-"$tag"-*.whl wheelhouse/*-py3-none-any.whl >>"$LOG" 2>&1 \
                || echo "gpu_check: install failed (the log is in the JSON file); running with what is installed"
        fi
        echo "gpu_check: install took $(( $(date +%s) - t0 )) s"
    else
        echo "gpu_check: no wheelhouse/ here (make it with tools/make_wheelhouse.sh and carry it); using what is installed" \
            | tee "$LOG"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# the parts keep to 400 s in all; this is the last resort should the driver itself hang
[ "$INSTALL" = 1 ] && ARGS+=(--install-log "$LOG")
timeout --kill-after=10 460 "$PY" tools/gpu_check.py ${OUTFILE:+--out "$OUTFILE"} "${ARGS[@]}"
