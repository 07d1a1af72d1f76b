"""Do envpool's C++ tasks behave like dm_control's Python suite? Random actions on both backends
(same number of episodes, each backend's own reset randomness), per task: mean episode return, the
fraction of episodes with any reward, and the spread of every observation dimension. Differences
beyond seed noise mean the two backends are not the same task.

    python benchmarks/backend_parity.py --tasks finger-spin cheetah-run --episodes 96
"""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


@dataclass
class Args:
    tasks: tuple[str, ...] = ("cheetah-run", "finger-spin", "finger-turn_hard", "fish-swim", "hopper-stand",
                              "walker-walk")
    """dm_control tasks to compare"""
    episodes: int = 96
    """random-action episodes per task and backend (a multiple of --num-envs)"""
    num_envs: int = 16
    """envs stepped together"""
    seed: int = 1
    """seed of the envs and of the random actions"""
    out: str = "benchmarks/results/backend_parity.csv"
    """CSV written here"""


def rollout(task: str, backend: str, args: Args) -> tuple[np.ndarray, np.ndarray]:
    """Returns of --episodes random-action episodes and the observations seen, (N, obs_dim)."""
    envs = common.make_vector_env(task, args.num_envs, args.seed, backend, 1)
    rng = np.random.default_rng(args.seed)
    obs, _ = envs.reset(seed=args.seed)
    returns, running, seen = [], np.zeros(args.num_envs), []
    low, high = envs.single_action_space.low, envs.single_action_space.high
    while len(returns) < args.episodes:
        action = rng.uniform(low, high, (args.num_envs, len(low))).astype(np.float32)
        obs, reward, terminated, truncated, _ = envs.step(action)
        running += reward
        seen.append(obs.copy())
        for i in np.flatnonzero(terminated | truncated):
            returns.append(running[i])
            running[i] = 0.0
    envs.close()
    return np.asarray(returns[: args.episodes]), np.concatenate(seen)


def main(args: Args) -> None:
    rows = []
    for task in args.tasks:
        stats = {}
        for backend in ("envpool", "dm_control"):
            start = time.time()
            returns, obs = rollout(task, backend, args)
            stats[backend] = (returns, obs.std(0))
            rows.append({"task": task, "backend": backend, "episodes": len(returns),
                         "return_mean": f"{returns.mean():.4f}", "return_sem": f"{returns.std() / np.sqrt(len(returns)):.4f}",
                         "frac_rewarded": f"{(returns > 0).mean():.4f}",
                         "obs_std": " ".join(f"{x:.3f}" for x in obs.std(0)), "seconds": f"{time.time() - start:.1f}"})
            print(f"{task:17s} {backend:10s} return {returns.mean():8.3f} +- {returns.std() / np.sqrt(len(returns)):.3f} "
                  f"(sem), rewarded {(returns > 0).mean():.3f}", flush=True)
        ratio = stats["envpool"][1] / np.maximum(stats["dm_control"][1], 1e-8)
        print(f"{task:17s} obs std envpool/dm_control per dim: {' '.join(f'{r:.2f}' for r in ratio)}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main(tyro.cli(Args))
