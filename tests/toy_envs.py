"""Tiny gymnasium envs for the lifecycle tests, registered on import (`--env-id tests.toy_envs:Toy-v0`).

Pure numpy, rendering included, so the tests need neither a simulator nor GL."""

import gymnasium as gym
import numpy as np


class Toy(gym.Env):
    """Reach a random target: obs (target, step fraction), reward -|a - target|^2, 20-step episodes
    (truncated). With nan_after, every reward from that many steps of this instance on is NaN."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, nan_after=None, render_mode=None):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.render_mode = render_mode
        self.nan_after, self.steps_taken = nan_after, 0

    def _obs(self):
        return np.array([*self.target, self.t / 20.0], np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.target, self.t = self.np_random.uniform(-0.8, 0.8, 2), 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        self.steps_taken += 1
        reward = -float(np.sum((np.asarray(action) - self.target) ** 2))
        if self.nan_after is not None and self.steps_taken >= self.nan_after:
            reward = float("nan")
        return self._obs(), reward, False, self.t >= 20, {}

    def render(self):
        frame = np.zeros((32, 32, 3), np.uint8)
        x, y = ((self.target + 1.0) * 15.5).astype(int)
        frame[y, x] = 255
        return frame


gym.register("Toy-v0", entry_point=Toy)
gym.register("ToyNaN-v0", entry_point=Toy, kwargs={"nan_after": 150})
