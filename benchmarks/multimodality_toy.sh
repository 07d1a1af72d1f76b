#!/usr/bin/env bash
# A toy of benchmarks/toy_two_peaks.py (TwoPeaks-v0, or TwoPeaksRepeat-v0 where covering both peaks pays):
# GoRL (K = 3, two decoder refits) and its Gaussian twin, with both scripts; then each final policy's
# stochastic return (200 episodes) and the actions it samples at the first state. One run at a time.
# Usage: bash benchmarks/multimodality_toy.sh [TOY [OUT_DIR]]
#   (defaults TwoPeaks-v0, benchmarks/results/multimodality; runs/ and logs/ get a folder per toy)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
TOY="${1:-TwoPeaks-v0}"
OUT="$(realpath -m "${2:-$REPO/benchmarks/results/multimodality}")"
PY="${PYTHON:-python}"
case "$TOY" in
  TwoPeaks-v0) SLUG=toy_two_peaks ;;
  TwoPeaksRepeat-v0) SLUG=toy_two_peaks_repeat ;;
  *) echo "error: unknown toy '$TOY'; choose TwoPeaks-v0 or TwoPeaksRepeat-v0" >&2; exit 2 ;;
esac
ENV_ID="benchmarks.toy_two_peaks:$TOY"
RUNS="$OUT/runs/$SLUG" LOGS="$OUT/logs/$SLUG"
mkdir -p "$RUNS" "$LOGS"
cd "$REPO"
run() {  # name script flags...: skipped when the run finished before
  local name=$1 script=$2
  shift 2
  if ! { [ -f "$RUNS/$name/eval.csv" ] && grep -q ",final$" "$RUNS/$name/eval.csv"; }; then
    rm -rf "$RUNS/$name"
    echo "$PY $script --env-id $ENV_ID --seed 1 --run-dir $RUNS/$name $*" > "$LOGS/$name.log"
    GORL_NO_PROGRESS=1 "$PY" "$script" --env-id "$ENV_ID" --seed 1 --run-dir "$RUNS/$name" "$@" >> "$LOGS/$name.log" 2>&1
  fi
  # The deterministic evaluation plays one action per state; a mixture over peaks shows only in samples.
  "$PY" "$script" --eval-only --eval-stochastic --eval-episodes 200 --checkpoint "$RUNS/$name/checkpoint.pt" \
    > "$LOGS/$name.stochastic_eval.log" 2>&1
}
run ppo_gorl gorl_ppo.py --total-timesteps 300000 --num-stages 3 --eval-interval 20000
run ppo_twin gorl_ppo.py --total-timesteps 300000 --num-stages 1 --eval-interval 20000
run sac_gorl gorl_sac.py --total-timesteps 30000 --num-stages 3 --learning-starts 1000 --eval-interval 2000 --decoder-data-steps 5000
run sac_twin gorl_sac.py --total-timesteps 30000 --num-stages 1 --learning-starts 1000 --eval-interval 2000
"$PY" benchmarks/multimodality.py sample --steps 0 --samples 2000 --out "$OUT/$SLUG.csv" \
  --checkpoints "$RUNS"/{ppo_gorl,ppo_twin,sac_gorl,sac_twin}/checkpoint.pt \
  --labels "GoRL-PPO K=3" "PPO twin K=1" "GoRL-SAC K=3" "SAC twin K=1"
"$PY" benchmarks/multimodality.py plot "$OUT/$SLUG.csv"
