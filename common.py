"""What gorl_ppo.py and gorl_sac.py share: envs, evaluation, observation statistics, the run lifecycle and logs."""

from __future__ import annotations

import collections
import contextlib
import copy
import csv
import dataclasses
import difflib
import functools
import importlib
import os
import random
import re
import signal
import sys
import time
from typing import Callable, Optional

import gymnasium as gym
import numpy as np
import torch
import tyro

if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
    import ctypes.util  # headless: pick a renderer that exists, so dm_control does not try (and warn about) GLFW
    os.environ["MUJOCO_GL"] = next(
        (gl for gl, lib in (("egl", "EGL"), ("osmesa", "OSMesa")) if ctypes.util.find_library(lib)), "disable")

class UsageError(ValueError):
    """A bad argument or file given by the user: printed as one line, exit code 2, nothing created."""

BACKENDS = ("auto", "envpool", "dm_control")
# envpool's C++ finger differs from the Python suite's (a random policy: 0.06 vs 0.50 on finger-spin; detail 12)
ENVPOOL_MISMATCHED_DOMAINS = ("finger",)

@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """A checked --env-id: a gymnasium id, or a dm_control (domain, task) on envpool's C++ port or the Python suite."""
    env_id: str
    backend: str  # "gym", "dm_control" or "envpool"
    name: str | tuple[str, str]
    envpool_id: Optional[str] = None
    action_repeat: int = 1  # simulator steps per agent step (each counts as an env step)

@functools.lru_cache(maxsize=None)
def resolve_env(env_id: str, backend: str = "auto") -> EnvSpec:
    """Accepts `domain-task`, `dm_control/domain-task-v0`, gymnasium ids and `module:EnvId-v0` (module registers it)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown --env-backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    name = env_id
    if ":" in env_id:
        module, name = env_id.split(":", 1)
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise UsageError(f"--env-id {env_id!r}: cannot import module {module!r} ({err})") from None
        if name not in gym.registry:
            raise UsageError(f"--env-id {env_id!r}: importing {module!r} did not register {name!r}")
    if name in gym.registry:
        with contextlib.closing(gym.make(name)) as env:
            space = env.action_space
        if not isinstance(space, gym.spaces.Box):
            raise UsageError(f"--env-id {env_id!r} has a {type(space).__name__} action space; GoRL needs a "
                             "continuous (Box) action space")
        if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
            raise UsageError(f"--env-id {env_id!r} has unbounded actions; GoRL needs finite Box bounds")
        return EnvSpec(env_id, "gym", name)
    from dm_control import suite
    name = re.sub(r"^dm_control/(.*?)(-v0)?$", r"\1", name)
    domain, _, task = name.partition("-")
    if (domain, task) not in suite.ALL_TASKS:
        known = [f"{d}-{t}" for d, t in suite.ALL_TASKS] + [k for k in gym.registry if "/" not in k]
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        raise UsageError(f"unknown --env-id {env_id!r}: use a dm_control 'domain-task' id (e.g. hopper-stand), "
                         f"'dm_control/domain-task-v0', or a registered gymnasium id"
                         + (f"; did you mean {', '.join(close)}?" if close else ""))
    import envpool
    pool_id = "".join(part.capitalize() for part in f"{domain}_{task}".split("_")) + "-v1"
    pool_id = pool_id if pool_id in envpool.list_all_envs() else None
    if backend == "envpool" and pool_id is None:
        raise UsageError(f"--env-backend envpool does not implement {env_id!r}; use --env-backend dm_control")
    if backend == "auto":
        backend = "envpool" if pool_id and domain not in ENVPOOL_MISMATCHED_DOMAINS else "dm_control"
    return EnvSpec(env_id, backend, (domain, task), pool_id if backend == "envpool" else None)

class DMCEnv(gym.Env):
    """A dm_control suite task as a gymnasium env: flat float32 observations, the time limit as truncation."""
    metadata, render_mode = {"render_modes": ["rgb_array"], "render_fps": 50}, "rgb_array"

    def __init__(self, domain: str, task: str, seed: Optional[int] = None):
        from dm_control import suite
        self._env = suite.load(domain, task, task_kwargs={"random": seed})
        spec, self.keys = self._env.action_spec(), list(self._env.observation_spec())
        obs_dim = sum(int(np.prod(v.shape)) for v in self._env.observation_spec().values())
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(spec.minimum.astype(np.float32), spec.maximum.astype(np.float32))

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self._env.task.random.seed(seed)
        return flatten(self._env.reset().observation, self.keys), {}

    def step(self, action):
        ts = self._env.step(action)
        terminated = bool(ts.last() and ts.discount == 0.0)  # only a terminal state; a time limit truncates
        return flatten(ts.observation, self.keys), float(ts.reward or 0.0), terminated, ts.last() and not terminated, {}

    def render(self):
        return self._env.physics.render(240, 240, camera_id=0)

def flatten(obs: dict, keys: list[str], batch: Optional[int] = None) -> np.ndarray:
    """dm_control's observation dict as one float32 vector, or `batch` of them, in the task's key order."""
    shape = (-1,) if batch is None else (batch, -1)
    return np.concatenate([np.asarray(obs[k], np.float32).reshape(shape) for k in keys], axis=-1)

def make_env(spec: EnvSpec, seed: int) -> gym.Env:
    """One env with actions in [-1, 1] (the tanh output is mapped affinely onto the env's bounds)."""
    env = DMCEnv(*spec.name, seed=seed) if spec.backend != "gym" else gym.wrappers.DtypeObservation(
        gym.wrappers.FlattenObservation(gym.make(spec.name, render_mode="rgb_array")), np.float32)
    if not (np.all(env.action_space.low == -1.0) and np.all(env.action_space.high == 1.0)):
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env

class VectorEnv:
    """`num_envs` envs, SAME_STEP autoreset: an episode's last observation is in infos["final_obs"] (num_envs, obs_dim).
    state_dict(): each env's resets and actions since, replayed into fresh envs on --resume (detail 13)."""
    STATE = ("resets", "start", "history", "ret", "length", "step_seconds")

    def __init__(self, spec: EnvSpec, num_envs: int, seed: int, threads: int = 1):
        self.spec, self.num_envs, self.seed, self.pool = spec, num_envs, seed, None
        if spec.backend == "envpool":  # dm_control's C++ port: 2-3x the Python suite's rate
            import envpool
            self.pool = envpool.make_gymnasium(spec.envpool_id, num_envs=num_envs, seed=seed, num_threads=threads)
            first = DMCEnv(*spec.name)  # the Python suite's layout: flatten() uses its key order for both backends
            self.keys = first.keys
        else:
            self.envs = [make_env(spec, seed + i) for i in range(num_envs)]
            first = self.envs[0]
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, first.observation_space.shape, np.float32)
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, first.action_space.shape, np.float32)

    def _reset(self, ids: np.ndarray, seed: Optional[int] = None) -> np.ndarray:
        """The first observations of envs `ids` (env i reseeded with seed + i if `seed` is given)."""
        if self.pool is not None:  # envpool seeded env i with seed + i at construction
            return flatten(self.pool.reset(ids.astype(np.int32))[0], self.keys, len(ids))
        return np.stack([self.envs[i].reset(seed=None if seed is None else seed + int(i))[0] for i in ids])

    def _step(self, ids: np.ndarray, actions: np.ndarray):
        """Envs `ids` hold each action for `action_repeat` simulator steps (rewards summed) or to the episode's end."""
        actions = np.asarray(actions)
        obs, reward, term, trunc = self._sim_step(ids, actions)
        for _ in range(self.spec.action_repeat - 1):
            live = ~(term | trunc)
            if not live.any():
                break
            obs[live], step_reward, term[live], trunc[live] = self._sim_step(ids[live], actions[live])
            reward[live] += step_reward
        return obs, reward, term, trunc

    def _sim_step(self, ids: np.ndarray, actions: np.ndarray):
        if self.pool is not None:
            obs, reward, term, trunc, _ = self.pool.step(np.asarray(actions, np.float64), ids.astype(np.int32))
            return flatten(obs, self.keys, len(ids)), reward.astype(np.float64), term.astype(bool), trunc.astype(bool)
        obs, reward, term, trunc = zip(*[self.envs[i].step(a)[:4] for i, a in zip(ids, actions)])
        return np.stack(obs), np.array(reward, np.float64), np.array(term, bool), np.array(trunc, bool)

    def reset(self, seed=None):
        n = self.num_envs
        self.resets, self.start, self.history = np.ones(n, np.int64), np.zeros(n, np.int64), []
        self.ret, self.length, self.step_seconds = np.zeros(n), np.zeros(n, np.int64), 0.0
        return self._reset(np.arange(n), self.seed), {}

    def step(self, actions: np.ndarray):
        start = time.perf_counter()
        obs, reward, terminated, truncated = self._step(np.arange(self.num_envs), actions)
        done, infos = terminated | truncated, {}
        ids = np.flatnonzero(done)
        if len(ids):
            infos["final_obs"] = np.where(done[:, None], obs, 0.0)
            obs[ids] = self._reset(ids)
        self.step_seconds += time.perf_counter() - start
        self.history.append(np.array(actions, copy=True))  # one (num_envs, act_dim) array per step
        self.ret, self.length = self.ret + reward, self.length + self.spec.action_repeat
        if len(ids):
            infos["episodes"] = (ids, self.ret[ids], self.length[ids])
            self.ret, self.length = self.ret * ~done, self.length * ~done
            self.resets[ids] += 1
            self.start[ids] = len(self.history)
            drop = int(self.start.min())  # steps no running episode needs any more
            del self.history[:drop]
            self.start -= drop
        return obs, reward, terminated, truncated, infos

    def state_dict(self) -> dict:
        return copy.deepcopy({name: getattr(self, name) for name in self.STATE})

    def load_state_dict(self, state: dict) -> np.ndarray:
        """Bring freshly built envs to the saved state: redo their resets, then the actions since; the observations."""
        obs, _ = self.reset()
        vars(self).update(copy.deepcopy(state))
        for k in range(1, int(self.resets.max())):
            ids = np.flatnonzero(self.resets > k)
            obs[ids] = self._reset(ids)
        for j in range(int(self.start.min()), len(self.history)):
            ids = np.flatnonzero(self.start <= j)
            obs[ids] = self._step(ids, self.history[j][ids])[0]
        return obs

    def close(self) -> None:
        for env in [self.pool] if self.pool is not None else self.envs:
            env.close()

class RunningMeanStd:
    """Exact running mean/variance over all observations seen (parallel Chan et al. update)."""

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8):
        self.mean, self.var, self.count = np.zeros(shape, np.float64), np.ones(shape, np.float64), 0.0
        self.clip, self.eps = clip, eps

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, *self.mean.shape)
        batch_mean, batch_var, n = x.mean(0), x.var(0), x.shape[0]
        total, delta = self.count + n, batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return np.clip((x - self.mean) / np.sqrt(self.var + self.eps), -self.clip, self.clip).astype(np.float32)

    def state_dict(self) -> dict:
        return {"mean": self.mean.copy(), "var": self.var.copy(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = state["mean"].copy(), state["var"].copy(), state["count"]

def evaluate(spec: EnvSpec, act: Callable[[np.ndarray], np.ndarray], num_episodes: int, seed: int) -> np.ndarray:
    """Returns of one episode in each of `num_episodes` envs seeded seed + i (paired); act: raw obs -> actions."""
    envs = VectorEnv(spec, num_episodes, seed)
    obs, _ = envs.reset()
    returns, active = np.zeros(num_episodes), np.ones(num_episodes, bool)
    while active.any():
        obs, reward, terminated, truncated, _ = envs.step(act(obs))
        returns += reward * active
        active &= ~(terminated | truncated)
    envs.close()
    return returns

def record_video(spec: EnvSpec, act: Callable, seed: int, path: str) -> float:
    """One episode rendered by the Python simulator (envpool does not render) to an mp4; its return."""
    import imageio.v2 as imageio
    env, frames, total, done = make_env(spec, seed), [], 0.0, False
    obs, _ = env.reset(seed=seed)
    while not done:
        action = act(obs[None])[0]
        for _ in range(spec.action_repeat):  # every simulator step is a frame
            frames.append(env.render())
            obs, reward, terminated, truncated, _ = env.step(action)
            total, done = total + reward, terminated or truncated
            if done:
                break
    env.close()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    imageio.mimsave(path, frames, fps=50, macro_block_size=1)
    return total

def check_render(spec: EnvSpec) -> None:
    """Render one frame now, so a missing GL library fails before training, with one line."""
    env = make_env(spec, seed=0)
    try:
        if env.render() is None:
            raise RuntimeError("render() returned no frame")
    except Exception as err:
        raise UsageError(
            f"--capture-video: rendering {spec.env_id!r} failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); install libegl1 "
            "(MUJOCO_GL=egl) or libosmesa6 (MUJOCO_GL=osmesa)") from None
    finally:
        env.close()

MAY_BE_ZERO = ("seed", "eval_seed", "decoder_fresh_steps", "learning_starts")  # every other count must be > 0

def stage_ends(budget: int, num_stages: int, fractions: tuple[float, ...]) -> list[int]:
    """Where each stage ends in `budget`: by --stage-fractions, or 2/3 for stage 0 and equal shares after (detail 2)."""
    rest = [(1.0 - 2 / 3) / (num_stages - 1)] * (num_stages - 1) if num_stages > 1 else []
    f = np.asarray(fractions or [2 / 3] + rest, dtype=np.float64)
    return [int(x) for x in np.round(np.cumsum(f) / f.sum() * budget)]

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

def saved_args(args_type, ckpt: dict):  # the arguments the checkpoint's run started with (a resumed run keeps them)
    saved = {"action_repeat": 1, "num_critics": 2, **ckpt["args"]}  # older checkpoints: the defaults they had
    return args_type(**{k: v for k, v in saved.items() if k in args_type.__dataclass_fields__})

def check_args(args) -> None:  # the checks of the flags both scripts share, before anything is created
    for name, value in vars(args).items():
        if type(value) is int and name not in MAY_BE_ZERO and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.eval_only and args.checkpoint is None:
        raise UsageError("--eval-only needs --checkpoint PATH")
    if args.eval_only:
        return
    if args.eval_stochastic:
        raise UsageError("--eval-stochastic only applies with --eval-only")
    if args.run_dir is not None and os.path.exists(args.run_dir):
        raise UsageError(f"--run-dir {args.run_dir!r} already exists; continue it with --resume {args.run_dir}")
    if not 0.0 < args.decoder_val_fraction < 1.0:
        raise UsageError(f"--decoder-val-fraction must be in (0, 1), got {args.decoder_val_fraction}")
    if args.stage_fractions and (len(args.stage_fractions) != args.num_stages or min(args.stage_fractions) <= 0):
        raise UsageError(f"--stage-fractions {' '.join(map(str, args.stage_fractions))} must be {args.num_stages} "
                         "positive numbers (one per stage)")
    spec = resolve_env(args.env_id, args.env_backend)  # raises on unknown ids, backends and action spaces
    if args.capture_video:
        check_render(spec)

def evaluate_checkpoint(args, saved, ckpt: dict, build_act: Callable) -> None:
    """--eval-only: the composite policy (and observation statistics) of `ckpt`, whose run had arguments `saved`."""
    spec = dataclasses.replace(resolve_env(saved.env_id, saved.env_backend), action_repeat=saved.action_repeat)
    if args.capture_video:
        check_render(spec)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    seed = args.eval_seed if args.eval_stochastic else None
    returns = evaluate(spec, build_act(ckpt, saved, device, seed), args.eval_episodes, args.eval_seed)
    mode = "stochastic" if args.eval_stochastic else "deterministic"
    print(f"{saved.env_id} step {ckpt['global_step']} stage {ckpt['stage']}: {mode} "
          f"return {returns.mean():.4f} +- {returns.std():.4f} over {len(returns)} episodes")
    if args.capture_video:  # seeded like the first eval episode; dm_control's own simulator renders it
        path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "videos",
                            f"eval_step{ckpt['global_step']}_{mode}_seed{args.eval_seed}.mp4")
        ret = record_video(spec, build_act(ckpt, saved, device, seed), args.eval_seed, path)
        print(f"video: {path} (return {ret:.4f})")

class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk); its message is one line."""

def write_checkpoint(path: str, payload: dict) -> None:
    """Atomic (a temporary file, then a rename): on failure the temporary file goes, a file already at `path` stays."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:  # a Python file: a failed write raises its OSError (torch's own message hides it)
            torch.save(payload, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = err if isinstance(err, OSError) else err.__cause__ or err.__context__  # torch wraps the OSError
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(err).strip().split("\n")[0]
        raise CheckpointWriteError(f"could not write checkpoint {path}: {reason}") from None

def part_state(part):  # what a checkpoint keeps of one part named in Run.restore (load_part puts it back)
    if isinstance(part, np.random.Generator):
        return part.bit_generator.state
    if isinstance(part, torch.Tensor):
        return part.detach().clone()
    return list(part) if isinstance(part, collections.deque) else part.state_dict()

def load_part(part, state) -> None:
    if isinstance(part, np.random.Generator):
        part.bit_generator.state = state
    elif isinstance(part, torch.Tensor):
        part.data.copy_(state)
    elif isinstance(part, collections.deque):
        part.extend(state)
    else:
        part.load_state_dict(state)

class Run:
    """Around the algorithm: the command line, the run directory, and evals, checkpoints, signals between iterations."""

    def __init__(self, args_type, script: str, validate: Callable, build_act: Callable):
        args, self.script, self.ckpt, resume_dir = tyro.cli(args_type), script, None, None
        try:
            if args.resume:  # every other flag is ignored: the run continues with the arguments it started with
                resume_dir, path = args.resume, os.path.join(args.resume, "checkpoint.pt")
                if args.eval_only:
                    raise UsageError(f"--resume continues training; evaluate with --eval-only --checkpoint {path}")
                if not os.path.isdir(resume_dir):
                    raise UsageError(f"--resume {resume_dir!r}: no such run directory")
                if not os.path.isfile(path):
                    raise UsageError(f"--resume {resume_dir!r}: it holds no checkpoint.pt (the run saved none)")
                self.ckpt = load_checkpoint(path, script)
                if self.ckpt.get("finished"):
                    raise UsageError(f"--resume {resume_dir!r}: the run already finished "
                                     f"({self.ckpt['global_step']} env steps)")
                args = saved_args(args_type, self.ckpt)
            else:
                check_args(args)
                validate(args)
            if args.eval_only:
                ckpt = load_checkpoint(args.checkpoint, script)
                evaluate_checkpoint(args, saved_args(args_type, ckpt), ckpt, build_act)
                sys.exit(0)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        self.args, ckpt = args, self.ckpt
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        torch.set_num_threads(args.torch_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
        self.env = dataclasses.replace(resolve_env(args.env_id, args.env_backend), action_repeat=args.action_repeat)
        name = f"{re.sub('[/:]', '_', args.env_id)}__{args.exp_name}__K{args.num_stages}__{args.seed}"
        self.run_dir = resume_dir or args.run_dir or os.path.join("runs", f"{name}__{int(time.time())}")
        self.checkpoint_path = os.path.join(self.run_dir, "checkpoint.pt")
        self.global_step, self.stage = (ckpt["global_step"], ckpt["stage"]) if ckpt else (0, 0)
        state = ckpt["run"] if ckpt else {"eval_rows": 0, "wall_time_s": 0.0, "seconds": {}, "due_at": {
            "eval": 0, "video": args.video_interval, "checkpoint": args.checkpoint_interval}}
        self.due_at, self.eval_rows, self.seconds = state["due_at"], state["eval_rows"], state["seconds"]
        self.start_time = time.time() - state["wall_time_s"]
        from torch.utils.tensorboard import SummaryWriter
        os.makedirs(self.run_dir, exist_ok=True)
        # Events after the checkpoint's step are dropped (purge_step); those at it were logged before it.
        self.writer = SummaryWriter(self.run_dir, purge_step=self.global_step + 1 if ckpt else None)
        self.csv_file = open(os.path.join(self.run_dir, "eval.csv"), "r+" if ckpt else "a", newline="")
        self.csv = csv.writer(self.csv_file, lineterminator="\n")
        if ckpt:  # drop rows logged after the checkpoint, so nothing is written twice
            kept = self.csv_file.readlines()[: 1 + self.eval_rows]
            self.csv_file.seek(0)
            self.csv_file.truncate()
            self.csv_file.writelines(kept)
            self.csv_file.flush()  # on disk now: a run killed before its next row must not lose them
        else:
            self.csv_file.write("global_step,stage,return_mean,return_std,wall_time_s,tag,episode_returns\n")
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
                f"|{k}|{v}|" for k, v in sorted(vars(self.args).items())))
        self.wandb = None
        if self.args.track:
            import wandb
            name = os.path.basename(os.path.normpath(self.run_dir))  # so a resumed run continues its wandb run
            kwargs = dict(project=self.args.wandb_project_name, entity=self.args.wandb_entity, name=name,
                          config=vars(self.args), dir=self.run_dir, sync_tensorboard=True, save_code=True,
                          id=re.sub(r"[^A-Za-z0-9_-]", "-", name)[-64:], resume="allow")
            try:  # wandb must never hang a run without network: a short init timeout, then offline mode
                self.wandb = wandb.init(settings=wandb.Settings(init_timeout=30), **kwargs)
            except Exception as err:
                print(f"wandb online init failed ({type(err).__name__}); logging offline", file=sys.stderr)
                self.wandb = wandb.init(mode="offline", **kwargs)
        self.interrupt_signal: Optional[int] = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        from tqdm import tqdm
        self.pbar = tqdm(total=args.total_timesteps, initial=self.global_step, unit="step", unit_scale=True,
                         mininterval=0.5, dynamic_ncols=True, disable=os.environ.get("GORL_NO_PROGRESS") == "1")

    def restore(self, envs: VectorEnv, make_act: Callable, **parts) -> np.ndarray:
        """make_act(seed=None): the composite policy, obs -> actions, that evaluations run. `parts`: what a checkpoint
        holds; on --resume they are loaded, the envs replayed and the random streams continued. Returns the obs."""
        self.envs, self.make_act, self.parts = envs, make_act, parts
        if self.ckpt is None:
            print(f"run directory: {self.run_dir}; device {self.device}")
            return envs.reset()[0]
        for name, part in parts.items():
            load_part(part, self.ckpt[name])
        obs = envs.load_state_dict(self.ckpt["envs"])
        random.setstate(self.ckpt["random_state"]["python"])
        np.random.set_state(self.ckpt["random_state"]["numpy"])
        torch.set_rng_state(self.ckpt["random_state"]["torch"])
        print(f"resuming {self.run_dir} at env step {self.global_step} (stage {self.stage})")
        return obs

    def wall_time(self) -> float:
        return time.time() - self.start_time

    def log(self, scalars: dict) -> None:
        """Tensorboard scalars at the current env step, plus throughput and the stage."""
        wall = self.wall_time()
        scalars = {**scalars, "charts/stage": self.stage, "charts/SPS": self.global_step / wall,
                   "charts/env_time_fraction": self.envs.step_seconds / wall,
                   **{f"charts/{k}_time_fraction": v / wall for k, v in self.seconds.items()}}
        for name, value in scalars.items():
            self.writer.add_scalar(name, float(value), self.global_step)

    def count_env_steps(self, n: int, infos: dict) -> None:
        """Advance the env-step counter; log episodes that ended in this step at the step they ended."""
        self.global_step += n
        for i, ret, length in zip(*infos.get("episodes", ((), (), ()))):
            self.writer.add_scalar("charts/episodic_return", ret, self.global_step)
            self.writer.add_scalar("charts/episodic_length", length, self.global_step)

    @contextlib.contextmanager
    def timed(self, name: str):
        """`with run.timed("update"):` adds the block's seconds to charts/update_time_fraction."""
        start = time.perf_counter()
        yield  # an exception here ends the run: its seconds no longer matter
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def evaluate(self, tag: str) -> np.ndarray:
        """Deterministic returns on the eval seeds, an eval.csv row tagged periodic, boundary_before/_after or final."""
        returns = evaluate(self.env, self.make_act(), self.args.eval_episodes, self.args.eval_seed)
        self.csv.writerow([self.global_step, self.stage, f"{returns.mean():.4f}", f"{returns.std():.4f}",
                           f"{self.wall_time():.1f}", tag, " ".join(f"{r:.4f}" for r in returns)])
        self.csv_file.flush()
        self.eval_rows += 1
        if tag in ("periodic", "final"):
            self.log({"eval/return_mean": returns.mean(), "eval/return_std": returns.std()})
        return returns

    def video(self, name: str) -> None:
        if self.args.capture_video:
            record_video(self.env, self.make_act(), self.args.seed,
                         os.path.join(self.run_dir, "videos", f"{name}_step{self.global_step}.mp4"))

    def claim_due(self, name: str, interval: int) -> bool:
        """Whether event `name` is due; if so, claim it: the next falls due at the next multiple of `interval`."""
        if self.global_step < self.due_at.setdefault(name, 0):
            return False
        self.due_at[name] = (self.global_step // interval + 1) * interval
        return True

    def tick(self) -> None:
        """After each iteration: evaluate, film and checkpoint when due; on Ctrl-C / SIGTERM, checkpoint and exit."""
        self.pbar.update(self.global_step - self.pbar.n)
        if self.claim_due("eval", self.args.eval_interval):
            returns = self.evaluate("periodic")
            self.pbar.set_postfix(stage=f"{self.stage + 1}/{self.args.num_stages}", eval=f"{returns.mean():.1f}",
                                  sps=f"{self.global_step / self.wall_time():.0f}")
        if self.args.capture_video and self.claim_due("video", self.args.video_interval):
            self.video("train")
        if self.interrupt_signal is not None:
            self._exit_interrupted("the checkpoint just written" if self.save() else None)
        if self.claim_due("checkpoint", self.args.checkpoint_interval):
            self.save()

    def end_stage(self) -> None:  # the end of Phase 1: the resume point should the refit be interrupted
        self.video(f"stage{self.stage}_end")
        self.save()

    def start_stage(self, stage: int) -> np.ndarray:
        """After the refit and the reset: the 'boundary_after' returns, and a checkpoint (no refit is repeated)."""
        self.stage = stage
        after = self.evaluate("boundary_after")
        self.video(f"stage{stage}_start")
        self.save()
        return after

    def stop_requested_in_refit(self) -> None:
        """Called inside the refit: on Ctrl-C / SIGTERM exit; resuming restarts the refit from the stage end."""
        if self.interrupt_signal is not None:
            self._exit_interrupted("the stage-end checkpoint (the refit restarts)" if self.args.save_model else None)

    def save(self, finished: bool = False) -> bool:  # atomic checkpoint.pt: all that --resume and --eval-only read
        if not self.args.save_model:
            return False
        payload = {"script": self.script, "args": vars(self.args), "global_step": self.global_step,
                   "stage": self.stage, "finished": finished, "obs_dim": self.envs.single_observation_space.shape[0],
                   "act_dim": self.envs.single_action_space.shape[0], "envs": self.envs.state_dict(),
                   **{name: part_state(part) for name, part in self.parts.items()},
                   "random_state": {"python": random.getstate(), "numpy": np.random.get_state(),
                                    "torch": torch.get_rng_state()},
                   "run": {"due_at": dict(self.due_at), "eval_rows": self.eval_rows, "wall_time_s": self.wall_time(),
                           "seconds": dict(self.seconds)}}
        try:
            write_checkpoint(self.checkpoint_path, payload)
        except CheckpointWriteError as err:
            self._fail(str(err))
        return True

    def check_finite(self, named: dict) -> None:  # stop, naming the first non-finite value; the checkpoint stays
        if (name := first_nonfinite(named)) is not None:
            kept = f"the last good checkpoint {self.checkpoint_path} stays" if os.path.exists(self.checkpoint_path) \
                else "no checkpoint was written yet"
            self._fail(f"non-finite {name} at stage {self.stage}, env step {self.global_step}; stopped ({kept})")

    def _fail(self, message: str) -> None:  # one line on stderr, the logs closed, exit code 1
        print(f"error: {message}", file=sys.stderr)
        self._close()
        sys.exit(1)

    def finish(self, summary: str = "") -> None:
        final = self.evaluate("final")
        self.save(finished=True)
        wall = self.wall_time()
        self._close()
        print(f"final deterministic return {final.mean():.1f} +- {final.std():.1f}; {self.global_step} env steps in "
              f"{wall:.0f}s ({self.global_step / wall:.0f} steps/s{summary}, env "
              f"{self.envs.step_seconds / wall:.0%} of wall time)")

    def _on_signal(self, signum, frame) -> None:
        if self.interrupt_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.interrupt_signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current update, then saving a checkpoint "
              "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

    def _exit_interrupted(self, resume_from: Optional[str]) -> None:  # resume_from: None with --no-save-model
        self._close()
        how = "no checkpoint (--no-save-model)" if resume_from is None else \
            f"resume from {resume_from} with:\n    python {self.script}.py --resume {self.run_dir}"
        print(f"interrupted by {signal.Signals(self.interrupt_signal).name} at env step {self.global_step}; {how}",
              flush=True)
        sys.exit(128 + self.interrupt_signal)

    def _close(self) -> None:
        for part in (self.pbar, self.envs, self.writer, self.csv_file):
            part.close()
        if self.wandb is not None:
            self.wandb.finish()

def first_nonfinite(named: dict) -> Optional[str]:
    """The name of the first non-finite value (a number, a tensor or a list of tensors, by their norms), or None."""
    values = [torch.stack(torch._foreach_norm([v.detach() for v in value])) if isinstance(value, (list, tuple))
              else torch.as_tensor(value).detach().reshape(-1) for value in named.values()]
    if bool(torch.isfinite(torch.cat([v.float().cpu() for v in values])).all()):  # the common case: one check
        return None
    return next(name for name, value in zip(named, values) if not bool(torch.isfinite(value).all()))
