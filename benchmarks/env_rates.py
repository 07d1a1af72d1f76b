"""Raw simulator step rates of the env paths common.py can use (random actions, no policy).

    python benchmarks/env_rates.py [--seconds 3] > benchmarks/results/env_rates.csv

Measures, per task: dm_control's own suite env, the hand-written DMCEnv wrapper, 8 of them in
gymnasium's SyncVectorEnv and AsyncVectorEnv (one subprocess per env), and envpool with 64 envs
in 1 and 2 threads. Run it on an otherwise idle machine.
"""

import argparse
import os
import sys
import time

import gymnasium as gym
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def rate(step, batch: int, seconds: float) -> float:
    step()  # warm-up
    start, steps = time.time(), 0
    while time.time() - start < seconds:
        step()
        steps += batch
    return steps / (time.time() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--tasks", nargs="+", default=["hopper-stand", "cheetah-run", "walker-walk"])
    cli = parser.parse_args()
    rng = np.random.default_rng(0)
    print("task,path,envs,steps_per_s")
    for task in cli.tasks:
        domain, name = common.resolve_env_id(task)[1]
        from dm_control import suite

        raw = suite.load(domain, name, task_kwargs={"random": 0})
        raw.reset()
        act_dim = raw.action_spec().shape[0]
        a1 = rng.uniform(-1, 1, act_dim).astype(np.float32)

        def raw_step():
            if raw.step(a1).last():
                raw.reset()

        print(f"{task},dm_control suite,1,{rate(raw_step, 1, cli.seconds):.0f}", flush=True)
        env = common.make_env(task, 0)()

        def wrapper_step():
            _, _, terminated, truncated, _ = env.step(a1)
            if terminated or truncated:
                env.reset()

        print(f"{task},DMCEnv wrapper,1,{rate(wrapper_step, 1, cli.seconds):.0f}", flush=True)
        for label, cls in (("gymnasium SyncVectorEnv", gym.vector.SyncVectorEnv),
                           ("gymnasium AsyncVectorEnv", gym.vector.AsyncVectorEnv)):
            venv = cls([common.make_env(task, i) for i in range(8)])
            venv.reset(seed=0)
            a8 = rng.uniform(-1, 1, (8, act_dim)).astype(np.float32)
            print(f"{task},{label},8,{rate(lambda: venv.step(a8), 8, cli.seconds):.0f}", flush=True)
            venv.close()
        for threads in (1, 2):
            pool = common.make_vector_env(task, 64, 0, backend="envpool", threads=threads)
            pool.reset()
            a64 = rng.uniform(-1, 1, (64, act_dim)).astype(np.float32)
            print(f"{task},envpool {threads} thread(s),64,{rate(lambda: pool.step(a64), 64, cli.seconds):.0f}",
                  flush=True)
            pool.close()


if __name__ == "__main__":
    main()
