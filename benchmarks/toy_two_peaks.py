"""TwoPeaks-v0: a one-step bandit whose reward has two equal, separated peaks in a 2-D action space.

    python gorl_ppo.py --env-id benchmarks.toy_two_peaks:TwoPeaks-v0 ...

Every episode is one step from the same observation. The reward is the sum of two Gaussian bumps of
height 1 and width 0.2 centred at (0.6, 0.6) and (-0.6, -0.6), so a policy earns the most by putting
its mass on the peaks; a single Gaussian must pick one peak or spread over the empty diagonal between
them, while a policy that can be bimodal can cover both. Used by benchmarks/multimodality.py.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

PEAKS = np.array([[0.6, 0.6], [-0.6, -0.6]], np.float32)
WIDTH = 0.2


def reward(action: np.ndarray) -> float:
    d2 = ((np.asarray(action, np.float32)[None] - PEAKS) ** 2).sum(-1)
    return float(np.exp(-d2 / (2 * WIDTH**2)).sum())


class TwoPeaks(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, render_mode=None):  # no rendering; the argument is accepted for the env factory
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.array([1.0, 0.0], np.float32), {}

    def step(self, action):
        return np.array([1.0, 0.0], np.float32), reward(action), True, False, {}


gym.register("TwoPeaks-v0", entry_point=TwoPeaks)
