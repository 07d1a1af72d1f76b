"""GoRL-PPO: online RL with a Gaussian latent policy and a flow-matching action decoder.

    eps ~ pi_theta(eps | s)   latent policy, diagonal Gaussian, trained by PPO (fast timescale)
    u   = g_phi(s, eps)       flow-matching decoder, frozen during RL, refit between stages (slow)
    a   = tanh(u)             env action in [-1, 1]

Zhang et al., "GoRL: An Algorithm-Agnostic Framework for Online Reinforcement Learning with
Generative Policies", arXiv 2512.02581. Section numbers (spec §N) refer to GORL_SPEC.md, which is
quoted in README.md. `--num-stages 1` is the tanh-Gaussian PPO baseline at identical settings.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro

import common


@dataclass
class Args:
    # ---- experiment ----
    exp_name: str = "gorl_ppo"
    """name of this experiment (first part of the run name)"""
    seed: int = 1
    """seed of the experiment (envs are seeded seed, seed+1, ...)"""
    torch_deterministic: bool = True
    """sets torch.backends.cudnn.deterministic"""
    cuda: bool = False
    """run the networks on a GPU when one is present (the simulator always runs on the CPU)"""
    torch_threads: int = 1
    """torch CPU threads; 1 is ~3x faster than 2 threads competing with the simulator on 2 cores"""
    track: bool = False
    """mirror the tensorboard logs to Weights & Biases (falls back to offline without network)"""
    wandb_project_name: str = "gorl"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    capture_video: bool = False
    """record a deterministic episode (env 0's seed) to <run>/videos/ every --video-interval env steps and at every stage end; with --eval-only, the first evaluated episode. Headless: MUJOCO_GL=egl or osmesa"""
    video_interval: int = 500_000
    """env steps between training videos with --capture-video"""
    save_model: bool = True
    """write <run>/checkpoint.pt (everything --resume needs) every --checkpoint-interval env steps, at every stage end, on Ctrl-C/SIGTERM and at the end"""
    checkpoint_interval: int = 100_000
    """env steps between checkpoints; bounds what a crash loses"""
    run_dir: Optional[str] = None
    """write the run here instead of runs/<env>__<exp-name>__K<stages>__<seed>__<unix time>; must not exist yet"""
    resume: Optional[str] = None
    """continue the run in this directory from its checkpoint.pt, with the arguments it started with (other flags are ignored)"""
    eval_only: bool = False
    """only evaluate --checkpoint over --eval-episodes episodes, print mean and std of the return, then exit"""
    checkpoint: Optional[str] = None
    """checkpoint to evaluate with --eval-only"""
    eval_stochastic: bool = False
    """with --eval-only: sample the latent eps ~ pi(.|s) instead of taking its mean"""

    # ---- environment ----
    env_id: str = "hopper-stand"
    """dm_control 'domain-task', 'dm_control/domain-task-v0', or a gymnasium id with a Box action space"""
    env_backend: str = "auto"
    """auto (envpool where it has the dm_control task and matches it, i.e. not finger-*; else dm_control), envpool, or dm_control"""
    env_threads: int = 2
    """envpool simulator threads; 2 uses the second core while the envs step (same results; a 600k hopper-stand run: 2,865 env steps/s with 2, 1,862 with 1 in an earlier session, README)"""
    total_timesteps: int = 2_000_000
    """total env steps of training, all stages together"""
    num_envs: int = 64
    """parallel envs; the decoder and the policy run batched across them"""
    num_steps: int = 32
    """steps per env per rollout (rollout = num_envs * num_steps transitions)"""

    # ---- PPO (Phase 1, latent space) ----
    learning_rate: float = 1e-3
    """Adam learning rate of the latent policy and the critic (the authors' value; 3e-4 barely moved the policy)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over the whole run"""
    gamma: float = 0.99
    """discount factor (authors at GPU scale: 0.995)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 10
    """epochs over each rollout"""
    norm_adv: bool = True
    """normalise advantages per minibatch"""
    clip_coef: float = 0.2
    """PPO clip coefficient in stage 0"""
    clip_coef_late: Optional[float] = None
    """clip coefficient from stage 1 on (authors: 0.15 then 0.3); default: same as --clip-coef"""
    ent_coef: float = 1e-3
    """entropy bonus on the latent Gaussian"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient-norm clip, applied to the policy and to the critic separately"""
    reward_scale: float = 1.0
    """rewards are multiplied by this before GAE (authors: 10 with their own normalisation)"""
    kl_coef: float = 1e-2
    """beta: weight of the penalty pulling pi_theta(.|s) to N(0, I) (spec §2); same for the Gaussian twin"""
    prior_penalty: Literal["kl", "l2"] = "kl"
    """'kl': analytic KL(pi || N(0, I)); 'l2': the authors' mean(mu^2 + sigma^2) surrogate"""
    policy_hidden: int = 64
    """width of the latent policy MLP (authors: 32)"""
    policy_layers: int = 2
    """hidden layers of the latent policy MLP (authors: 4)"""
    critic_hidden: int = 64
    """width of the critic MLP (authors: 256)"""
    critic_layers: int = 2
    """hidden layers of the critic MLP (authors: 5)"""
    activation: Literal["tanh", "silu"] = "tanh"
    """activation of the policy and critic MLPs (authors: silu)"""

    # ---- GoRL stages (spec §2) ----
    num_stages: int = 2
    """K: number of RL stages; K - 1 decoder refits. 1 = tanh-Gaussian PPO baseline"""
    first_stage_fraction: float = 2 / 3
    """share of the env steps spent in stage 0; the rest is split equally over the later stages"""
    stage_fractions: tuple[float, ...] = ()
    """relative env-step budget of each stage (K numbers, e.g. 60 60 30 30); overrides --first-stage-fraction"""

    # ---- decoder (Phase 2, spec §3) ----
    decoder_hidden: int = 64
    """width of the velocity MLP"""
    decoder_layers: int = 4
    """hidden layers of the velocity MLP"""
    euler_steps: int = 10
    """N: Euler steps from t = 1 (noise) to t = 0 (action)"""
    decoder_data_steps: int = 65536
    """refit on the states of the latest this-many env steps; keep it >= num_envs x episode length: the envs run in lockstep, so a shorter window misses whole phases of the episode (e.g. its start)"""
    decoder_fresh_steps: int = 0
    """if > 0: at each boundary collect this many env steps with the frozen composite policy and refit on them alone (exactly on-policy; the steps count in the budget) instead of the latest training data"""
    decoder_targets: Literal["executed", "resampled"] = "resampled"
    """'executed': the pre-tanh u actually executed; 'resampled': fresh u ~ current composite policy at the stored states, drawn anew at every decoder step (same distribution, far more samples per state)"""
    decoder_train_steps: int = 12000
    """Adam steps per decoder refit (cheetah-run, spec §7 check: 2000 steps lost 85% of the return at the boundary, 12000 lost 1%; about 100 s here)"""
    decoder_batch_size: int = 256
    """(s, u) pairs per decoder step"""
    decoder_noise_draws: int = 4
    """independent (eps, t) draws per pair and step"""
    decoder_lr: float = 1e-3
    """decoder Adam learning rate (authors: 3e-4, with far longer refits)"""
    decoder_cosine: bool = True
    """decay the decoder learning rate to 0 along a cosine over the refit"""
    decoder_val_fraction: float = 0.1
    """share of the refit data held out; the best validation weights are kept"""
    decoder_val_every: int = 100
    """steps between validation checks"""
    u_clip: float = 3.0
    """targets are clipped to |u| <= u_clip so the decoder does not chase tanh saturation"""

    # ---- evaluation ----
    eval_interval: int = 100_000
    """env steps between deterministic evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation (fixed seeds, so evaluations are paired)"""
    eval_seed: int = 10_000
    """seed of the first eval episode; eval env i uses eval_seed + i"""

    # ---- filled in at runtime ----
    batch_size: int = 0
    """(derived) num_envs * num_steps"""
    minibatch_size: int = 0
    """(derived) batch_size // num_minibatches"""
    num_iterations: int = 0
    """(derived) PPO iterations: total_timesteps // batch_size, less the fresh decoder-data rollouts"""
    fresh_iterations: int = 0
    """(derived) rollouts collected for each refit when --decoder-fresh-steps > 0"""


# ---- networks ----


def layer_init(layer: nn.Linear, std: float = np.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp(in_dim: int, hidden: int, layers: int, activation: type[nn.Module]) -> nn.Sequential:
    dims = [in_dim] + [hidden] * layers
    mods: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        mods += [layer_init(nn.Linear(a, b)), activation()]
    return nn.Sequential(*mods)


class LatentPolicy(nn.Module):
    """pi_theta(eps | s) = N(mu(s), diag(sigma^2)); sigma is a state-independent parameter."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int, activation):
        super().__init__()
        self.trunk = mlp(obs_dim, hidden, layers, activation)
        self.mu_head = layer_init(nn.Linear(hidden, act_dim), std=0.01)
        self.log_sigma = nn.Parameter(torch.zeros(act_dim))

    def forward(self, s_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.mu_head(self.trunk(s_norm))  # (B, d)
        return mu, self.log_sigma.exp().expand_as(mu)

    def head_parameters(self) -> list[nn.Parameter]:
        return [self.mu_head.weight, self.mu_head.bias, self.log_sigma]

    @torch.no_grad()
    def reset_to_prior(self) -> None:
        """Exactly N(0, I) for every state: zero mean head, sigma = 1. The trunk is kept (spec §2)."""
        self.mu_head.weight.zero_()
        self.mu_head.bias.zero_()
        self.log_sigma.zero_()


class Critic(nn.Module):
    def __init__(self, obs_dim: int, hidden: int, layers: int, activation):
        super().__init__()
        self.net = nn.Sequential(mlp(obs_dim, hidden, layers, activation), layer_init(nn.Linear(hidden, 1), std=1.0))

    def forward(self, s_norm: torch.Tensor) -> torch.Tensor:
        return self.net(s_norm).squeeze(-1)  # (B,)


class FlowDecoder(nn.Module):
    """g_phi(s, eps): conditional flow matching from the fixed prior N(0, I) to pre-tanh actions u.

    Velocity v_phi(s_norm, x, emb(t)) is an MLP with SiLU; emb(t) = [cos(2^j t), sin(2^j t)],
    j = 0..3. The last layer is zero at initialisation, so v = 0 and g(s, eps) = eps exactly
    (stage 0 is plain tanh-Gaussian RL). Observations are normalised with statistics frozen at
    the refit and stored here, so later updates of the running statistics do not move its inputs.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int, euler_steps: int):
        super().__init__()
        self.euler_steps = euler_steps
        dims = [obs_dim + act_dim + 8] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.SiLU()]
        self.out = nn.Linear(hidden, act_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.net = nn.Sequential(*mods, self.out)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_var", torch.ones(obs_dim))
        # True until the first refit: the network then is exactly the identity, so skip it.
        self.register_buffer("is_identity", torch.tensor(True))
        self.register_buffer("freqs", 2.0 ** torch.arange(4, dtype=torch.float32))

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return ((obs - self.obs_mean) / torch.sqrt(self.obs_var + 1e-8)).clamp(-10.0, 10.0)

    def velocity(self, s_norm: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # s_norm (B, obs_dim), x (B, d), t (B, 1) -> velocity (B, d)
        emb = torch.cat([torch.cos(self.freqs * t), torch.sin(self.freqs * t)], dim=-1)  # (B, 8)
        return self.net(torch.cat([s_norm, x, emb], dim=-1))

    def integrate(self, obs: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Explicit Euler from t = 1 (x = eps) to t = 0: x <- x - (1/N) v(s, x, t). No clipping."""
        s_norm = self.normalize(obs)
        x, dt = eps, 1.0 / self.euler_steps
        for k in range(self.euler_steps):
            t = torch.full_like(x[:, :1], 1.0 - k * dt)
            x = x - dt * self.velocity(s_norm, x, t)
        return x  # u, (B, d)

    def forward(self, obs: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return eps
        return self.integrate(obs, eps)


# ---- helpers ----


def prior_penalty(mu: torch.Tensor, sigma: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample penalty toward N(0, I), shape (B,). 'kl' is the analytic
    KL(N(mu, sigma^2) || N(0, I)) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)."""
    if kind == "kl":
        return 0.5 * (mu.pow(2) + sigma.pow(2) - 1.0 - 2.0 * sigma.log()).sum(-1)
    return (mu.pow(2) + sigma.pow(2)).sum(-1)


def gaussian_log_prob(eps: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(eps; mu, diag(sigma^2)) summed over dims, (B,). Written out: torch.distributions adds
    argument checks that cost more than the maths at these batch sizes."""
    return (-0.5 * ((eps - mu) / sigma).pow(2) - sigma.log() - 0.5 * np.log(2 * np.pi)).sum(-1)


def compute_gae(rewards, values, next_values, terminated, dones, gamma: float, lam: float):
    """GAE over (T, N) tensors. next_values[t] is V(s_{t+1}) of the true next state (the final
    observation when an episode ended at t), so a time-limit truncation still bootstraps while a
    termination does not; `dones` (terminated or truncated) cuts the recursion between episodes."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        last = delta + gamma * lam * (1.0 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values


def flow_matching_loss(decoder: FlowDecoder, s_norm, u, draws: int, generator=None) -> torch.Tensor:
    """Fixed-prior conditional flow matching (spec §3). eps is drawn fresh and independent of the
    latent that produced u, so the decoder learns to push N(0, I) onto the action distribution."""
    s_norm, u = s_norm.repeat(draws, 1), u.repeat(draws, 1)  # (draws * B, .)
    eps = torch.randn(u.shape, generator=generator, device=u.device)
    t = torch.rand((u.shape[0], 1), generator=generator, device=u.device)
    x_t = t * eps + (1.0 - t) * u
    return (decoder.velocity(s_norm, x_t, t) - (eps - u)).pow(2).mean()


def fit_decoder(obs: torch.Tensor, targets, args: Args, obs_dim: int, act_dim: int, device,
                stop=lambda: False) -> Optional[tuple[FlowDecoder, dict]]:
    """Fit a fresh decoder on raw obs (M, obs_dim) and targets: a tensor u (M, d) of executed pre-tanh
    actions, or a function idx -> u drawing fresh actions of the composite policy at obs[idx].
    Keeps the weights with the best validation loss. Returns None if `stop()` turns true (Ctrl-C),
    and stops early with a NaN train loss if the loss stops being finite."""
    decoder = FlowDecoder(obs_dim, act_dim, args.decoder_hidden, args.decoder_layers, args.euler_steps).to(device)
    # Normalise with the statistics of the refit data itself, frozen from now on (spec §3): late
    # in training the visited states can fill a small corner of the running statistics' range.
    decoder.obs_mean.copy_(obs.mean(0))
    decoder.obs_var.copy_(obs.var(0))
    decoder.is_identity.fill_(False)
    s_norm = decoder.normalize(obs)
    draw = targets if callable(targets) else (lambda idx: targets[idx])
    perm = torch.randperm(len(obs), device=device)
    n_val = max(1, int(args.decoder_val_fraction * len(obs)))
    val, train = perm[:n_val], perm[n_val:]
    u_val = draw(val).clamp(-args.u_clip, args.u_clip)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=args.decoder_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (
        1.0 + np.cos(np.pi * step / args.decoder_train_steps)) if args.decoder_cosine else 1.0)
    val_gen = torch.Generator(device=device)

    def val_loss() -> float:
        val_gen.manual_seed(0)  # the same (eps, t) draws at every check, so checks are comparable
        with torch.no_grad():
            return flow_matching_loss(decoder, s_norm[val], u_val, args.decoder_noise_draws, val_gen).item()

    best, best_state, train_loss = float("inf"), None, float("nan")
    for step in range(1, args.decoder_train_steps + 1):
        idx = train[torch.randint(len(train), (args.decoder_batch_size,), device=device)]
        u = draw(idx).clamp(-args.u_clip, args.u_clip)
        loss = flow_matching_loss(decoder, s_norm[idx], u, args.decoder_noise_draws)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        train_loss = 0.98 * train_loss + 0.02 * loss.item() if step > 1 else loss.item()
        if not np.isfinite(train_loss):
            break  # the caller stops the run, naming the decoder loss
        if step % args.decoder_val_every == 0 or step == args.decoder_train_steps:
            if stop():
                return None
            current = val_loss()
            if current < best:
                best, best_state = current, copy.deepcopy(decoder.state_dict())
    if best_state is not None:
        decoder.load_state_dict(best_state)
    return decoder, {"train_loss": train_loss, "val_loss": best, "pairs": len(obs)}


@torch.no_grad()
def boundary_diagnostics(policy, old_decoder, new_decoder, obs_rms, obs, generator, samples: int = 32) -> dict:
    """Action-space checks of a refit (spec §7), on states of the refit data. Old composite policy:
    tanh(g_old(s, mu + sigma * xi)); new one after the reset: tanh(g_new(s, xi))."""
    s_norm = torch.as_tensor(obs_rms.normalize(obs.cpu().numpy()), device=obs.device)
    mu, sigma = policy(s_norm)
    a_old_det = torch.tanh(old_decoder(obs, mu))
    a_new_det = torch.tanh(new_decoder(obs, torch.zeros_like(mu)))
    xi = torch.randn((samples, *mu.shape), generator=generator, device=obs.device)  # (S, B, d)
    obs_rep = obs.expand(samples, *obs.shape).reshape(-1, obs.shape[-1])
    a_old = torch.tanh(old_decoder(obs_rep, (mu + sigma * xi).reshape(-1, mu.shape[-1]))).reshape(xi.shape)
    a_new = torch.tanh(new_decoder(obs_rep, xi.reshape(-1, mu.shape[-1]))).reshape(xi.shape)
    return {
        "action_rms_deterministic": (a_old_det - a_new_det).pow(2).mean().sqrt().item(),
        "action_rms_mean": (a_old.mean(0) - a_new.mean(0)).pow(2).mean().sqrt().item(),
        "action_std_old": a_old.std(0).mean().item(),
        "action_std_new": a_new.std(0).mean().item(),
    }


def make_act(policy: LatentPolicy, decoder: FlowDecoder, obs_rms: common.RunningMeanStd, device,
             stochastic_seed: Optional[int] = None):
    """Composite policy with frozen observation statistics: deterministic a = tanh(g(s, mu(s))), or,
    given a seed, stochastic a = tanh(g(s, mu + sigma * xi)) drawn from its own generator (so
    evaluating never moves the training random stream)."""
    frozen = obs_rms.copy()
    generator = None if stochastic_seed is None else torch.Generator(device=device).manual_seed(stochastic_seed)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        mu, sigma = policy(torch.as_tensor(frozen.normalize(obs), device=device))
        eps = mu if generator is None else mu + sigma * torch.randn(mu.shape, generator=generator, device=device)
        return torch.tanh(decoder(torch.as_tensor(obs, dtype=torch.float32, device=device), eps)).cpu().numpy()

    return act


def reset_latent_policy(policy: LatentPolicy, optimizer: torch.optim.Optimizer) -> None:
    """Stage boundary (spec §2): pi_theta(.|s) = N(0, I) exactly, with fresh Adam moments for the
    reset head. The trunk, the critic, their optimiser state and the observation statistics stay."""
    policy.reset_to_prior()
    for p in policy.head_parameters():
        optimizer.state.pop(p, None)


def stage_iterations(args: Args) -> list[int]:
    """Split the PPO iterations over the stages by --stage-fractions (at least one each)."""
    if args.stage_fractions:
        fractions = np.asarray(args.stage_fractions, dtype=np.float64)
    elif args.num_stages == 1:
        fractions = np.ones(1)
    else:  # spec §7: few, late boundaries lost least at CPU scale
        later = (1.0 - args.first_stage_fraction) / (args.num_stages - 1)
        fractions = np.asarray([args.first_stage_fraction] + [later] * (args.num_stages - 1))
    bounds = np.round(np.cumsum(fractions) / fractions.sum() * args.num_iterations).astype(int)
    counts = np.diff(np.concatenate([[0], bounds]))
    return [int(c) for c in counts]


def validate(args: Args) -> None:
    """Every check that can fail runs before any work, with a one-line message."""
    E = common.UsageError
    for name in ("total_timesteps", "num_envs", "num_steps", "num_minibatches", "update_epochs", "num_stages",
                 "decoder_hidden", "decoder_layers", "euler_steps", "decoder_data_steps", "decoder_train_steps",
                 "decoder_batch_size", "decoder_noise_draws", "decoder_val_every", "eval_interval",
                 "eval_episodes", "policy_hidden", "policy_layers", "critic_hidden", "critic_layers", "torch_threads",
                 "env_threads", "checkpoint_interval", "video_interval"):
        if getattr(args, name) <= 0:
            raise E(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eval_only:
        if args.checkpoint is None:
            raise E("--eval-only needs --checkpoint PATH")
        return
    if args.eval_stochastic:
        raise E("--eval-stochastic only applies with --eval-only")
    if args.run_dir is not None and os.path.exists(args.run_dir):
        raise E(f"--run-dir {args.run_dir!r} already exists; continue it with --resume {args.run_dir}")
    batch = args.num_envs * args.num_steps
    if batch % args.num_minibatches:
        raise E(f"rollout of {batch} transitions (--num-envs {args.num_envs} x --num-steps {args.num_steps}) "
                f"does not split into --num-minibatches {args.num_minibatches}")
    if args.total_timesteps < batch * args.num_stages:
        raise E(f"--total-timesteps {args.total_timesteps} is less than one rollout ({batch} steps) per stage "
                f"for --num-stages {args.num_stages}")
    if args.stage_fractions and (len(args.stage_fractions) != args.num_stages or min(args.stage_fractions) <= 0):
        raise E(f"--stage-fractions {' '.join(map(str, args.stage_fractions))} must be {args.num_stages} positive "
                "numbers (one per stage)")
    if not 0.0 < args.first_stage_fraction < 1.0:
        raise E(f"--first-stage-fraction must be in (0, 1), got {args.first_stage_fraction}")
    if not 0.0 < args.decoder_val_fraction < 1.0:
        raise E(f"--decoder-val-fraction must be in (0, 1), got {args.decoder_val_fraction}")
    fresh = -(-args.decoder_fresh_steps // batch) * (args.num_stages - 1)
    counts = stage_iterations(dataclasses.replace(args, num_iterations=args.total_timesteps // batch - fresh))
    if min(counts) < 1:
        raise E(f"--total-timesteps {args.total_timesteps} gives stage iterations {counts}: every stage needs at "
                f"least one rollout of {batch} steps")
    common.resolve_backend(args.env_id, args.env_backend)  # raises on unknown ids and backends
    common.make_env(args.env_id, seed=0)().close()  # raises on non-Box or unbounded action spaces
    if args.capture_video:
        common.check_render(args.env_id)


def saved_args(ckpt: dict) -> Args:
    return Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__})


def evaluate_checkpoint(args: Args) -> None:
    """--eval-only: the checkpoint's policy, decoder and observation statistics on fresh eval envs."""
    ckpt = common.load_checkpoint(args.checkpoint, "gorl_ppo")
    saved = saved_args(ckpt)
    if args.capture_video:
        common.check_render(saved.env_id)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    policy, decoder, obs_rms = build_from_checkpoint(ckpt, saved, device)
    seed = args.eval_seed if args.eval_stochastic else None
    returns = common.evaluate(saved.env_id, make_act(policy, decoder, obs_rms, device, seed),
                              args.eval_episodes, args.eval_seed, saved.env_backend)
    mode = "stochastic" if args.eval_stochastic else "deterministic"
    print(f"{saved.env_id} step {ckpt['global_step']} stage {ckpt['stage']}: {mode} "
          f"return {returns.mean():.4f} +- {returns.std():.4f} over {len(returns)} episodes")
    if args.capture_video:
        path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "videos",
                            f"eval_step{ckpt['global_step']}_{mode}_seed{args.eval_seed}.mp4")
        # Seeded like the first eval episode; dm_control renders it, and its initial state for a seed
        # differs from envpool's, so the video's return is printed separately.
        ret = common.record_video(saved.env_id, make_act(policy, decoder, obs_rms, device, seed), args.eval_seed, path)
        print(f"video: {path} (return {ret:.4f})")


def build_from_checkpoint(ckpt: dict, args: Args, device):
    obs_dim, act_dim = ckpt["obs_dim"], ckpt["act_dim"]
    activation = nn.Tanh if args.activation == "tanh" else nn.SiLU
    policy = LatentPolicy(obs_dim, act_dim, args.policy_hidden, args.policy_layers, activation).to(device)
    policy.load_state_dict(ckpt["policy"])
    decoder = FlowDecoder(obs_dim, act_dim, args.decoder_hidden, args.decoder_layers, args.euler_steps).to(device)
    decoder.load_state_dict(ckpt["decoder"])
    obs_rms = common.RunningMeanStd((obs_dim,))
    obs_rms.load_state_dict(ckpt["obs_rms"])
    return policy, decoder, obs_rms


if __name__ == "__main__":
    args = tyro.cli(Args)
    ckpt = None
    try:
        if args.resume:  # every other flag is ignored: the run continues with the arguments it started with
            if args.eval_only:
                raise common.UsageError("--resume continues training; evaluate with --eval-only --checkpoint "
                                        f"{os.path.join(args.resume, 'checkpoint.pt')}")
            ckpt = common.load_resume(args.resume, "gorl_ppo")
        else:
            validate(args)
        if args.eval_only:
            evaluate_checkpoint(args)
            sys.exit(0)
    except common.UsageError as err:
        common.exit_on_usage_error(err)
    if ckpt is None:
        args.batch_size = args.num_envs * args.num_steps
        args.minibatch_size = args.batch_size // args.num_minibatches
        args.fresh_iterations = -(-args.decoder_fresh_steps // args.batch_size)  # ceil
        args.num_iterations = args.total_timesteps // args.batch_size - args.fresh_iterations * (args.num_stages - 1)
        run_name = f"{args.env_id.replace('/', '_').replace(':', '_')}__{args.exp_name}__K{args.num_stages}__{args.seed}__{int(time.time())}"
        run_dir = args.run_dir or os.path.join("runs", run_name)
    else:
        run_dir, args = args.resume, saved_args(ckpt)
    iterations_per_stage = stage_iterations(args)

    common.seed_everything(args.seed, args.torch_deterministic)
    torch.set_num_threads(args.torch_threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    envs = common.make_vector_env(args.env_id, args.num_envs, args.seed, args.env_backend, args.env_threads)
    obs_dim = envs.single_observation_space.shape[0]
    act_dim = envs.single_action_space.shape[0]  # latent dim = action dim (spec §1)
    logger = common.RunLogger(run_dir, args, args.track, args.wandb_project_name, args.wandb_entity,
                              resume=ckpt["logger"] if ckpt else None)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")

    activation = nn.Tanh if args.activation == "tanh" else nn.SiLU
    policy = LatentPolicy(obs_dim, act_dim, args.policy_hidden, args.policy_layers, activation).to(device)
    critic = Critic(obs_dim, args.critic_hidden, args.critic_layers, activation).to(device)
    decoder = FlowDecoder(obs_dim, act_dim, args.decoder_hidden, args.decoder_layers, args.euler_steps).to(device)
    # fused=True: one kernel per step instead of several per parameter (the update is overhead-bound).
    optimizer = torch.optim.Adam([*policy.parameters(), *critic.parameters()], lr=args.learning_rate, eps=1e-5,
                                 fused=True)
    obs_rms = common.RunningMeanStd((obs_dim,))

    # Rollout storage, (T, N, ...)
    T, N = args.num_steps, args.num_envs
    b_obs = torch.zeros((T, N, obs_dim), device=device)  # normalised with the stats of that step
    b_eps = torch.zeros((T, N, act_dim), device=device)
    b_logp = torch.zeros((T, N), device=device)
    b_rewards = torch.zeros((T, N), device=device)
    b_values = torch.zeros((T, N), device=device)
    b_final_values = torch.zeros((T, N), device=device)  # V(final obs) where an episode ended at t
    b_terminated = torch.zeros((T, N), device=device)
    b_dones = torch.zeros((T, N), device=device)
    b_raw_obs = torch.zeros((T, N, obs_dim), device=device)  # decoder refit data (raw obs, executed u)
    b_u = torch.zeros((T, N, act_dim), device=device)
    # The latest rollouts of the current composite policy, for the next decoder refit (spec §7).
    data_rollouts = args.fresh_iterations or -(-args.decoder_data_steps // args.batch_size)
    refit_data: collections.deque = collections.deque(maxlen=data_rollouts)

    # Everything the loop carries from one rollout to the next; a checkpoint saves it whole.
    loop = {"global_step": 0, "iteration": 0, "stage": 0, "stage_rollouts": 0, "next_eval": 0,
            "next_video": args.video_interval, "next_checkpoint": args.checkpoint_interval, "last_eval": float("nan"),
            "episode_return": np.zeros(N), "episode_length": np.zeros(N, dtype=int), "env_time": 0.0}
    if ckpt is None:
        next_obs_raw, _ = envs.reset(seed=args.seed)
        print(f"run directory: {run_dir}; device {device}; stage iterations {iterations_per_stage} "
              f"x {args.batch_size} steps")
    else:  # ---- resume: restore every piece of state, then replay the envs to the same step ----
        policy.load_state_dict(ckpt["policy"])
        critic.load_state_dict(ckpt["critic"])
        decoder.load_state_dict(ckpt["decoder"])
        optimizer.load_state_dict(ckpt["optimizer"])
        obs_rms.load_state_dict(ckpt["obs_rms"])
        refit_data.extend(ckpt["refit_data"])
        loop = ckpt["loop"]
        next_obs_raw = envs.load_state_dict(ckpt["envs"])
        if not np.array_equal(next_obs_raw, loop["next_obs_raw"]):
            print("warning: replaying the envs did not reproduce the saved observations (another machine or library "
                  "version?); the episodes in progress continue from the replayed state", file=sys.stderr)
        common.set_rng_state(ckpt["rng"])
        print(f"resuming {run_dir} at env step {loop['global_step']} (stage {loop['stage']})")
    global_step, iteration, stage, stage_rollouts = (loop[k] for k in ("global_step", "iteration", "stage",
                                                                        "stage_rollouts"))
    next_eval, next_video, next_checkpoint, last_eval = (loop[k] for k in ("next_eval", "next_video",
                                                                            "next_checkpoint", "last_eval"))
    episode_return, episode_length, env_time = loop["episode_return"], loop["episode_length"], loop["env_time"]
    pbar = common.progress_bar(args.total_timesteps, initial=global_step)
    interrupt = common.Interrupt()

    def run_eval(tag: str, stage: int) -> np.ndarray:
        returns = common.evaluate(args.env_id, make_act(policy, decoder, obs_rms, device), args.eval_episodes,
                                  args.eval_seed, args.env_backend)
        logger.eval_row(global_step, stage, returns, tag)
        if tag == "periodic" or tag == "final":
            logger.scalar("eval/return_mean", returns.mean(), global_step)
            logger.scalar("eval/return_std", returns.std(), global_step)
        return returns

    def record_video(name: str) -> None:
        common.record_video(args.env_id, make_act(policy, decoder, obs_rms, device), args.seed,
                            os.path.join(run_dir, "videos", f"{name}_step{global_step}.mp4"))

    def save(finished: bool = False) -> bool:
        """Atomic checkpoint of everything --resume needs (and --eval-only reads)."""
        if not args.save_model:
            return False
        loop.update(global_step=global_step, iteration=iteration, stage=stage, stage_rollouts=stage_rollouts,
                    next_eval=next_eval, next_video=next_video, next_checkpoint=next_checkpoint, last_eval=last_eval,
                    episode_return=episode_return, episode_length=episode_length, env_time=env_time,
                    next_obs_raw=next_obs_raw)
        common.save_checkpoint(checkpoint_path, {
            "script": "gorl_ppo", "args": vars(args), "global_step": global_step, "stage": stage, "finished": finished,
            "obs_dim": obs_dim, "act_dim": act_dim, "policy": policy.state_dict(), "critic": critic.state_dict(),
            "decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(), "obs_rms": obs_rms.state_dict(),
            "refit_data": list(refit_data), "loop": loop, "envs": envs.state_dict(), "rng": common.rng_state(),
            "logger": logger.resume_state(global_step),
        })
        return True

    def stop_nonfinite(name: str) -> None:
        """Stop at once, naming what broke; the last checkpoint (written before this update) stays."""
        kept = f"the last good checkpoint {checkpoint_path} stays" if os.path.exists(checkpoint_path) else \
            "no checkpoint was written yet"
        print(f"error: non-finite {name} at stage {stage}, env step {global_step}; stopped ({kept})", file=sys.stderr)
        pbar.close()
        envs.close()
        logger.close()
        sys.exit(1)

    while True:
        rollouts_this_stage = iterations_per_stage[stage] + (args.fresh_iterations if stage < args.num_stages - 1 else 0)
        if stage_rollouts == rollouts_this_stage:
            # ---- End of a stage: checkpoint (the resume point if Phase 2 is interrupted) ----
            if args.capture_video:
                record_video(f"stage{stage}_end")
            save()
            if stage == args.num_stages - 1:
                break

            # ---- Phase 2: decoder refit on the latest on-policy (s, u) pairs ----
            fit_start = time.time()
            before = run_eval("boundary_before", stage)
            data_obs = torch.cat([o for o, _ in refit_data])  # (M, obs_dim), raw
            data_u = torch.cat([u for _, u in refit_data])  # (M, d), executed pre-tanh actions
            targets, old_decoder = data_u, decoder
            if args.decoder_targets == "resampled":
                data_s = torch.as_tensor(obs_rms.normalize(data_obs.cpu().numpy()), device=device)

                @torch.no_grad()
                def targets(idx):  # u = g_old(s, mu + sigma * xi): the current composite policy at obs[idx]
                    mu, sigma = policy(data_s[idx])
                    return old_decoder(data_obs[idx], mu + sigma * torch.randn_like(mu))

            refit = fit_decoder(data_obs, targets, args, obs_dim, act_dim, device, stop=lambda: interrupt.requested)
            if refit is None:  # Ctrl-C / SIGTERM: the refit restarts from the stage-end checkpoint on resume
                pbar.close()
                logger.close()  # flushes tensorboard and eval.csv before exiting
                interrupt.exit("gorl_ppo", run_dir, global_step, "stage_end" if args.save_model else "none")
            new_decoder, fit = refit
            if (bad := common.first_nonfinite({"losses/decoder_train": fit["train_loss"]})) is not None:
                stop_nonfinite(bad)
            # Diagnostics draw from their own generator: logging never moves the training random stream.
            probe_gen = torch.Generator(device=device).manual_seed(args.seed + stage)
            probe = data_obs[torch.randperm(len(data_obs), generator=probe_gen, device=device)[:2048]]
            diagnostics = boundary_diagnostics(policy, old_decoder, new_decoder, obs_rms, probe, probe_gen)

            # ---- Stage boundary: latent policy reset to N(0, I); critic and obs statistics kept ----
            reset_latent_policy(policy, optimizer)
            decoder = new_decoder
            refit_data.clear()  # the next refit must see only the next stage's composite policy
            stage, stage_rollouts = stage + 1, 0
            after = run_eval("boundary_after", stage)
            for name, value in {
                "losses/decoder_train": fit["train_loss"], "losses/decoder_val": fit["val_loss"],
                "eval/boundary_before": before.mean(), "eval/boundary_after": after.mean(),
                "charts/boundary_action_rms": diagnostics["action_rms_deterministic"],
                "charts/boundary_action_mean_rms": diagnostics["action_rms_mean"],
                "charts/boundary_action_std_old": diagnostics["action_std_old"],
                "charts/boundary_action_std_new": diagnostics["action_std_new"],
                "charts/decoder_fit_seconds": time.time() - fit_start,
            }.items():
                logger.scalar(name, value, global_step)
            pbar.write(
                f"stage {stage - 1} -> {stage} at step {global_step}: decoder val loss {fit['val_loss']:.3f} "
                f"on {fit['pairs']} pairs; eval {before.mean():.1f} -> {after.mean():.1f}; action RMS "
                f"{diagnostics['action_rms_deterministic']:.3f}; action std {diagnostics['action_std_old']:.3f} -> "
                f"{diagnostics['action_std_new']:.3f}; {time.time() - fit_start:.1f}s")
            if args.capture_video:
                record_video(f"stage{stage}_start")
            save()  # a crash later in this stage does not repeat the refit
            continue

        # ---- Phase 1: PPO on the latent policy, decoder frozen ----
        clip_coef = args.clip_coef if stage == 0 or args.clip_coef_late is None else args.clip_coef_late
        # The last `fresh` rollouts of a stage only gather refit data (Phase 2) with the policy frozen.
        collect_only = stage_rollouts >= iterations_per_stage[stage]
        if collect_only and stage_rollouts == iterations_per_stage[stage]:
            refit_data.clear()
        iteration += 0 if collect_only else 1
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / args.num_iterations) * args.learning_rate

        for step in range(T):
            obs_rms.update(next_obs_raw)
            raw = torch.as_tensor(next_obs_raw, dtype=torch.float32, device=device)
            s = torch.as_tensor(obs_rms.normalize(next_obs_raw), device=device)
            with torch.inference_mode():
                mu, sigma = policy(s)
                eps = mu + sigma * torch.randn_like(mu)  # latent action (N, d)
                logp = gaussian_log_prob(eps, mu, sigma)
                value = critic(s)
                u = decoder(raw, eps)  # pre-tanh action (N, d)
            b_obs[step], b_eps[step], b_logp[step], b_values[step] = s, eps, logp, value
            b_raw_obs[step], b_u[step] = raw, u

            t_env = time.time()
            next_obs_raw, reward, terminated, truncated, infos = envs.step(torch.tanh(u).cpu().numpy())
            env_time += time.time() - t_env
            done = terminated | truncated
            b_rewards[step] = torch.as_tensor(reward * args.reward_scale, dtype=torch.float32, device=device)
            b_terminated[step] = torch.as_tensor(terminated, dtype=torch.float32, device=device)
            b_dones[step] = torch.as_tensor(done, dtype=torch.float32, device=device)
            if done.any():
                # V of the true last observation: a truncated episode still bootstraps from it.
                final = torch.as_tensor(obs_rms.normalize(infos["final_obs"][done]), device=device)
                with torch.no_grad():
                    final_values = critic(final)
                b_final_values[step, torch.as_tensor(done, device=device)] = final_values
                for i in np.flatnonzero(done):
                    logger.scalar("charts/episodic_return", episode_return[i] + reward[i], global_step + i)
                    logger.scalar("charts/episodic_length", episode_length[i] + 1, global_step + i)
            episode_return = (episode_return + reward) * ~done
            episode_length = (episode_length + 1) * ~done
        global_step += args.batch_size
        stage_rollouts += 1
        with torch.no_grad():
            last_values = critic(torch.as_tensor(obs_rms.normalize(next_obs_raw), device=device))
        # V(s_{t+1}) of the true next state: the next step's value, or V(final obs) where an episode ended.
        b_next_values = torch.cat([b_values[1:], last_values[None]])
        b_next_values = torch.where(b_dones.bool(), b_final_values, b_next_values)
        advantages, returns = compute_gae(b_rewards, b_values, b_next_values, b_terminated, b_dones,
                                          args.gamma, args.gae_lambda)
        refit_data.append((b_raw_obs.reshape(-1, obs_dim).clone(), b_u.reshape(-1, act_dim).clone()))
        if collect_only:
            pbar.update(args.batch_size)
        else:
            # PPO update in latent space: the ratio is over eps, so no tanh/decoder Jacobian is needed.
            f_obs, f_eps, f_logp = b_obs.reshape(-1, obs_dim), b_eps.reshape(-1, act_dim), b_logp.reshape(-1)
            f_adv, f_ret, f_val = advantages.reshape(-1), returns.reshape(-1), b_values.reshape(-1)
            clipfracs, approx_kls = [], []
            for epoch in range(args.update_epochs):
                perm = torch.randperm(args.batch_size, device=device)
                for start in range(0, args.batch_size, args.minibatch_size):
                    mb = perm[start:start + args.minibatch_size]
                    mu, sigma = policy(f_obs[mb])
                    new_logp = gaussian_log_prob(f_eps[mb], mu, sigma)
                    log_ratio = new_logp - f_logp[mb]
                    ratio = log_ratio.exp()
                    with torch.no_grad():
                        approx_kls.append(((ratio - 1) - log_ratio).mean().item())
                        clipfracs.append(((ratio - 1.0).abs() > clip_coef).float().mean().item())
                    adv = f_adv[mb]
                    if args.norm_adv:
                        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
                    v_loss = 0.5 * (critic(f_obs[mb]) - f_ret[mb]).pow(2).mean()
                    entropy = (sigma.log() + 0.5 * np.log(2 * np.pi * np.e)).sum(-1).mean()
                    penalty = prior_penalty(mu, sigma, args.prior_penalty).mean()
                    loss = pg_loss - args.ent_coef * entropy + args.vf_coef * v_loss + args.kl_coef * penalty
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    # Clipped separately: a shared norm lets the critic's large early gradients
                    # (returns are O(100) on dm_control) shrink the policy's step to almost nothing.
                    policy_grad = nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                    critic_grad = nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                    # Checked before the step, so a bad update never reaches the parameters. One sum
                    # is non-finite iff a term is (the loss holds every loss term); naming the
                    # culprit costs more, so it only runs on failure.
                    if not torch.isfinite(loss + policy_grad + critic_grad):
                        stop_nonfinite(common.first_nonfinite({
                            "losses/policy_loss": pg_loss, "losses/value_loss": v_loss, "losses/prior_kl": penalty,
                            "losses/entropy": entropy, "gradient norm of the policy": policy_grad,
                            "gradient norm of the critic": critic_grad}) or "sum of the losses and gradient norms")
                    optimizer.step()
            bad = common.first_nonfinite({"policy parameters": list(policy.parameters()),
                                          "critic parameters": list(critic.parameters())})
            if bad is not None:
                stop_nonfinite(bad)

            explained_var = 1.0 - (f_ret - f_val).var() / (f_ret.var() + 1e-8)
            sps = global_step / logger.wall_time()
            for name, value in {
                "losses/policy_loss": pg_loss.item(), "losses/value_loss": v_loss.item(),
                "losses/entropy": entropy.item(), "losses/prior_kl": penalty.item(),
                "losses/approx_kl": np.mean(approx_kls), "losses/clipfrac": np.mean(clipfracs),
                "losses/explained_variance": explained_var.item(),
                "charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/SPS": sps,
                "charts/env_time_fraction": env_time / logger.wall_time(), "charts/stage": stage,
                "charts/latent_mu_abs": mu.abs().mean().item(), "charts/latent_sigma": policy.log_sigma.exp().mean().item(),
                "charts/action_abs": torch.tanh(b_u).abs().mean().item(),
            }.items():
                logger.scalar(name, value, global_step)

            if global_step >= next_eval:
                last_eval = run_eval("periodic", stage).mean()
                next_eval += args.eval_interval
            pbar.update(args.batch_size)
            pbar.set_postfix(stage=f"{stage + 1}/{args.num_stages}", sps=f"{sps:.0f}", eval=f"{last_eval:.1f}")

        if args.capture_video and global_step >= next_video:
            record_video("train")
            next_video += args.video_interval
        if interrupt.requested:
            saved = save()
            pbar.close()
            logger.close()  # flushes tensorboard and eval.csv before exiting
            interrupt.exit("gorl_ppo", run_dir, global_step, "now" if saved else "none")
        if global_step >= next_checkpoint:
            save()
            next_checkpoint += args.checkpoint_interval

    final = run_eval("final", stage)
    save(finished=True)
    pbar.close()
    elapsed = logger.wall_time()
    print(f"final deterministic return {final.mean():.1f} +- {final.std():.1f}; {global_step} env steps in "
          f"{elapsed:.0f}s ({global_step / elapsed:.0f} steps/s, env {env_time / elapsed:.0%} of wall time)")
    envs.close()
    logger.close()
