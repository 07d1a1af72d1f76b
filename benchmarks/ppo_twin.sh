#!/usr/bin/env bash
# GoRL-PPO (default K=2, boundary at 2/3 of the budget) vs its Gaussian twin (--num-stages 1),
# paired seeds, at CPU scale. Two runs at a time (one per core), one torch thread each.
# Usage: bash benchmarks/ppo_twin.sh [OUT_DIR] [TASKS...]   (results: OUT_DIR/runs/*/eval.csv)
# The code is copied to OUT_DIR/code first, so editing the repo does not change queued runs.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(realpath -m "${1:-$REPO/benchmarks/results/ppo_twin}")"
shift || true
TASKS=("$@")
[ ${#TASKS[@]} -eq 0 ] && TASKS=("cheetah-run 1500000" "walker-walk 1500000" "hopper-stand 2000000")
mkdir -p "$OUT/code"
if [ -z "${REUSE_CODE:-}" ] || [ ! -f "$OUT/code/gorl_ppo.py" ]; then  # REUSE_CODE=1 keeps the frozen copy
  cp "$REPO/gorl_ppo.py" "$REPO/common.py" "$OUT/code/"
  (cd "$REPO" && git rev-parse HEAD > "$OUT/code/COMMIT" 2>/dev/null || true)
fi
ROOT="$OUT/code"
cd "$OUT"
jobs=()
for env_steps in "${TASKS[@]}"; do
  set -- $env_steps
  for seed in 1 2; do
    for stages in 2 1; do
      jobs+=("$1 $2 $seed $stages")
    done
  done
done
printf '%s\n' "${jobs[@]}" | xargs -P 2 -L 1 bash -c '
  env_id=$0; steps=$1; seed=$2; stages=$3
  log="'"$OUT"'/${env_id}__K${stages}__${seed}.log"
  [ -f "$log" ] && grep -q "final deterministic return" "$log" && exit 0
  echo "python gorl_ppo.py --env-id $env_id --total-timesteps $steps --seed $seed --num-stages $stages" > "$log"
  GORL_NO_PROGRESS=1 python "'"$ROOT"'/gorl_ppo.py" --env-id "$env_id" --total-timesteps "$steps" \
    --seed "$seed" --num-stages "$stages" --exp-name twin >> "$log" 2>&1
'
