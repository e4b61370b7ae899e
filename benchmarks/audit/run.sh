#!/usr/bin/env bash
# Runs the audits of docs/audit.md one at a time (nice -n 5), each in its own new folder under $AUDIT_RUNS
# (default: ../audit-runs, outside the repository: black-box folders hold a model and the canary data), and copies
# each one's audit.json, audit.md and log into benchmarks/audit/<name>/. Resumable: a run whose audit.json exists is
# skipped; a killed run's partial folder is moved aside and the run redone from scratch (fresh canaries).
# One torch thread by default (AUDIT_THREADS): on a 2-core machine shared with other jobs, 2 threads thrash.
#   bash benchmarks/audit/run.sh                 # all
#   bash benchmarks/audit/run.sh wb-eps10 bb-nodp  # some
set -uo pipefail
cd "$(dirname "$0")/../.."
RUNS=${AUDIT_RUNS:-$(cd .. && pwd)/audit-runs}
mkdir -p "$RUNS"
declare -A CMD=(
  [wb-nodp]="white-box --disable_dp --num_canaries 5000"
  [wb-eps10]="white-box --epsilon 10 --num_canaries 5000"
  [wb-eps1]="white-box --epsilon 1 --num_canaries 5000"
  [bb-nodp]="black-box --disable_dp --num_canaries 1000"
  [bb-eps10]="black-box --epsilon 10 --num_canaries 1000"
  [bb-eps1]="black-box --epsilon 1 --num_canaries 1000"
)
ORDER=(wb-nodp wb-eps10 wb-eps1 bb-nodp bb-eps10 bb-eps1)
[ $# -gt 0 ] && ORDER=("$@")
for name in "${ORDER[@]}"; do
  out="$RUNS/$name"
  if [ -f "$out/audit.json" ]; then echo "skip $name (done)"; continue; fi
  [ -e "$out" ] && mv "$out" "$out.killed-$(date +%s)"
  mkdir -p "benchmarks/audit/$name"
  echo "run $name: ${CMD[$name]}"
  start=$(date +%s)
  # shellcheck disable=SC2086
  HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${AUDIT_THREADS:-1} nice -n 5 python examples/audit.py ${CMD[$name]} --output_dir "$out" \
    > "benchmarks/audit/$name/log.txt" 2>&1
  rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "benchmarks/audit/$name/log.txt"
  [ -f "$out/audit.json" ] && cp "$out/audit.json" "$out/audit.md" "benchmarks/audit/$name/"
done
