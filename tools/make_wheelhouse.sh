#!/usr/bin/env bash
# Download the wheels tools/gpu_check.sh needs beyond torch into wheelhouse/ (git-ignored), for a
# machine with torch and CUDA but no internet: Linux x86_64, CPython 3.10, 3.11 and 3.12.
#
#   bash tools/make_wheelhouse.sh [--with-fla] [--python-versions "3.10 3.11 3.12"] [DIR]
#
# What `import distattn`, the schemes and the in-process trainer import beyond torch and what
# such a machine usually has (numpy, packaging, pyyaml, einops, tensorboard): megatron-core (the
# GPT model) and pydantic (the config) with pydantic's own dependencies. Ray, DeepSpeed and
# matplotlib are not needed: the training smoke runs the trainer in-process in a world of one
# with ZeRO off, and nothing is plotted. flash-attn, fla-core and triton are optional GPU
# kernels and are not carried (flash-attn alone is hundreds of MiB); --with-fla adds fla-core,
# pure Python (about 1 MiB; it needs triton, which CUDA builds of torch bring).
# The versions are the ones the project's tests run with. wheelhouse/requirements.txt lists
# what tools/gpu_check.sh installs.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
VERSIONS="3.10 3.11 3.12"
WITH_FLA=0
DIR=wheelhouse
while [ $# -gt 0 ]; do
    case "$1" in
        --with-fla) WITH_FLA=1 ;;
        --python-versions) VERSIONS="$2"; shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        -*) echo "make_wheelhouse.sh: unknown option $1" >&2; exit 2 ;;
        *) DIR="$1" ;;
    esac
    shift
done

# compiled: one wheel per CPython version
COMPILED=(
    "megatron-core==0.16.1"
    "pydantic-core==2.50.5"
)
# pure Python: one wheel serves every version
PURE=(
    "pydantic==2.14.4"
    "annotated-types==0.8.0"
    "typing-inspection==0.4.5"
    "typing-extensions==4.16.0"
    "packaging==26.4"
)
# what gpu_check.sh asks pip for; pip takes the rest from the wheelhouse only where the machine lacks it
TOP=("megatron-core==0.16.1" "pydantic==2.14.4")
if [ "$WITH_FLA" = 1 ]; then
    PURE+=("fla-core==0.6.0")
    TOP+=("fla-core==0.6.0")
fi
# megatron-core's wheels are tagged manylinux_2_28, pydantic-core's manylinux2014: pip matches tags exactly
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64)

mkdir -p "$DIR"
rm -f "$DIR"/*.whl  # one version of each package: two would make the offline install ambiguous
download() {  # python version, requirements...
    local v=$1; shift
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --implementation cp --python-version "$v" "${PLATFORMS[@]}" -d "$DIR" "$@"
}
for v in $VERSIONS; do
    echo "make_wheelhouse: CPython $v: ${COMPILED[*]}"
    download "$v" "${COMPILED[@]}"
done
first=${VERSIONS%% *}
echo "make_wheelhouse: pure Python: ${PURE[*]}"
download "$first" "${PURE[@]}"
printf '%s\n' "${TOP[@]}" > "$DIR/requirements.txt"

echo "make_wheelhouse: $DIR holds:"
ls -1 "$DIR" | sed 's/^/  /'
size=$(du -sk "$DIR" | cut -f1)
echo "make_wheelhouse: $DIR is $((size / 1024)).$(( (size % 1024) * 10 / 1024 )) MiB (${size} KiB)"
if [ "$size" -gt $((40 * 1024)) ]; then
    echo "make_wheelhouse: over 40 MiB: the working tree that travels to a lent machine is capped at 64 MiB" >&2
    exit 1
fi
