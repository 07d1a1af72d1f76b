#!/usr/bin/env bash
# The TwoPeaks-v0 toy (benchmarks/toy_two_peaks.py): GoRL (K = 3, two decoder refits) and its Gaussian
# twin, with both scripts, then the actions each final policy samples. One run at a time.
# Usage: bash benchmarks/multimodality_toy.sh [OUT_DIR]   (default benchmarks/results/multimodality)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(realpath -m "${1:-$REPO/benchmarks/results/multimodality}")"
PY="${PYTHON:-python}"
ENV_ID="benchmarks.toy_two_peaks:TwoPeaks-v0"
mkdir -p "$OUT/runs" "$OUT/logs"
cd "$REPO"
run() {  # name script flags...: skipped when the run finished before
  local name=$1 script=$2
  shift 2
  [ -f "$OUT/runs/$name/eval.csv" ] && grep -q ",final$" "$OUT/runs/$name/eval.csv" && return 0
  rm -rf "$OUT/runs/$name"
  echo "$PY $script --env-id $ENV_ID --seed 1 --run-dir $OUT/runs/$name $*" > "$OUT/logs/$name.log"
  GORL_NO_PROGRESS=1 "$PY" "$script" --env-id "$ENV_ID" --seed 1 --run-dir "$OUT/runs/$name" "$@" >> "$OUT/logs/$name.log" 2>&1
}
run ppo_gorl gorl_ppo.py --total-timesteps 300000 --num-stages 3 --eval-interval 20000
run ppo_twin gorl_ppo.py --total-timesteps 300000 --num-stages 1 --eval-interval 20000
run sac_gorl gorl_sac.py --total-timesteps 30000 --num-stages 3 --learning-starts 1000 --eval-interval 2000 --decoder-data-steps 5000
run sac_twin gorl_sac.py --total-timesteps 30000 --num-stages 1 --learning-starts 1000 --eval-interval 2000
"$PY" benchmarks/multimodality.py sample --steps 0 --samples 2000 --out "$OUT/toy_two_peaks.csv" \
  --checkpoints "$OUT"/runs/{ppo_gorl,ppo_twin,sac_gorl,sac_twin}/checkpoint.pt \
  --labels "GoRL-PPO K=3" "PPO twin K=1" "GoRL-SAC K=3" "SAC twin K=1"
"$PY" benchmarks/multimodality.py plot "$OUT/toy_two_peaks.csv"
