"""Small utilities shared by gorl_ppo.py and gorl_sac.py.

Only plumbing lives here (environments, evaluation, logging, checkpoints, observation
statistics). Everything that is part of the GoRL algorithm is written out in each script so that
each script reads on its own next to the paper.
"""

from __future__ import annotations

import csv
import difflib
import importlib
import os
import random
import re
import signal
import sys
import time
from typing import Callable

import gymnasium as gym
import numpy as np
import torch

if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    # Headless: pick a renderer that exists, so dm_control does not try (and warn about) GLFW.
    import ctypes.util

    os.environ["MUJOCO_GL"] = next(
        (gl for gl, lib in (("egl", "EGL"), ("osmesa", "OSMesa")) if ctypes.util.find_library(lib)), "disable"
    )

# ----------------------------------------------------------------------------------------------
# Errors for bad input: one line on stderr, non-zero exit, no traceback.
# ----------------------------------------------------------------------------------------------


class UsageError(ValueError):
    """A bad argument or file given by the user; printed as one line by `exit_on_usage_error`."""


def exit_on_usage_error(err: UsageError) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------------------------


def _dmc_tasks() -> list[tuple[str, str]]:
    from dm_control import suite

    return list(suite.ALL_TASKS)


def resolve_env_id(env_id: str) -> tuple[str, str | tuple[str, str]]:
    """Map a user env id to ("dmc", (domain, task)) or ("gym", gym_id).

    Accepted: short dm_control ids `domain-task` (`hopper-stand`, `ball_in_cup-catch`),
    shimmy-style ids `dm_control/domain-task-v0`, any registered gymnasium id, and
    `module:EnvId-v0` (gymnasium's form for an env registered when `module` is imported).
    """
    if ":" in env_id:  # gymnasium's "module:EnvId-v0": import the module that registers the env
        module, name = env_id.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UsageError(f"--env-id {env_id!r}: cannot import module {module!r} ({err})") from None
        if name not in gym.registry:
            raise UsageError(f"--env-id {env_id!r}: importing {module!r} did not register {name!r}")
        return "gym", name
    if env_id in gym.registry:  # checked first: gymnasium ids need no dm_control import
        return "gym", env_id
    tasks = _dmc_tasks()
    name = env_id
    if name.startswith("dm_control/"):
        name = name[len("dm_control/") :]
        if name.endswith("-v0"):
            name = name[: -len("-v0")]
    if "-" in name:
        domain, task = name.split("-", 1)
        if (domain, task) in tasks:
            return "dmc", (domain, task)
    known = [f"{d}-{t}" for d, t in tasks] + [k for k in gym.registry if "/" not in k]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UsageError(
        f"unknown --env-id {env_id!r}: use a dm_control 'domain-task' id (e.g. hopper-stand), "
        f"'dm_control/domain-task-v0', or a registered gymnasium id{hint}"
    )


class DMCEnv(gym.Env):
    """A dm_control suite task as a gymnasium env, written by hand because it runs at the raw
    simulator rate (shimmy's wrapper costs ~25% and needs explicit registration in gymnasium 1.x).

    Observations are the task's observation dict flattened to float32. The time limit is reported
    as truncation; `terminated` is True only when dm_control signals a terminal state (discount 0).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(self, domain: str, task: str, seed: int | None = None, render_size: int = 240):
        from dm_control import suite

        self._env = suite.load(domain, task, task_kwargs={"random": seed})
        spec = self._env.action_spec()
        obs_dim = sum(int(np.prod(v.shape)) for v in self._env.observation_spec().values())
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(
            spec.minimum.astype(np.float32), spec.maximum.astype(np.float32), dtype=np.float32
        )
        self.render_mode = "rgb_array"
        self._render_size = render_size

    def observation_spec_keys(self):
        return self._env.observation_spec().keys()

    @staticmethod
    def _flat(observation) -> np.ndarray:
        return np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in observation.values()])

    def reset(self, *, seed: int | None = None, options=None):
        if seed is not None:
            self._env.task.random.seed(seed)
        timestep = self._env.reset()
        return self._flat(timestep.observation), {}

    def step(self, action):
        timestep = self._env.step(action)
        last = timestep.last()
        terminated = bool(last and timestep.discount == 0.0)
        truncated = bool(last and not terminated)
        return self._flat(timestep.observation), float(timestep.reward or 0.0), terminated, truncated, {}

    def render(self):
        return self._env.physics.render(self._render_size, self._render_size, camera_id=0)


def make_env(env_id: str, seed: int) -> Callable[[], gym.Env]:
    """Thunk for one environment whose action space is Box(-1, 1): the policy's tanh output is
    mapped affinely onto the env's own bounds."""
    kind, spec = resolve_env_id(env_id)

    def thunk() -> gym.Env:
        if kind == "dmc":
            env: gym.Env = DMCEnv(*spec, seed=seed)
        else:
            env = gym.make(spec, render_mode="rgb_array")
            if not isinstance(env.action_space, gym.spaces.Box):
                raise UsageError(
                    f"--env-id {env_id!r} has a {type(env.action_space).__name__} action space; "
                    "GoRL needs a continuous (Box) action space"
                )
            env = gym.wrappers.FlattenObservation(env)
            env = gym.wrappers.DtypeObservation(env, np.float32)
        low, high = env.action_space.low, env.action_space.high
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise UsageError(f"--env-id {env_id!r} has unbounded actions; GoRL needs finite Box bounds")
        if not (np.all(low == -1.0) and np.all(high == 1.0)):
            env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
        env.reset(seed=seed)
        env.action_space.seed(seed)
        return env

    return thunk


ENV_BACKENDS = ("auto", "envpool", "dm_control")
# envpool's C++ finger differs from dm_control's (benchmarks/backend_parity.py: the spinner's hinge
# velocity spreads 0.65-0.74x as wide, random finger-spin pays 0.06 vs 0.50), so `auto` avoids it.
ENVPOOL_MISMATCHED_DOMAINS = ("finger",)


def envpool_task_id(env_id: str) -> str | None:
    """envpool's name for a dm_control task (`finger-turn_hard` -> `FingerTurnHard-v1`), or None
    when the id is not a dm_control task or envpool does not implement it."""
    kind, spec = resolve_env_id(env_id)
    if kind != "dmc":
        return None
    import envpool

    name = "".join(part.capitalize() for part in "_".join(spec).split("_")) + "-v1"
    return name if name in envpool.list_all_envs() else None


def resolve_backend(env_id: str, backend: str) -> str:
    if backend not in ENV_BACKENDS:
        raise UsageError(f"unknown --env-backend {backend!r}; allowed: {', '.join(ENV_BACKENDS)}")
    has_envpool = envpool_task_id(env_id) is not None
    if backend == "envpool" and not has_envpool:
        raise UsageError(f"--env-backend envpool does not implement {env_id!r}; use --env-backend dm_control")
    if backend == "auto":
        if not has_envpool:
            return "dm_control"
        domain = resolve_env_id(env_id)[1][0]  # has_envpool implies a dm_control (domain, task)
        return "dm_control" if domain in ENVPOOL_MISMATCHED_DOMAINS else "envpool"
    return backend


class EpisodeLog:
    """Enough to rebuild every env's exact state: how often each env was reset, and the actions it
    took since its last reset (at most one episode). Reset randomness comes from each env's own
    RNG, which advances once per reset, so replaying the resets and then the actions into freshly
    built envs reproduces the simulator state bit for bit. This is how --resume continues episodes
    mid-way: envpool cannot save its state, and pickling MuJoCo is not portable."""

    def __init__(self, num_envs: int):
        self.resets = np.zeros(num_envs, np.int64)
        self.start = np.zeros(num_envs, np.int64)  # index into history where env i's episode began
        self.history: list[np.ndarray] = []  # one (num_envs, act_dim) array per vector step

    def on_reset(self, ids) -> None:
        self.resets[ids] += 1
        self.start[ids] = len(self.history)
        drop = int(self.start.min())  # steps no running episode needs any more
        if drop:
            del self.history[:drop]
            self.start -= drop

    def on_step(self, actions: np.ndarray) -> None:
        self.history.append(np.array(actions, copy=True))

    def state_dict(self) -> dict:
        return {"resets": self.resets.copy(), "start": self.start.copy(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.resets[:], self.start[:], self.history = state["resets"], state["start"], list(state["history"])

    @staticmethod
    def replay_plan(state: dict):
        """Yields ('reset', ids) and then ('step', ids, actions (len(ids), act_dim)) in replay order."""
        resets, start, history = state["resets"], state["start"], state["history"]
        for k in range(1, int(resets.max())):
            yield "reset", np.flatnonzero(resets > k)
        for j in range(int(start.min()), len(history)):
            ids = np.flatnonzero(start <= j)
            yield "step", ids, history[j][ids]


class EnvPoolVectorEnv:
    """envpool's C++ implementation of a dm_control task (2-3x the step rate of the Python suite
    here, README "Why these choices"), presented like gymnasium's SyncVectorEnv in SAME_STEP
    autoreset mode: a finished episode's last observation is in infos["final_obs"] and the
    returned observation is already the next episode's first one."""

    def __init__(self, env_id: str, num_envs: int, seed: int, num_threads: int = 1):
        import envpool

        domain, task = resolve_env_id(env_id)[1]
        self.num_envs = num_envs
        self._pool = envpool.make_gymnasium(
            envpool_task_id(env_id), num_envs=num_envs, seed=seed, num_threads=num_threads
        )
        # Flatten the observation dict in dm_control's own key order, as DMCEnv does.
        self._keys = list(DMCEnv(domain, task).observation_spec_keys())
        obs_dim = sum(int(np.prod(self._pool.observation_space[k].shape)) for k in self._keys)
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, self._pool.action_space.shape, np.float32)
        self.episode_log = EpisodeLog(num_envs)

    def _flat(self, obs: dict) -> np.ndarray:
        n = len(obs[self._keys[0]])
        return np.concatenate([np.asarray(obs[k], np.float32).reshape(n, -1) for k in self._keys], axis=1)

    def reset(self, seed: int | None = None):
        # envpool seeds env i with `seed + i` at construction; `seed` here is accepted for API parity.
        obs, _ = self._pool.reset()
        self.episode_log = EpisodeLog(self.num_envs)
        self.episode_log.on_reset(np.arange(self.num_envs))
        return self._flat(obs), {}

    def step(self, actions: np.ndarray):
        self.episode_log.on_step(actions)
        obs, reward, terminated, truncated, _ = self._pool.step(np.asarray(actions, np.float64))
        obs = self._flat(obs)
        infos: dict = {}
        done = np.logical_or(terminated, truncated)
        if done.any():
            ids = np.flatnonzero(done).astype(np.int32)
            infos["final_obs"] = np.where(done[:, None], obs, 0.0)  # rows of finished envs only
            infos["_final_obs"] = done
            first_obs, _ = self._pool.reset(ids)
            obs[ids] = self._flat(first_obs)
            self.episode_log.on_reset(ids)
        return obs, reward.astype(np.float64), terminated.astype(bool), truncated.astype(bool), infos

    def state_dict(self) -> dict:
        return self.episode_log.state_dict()

    def load_state_dict(self, state: dict) -> np.ndarray:
        """Bring freshly built envs to the saved state (EpisodeLog); returns the current observations."""
        obs, _ = self.reset()
        for kind, ids, *actions in EpisodeLog.replay_plan(state):
            ids = ids.astype(np.int32)
            if kind == "reset":
                new, _ = self._pool.reset(ids)
            else:
                new, *_ = self._pool.step(np.asarray(actions[0], np.float64), ids)
            obs[ids] = self._flat(new)
        self.episode_log.load_state_dict(state)
        return obs

    def close(self) -> None:
        self._pool.close()


class SyncVectorEnv(gym.vector.SyncVectorEnv):
    """gymnasium's SyncVectorEnv in SAME_STEP mode, with infos["final_obs"] as a dense
    (num_envs, obs_dim) float32 array like EnvPoolVectorEnv's (gymnasium gives an object array)."""

    def __init__(self, env_fns):
        super().__init__(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        self.episode_log = EpisodeLog(self.num_envs)
        self._seed = None

    def reset(self, *, seed=None, options=None):
        self._seed = seed
        self.episode_log = EpisodeLog(self.num_envs)
        self.episode_log.on_reset(np.arange(self.num_envs))
        return super().reset(seed=seed, options=options)

    def step(self, actions):
        self.episode_log.on_step(actions)
        obs, reward, terminated, truncated, infos = super().step(actions)
        if "final_obs" in infos:
            done = infos["_final_obs"]
            dense = np.zeros_like(obs)
            dense[done] = np.stack(infos["final_obs"][done])
            infos["final_obs"] = dense
            self.episode_log.on_reset(np.flatnonzero(done))
        return obs, reward, terminated, truncated, infos

    def state_dict(self) -> dict:
        return {**self.episode_log.state_dict(), "seed": self._seed}

    def load_state_dict(self, state: dict) -> np.ndarray:
        """Bring freshly built envs to the saved state (EpisodeLog); returns the current observations."""
        obs, _ = self.reset(seed=state["seed"])
        obs = np.array(obs)
        for kind, ids, *actions in EpisodeLog.replay_plan(state):
            for n, i in enumerate(ids):
                obs[i] = self.envs[i].reset()[0] if kind == "reset" else self.envs[i].step(actions[0][n])[0]
        self.episode_log.load_state_dict(state)
        return obs


def make_vector_env(env_id: str, num_envs: int, seed: int, backend: str = "auto", threads: int = 1):
    """`num_envs` envs stepped in this process, with SAME_STEP autoreset semantics (the true last
    observation of a finished episode is in infos["final_obs"], which the value bootstrap needs).
    dm_control tasks run on envpool where it has them; everything else on gymnasium's
    SyncVectorEnv, which beat AsyncVectorEnv at every size on 2 cores (README). `threads` is the
    number of simulator threads of the envpool backend."""
    if resolve_backend(env_id, backend) == "envpool":
        return EnvPoolVectorEnv(env_id, num_envs, seed, threads)
    return SyncVectorEnv([make_env(env_id, seed + i) for i in range(num_envs)])


# ----------------------------------------------------------------------------------------------
# Observation statistics
# ----------------------------------------------------------------------------------------------


class RunningMeanStd:
    """Exact running mean/variance over all observations seen (parallel Chan et al. update)."""

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 0.0
        self.clip, self.eps = clip, eps

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, *self.mean.shape)
        batch_mean, batch_var, n = x.mean(0), x.var(0), x.shape[0]
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean = self.mean + delta * n / total
        self.var = m2 / total
        self.count = total

    def normalize(self, x: np.ndarray) -> np.ndarray:
        y = (x - self.mean) / np.sqrt(self.var + self.eps)
        return np.clip(y, -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict:
        return {"mean": self.mean.copy(), "var": self.var.copy(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"].copy(), state["var"].copy(), state["count"]

    def copy(self) -> "RunningMeanStd":
        other = RunningMeanStd(self.mean.shape, self.clip, self.eps)
        other.load_state_dict(self.state_dict())
        return other


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def evaluate(
    env_id: str,
    act: Callable[[np.ndarray], np.ndarray],
    num_episodes: int,
    seed: int,
    backend: str = "auto",
) -> np.ndarray:
    """The first episode of each of `num_episodes` fresh eval envs (env i seeded `seed + i`), all
    stepped as one batch so the policy and its decoder run batched. Fresh envs with fixed seeds
    make two calls with the same policy give identical returns, so evaluations just before and
    after a stage boundary are paired (spec section 7). `act` maps raw observations
    (B, obs_dim) to actions in [-1, 1] (B, act_dim) and must use frozen observation statistics.
    Returns the undiscounted episode returns, shape (num_episodes,)."""
    envs = make_vector_env(env_id, num_episodes, seed, backend)
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(num_episodes)
    active = np.ones(num_episodes, bool)
    while active.any():
        obs, reward, terminated, truncated, _ = envs.step(act(obs))
        returns += reward * active
        active &= ~(terminated | truncated)
    envs.close()
    return returns


def record_video(env_id: str, act: Callable[[np.ndarray], np.ndarray], seed: int, path: str) -> float:
    """Render one episode to an mp4 with dm_control's own simulator (envpool does not render).
    Needs a headless GL backend: MUJOCO_GL=egl or osmesa (README). Returns the episode return."""
    env = make_env(env_id, seed)()
    obs, _ = env.reset(seed=seed)
    frames, total, done = [], 0.0, False
    while not done:
        frames.append(env.render())
        obs, reward, terminated, truncated, _ = env.step(act(obs[None])[0])
        total += reward
        done = terminated or truncated
    write_video(path, frames)
    env.close()
    return total


def check_render(env_id: str) -> None:
    """Render one frame now, so a missing GL library fails before training with one line."""
    env = make_env(env_id, seed=0)()
    try:
        frame = env.render()
        if frame is None:
            raise RuntimeError("render() returned no frame")
    except Exception as err:
        raise UsageError(
            f"--capture-video: rendering {env_id!r} failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); install libegl1 (MUJOCO_GL=egl) "
            "or libosmesa6 (MUJOCO_GL=osmesa)") from None
    finally:
        env.close()


def write_video(path: str, frames: list[np.ndarray], fps: int = 50) -> None:
    import imageio.v2 as imageio

    os.makedirs(os.path.dirname(path), exist_ok=True)
    imageio.mimsave(path, frames, fps=fps, macro_block_size=1)


# ----------------------------------------------------------------------------------------------
# Run directory, logging, checkpoints
# ----------------------------------------------------------------------------------------------


def seed_everything(seed: int, torch_deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def rng_state() -> dict:
    """Every global RNG a run draws from, for checkpoints (resume continues the same random stream)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# episode_returns: every eval episode's return, space-separated in eval-env order (env i seeded
# seed + i), so per-episode analyses (success counts, rliable over episodes) need no rerun.
EVAL_COLUMNS = ["global_step", "stage", "return_mean", "return_std", "wall_time_s", "tag", "episode_returns"]


class RunLogger:
    """`run_dir/`: tensorboard events (mirrored to wandb with --track) and eval.csv.

    On resume, `resume` = {"global_step", "eval_rows", "wall_time_s"} from the checkpoint: eval.csv is
    cut back to the rows the checkpoint had seen and tensorboard drops the interrupted run's events
    after `global_step` (SummaryWriter's purge_step), so nothing is duplicated; wall time continues.
    """

    def __init__(self, run_dir: str, args, track: bool, project: str, entity: str | None,
                 resume: dict | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        os.makedirs(self.run_dir, exist_ok=True)
        self.csv_path = os.path.join(self.run_dir, "eval.csv")
        self.eval_rows = 0
        if resume is not None:
            self.eval_rows = resume["eval_rows"]
            with open(self.csv_path, newline="") as f:
                kept = f.readlines()[: 1 + self.eval_rows]
            with open(self.csv_path + ".tmp", "w", newline="") as f:
                f.writelines(kept)
            os.replace(self.csv_path + ".tmp", self.csv_path)
        self.wandb = None
        if track:
            self.wandb = _init_wandb(os.path.basename(os.path.normpath(run_dir)), args, project, entity, run_dir)
        # Events at the checkpoint's own step were logged before it was written, so purge from the next
        # step on. (A hard crash inside a decoder refit, after its boundary scalars were logged but before
        # the checkpoint that follows it, would leave those few scalars twice.)
        self.writer = SummaryWriter(self.run_dir, purge_step=resume["global_step"] + 1 if resume else None)
        if resume is None:
            self.writer.add_text(
                "hyperparameters",
                "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in sorted(vars(args).items())),
            )
        new = not os.path.exists(self.csv_path)
        self._csv_file = open(self.csv_path, "a", newline="")
        self._csv = csv.writer(self._csv_file, lineterminator="\n")
        if new:
            self._csv.writerow(EVAL_COLUMNS)
            self._csv_file.flush()
        self.start_time = time.time() - (resume["wall_time_s"] if resume else 0.0)

    def wall_time(self) -> float:
        """Seconds of training so far, across interruptions."""
        return time.time() - self.start_time

    def scalar(self, name: str, value: float, step: int) -> None:
        self.writer.add_scalar(name, float(value), step)

    def eval_row(self, global_step: int, stage: int, returns: np.ndarray, tag: str = "periodic") -> None:
        """tag: 'periodic', 'boundary_before', 'boundary_after' or 'final'."""
        self._csv.writerow([global_step, stage, f"{returns.mean():.4f}", f"{returns.std():.4f}",
                            f"{self.wall_time():.1f}", tag, " ".join(f"{r:.4f}" for r in returns)])
        self._csv_file.flush()
        self.eval_rows += 1

    def resume_state(self, global_step: int) -> dict:
        return {"global_step": global_step, "eval_rows": self.eval_rows, "wall_time_s": self.wall_time()}

    def close(self) -> None:
        self.writer.close()
        self._csv_file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(run_name, args, project, entity, run_dir):
    """wandb must never hang a run without network: a short init timeout, then offline mode."""
    import wandb

    # The run id is derived from the run name, so a resumed run continues the same wandb run.
    kwargs = dict(project=project, entity=entity, name=run_name, config=vars(args), dir=run_dir,
                  sync_tensorboard=True, save_code=True, id=re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[-64:],
                  resume="allow")
    try:
        return wandb.init(settings=wandb.Settings(init_timeout=30), **kwargs)
    except Exception as err:  # no network / no login: keep the run, log locally
        print(f"wandb online init failed ({type(err).__name__}); logging offline", file=sys.stderr)
        return wandb.init(mode="offline", **kwargs)


def save_checkpoint(path: str, payload: dict) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, script: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UsageError(f"checkpoint {path!r} is not readable ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or "script" not in payload:
        raise UsageError(f"checkpoint {path!r} is not a GoRL checkpoint")
    if payload["script"] != script:
        raise UsageError(f"checkpoint {path!r} was written by {payload['script']}.py, not {script}.py")
    return payload


def load_resume(run_dir: str, script: str) -> dict:
    """The checkpoint --resume continues from, with one-line errors for every way it can be wrong."""
    if not os.path.isdir(run_dir):
        raise UsageError(f"--resume {run_dir!r}: no such run directory")
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UsageError(f"--resume {run_dir!r}: it holds no checkpoint.pt (the run saved none)")
    ckpt = load_checkpoint(path, script)
    if ckpt.get("finished"):
        raise UsageError(f"--resume {run_dir!r}: the run already finished ({ckpt['global_step']} env steps)")
    return ckpt


class Interrupt:
    """Ctrl-C and SIGTERM. The first one only records the signal: the training loop finishes the
    current update, writes a checkpoint and exits with 128 + signal (130, 143). A second Ctrl-C
    aborts at once without saving."""

    def __init__(self):
        self.signum: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current update, then saving a checkpoint "
              "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exit(self, script: str, run_dir: str, global_step: int, checkpoint: str) -> None:
        """checkpoint: 'now' (just written), 'stage_end' (interrupted in a refit, which restarts) or
        'none' (--no-save-model: nothing to resume from)."""
        name = signal.Signals(self.signum).name
        if checkpoint == "none":
            print(f"interrupted by {name} at env step {global_step}; no checkpoint (--no-save-model)", flush=True)
        else:
            where = "the checkpoint just written" if checkpoint == "now" else \
                "the stage-end checkpoint (the decoder refit restarts)"
            print(f"interrupted by {name} at env step {global_step}; resume from {where} with:\n"
                  f"    python {script}.py --resume {run_dir}", flush=True)
        sys.exit(128 + self.signum)


def first_nonfinite(named: dict) -> str | None:
    """The name of the first value that holds a NaN or inf: a tensor/number, or a list of tensors
    (parameters, checked through their norms in one fused call). None when all are finite."""
    values = [torch.stack(torch._foreach_norm([v.detach() for v in value])) if isinstance(value, (list, tuple))
              else torch.as_tensor(value).detach().reshape(-1) for value in named.values()]
    finite = torch.isfinite(torch.cat([v.float().cpu() for v in values]))
    if bool(finite.all()):  # one check in the common case; the loop below only runs to name the culprit
        return None
    for name, value in zip(named, values):
        if not bool(torch.isfinite(value).all()):
            return name
    return None


def progress_bar(total: int, initial: int = 0):
    from tqdm import tqdm

    # Only redraw twice a second; a plain log line per eval is printed separately.
    return tqdm(total=total, initial=initial, unit="step", unit_scale=True, mininterval=0.5,
                dynamic_ncols=True, disable=os.environ.get("GORL_NO_PROGRESS") == "1")
