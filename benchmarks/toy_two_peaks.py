"""Two toys whose reward has two equal, separated peaks in a 2-D action space.

    python gorl_ppo.py --env-id benchmarks.toy_two_peaks:TwoPeaks-v0 ...
    python gorl_ppo.py --env-id benchmarks.toy_two_peaks:TwoPeaksRepeat-v0 ...

TwoPeaks-v0 (one step; one peak earns as much as two):

Every episode is one step from the same observation. The reward is the sum of two Gaussian bumps of
height 1 and width 0.2 centred at (0.6, 0.6) and (-0.6, -0.6), so a policy earns the most by putting
its mass on the peaks; a single Gaussian must pick one peak or spread over the empty diagonal between
them, while a policy that can be bimodal can cover both. The multimodality study runs the scripts on
it (benchmarks/results/STUDIES.md).

TwoPeaksRepeat-v0 (where covering both peaks pays): HORIZON steps per episode, and a peak's bump is
worth DECAY^n, n its (soft) count of earlier hits in the episode, so hitting the same peak again earns
less and less. The observation is the same at every step, (1, 0): it shows neither which peak was
hit nor the time (with the time observed, a deterministic policy could alternate peaks by the clock's
parity and earn 3.75, which is what a first version of this toy taught a Gaussian policy). So every
deterministic policy plays one action all episode and earns at most about 2 (1 + 1/2 + 1/4 + ...,
one peak), while one that picks either peak at random with probability 1/2 earns about 3.6 (both by
`expected_return`). A Gaussian cannot do the latter; a bimodal policy can.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

PEAKS = np.array([[0.6, 0.6], [-0.6, -0.6]], np.float32)
WIDTH = 0.2


def bumps(action: np.ndarray) -> np.ndarray:
    """Each peak's Gaussian bump at the action, shape (2,)."""
    d2 = ((np.asarray(action, np.float32)[None] - PEAKS) ** 2).sum(-1)
    return np.exp(-d2 / (2 * WIDTH**2))


def reward(action: np.ndarray) -> float:
    """TwoPeaks-v0's reward: both bumps summed."""
    return float(bumps(action).sum())


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


HORIZON, DECAY = 8, 0.5


def expected_return(p_first: float, episodes: int = 20_000, seed: int = 0) -> float:
    """Mean TwoPeaksRepeat-v0 return of the policy that plays exactly peak 0 with probability p_first,
    else exactly peak 1, at every step (Monte Carlo)."""
    rng, total = np.random.default_rng(seed), 0.0
    for _ in range(episodes):
        env = TwoPeaksRepeat()
        env.reset()
        for _ in range(HORIZON):
            total += env.step(PEAKS[0] if rng.random() < p_first else PEAKS[1])[1]
    return total / episodes


class TwoPeaksRepeat(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, render_mode=None):
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.hits = 0, np.zeros(2)
        return np.array([1.0, 0.0], np.float32), {}

    def step(self, action):
        b = bumps(action)
        reward = float((b * DECAY**self.hits).sum())
        self.hits += b  # a near miss counts partly, so the reward stays smooth in the action
        self.t += 1
        # The episode really ends after HORIZON steps (a termination), though the unchanged observation
        # gives the critics no warning: to them the end looks random.
        return np.array([1.0, 0.0], np.float32), reward, self.t == HORIZON, False, {}


gym.register("TwoPeaks-v0", entry_point=TwoPeaks)
gym.register("TwoPeaksRepeat-v0", entry_point=TwoPeaksRepeat)
