#!/usr/bin/env bash
# GoRL-PPO (default K=2, boundary at 2/3 of the budget) vs its Gaussian twin (--num-stages 1),
# paired seeds, at CPU scale. Two runs at a time (one per core), one torch thread each.
# Usage: bash benchmarks/ppo_twin.sh [OUT_DIR]   (results: OUT_DIR/runs/*/eval.csv)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/benchmarks/results/ppo_twin}"
mkdir -p "$OUT"
cd "$OUT"
jobs=()
for env_steps in "hopper-stand 2000000" "cheetah-run 1500000" "walker-walk 1500000"; do
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
