#!/usr/bin/env bash
# The Prefect flow tests N times in a row (default 5) beside a CPU hog: one busy-loop process per core, so
# every temporary Prefect server starts on a loaded machine. Prints each round's result and time.
#   bash bench/flow_under_load.sh [rounds] [pytest selection...]
set -uo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}; shift || true
selection=("${@:-tests/test_flow.py tests/test_sources.py::test_editing_source_files_reruns_prepare_in_the_flow}")
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
hogs=()
for _ in $(seq "$(nproc)"); do .venv/bin/python -c "while True: pass" & hogs+=($!); done
trap 'kill "${hogs[@]}" 2>/dev/null' EXIT
failed=0
for r in $(seq "$rounds"); do
  start=$(date +%s)
  if .venv/bin/python -m pytest -q -p no:cacheprovider ${selection[*]} > "/tmp/flow_under_load.$r.log" 2>&1; then
    result=passed
  else
    result=FAILED; failed=$((failed + 1))
  fi
  echo "round $r: $result in $(( $(date +%s) - start )) s ($(tail -1 "/tmp/flow_under_load.$r.log"))"
done
echo "$((rounds - failed)) of $rounds rounds passed beside $(nproc) busy-loop processes"
exit "$failed"
