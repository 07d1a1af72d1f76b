#!/usr/bin/env bash
# GoRL-SAC learning runs at CPU scale, one line per run, P at a time (one torch thread each).
# Usage: P=1 bash benchmarks/sac_runs.sh OUT_DIR "ENV STEPS SEED STAGES [EXTRA FLAGS...]" ...
# Results: OUT_DIR/runs/*/eval.csv; OUT_DIR/<env>__K<stages>__<seed>.log starts with the exact command.
# The code is copied to OUT_DIR/code first (with its commit), so editing the repo does not change
# queued runs; REUSE_CODE=1 keeps an existing copy. Finished runs (log has the final line) are skipped.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(realpath -m "$1")"
shift
mkdir -p "$OUT/code"
if [ -z "${REUSE_CODE:-}" ] || [ ! -f "$OUT/code/gorl_sac.py" ]; then
  cp "$REPO/gorl_sac.py" "$REPO/common.py" "$OUT/code/"
  (cd "$REPO" && { git rev-parse HEAD; git diff --quiet HEAD -- gorl_sac.py common.py || echo "(uncommitted changes)"; } \
    > "$OUT/code/COMMIT" 2>/dev/null || true)
fi
cd "$OUT"
printf '%s\n' "$@" | xargs -P "${P:-1}" -I{} bash -c '
  set -- {}
  env_id=$1; steps=$2; seed=$3; stages=$4; shift 4
  log="'"$OUT"'/${env_id}__K${stages}__${seed}.log"
  [ -f "$log" ] && grep -q "final deterministic return" "$log" && exit 0
  cmd="python gorl_sac.py --env-id $env_id --total-timesteps $steps --seed $seed --num-stages $stages $*"
  echo "$cmd" > "$log"
  GORL_NO_PROGRESS=1 python "'"$OUT"'/code/gorl_sac.py" --env-id "$env_id" --total-timesteps "$steps" \
    --seed "$seed" --num-stages "$stages" "$@" >> "$log" 2>&1
'
