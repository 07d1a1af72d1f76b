"""Throughput of gorl_ppo.py against the raw simulator rate, measured in the same process.

    python benchmarks/throughput_ppo.py [--env-id hopper-stand] [--total-timesteps 2000000] [gorl_ppo flags]

1. raw env rate: the same vector env gorl_ppo.py uses (envpool backend, --num-envs envs), random
   actions, no policy; 2. a whole gorl_ppo.py training run with default settings (decoder refit and
   evaluations included) in a subprocess; prints both rates and their ratio as one CSV line.
"""

import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--env-id", default="hopper-stand")
parser.add_argument("--num-envs", type=int, default=64, help="gorl_ppo.py's default")
parser.add_argument("--total-timesteps", type=int, default=2_000_000, help="gorl_ppo.py's default")
parser.add_argument("--raw-steps", type=int, default=200_000)
parser.add_argument("--env-threads", type=int, default=2, help="envpool threads (gorl_ppo.py's default), for the raw rate and the training run")
cli, extra = parser.parse_known_args()  # unknown flags are passed on to gorl_ppo.py

envs = common.make_vector_env(cli.env_id, cli.num_envs, seed=0, threads=cli.env_threads)
envs.reset(seed=0)
actions = np.random.default_rng(0).uniform(-1, 1, (64, cli.num_envs, envs.single_action_space.shape[0]))
start, steps = time.time(), 0
while steps < cli.raw_steps:
    envs.step(actions[(steps // cli.num_envs) % 64].astype(np.float32))
    steps += cli.num_envs
raw_rate = steps / (time.time() - start)
envs.close()

cmd = [sys.executable, os.path.join(ROOT, "gorl_ppo.py"), "--env-id", cli.env_id,
       "--total-timesteps", str(cli.total_timesteps), "--exp-name", "throughput", "--env-threads", str(cli.env_threads),
       *extra]
start = time.time()
out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, GORL_NO_PROGRESS="1"))
wall = time.time() - start
match = re.search(r"(\d+) env steps in (\d+)s \((\d+) steps/s", out.stdout)
if out.returncode != 0 or match is None:
    sys.exit(f"training run failed:\n{out.stderr[-2000:]}")
train_rate = int(match.group(3))
print("env_id,num_envs,raw_env_steps_per_s,training_env_steps_per_s,ratio,training_env_steps,wall_s,command")
print(f"{cli.env_id},{cli.num_envs},{raw_rate:.0f},{train_rate},{train_rate / raw_rate:.3f},{match.group(1)},"
      f"{wall:.0f},python gorl_ppo.py {' '.join(cmd[2:])}")
