#!/usr/bin/env bash
# Learning check of --num-steps 64 (rollout 64 envs x 64 steps = 4096 transitions, 4 minibatches of 1024),
# paired with the --num-steps 32 runs in ../ppo_twin (same seeds, same budgets). One run at a time,
# one envpool thread (a SAC run shared the machine). Usage: bash benchmarks/results/ppo_ns64/run.sh
set -u
cd "$(dirname "$0")"
# The queue also held the K = 2 runs; it was stopped after these four (NOTE.md).
for job in "cheetah-run 1 1" "walker-walk 1 1" "cheetah-run 2 1" "walker-walk 2 1"; do
  set -- $job
  name="$1__K$3__$2"
  [ -f "runs/$name/eval.csv" ] && grep -q final "runs/$name/eval.csv" && continue
  rm -rf "runs/$name"
  GORL_NO_PROGRESS=1 /tmp/venv/bin/python code/gorl_ppo.py --env-id "$1" --seed "$2" --num-stages "$3" \
    --total-timesteps 1500000 --num-steps 64 --env-threads 1 --exp-name ns64 --run-dir "runs/$name" > "logs/$name.log" 2>&1
done
