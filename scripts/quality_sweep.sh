#!/usr/bin/env bash
# The Gowalla equal-memory sweep of docs/RESULTS.md (issue 12), split into one process per cell so
# that cells run side by side (--threads 1 each, JOBS at a time), then gathered into one table and
# one Pareto plot. Finished cells are reused (--reuse), so the script can be re-run after an
# interruption and only trains what is missing.
#
#   bash scripts/quality_sweep.sh [DATA] [OUT] [JOBS] [SEEDS]
#   defaults: ../shared/data/gowalla runs/quality 2 0
set -euo pipefail
DATA=${1:-../shared/data/gowalla}
OUT=${2:-runs/quality}
JOBS=${3:-2}
SEEDS=${4:-0}
mkdir -p "$OUT"
common=(--model mf --data "$DATA" --reuse --threads 1 --no-progress --out "$OUT"
        --eval-users 10000 --seeds "$SEEDS")
cells=(
  "--methods dense_small,dsl,static_frequency,static_aligned,static,magnitude,dsl_paper --memory-points 0.2 --no-dense"
  "--methods dense_small --memory-points 0.1,0.05 --no-dense"
  "--methods dsl,static_frequency --memory-points 0.1,0.05 --block-size 4 --no-dense"
  "--methods dsl --memory-points 0.1 --no-dense"
  "dense"
)
run_cell() {
  local cell=$1
  local tag
  tag=$(echo "$cell" | tr -c 'a-zA-Z0-9.' '_')
  if [[ $cell == dense ]]; then   # the dense reference alone (no sparse methods)
    dsl-train sweep "${common[@]}" --methods "" --name "cell-dense" > "$OUT/log-dense.txt" 2>&1
  else
    # shellcheck disable=SC2086
    dsl-train sweep "${common[@]}" $cell --name "cell-$tag" > "$OUT/log-$tag.txt" 2>&1
  fi
}
i=0
for cell in "${cells[@]}"; do
  run_cell "$cell" &
  i=$((i + 1))
  if (( i % JOBS == 0 )); then wait; fi
done
wait
dsl-train sweep --gather --out "$OUT" --name quality-gowalla-mf
