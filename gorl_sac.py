"""GoRL-SAC: the off-policy instantiation of GoRL (spec §5), a Gaussian latent actor trained by SAC
through a frozen flow-matching action decoder.

    eps ~ pi_theta(eps | s)   latent actor, diagonal Gaussian, reparameterised (fast timescale)
    u   = g_phi(s, eps)       flow-matching decoder, frozen during RL, refit between stages (slow)
    a   = tanh(u)             env action in [-1, 1]

The paper only ran PPO; this variant is this project's. Critics are twin Q(s, a) on *actions*, so
the replay buffer stays valid across decoder refits; the actor's gradient passes through the
frozen decoder's Euler steps to eps only; the entropy bonus and its target are on the latent.
`--num-stages 1` is a tanh-Gaussian SAC at identical settings. Section numbers (spec §N) refer to
GORL_SPEC.md.
"""

from __future__ import annotations

import copy
import os
import shutil
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
    exp_name: str = "gorl_sac"
    """name of this experiment (first part of the run name)"""
    seed: int = 1
    """seed of the experiment (envs are seeded seed, seed+1, ...)"""
    torch_deterministic: bool = True
    """sets torch.backends.cudnn.deterministic"""
    cuda: bool = False
    """run the networks on a GPU when one is present (the simulator always runs on the CPU)"""
    torch_threads: int = 1
    """torch CPU threads"""
    track: bool = False
    """mirror the tensorboard logs to Weights & Biases (falls back to offline without network)"""
    wandb_project_name: str = "gorl"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    capture_video: bool = False
    """record a deterministic episode (env 0's seed) to <run>/videos/ every --video-interval env steps and at every stage end; with --eval-only, the first evaluated episode. Headless: MUJOCO_GL=egl or osmesa"""
    video_interval: int = 100_000
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
    env_id: str = "walker-walk"
    """dm_control 'domain-task', 'dm_control/domain-task-v0', or a gymnasium id with a Box action space"""
    env_backend: str = "auto"
    """auto (envpool where it has the dm_control task and matches it, i.e. not finger-*; else dm_control), envpool, or dm_control"""
    env_threads: int = 1
    """simulator threads of the envpool backend"""
    total_timesteps: int = 500_000
    """total env steps, warm-up and all stages included"""
    num_envs: int = 1
    """parallel envs; each loop iteration adds num_envs transitions"""
    learning_starts: int = 5_000
    """env steps of uniformly random actions before updates begin"""

    # ---- SAC (Phase 1, latent actor) ----
    buffer_size: int = 1_000_000
    """replay buffer capacity (transitions)"""
    batch_size: int = 128
    """transitions per gradient update (128, not the usual 256: ~60% of the update cost on this CPU, and it learned walker-walk as well; README, GoRL-SAC, Speed)"""
    updates_per_step: float = 0.5
    """critic updates per env step (update-to-data ratio; 0.5 = one update every 2 steps): ratio 0.2 ran faster but learned walker-walk to only 574 in 500k steps (README, GoRL-SAC, Speed)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak averaging rate of the target critics"""
    policy_lr: float = 3e-4
    """Adam learning rate of the latent actor"""
    q_lr: float = 1e-3
    """Adam learning rate of the twin critics"""
    policy_frequency: int = 2
    """critic updates per actor (and alpha) update"""
    alpha: float = 0.2
    """entropy coefficient when --no-autotune"""
    autotune: bool = True
    """tune alpha so the entropy estimate (see --tanh-correction) tracks -action_dim"""
    entropy_target: Literal["latent", "action"] = "latent"
    """'latent': alpha keeps -logp at -action_dim in every stage; 'action': minus the decoder's mean log-volume (measured at each refit), so the target stays -action_dim for the actions"""
    tanh_correction: bool = True
    """entropy terms use log pi(eps|s) - sum log(1 - tanh(u)^2), SAC's squashing correction; off: the bare latent log-density (its sigma ran to the clamp on cheetah-run)"""
    kl_coef: float = 1e-3
    """beta: weight of KL(pi_theta(.|s) || N(0, I)) in the actor loss (spec §5)"""
    hidden: int = 256
    """width of actor and critic MLPs"""
    layers: int = 2
    """hidden layers of actor and critic MLPs"""

    # ---- GoRL stages (spec §2) ----
    num_stages: int = 2
    """K: number of RL stages; K - 1 decoder refits. 1 = tanh-Gaussian SAC baseline"""
    first_stage_fraction: float = 2 / 3
    """share of the env steps spent in stage 0; the rest is split equally over the later stages"""
    stage_fractions: tuple[float, ...] = ()
    """relative env-step budget of each stage (K numbers); overrides --first-stage-fraction"""

    # ---- decoder (Phase 2, spec §3) ----
    decoder_hidden: int = 64
    """width of the velocity MLP"""
    decoder_layers: int = 4
    """hidden layers of the velocity MLP"""
    euler_steps: int = 10
    """N: Euler steps from t = 1 (noise) to t = 0 (action)"""
    decoder_data_steps: int = 20_000
    """refit on the states of the latest this-many transitions of the buffer (the current policy's, spec §7)"""
    decoder_targets: Literal["executed", "resampled"] = "resampled"
    """'executed': the stored pre-tanh u; 'resampled': fresh u ~ current composite policy at the stored states"""
    decoder_train_steps: int = 12000
    """Adam steps per decoder refit (the PPO script's measured default)"""
    decoder_batch_size: int = 256
    """(s, u) pairs per decoder step"""
    decoder_noise_draws: int = 4
    """independent (eps, t) draws per pair and step"""
    decoder_lr: float = 1e-3
    """decoder Adam learning rate, decayed to 0 along a cosine over the refit"""
    decoder_val_fraction: float = 0.1
    """share of the refit data held out; the best validation weights are kept"""
    decoder_val_every: int = 100
    """steps between validation checks"""
    decoder_split_first_layer: bool = True
    """speed: compute the state and time shares of the decoder's first layer once per decode, not at every Euler step (same u up to float rounding; off: the plain Euler loop)"""
    u_clip: float = 3.0
    """targets are clipped to |u| <= u_clip so the decoder does not chase tanh saturation"""

    # ---- evaluation ----
    eval_interval: int = 20_000
    """env steps between deterministic evaluations (each takes 3-6 s on this CPU for walker-walk)"""
    eval_episodes: int = 10
    """episodes per evaluation (fixed seeds, so evaluations are paired)"""
    eval_seed: int = 10_000
    """seed of the first eval episode; eval env i uses eval_seed + i"""


# ---- networks ----

LOG_SIGMA_MIN, LOG_SIGMA_MAX = -5.0, 2.0


def mlp(in_dim: int, hidden: int, layers: int) -> nn.Sequential:
    dims = [in_dim] + [hidden] * layers
    mods: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        mods += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*mods)


class LatentActor(nn.Module):
    """pi_theta(eps | s) = N(mu(s), diag(sigma(s)^2)), reparameterised."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int):
        super().__init__()
        self.trunk = mlp(obs_dim, hidden, layers)
        self.mu_head = nn.Linear(hidden, act_dim)
        self.log_sigma_head = nn.Linear(hidden, act_dim)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(obs)
        log_sigma = self.log_sigma_head(h).clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)
        return self.mu_head(h), log_sigma.exp()  # (B, d), (B, d)

    @torch.no_grad()
    def reset_to_prior(self) -> None:
        """Exactly N(0, I) for every state: zero heads (mu = 0, log sigma = 0); trunk kept (spec §2)."""
        for head in (self.mu_head, self.log_sigma_head):
            head.weight.zero_()
            head.bias.zero_()

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.mu_head.parameters(), *self.log_sigma_head.parameters()]


class EnsembleLinear(nn.Module):
    """`n` independent linear layers applied in one batched matmul: x (n, B, in) -> (n, B, out)."""

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / np.sqrt(in_dim)  # nn.Linear's default initialisation, per member
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class TwinQ(nn.Module):
    """Q_1(s, a), Q_2(s, a) on env actions, evaluated together in one batched forward."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int):
        super().__init__()
        dims = [obs_dim + act_dim] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [EnsembleLinear(2, a, b), nn.ReLU()]
        self.net = nn.Sequential(*mods, EnsembleLinear(2, hidden, 1))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, action], dim=-1).expand(2, -1, -1)  # (2, B, obs + act)
        return self.net(x).squeeze(-1)  # (2, B)


class FlowDecoder(nn.Module):
    """g_phi(s, eps): conditional flow matching from the fixed prior N(0, I) to pre-tanh actions u.

    Velocity v_phi(s_norm, x, emb(t)) is an MLP with SiLU; emb(t) = [cos(2^j t), sin(2^j t)],
    j = 0..3. The last layer is zero at initialisation, so g(s, eps) = eps exactly (stage 0 is
    plain tanh-Gaussian SAC). Observations are normalised with statistics frozen at the refit.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int, euler_steps: int,
                 split_first_layer: bool = True):
        super().__init__()
        self.euler_steps, self.split_first_layer = euler_steps, split_first_layer
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
        """Explicit Euler from t = 1 (x = eps) to t = 0: x <- x - (1/N) v(s, x, t). Differentiable
        in eps, which is how the actor's gradient reaches the latent through a frozen decoder."""
        s_norm = self.normalize(obs)
        x, dt = eps, 1.0 / self.euler_steps
        for k in range(self.euler_steps):
            t = torch.full_like(x[:, :1], 1.0 - k * dt)
            x = x - dt * self.velocity(s_norm, x, t)
        return x  # u, (B, d)

    def integrate_split(self, obs: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """`integrate` with the first layer split by input, W1 [s; x; emb] = W_s s + W_x x + W_e emb:
        the state's share and each step's time share do not depend on x, so they are computed once
        per decode instead of at every Euler step. Equal up to float rounding (tests/test_sac.py);
        the forward decode ran 25-45% faster here at batch 1 to 256 (README, GoRL-SAC, Speed)."""
        first, *rest = [m for m in self.net if isinstance(m, nn.Linear)]
        w_s, w_x, w_e = first.weight.split([obs.shape[-1], eps.shape[-1], 8], dim=1)
        w_x = w_x.T.contiguous()  # (d, hidden)
        dt = 1.0 / self.euler_steps
        t = 1.0 - dt * torch.arange(self.euler_steps, dtype=eps.dtype, device=eps.device)[:, None]  # (N, 1)
        emb = torch.cat([torch.cos(self.freqs * t), torch.sin(self.freqs * t)], dim=-1)  # (N, 8)
        h_state = nn.functional.linear(self.normalize(obs), w_s, first.bias)  # (B, hidden)
        h_time = emb @ w_e.T  # (N, hidden)
        x = eps
        for k in range(self.euler_steps):
            h = torch.addmm(h_state + h_time[k], x, w_x)  # the first layer, (B, hidden)
            for layer in rest:
                h = layer(nn.functional.silu(h))
            x = x - dt * h  # h is the velocity, (B, d)
        return x  # u, (B, d)

    def forward(self, obs: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return eps
        return self.integrate_split(obs, eps) if self.split_first_layer else self.integrate(obs, eps)


# ---- helpers ----


class ReplayBuffer:
    """Ring buffer of (obs, action, u, reward, next_obs, terminated, truncated). `u` is the executed
    pre-tanh action, kept for decoder refits; the critics only ever see `action`."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.capacity, self.size, self.ptr = capacity, 0, 0
        self.data = {
            "obs": np.zeros((capacity, obs_dim), np.float32), "next_obs": np.zeros((capacity, obs_dim), np.float32),
            "action": np.zeros((capacity, act_dim), np.float32), "u": np.zeros((capacity, act_dim), np.float32),
            "reward": np.zeros(capacity, np.float32), "terminated": np.zeros(capacity, np.float32),
            "truncated": np.zeros(capacity, np.float32),
        }

    def add(self, **batch: np.ndarray) -> None:
        n = len(batch["obs"])
        idx = (self.ptr + np.arange(n)) % self.capacity
        for key, value in batch.items():
            self.data[key][idx] = value
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator, device) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, self.size, batch_size)
        return {k: torch.as_tensor(v[idx], device=device) for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return {"ptr": self.ptr, "size": self.size, "data": {k: v[: self.size].copy() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.ptr, self.size = state["ptr"], state["size"]
        for k, v in state["data"].items():
            self.data[k][: self.size] = v

    def latest(self, n: int) -> dict[str, np.ndarray]:
        """The newest min(n, size) transitions in time order (the ring is unrolled first, spec §7)."""
        n = min(n, self.size)
        idx = (self.ptr - n + np.arange(n)) % self.capacity
        return {k: v[idx] for k, v in self.data.items()}


def gaussian_log_prob(eps: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(eps; mu, diag(sigma^2)) summed over dims, (B,): the latent log-likelihood."""
    return (-0.5 * ((eps - mu) / sigma).pow(2) - sigma.log() - 0.5 * np.log(2 * np.pi)).sum(-1)


def kl_to_prior(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2), (B,)."""
    return 0.5 * (mu.pow(2) + sigma.pow(2) - 1.0 - 2.0 * sigma.log()).sum(-1)


def sample_action(actor: LatentActor, decoder: FlowDecoder, obs: torch.Tensor, tanh_correction: bool = True):
    """eps = mu + sigma * xi (reparameterised), u = g(s, eps), a = tanh(u). Returns a, u, logp, mu, sigma.

    logp is what the entropy terms use: the exact latent log-density log pi(eps|s), minus (with
    tanh_correction) the log-Jacobian of the tanh squashing, log(1 - tanh(u)^2) per dim, as SAC
    does. Without it nothing stops the latent from growing wide and driving the actions into
    saturation: on cheetah-run sigma sat at its clamp (e^2) within 6k steps. The decoder's own
    Jacobian is left out: GoRL keeps the entropy on the tractable side of the decoder."""
    mu, sigma = actor(obs)
    eps = mu + sigma * torch.randn_like(mu)
    u = decoder(obs, eps)
    logp = gaussian_log_prob(eps, mu, sigma)
    if tanh_correction:  # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|
        logp = logp - (2.0 * (np.log(2.0) - u - nn.functional.softplus(-2.0 * u))).sum(-1)
    return torch.tanh(u), u, logp, mu, sigma


def q_target(batch, actor, decoder, qf_target, alpha: float, gamma: float, tanh_correction: bool = True):
    """r + gamma * (1 - terminated) * (min Q'(s', a') - alpha log pi(eps'|s')). A truncated
    transition bootstraps from its true next observation; only termination cuts the return."""
    with torch.no_grad():
        next_action, _, next_logp, _, _ = sample_action(actor, decoder, batch["next_obs"], tanh_correction)
        next_q = qf_target(batch["next_obs"], next_action).min(0).values - alpha * next_logp
        return batch["reward"] + gamma * (1.0 - batch["terminated"]) * next_q


def critic_update(batch, actor, decoder, qf, qf_target, q_optimizer, alpha: float, gamma: float,
                  tanh_correction: bool = True):
    """One step on both critics (one batched forward). Returns (loss, Q values (2, B), gradient norm)."""
    target = q_target(batch, actor, decoder, qf_target, alpha, gamma, tanh_correction)
    q = qf(batch["obs"], batch["action"])  # (2, B)
    q_loss = (q - target).pow(2).mean(1).sum()
    q_optimizer.zero_grad(set_to_none=True)
    q_loss.backward()
    q_grad_norm = nn.utils.get_total_norm([p.grad for p in qf.parameters()])
    q_optimizer.step()
    return q_loss, q, q_grad_norm


def actor_update(batch, actor, decoder, qf, actor_optimizer, alpha: float, kl_coef: float,
                 tanh_correction: bool = True):
    """alpha log pi(eps|s) - min Q(s, tanh(g(s, eps))) + beta KL(pi || N(0, I)), eps reparameterised.
    The gradient flows through the frozen decoder's Euler steps into eps; neither the decoder's nor
    the critics' parameters require gradients here, so only the actor steps."""
    a_pi, _, logp, mu, sigma = sample_action(actor, decoder, batch["obs"], tanh_correction)
    qf.requires_grad_(False)  # backward then skips the critics' weight gradients (~1/3 of this update)
    q_pi = qf(batch["obs"], a_pi).min(0).values
    actor_loss = (alpha * logp - q_pi + kl_coef * kl_to_prior(mu, sigma)).mean()
    actor_optimizer.zero_grad(set_to_none=True)
    actor_loss.backward()
    actor_grad_norm = nn.utils.get_total_norm([p.grad for p in actor.parameters()])
    actor_optimizer.step()
    qf.requires_grad_(True)
    return actor_loss, actor_grad_norm, a_pi.detach(), logp.detach(), mu.detach(), sigma.detach()


def flow_matching_loss(decoder: FlowDecoder, s_norm, u, draws: int, generator=None) -> torch.Tensor:
    """Fixed-prior conditional flow matching (spec §3): eps fresh and independent of the latent."""
    s_norm, u = s_norm.repeat(draws, 1), u.repeat(draws, 1)  # (draws * B, .)
    eps = torch.randn(u.shape, generator=generator, device=u.device)
    t = torch.rand((u.shape[0], 1), generator=generator, device=u.device)
    x_t = t * eps + (1.0 - t) * u
    return (decoder.velocity(s_norm, x_t, t) - (eps - u)).pow(2).mean()


def fit_decoder(obs: torch.Tensor, targets, args: Args, obs_dim: int, act_dim: int, device,
                stop=lambda: False) -> Optional[tuple[FlowDecoder, dict]]:
    """Fit a fresh, frozen-after decoder on raw obs (M, obs_dim) and targets: a tensor u (M, d), or a
    function idx -> u drawing fresh actions of the composite policy at obs[idx]. Keeps the weights
    with the best validation loss. Returns None if `stop()` turns true (Ctrl-C), and stops early
    with a NaN train loss if the loss stops being finite."""
    decoder = FlowDecoder(obs_dim, act_dim, args.decoder_hidden, args.decoder_layers, args.euler_steps,
                          args.decoder_split_first_layer).to(device)
    decoder.obs_mean.copy_(obs.mean(0))  # statistics of the refit data, frozen with the decoder
    decoder.obs_var.copy_(obs.var(0))
    decoder.is_identity.fill_(False)
    s_norm = decoder.normalize(obs)
    draw = targets if callable(targets) else (lambda idx: targets[idx])
    perm = torch.randperm(len(obs), device=device)
    n_val = max(1, int(args.decoder_val_fraction * len(obs)))
    val, train = perm[:n_val], perm[n_val:]
    u_val = draw(val).clamp(-args.u_clip, args.u_clip)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=args.decoder_lr, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + np.cos(np.pi * step / args.decoder_train_steps)))
    val_gen = torch.Generator(device=device)
    best, best_state, train_loss = float("inf"), None, float("nan")
    for step in range(1, args.decoder_train_steps + 1):
        idx = train[torch.randint(len(train), (args.decoder_batch_size,), device=device)]
        loss = flow_matching_loss(decoder, s_norm[idx], draw(idx).clamp(-args.u_clip, args.u_clip),
                                  args.decoder_noise_draws)
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
            val_gen.manual_seed(0)  # the same (eps, t) draws at every check
            with torch.no_grad():
                current = flow_matching_loss(decoder, s_norm[val], u_val, args.decoder_noise_draws, val_gen).item()
            if current < best:
                best, best_state = current, copy.deepcopy(decoder.state_dict())
    if best_state is not None:
        decoder.load_state_dict(best_state)
    decoder.requires_grad_(False)  # frozen: only eps receives gradients through it
    return decoder, {"train_loss": train_loss, "val_loss": best, "pairs": len(obs)}


@torch.no_grad()
def boundary_diagnostics(actor, old_decoder, new_decoder, obs, generator, samples: int = 32) -> dict:
    """Action-space checks of a refit (spec §7). Old composite policy tanh(g_old(s, mu + sigma xi));
    new one after the reset: tanh(g_new(s, xi))."""
    mu, sigma = actor(obs)
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


def decoder_log_volume(decoder: FlowDecoder, obs: torch.Tensor, generator) -> float:
    """E log|det dg(s, eps)/d eps| over states and eps ~ N(0, I): how much the decoder expands (> 0) or
    shrinks (< 0) volume, so entropy(u) = entropy(eps) + this. d backward passes give the per-sample
    Jacobian rows (samples are independent, so the gradient of a column's sum is each sample's row)."""
    if decoder.is_identity:
        return 0.0
    eps = torch.randn(obs.shape[0], decoder.out.out_features, generator=generator, device=obs.device,
                      requires_grad=True)
    u = decoder.integrate(obs, eps)  # (B, d)
    rows = [torch.autograd.grad(u[:, j].sum(), eps, retain_graph=True)[0] for j in range(u.shape[1])]
    return torch.linalg.slogdet(torch.stack(rows, dim=1)).logabsdet.mean().item()  # (B, d, d) Jacobians


@torch.no_grad()
def action_noise(actor: LatentActor, decoder: FlowDecoder, obs: torch.Tensor, generator, samples: int = 8) -> float:
    """Per-state spread of the executed action: std over `samples` draws of tanh(g(s, mu + sigma xi))
    at each state, averaged over states and dims. This is the exploration noise the env sees; alpha
    only controls it through the latent entropy, so it is logged to see whether it narrows from
    stage to stage (README, GoRL-SAC)."""
    obs_rep = obs.repeat(samples, 1)  # (samples * B, obs_dim)
    mu, sigma = actor(obs_rep)
    eps = mu + sigma * torch.randn(mu.shape, generator=generator, device=mu.device)
    a = torch.tanh(decoder(obs_rep, eps)).reshape(samples, *obs.shape[:1], -1)  # (samples, B, d)
    return a.std(0).mean().item()


def make_act(actor: LatentActor, decoder: FlowDecoder, device, stochastic_seed: Optional[int] = None):
    """Composite policy: deterministic a = tanh(g(s, mu(s))), or, given a seed, stochastic
    a = tanh(g(s, mu + sigma * xi)) drawn from its own generator (evaluating never moves the
    training random stream)."""
    generator = None if stochastic_seed is None else torch.Generator(device=device).manual_seed(stochastic_seed)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
        mu, sigma = actor(obs_t)
        eps = mu if generator is None else mu + sigma * torch.randn(mu.shape, generator=generator, device=device)
        return torch.tanh(decoder(obs_t, eps)).cpu().numpy()

    return act


def reset_latent_actor(actor: LatentActor, optimizer: torch.optim.Optimizer) -> None:
    """Stage boundary (spec §5): pi_theta(.|s) = N(0, I) exactly, fresh Adam moments for the heads.
    Critics, targets, alpha and the buffer are kept."""
    actor.reset_to_prior()
    for p in actor.head_parameters():
        optimizer.state.pop(p, None)


def stage_ends(args: Args) -> list[int]:
    """Env step at which each stage ends (the last one at total_timesteps)."""
    if args.stage_fractions:
        fractions = np.asarray(args.stage_fractions, dtype=np.float64)
    elif args.num_stages == 1:
        fractions = np.ones(1)
    else:
        later = (1.0 - args.first_stage_fraction) / (args.num_stages - 1)
        fractions = np.asarray([args.first_stage_fraction] + [later] * (args.num_stages - 1))
    return [int(x) for x in np.round(np.cumsum(fractions) / fractions.sum() * args.total_timesteps)]


def validate(args: Args) -> None:
    """Every check that can fail runs before any work, with a one-line message."""
    E = common.UsageError
    for name in ("total_timesteps", "num_envs", "buffer_size", "batch_size", "policy_frequency", "num_stages",
                 "hidden", "layers", "decoder_hidden", "decoder_layers", "euler_steps", "decoder_data_steps",
                 "decoder_train_steps", "decoder_batch_size", "decoder_noise_draws", "decoder_val_every",
                 "eval_interval", "eval_episodes", "torch_threads", "env_threads", "checkpoint_interval",
                 "video_interval"):
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
    if args.learning_starts < 0 or args.updates_per_step <= 0:
        raise E("--learning-starts must be >= 0 and --updates-per-step > 0")
    if args.learning_starts < args.batch_size:
        raise E(f"--learning-starts {args.learning_starts} is less than one --batch-size {args.batch_size}")
    if args.total_timesteps <= args.learning_starts:
        raise E(f"--total-timesteps {args.total_timesteps} leaves no updates after --learning-starts "
                f"{args.learning_starts}")
    if args.stage_fractions and (len(args.stage_fractions) != args.num_stages or min(args.stage_fractions) <= 0):
        raise E(f"--stage-fractions {' '.join(map(str, args.stage_fractions))} must be {args.num_stages} positive "
                "numbers (one per stage)")
    if not 0.0 < args.first_stage_fraction < 1.0:
        raise E(f"--first-stage-fraction must be in (0, 1), got {args.first_stage_fraction}")
    ends = stage_ends(args)
    if ends[0] <= args.learning_starts or min(np.diff([0] + ends)) < args.num_envs:
        raise E(f"--total-timesteps {args.total_timesteps} gives stage ends {ends}: stage 0 must outlast "
                f"--learning-starts {args.learning_starts} and every stage needs env steps")
    common.resolve_backend(args.env_id, args.env_backend)  # raises on unknown ids and backends
    common.make_env(args.env_id, seed=0)().close()  # raises on non-Box or unbounded action spaces
    if args.capture_video:
        common.check_render(args.env_id)


def build_from_checkpoint(ckpt: dict, args: Args, device):
    obs_dim, act_dim = ckpt["obs_dim"], ckpt["act_dim"]
    actor = LatentActor(obs_dim, act_dim, args.hidden, args.layers).to(device)
    actor.load_state_dict(ckpt["actor"])
    decoder = FlowDecoder(obs_dim, act_dim, args.decoder_hidden, args.decoder_layers, args.euler_steps,
                          args.decoder_split_first_layer).to(device)
    decoder.load_state_dict(ckpt["decoder"])
    return actor, decoder


def saved_args(ckpt: dict) -> Args:
    return Args(**{k: v for k, v in ckpt["args"].items() if k in Args.__dataclass_fields__})


def evaluate_checkpoint(args: Args) -> None:
    """--eval-only: the checkpoint's actor and decoder on fresh eval envs."""
    ckpt = common.load_checkpoint(args.checkpoint, "gorl_sac")
    saved = saved_args(ckpt)
    if args.capture_video:
        common.check_render(saved.env_id)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    actor, decoder = build_from_checkpoint(ckpt, saved, device)
    seed = args.eval_seed if args.eval_stochastic else None
    returns = common.evaluate(saved.env_id, make_act(actor, decoder, device, seed), args.eval_episodes,
                              args.eval_seed, saved.env_backend)
    mode = "stochastic" if args.eval_stochastic else "deterministic"
    print(f"{saved.env_id} step {ckpt['global_step']} stage {ckpt['stage']}: {mode} "
          f"return {returns.mean():.4f} +- {returns.std():.4f} over {len(returns)} episodes")
    if args.capture_video:
        path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "videos",
                            f"eval_step{ckpt['global_step']}_{mode}_seed{args.eval_seed}.mp4")
        # Seeded like the first eval episode; dm_control renders it, and its initial state for a seed
        # differs from envpool's, so the video's return is printed separately.
        ret = common.record_video(saved.env_id, make_act(actor, decoder, device, seed), args.eval_seed, path)
        print(f"video: {path} (return {ret:.4f})")


if __name__ == "__main__":
    args = tyro.cli(Args)
    ckpt = None
    try:
        if args.resume:  # every other flag is ignored: the run continues with the arguments it started with
            if args.eval_only:
                raise common.UsageError("--resume continues training; evaluate with --eval-only --checkpoint "
                                        f"{os.path.join(args.resume, 'checkpoint.pt')}")
            ckpt = common.load_resume(args.resume, "gorl_sac")
        else:
            validate(args)
        if args.eval_only:
            evaluate_checkpoint(args)
            sys.exit(0)
    except common.UsageError as err:
        common.exit_on_usage_error(err)
    if ckpt is None:
        run_name = f"{args.env_id.replace('/', '_').replace(':', '_')}__{args.exp_name}__K{args.num_stages}__{args.seed}__{int(time.time())}"
        run_dir = args.run_dir or os.path.join("runs", run_name)
    else:
        run_dir, args = args.resume, saved_args(ckpt)
    ends = stage_ends(args)

    common.seed_everything(args.seed, args.torch_deterministic)
    torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    envs = common.make_vector_env(args.env_id, args.num_envs, args.seed, args.env_backend, args.env_threads)
    obs_dim = envs.single_observation_space.shape[0]
    act_dim = envs.single_action_space.shape[0]  # latent dim = action dim (spec §1)
    logger = common.RunLogger(run_dir, args, args.track, args.wandb_project_name, args.wandb_entity,
                              resume=ckpt["logger"] if ckpt else None)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")

    actor = LatentActor(obs_dim, act_dim, args.hidden, args.layers).to(device)
    qf = TwinQ(obs_dim, act_dim, args.hidden, args.layers).to(device)
    qf_target = copy.deepcopy(qf).requires_grad_(False)
    decoder = FlowDecoder(obs_dim, act_dim, args.decoder_hidden, args.decoder_layers, args.euler_steps,
                          args.decoder_split_first_layer).to(device)
    decoder.requires_grad_(False)  # never trained by the RL losses; only refit in Phase 2
    # fused: one kernel per step for all parameters; the optimizer steps of an update took 0.7 ms
    # instead of 1.9 on this CPU (README, GoRL-SAC, Speed). Same algorithm.
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=True)
    q_optimizer = torch.optim.Adam(qf.parameters(), lr=args.q_lr, fused=True)
    log_alpha = torch.zeros(1, device=device, requires_grad=True)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=args.q_lr, fused=True)
    buffer = ReplayBuffer(args.buffer_size, obs_dim, act_dim)

    # Everything the loop carries from one env step to the next; a checkpoint saves it whole.
    loop = {"global_step": 0, "stage": 0, "num_updates": 0, "update_credit": 0.0, "next_eval": 0, "next_log": 0,
            "next_video": args.video_interval, "next_checkpoint": args.checkpoint_interval, "last_eval": float("nan"),
            "episode_return": np.zeros(args.num_envs), "episode_length": np.zeros(args.num_envs, dtype=int),
            "latest": {}, "target_entropy": -float(act_dim), "env_time": 0.0, "update_time": 0.0}
    if ckpt is None:
        obs, _ = envs.reset(seed=args.seed)
        print(f"run directory: {run_dir}; device {device}; stages end at env steps {ends}")
    else:  # ---- resume: restore every piece of state, then replay the envs to the same step ----
        actor.load_state_dict(ckpt["actor"])
        qf.load_state_dict(ckpt["qf"])
        qf_target.load_state_dict(ckpt["qf_target"])
        decoder.load_state_dict(ckpt["decoder"])
        actor_optimizer.load_state_dict(ckpt["actor_optimizer"])
        q_optimizer.load_state_dict(ckpt["q_optimizer"])
        with torch.no_grad():
            log_alpha.copy_(ckpt["log_alpha"])
        alpha_optimizer.load_state_dict(ckpt["alpha_optimizer"])
        buffer.load_state_dict(ckpt["buffer"])
        loop = ckpt["loop"]
        obs = envs.load_state_dict(ckpt["envs"])
        if not np.array_equal(obs, loop["obs"]):
            print("warning: replaying the envs did not reproduce the saved observations (another machine or library "
                  "version?); the episodes in progress continue from the replayed state", file=sys.stderr)
        rng.bit_generator.state = ckpt["np_rng"]
        common.set_rng_state(ckpt["rng"])
        print(f"resuming {run_dir} at env step {loop['global_step']} (stage {loop['stage']})")
    global_step, stage, num_updates, update_credit = (loop[k] for k in ("global_step", "stage", "num_updates",
                                                                         "update_credit"))
    next_eval, next_log, next_video, next_checkpoint, last_eval = (
        loop[k] for k in ("next_eval", "next_log", "next_video", "next_checkpoint", "last_eval"))
    episode_return, episode_length = loop["episode_return"], loop["episode_length"]
    latest = loop["latest"]  # the newest update's losses and batch statistics, for the logs
    # seconds spent in the simulator and in gradient updates (pauses excluded), to say where the time goes
    env_time, update_time = loop.get("env_time", 0.0), loop.get("update_time", 0.0)
    target_entropy = loop["target_entropy"]  # for the entropy estimate -logp of sample_action
    alpha = log_alpha.exp().item() if args.autotune else args.alpha
    pbar = common.progress_bar(args.total_timesteps, initial=global_step)
    interrupt = common.Interrupt()

    def run_eval(tag: str, stage: int) -> np.ndarray:
        returns = common.evaluate(args.env_id, make_act(actor, decoder, device), args.eval_episodes,
                                  args.eval_seed, args.env_backend)
        logger.eval_row(global_step, stage, returns, tag)
        if tag in ("periodic", "final"):
            logger.scalar("eval/return_mean", returns.mean(), global_step)
            logger.scalar("eval/return_std", returns.std(), global_step)
        return returns

    def record_video(name: str) -> None:
        common.record_video(args.env_id, make_act(actor, decoder, device), args.seed,
                            os.path.join(run_dir, "videos", f"{name}_step{global_step}.mp4"))

    def save(finished: bool = False) -> bool:
        """Atomic checkpoint of everything --resume needs (replay buffer included) and --eval-only reads."""
        if not args.save_model:
            return False
        loop.update(global_step=global_step, stage=stage, num_updates=num_updates, update_credit=update_credit,
                    next_eval=next_eval, next_log=next_log, next_video=next_video, next_checkpoint=next_checkpoint,
                    last_eval=last_eval, episode_return=episode_return, episode_length=episode_length, obs=obs,
                    latest=latest, target_entropy=target_entropy, env_time=env_time, update_time=update_time)
        common.save_checkpoint(checkpoint_path, {
            "script": "gorl_sac", "args": vars(args), "global_step": global_step, "stage": stage, "finished": finished,
            "obs_dim": obs_dim, "act_dim": act_dim, "actor": actor.state_dict(), "qf": qf.state_dict(),
            "qf_target": qf_target.state_dict(), "decoder": decoder.state_dict(), "log_alpha": log_alpha.detach(),
            "actor_optimizer": actor_optimizer.state_dict(), "q_optimizer": q_optimizer.state_dict(),
            "alpha_optimizer": alpha_optimizer.state_dict(), "buffer": buffer.state_dict(), "loop": loop,
            "envs": envs.state_dict(), "np_rng": rng.bit_generator.state, "rng": common.rng_state(),
            "logger": logger.resume_state(global_step),
        })
        return True

    def stop_nonfinite(name: str) -> None:
        """Stop at once, naming what broke; nothing is saved after it, so the last checkpoint stays good."""
        kept = f"the last good checkpoint {checkpoint_path} stays" if os.path.exists(checkpoint_path) else \
            "no checkpoint was written yet"
        print(f"error: non-finite {name} at stage {stage}, env step {global_step}; stopped ({kept})", file=sys.stderr)
        pbar.close()
        envs.close()
        logger.close()
        sys.exit(1)

    while True:
        if global_step >= ends[stage]:
            # ---- End of a stage: checkpoint (the resume point if Phase 2 is interrupted) ----
            if args.capture_video:
                record_video(f"stage{stage}_end")
            if save() and stage == 0 and args.num_stages > 1:
                # Kept: the Gaussian twin (--num-stages 1, same seed) computes exactly this state, so
                # benchmarks/run.py continues the twin from here instead of recomputing stage 0.
                shutil.copyfile(checkpoint_path, os.path.join(run_dir, "stage0_end.pt"))
            if stage == args.num_stages - 1:
                break

            # ---- Phase 2: decoder refit on the latest buffer transitions (the current policy's) ----
            fit_start = time.time()
            before = run_eval("boundary_before", stage)
            newest = buffer.latest(args.decoder_data_steps)
            data_obs = torch.as_tensor(newest["obs"], device=device)
            targets, old_decoder = torch.as_tensor(newest["u"], device=device), decoder
            if args.decoder_targets == "resampled":

                @torch.no_grad()
                def targets(idx):  # u = g_old(s, mu + sigma * xi): the current composite policy at obs[idx]
                    return sample_action(actor, old_decoder, data_obs[idx])[1]

            refit = fit_decoder(data_obs, targets, args, obs_dim, act_dim, device, stop=lambda: interrupt.requested)
            if refit is None:  # Ctrl-C / SIGTERM: the refit restarts from the stage-end checkpoint on resume
                pbar.close()
                logger.close()  # flushes tensorboard and eval.csv before exiting
                interrupt.exit("gorl_sac", run_dir, global_step, "stage_end" if args.save_model else "none")
            new_decoder, fit = refit
            if (bad := common.first_nonfinite({"losses/decoder_train": fit["train_loss"]})) is not None:
                stop_nonfinite(bad)
            # Diagnostics draw from their own generator: logging never moves the training random stream.
            probe_gen = torch.Generator(device=device).manual_seed(args.seed + stage)
            probe = data_obs[torch.randperm(len(data_obs), generator=probe_gen, device=device)[:2048]]
            diagnostics = boundary_diagnostics(actor, old_decoder, new_decoder, probe, probe_gen)
            log_volume = decoder_log_volume(new_decoder, probe[:512], probe_gen)

            # ---- Stage boundary: actor reset to N(0, I); critics, targets, alpha and buffer kept ----
            reset_latent_actor(actor, actor_optimizer)
            decoder = new_decoder
            stage += 1
            if args.entropy_target == "action":  # entropy(a) = entropy(eps) + log-volume (+ tanh term, in logp)
                target_entropy = -float(act_dim) - log_volume
            after = run_eval("boundary_after", stage)
            for name, value in {
                "losses/decoder_train": fit["train_loss"], "losses/decoder_val": fit["val_loss"],
                "eval/boundary_before": before.mean(), "eval/boundary_after": after.mean(),
                "charts/boundary_action_rms": diagnostics["action_rms_deterministic"],
                "charts/boundary_action_mean_rms": diagnostics["action_rms_mean"],
                "charts/boundary_action_std_old": diagnostics["action_std_old"],
                "charts/boundary_action_std_new": diagnostics["action_std_new"],
                "charts/decoder_fit_seconds": time.time() - fit_start,
                "charts/decoder_log_volume": log_volume, "losses/target_entropy": target_entropy,
            }.items():
                logger.scalar(name, value, global_step)
            pbar.write(
                f"stage {stage - 1} -> {stage} at step {global_step}: decoder val loss {fit['val_loss']:.3f} "
                f"on {fit['pairs']} pairs; eval {before.mean():.1f} -> {after.mean():.1f}; action RMS "
                f"{diagnostics['action_rms_deterministic']:.3f}; action std {diagnostics['action_std_old']:.3f} -> "
                f"{diagnostics['action_std_new']:.3f}; alpha {alpha:.4f}; decoder log-volume {log_volume:.2f}; "
                f"{time.time() - fit_start:.1f}s")
            if args.capture_video:
                record_video(f"stage{stage}_start")
            save()  # a crash later in this stage does not repeat the refit
            continue

        # ---- Phase 1: SAC on the latent actor, decoder frozen ----
        if global_step < args.learning_starts:
            action = rng.uniform(-1.0, 1.0, (args.num_envs, act_dim)).astype(np.float32)  # random warm-up
            u = np.arctanh(np.clip(action, -0.999999, 0.999999))
        else:
            with torch.no_grad():
                a_t, u_t, _, _, _ = sample_action(actor, decoder, torch.as_tensor(obs, device=device))
            action, u = a_t.cpu().numpy(), u_t.cpu().numpy()
        t_env = time.perf_counter()
        next_obs, reward, terminated, truncated, infos = envs.step(action)
        env_time += time.perf_counter() - t_env
        done = terminated | truncated
        real_next_obs = next_obs.copy()  # the true next state; a truncated episode still bootstraps from it
        if done.any():
            real_next_obs[done] = infos["final_obs"][done]
            for i in np.flatnonzero(done):
                logger.scalar("charts/episodic_return", episode_return[i] + reward[i], global_step + i)
                logger.scalar("charts/episodic_length", episode_length[i] + 1, global_step + i)
        buffer.add(obs=obs, next_obs=real_next_obs, action=action, u=u, reward=reward, terminated=terminated,
                   truncated=truncated)
        episode_return = (episode_return + reward) * ~done
        episode_length = (episode_length + 1) * ~done
        obs = next_obs
        global_step += args.num_envs
        pbar.update(args.num_envs)

        if global_step > args.learning_starts:
            update_credit += args.updates_per_step * args.num_envs
            t_update = time.perf_counter()
            while update_credit >= 1.0:
                update_credit -= 1.0
                num_updates += 1
                batch = buffer.sample(args.batch_size, rng, device)
                q_loss, q, q_grad = critic_update(batch, actor, decoder, qf, qf_target, q_optimizer, alpha, args.gamma,
                                                  args.tanh_correction)
                checks = {"losses/q_loss": q_loss, "gradient norm of the critics": q_grad}
                latest.update(q_loss=q_loss.detach(), q=q.detach())
                if num_updates % args.policy_frequency == 0:
                    actor_loss, actor_grad, a_pi, logp, mu, sigma = actor_update(
                        batch, actor, decoder, qf, actor_optimizer, alpha, args.kl_coef, args.tanh_correction)
                    checks.update({"losses/actor_loss": actor_loss, "gradient norm of the actor": actor_grad})
                    latest.update(actor_loss=actor_loss.detach(), a_pi=a_pi, logp=logp, mu=mu, sigma=sigma,
                                  obs=batch["obs"])
                    if args.autotune:  # alpha tracks the latent entropy target
                        alpha_loss = -(log_alpha.exp() * (logp + target_entropy)).mean()
                        alpha_optimizer.zero_grad(set_to_none=True)
                        alpha_loss.backward()
                        alpha_optimizer.step()
                        alpha = log_alpha.exp().item()
                        checks["alpha"] = alpha
                # A bad step has already changed the parameters in memory, but stopping here means
                # nothing is saved after it: the last checkpoint on disk is still the last good one.
                if (bad := common.first_nonfinite(checks)) is not None:
                    stop_nonfinite(bad)

                with torch.no_grad():  # Polyak averaging, one fused op over all parameters
                    torch._foreach_lerp_(list(qf_target.parameters()), list(qf.parameters()), args.tau)
            update_time += time.perf_counter() - t_update

            if global_step >= next_log and "actor_loss" in latest:
                next_log += 1000
                bad = common.first_nonfinite({"actor parameters": list(actor.parameters()),
                                              "critic parameters": list(qf.parameters())})
                if bad is not None:
                    stop_nonfinite(bad)
                mu, sigma, logp, a_pi = latest["mu"], latest["sigma"], latest["logp"], latest["a_pi"]
                for name, value in {
                    "losses/q_loss": latest["q_loss"].item() / 2, "losses/q_values": latest["q"].mean().item(),
                    "losses/actor_loss": latest["actor_loss"].item(),
                    "losses/prior_kl": kl_to_prior(mu, sigma).mean().item(),
                    "losses/alpha": alpha, "losses/entropy_estimate": -logp.mean().item(),
                    "losses/latent_entropy": (sigma.log() + 0.5 * np.log(2 * np.pi * np.e)).sum(-1).mean().item(),
                    "charts/latent_sigma": sigma.mean().item(), "charts/latent_mu_abs": mu.abs().mean().item(),
                    "charts/action_abs": a_pi.abs().mean().item(),
                    "charts/action_std_over_batch": a_pi.std(0).mean().item(), "charts/stage": stage,
                    "charts/action_noise_std": action_noise(actor, decoder, latest["obs"],
                                                             torch.Generator(device=device).manual_seed(global_step)),
                    "charts/SPS": global_step / logger.wall_time(),
                    "charts/env_time_fraction": env_time / logger.wall_time(),
                    "charts/update_time_fraction": update_time / logger.wall_time(),
                }.items():
                    logger.scalar(name, value, global_step)

        if global_step >= next_eval:
            last_eval = run_eval("periodic", stage).mean()
            next_eval += args.eval_interval
            pbar.set_postfix(stage=f"{stage + 1}/{args.num_stages}", sps=f"{global_step / logger.wall_time():.0f}",
                             eval=f"{last_eval:.1f}")
        if args.capture_video and global_step >= next_video:
            record_video("train")
            next_video += args.video_interval
        if interrupt.requested:
            saved = save()
            pbar.close()
            logger.close()  # flushes tensorboard and eval.csv before exiting
            interrupt.exit("gorl_sac", run_dir, global_step, "now" if saved else "none")
        if global_step >= next_checkpoint:
            save()
            next_checkpoint += args.checkpoint_interval

    final = run_eval("final", stage)
    save(finished=True)
    pbar.close()
    elapsed = logger.wall_time()
    print(f"final deterministic return {final.mean():.1f} +- {final.std():.1f}; {global_step} env steps in "
          f"{elapsed:.0f}s ({global_step / elapsed:.0f} steps/s, {num_updates} updates; updates "
          f"{update_time / elapsed:.0%}, env {env_time / elapsed:.0%} of wall time)")
    envs.close()
    logger.close()
