#!/usr/bin/env bash
# Regenerate every table and figure of docs/benchmarks.md and the README figures, with the
# exact arguments the documents quote.
#
#   tools/reproduce_all.sh                 # every section this machine can run
#   tools/reproduce_all.sh profile sweep   # only the named sections
#   tools/reproduce_all.sh --list          # the sections and their commands
#
# Sections: kernel attention linear hetero cad balance profile sweep simulate.
# A section whose command this installation does not have (an older checkout),
# or that needs hardware this machine lacks (kernel: a CUDA GPU; the 16-core
# runs: >= 16 cores), is skipped with a message. Outputs go to $OUT
# (default runs/reproduce/); the files the documents embed are copied to docs/ at
# the end of their section (docs/data/*.json, docs/img/*.png). Logs: $OUT/<section>.log.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/reproduce}
if [[ -n "${DISTATTN:-}" ]]; then
  read -r -a DA <<<"$DISTATTN"
elif [[ -x .venv/bin/distattn ]]; then
  DA=(.venv/bin/distattn)
else
  DA=(python3 -m distattn.cli)
fi
PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
CORES=$(nproc 2>/dev/null || echo 2)
mkdir -p "$OUT" docs/img docs/data

has() { "${DA[@]}" "$@" --help >/dev/null 2>&1; }
gpu() { "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
run() { echo "+ $*"; "$@"; }
skip() { echo "skip: $*"; }

sec_kernel() {
  if ! gpu; then skip "kernel table needs a CUDA GPU"; return; fi
  run env PYTHONPATH=. "$PY" tools/kernel_bench.py --n 16384 --dtype bf16
}

sec_attention() {
  if ! has bench attention; then skip "no 'distattn bench attention' here"; return; fi
  run "${DA[@]}" bench attention --set bench.seq_len=16384 --set "bench.schemes=[ring,allgather,ulysses]" \
    --set bench.iters=2 --peers --json "$OUT/bench_attention_n16k_w2.json"
  if (( CORES >= 16 )); then   # the "clean run" tables (one core per rank, no other load)
    run "$PY" -c '
from distattn.bench.attention import BenchSpec, format_table, run_attention_bench
if __name__ == "__main__":
    for spec in (BenchSpec(seq_len=16384, schemes=["ring", "allgather", "ulysses", "ring-unbalanced"], iters=2, warmup=1),
                 BenchSpec(seq_len=16384, doc_lens=[5000, 3000, 4000, 2000, 2384],
                           schemes=["ring", "ring@doc_zigzag", "ring-unbalanced"], iters=2, warmup=1)):
        rows, single = run_attention_bench(spec); print(format_table(rows, single, spec))'
  else skip "the clean-run attention tables need >= 16 cores"; fi
  if [[ -f tools/zigzag_kernel_split.py ]]; then run env PYTHONPATH=. "$PY" tools/zigzag_kernel_split.py; fi
}

sec_linear() {
  if ! has bench linear; then skip "no 'distattn bench linear' here"; return; fi
  run "${DA[@]}" bench linear --lengths 4096,8192,16384,32768 --worlds 2,4 --json "$OUT/bench_linear.json"
  if (( CORES >= 16 )); then   # the "one core per rank" table
    run "${DA[@]}" bench linear --lengths 4096,8192,16384,32768 --worlds 2,4,8 --json "$OUT/bench_linear_w8.json"
  else skip "bench linear --worlds 2,4,8 (one core per rank) needs >= 16 cores"; fi
}

sec_hetero() {
  if ! has bench hetero; then skip "no 'distattn bench hetero' here"; return; fi
  run "${DA[@]}" bench hetero --lengths 2048,4096,8192,16384 --set attention.hetero_stride=8 \
    --json "$OUT/bench_hetero_stride8.json"
  run "${DA[@]}" bench hetero --lengths 4096,16384 --json "$OUT/bench_hetero.json"
}

sec_cad() {
  if ! has bench cad; then skip "no 'distattn bench cad' here"; return; fi
  run "${DA[@]}" bench cad --json "$OUT/bench_cad.json" && cp "$OUT/bench_cad.json" docs/data/
  if (( CORES >= 16 )); then
    run "${DA[@]}" bench cad --no-planner --set bench.iters=7 --set bench.warmup=2 \
      --json "$OUT/bench_cad_lent16.json" && cp "$OUT/bench_cad_lent16.json" docs/data/
  else skip "bench cad on 16 cores (docs/data/bench_cad_lent16.json) needs >= 16 cores"; fi
  run "${DA[@]}" bench cad --no-planner --world 2 --set bench.iters=5 \
    --modes "cad colocated,cad colocated+pingpong,cad colocated,cad colocated+pingpong"
}

sec_balance() {
  if ! has bench balance; then skip "no 'distattn bench balance' here"; return; fi
  run "${DA[@]}" bench balance --measure-steps 3
  run "${DA[@]}" bench balance --micro 1 --max-defer 4 --measure-steps 0
}

sec_profile() {
  if ! has profile; then skip "no 'distattn profile' here"; return; fi
  run "${DA[@]}" profile --schemes ring,allgather,ulysses,lasp2 --steps 2 --warmup 1 \
    --set data.seq_len=4096 --out "$OUT/profile" &&
    cp "$OUT/profile/timeline_ring.png" docs/img/profile_timeline_ring.png
}

sec_sweep() {
  if ! has sweep; then skip "no 'distattn sweep' here"; return; fi
  run "${DA[@]}" sweep configs/sweeps/example.yaml --out "$OUT/sweep" --no-progress &&
    cp "$OUT/sweep/throughput.png" docs/img/sweep_throughput.png &&
    cp "$OUT/sweep/memory.png" docs/img/sweep_memory.png
}

sec_simulate() {
  if ! has simulate; then skip "no 'distattn simulate' here"; return; fi
  run "${DA[@]}" simulate --validate --out "$OUT/simulate"
  run "${DA[@]}" simulate --cluster h100 --gpus 64 --seq 2097152 --out "$OUT/simulate/h100_64gpu_2m"
  run "${DA[@]}" simulate --cluster h100 --tokens-per-gpu 16384 --scaling 8,16,32,64,128,256,512,1024 \
    --schemes ring,ring-basic,allgather,usp:8,lasp2,lasp1 --out "$OUT/simulate/h100_scaling" \
    --png docs/img/sim_scaling_h100.png
  run "${DA[@]}" simulate --cluster h100 --model llama3-8b-hybrid --gpus 64 --seq 2097152 \
    --schemes ring,allgather,usp:8,lasp2,lasp1 --out "$OUT/simulate/llama3_8b_hybrid"
}

ALL=(kernel attention linear hetero cad balance profile sweep simulate)
if [[ "${1:-}" == "--list" ]]; then
  for s in "${ALL[@]}"; do echo "== $s"; declare -f "sec_$s" | grep -E '^\s+run ' | sed 's/^\s*run //'; done
  exit 0
fi
SECTIONS=("$@")
(( ${#SECTIONS[@]} )) || SECTIONS=("${ALL[@]}")
status=0
for s in "${SECTIONS[@]}"; do
  if ! declare -f "sec_$s" >/dev/null; then echo "unknown section '$s' (choose from ${ALL[*]})"; exit 2; fi
  echo "=== $s"
  if ! "sec_$s" 2>&1 | tee "$OUT/$s.log"; then status=1; fi
done
exit $status
