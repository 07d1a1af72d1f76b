"""GoRL-SAC: SAC on a Gaussian latent actor, composed with a frozen flow-matching action decoder.

    eps ~ pi_theta(eps | s)   latent actor, diagonal Gaussian, reparameterised (fast timescale, Phase 1)
    u   = g_phi(s, eps)       flow-matching decoder: frozen during RL, refit between stages (slow, Phase 2)
    a   = tanh(u)             env action in [-1, 1]

The GoRL paper (Zhang et al., arXiv 2512.02581) only ran PPO; this off-policy variant is ours. The twin
critics are Q(s, a) on *actions*, so the replay buffer stays valid across refits; the actor's gradient
passes through the frozen decoder's Euler steps to eps; the entropy terms are on the latent.
`--num-stages 1` is tanh-Gaussian SAC at identical settings (the twin). (detail N) cites the README's
numbered implementation details.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn

import common

@dataclass
class Args:
    # ---- environment and budget ----
    env_id: str = "walker-walk"
    """dm_control 'domain-task' (or 'dm_control/domain-task-v0'), or a gymnasium id with a Box action space"""
    total_timesteps: int = 500_000
    """env steps, warm-up and all stages included"""
    num_envs: int = 1
    """parallel envs; each loop iteration adds num_envs transitions"""
    action_repeat: int = 2
    """simulator steps each action is held for (rewards summed); every simulator step counts as an env step"""
    learning_starts: int = 5_000
    """env steps of uniformly random actions before updates begin"""
    # ---- SAC on the latent actor (Phase 1) ----
    buffer_size: int = 1_000_000
    """replay buffer capacity (transitions)"""
    batch_size: int = 128
    """transitions per gradient update"""
    updates_per_step: float = 1.0
    """critic updates per env step, i.e. per simulator step (detail 11)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak averaging rate of the target critics"""
    policy_lr: float = 3e-4
    """Adam learning rate of the latent actor"""
    q_lr: float = 1e-3
    """Adam learning rate of the critics and of alpha"""
    policy_frequency: int = 1
    """the actor (and alpha) takes this many steps every this-many critic updates"""
    alpha: float = 1.0
    """entropy coefficient (its starting value with --autotune)"""
    autotune: bool = True
    """tune alpha so the entropy estimate tracks --entropy-target x action_dim"""
    entropy_target: float = -0.5
    """target entropy per action dimension"""
    kl_coef: float = 1e-3
    """beta: weight of KL(pi_theta(.|s) || N(0, I)) in the actor loss"""
    hidden: int = 256
    """width of actor and critic MLPs"""
    layers: int = 2
    """hidden layers of actor and critic MLPs"""
    critic_layernorm: bool = True
    """LayerNorm (no affine) before each hidden activation of the critics"""
    num_critics: int = 1
    """critics; targets and the actor use their minimum (2: clipped double Q; detail 11)"""
    # ---- GoRL stages ----
    num_stages: int = 2
    """K: RL stages, K - 1 decoder refits; 1 is the tanh-Gaussian SAC twin"""
    stage_fractions: tuple[float, ...] = ()
    """relative env-step budget of each stage (K numbers); default: 2/3 for stage 0, the rest split equally"""
    # ---- decoder (Phase 2) ----
    decoder_hidden: int = 64
    """width of the velocity MLP"""
    decoder_layers: int = 4
    """hidden layers of the velocity MLP"""
    euler_steps: int = 10
    """N: Euler steps from t = 1 (noise) to t = 0 (action)"""
    decoder_data_steps: int = 20_000
    """refit on the states of the latest this-many transitions of the buffer"""
    decoder_targets: Literal["executed", "resampled"] = "resampled"
    """'executed': the stored pre-tanh u; 'resampled': fresh u ~ composite policy at each decoder step"""
    decoder_train_steps: int = 12000
    """Adam steps per refit"""
    decoder_batch_size: int = 256
    """(s, u) pairs per decoder step"""
    decoder_noise_draws: int = 4
    """independent (eps, t) draws per pair and step"""
    decoder_lr: float = 1e-3
    """decoder Adam learning rate"""
    decoder_cosine: bool = True
    """decay the decoder learning rate to 0 along a cosine over the refit"""
    decoder_val_fraction: float = 0.1
    """share of the refit data held out; the best validation weights are kept"""
    decoder_val_every: int = 100
    """decoder steps between validation checks"""
    decoder_split_first_layer: bool = True
    """speed: the state and time shares of the first layer once per decode, not per Euler step (detail 12)"""
    u_clip: float = 3.0
    """refit targets are clipped to |u| <= u_clip"""
    # ---- evaluation ----
    eval_interval: int = 20_000
    """env steps between deterministic evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation (fixed seeds, so evaluations are paired)"""
    eval_seed: int = 10_000
    """seed of the first eval episode; eval env i uses eval_seed + i"""
    # ---- run ----
    exp_name: str = "gorl_sac"
    """first part of the run name"""
    seed: int = 1
    """seed of the run (train env i uses seed + i)"""
    env_backend: str = "auto"
    """auto (envpool's C++ dm_control where it matches the Python suite), envpool, or dm_control"""
    env_threads: int = 1
    """envpool simulator threads"""
    torch_threads: int = 1
    """torch CPU threads"""
    cuda: bool = False
    """run the networks on a GPU when one is present (the simulator stays on the CPU)"""
    track: bool = False
    """mirror the tensorboard logs to Weights & Biases"""
    wandb_project_name: str = "gorl"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    capture_video: bool = False
    """film a deterministic episode to <run>/videos/ every --video-interval env steps and at stage ends"""
    video_interval: int = 100_000
    """env steps between training videos"""
    save_model: bool = True
    """write <run>/checkpoint.pt every --checkpoint-interval env steps, at stage ends, on Ctrl-C and at the end"""
    checkpoint_interval: int = 100_000
    """env steps between checkpoints"""
    run_dir: Optional[str] = None
    """run directory (must not exist); default runs/<env>__<exp-name>__K<stages>__<seed>__<time>"""
    resume: Optional[str] = None
    """continue the run in this directory with the arguments it started with"""
    eval_only: bool = False
    """evaluate --checkpoint over --eval-episodes episodes and exit"""
    checkpoint: Optional[str] = None
    """checkpoint for --eval-only"""
    eval_stochastic: bool = False
    """with --eval-only: sample eps ~ pi(.|s) instead of taking its mean"""

# ---- networks ----

LOG_SIGMA_MIN, LOG_SIGMA_MAX = -5.0, 2.0

def mlp(in_dim: int, hidden: int, layers: int) -> nn.Sequential:
    dims = [in_dim] + [hidden] * layers
    return nn.Sequential(*[m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())])

class LatentActor(nn.Module):
    """pi_theta(eps | s) = N(mu(s), diag(sigma(s)^2)), reparameterised."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int):
        super().__init__()
        self.trunk = mlp(obs_dim, hidden, layers)
        self.mu_head = nn.Linear(hidden, act_dim)
        self.log_sigma_head = nn.Linear(hidden, act_dim)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(obs)
        return self.mu_head(h), self.log_sigma_head(h).clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX).exp()  # (B, d) each

class EnsembleLinear(nn.Module):
    """`n` independent linear layers in one batched matmul: x (n, B, in) -> (n, B, out)."""

    def __init__(self, n: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1.0 / np.sqrt(in_dim)  # nn.Linear's default initialisation, per member
        self.weight = nn.Parameter(torch.empty(n, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)

class Critics(nn.Module):
    """Q_1(s, a) .. Q_n(s, a) on env actions, evaluated together in one batched forward."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int, n: int, layernorm: bool = False):
        super().__init__()
        self.n = n
        dims, norm = [obs_dim + act_dim] + [hidden] * layers, (lambda w: nn.LayerNorm(w, elementwise_affine=False))
        mods = [m for a, b in zip(dims[:-1], dims[1:])
                for m in (EnsembleLinear(n, a, b), *([norm(b)] if layernorm else []), nn.ReLU())]
        self.net = nn.Sequential(*mods, EnsembleLinear(n, hidden, 1))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], dim=-1).expand(self.n, -1, -1)).squeeze(-1)  # (n, B)

class FlowDecoder(nn.Module):
    """g_phi(s, eps), flow matching from N(0, I) to pre-tanh actions u: v_phi(s, x, emb(t)) is a SiLU MLP, emb(t) =
    [cos(2^j t), sin(2^j t)], j < 4. Its last layer starts at zero, so g(s, eps) = eps: stage 0 is the twin."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int, euler_steps: int,
                 split_first_layer: bool = False):
        super().__init__()
        self.euler_steps, self.split_first_layer = euler_steps, split_first_layer
        dims = [obs_dim + act_dim + 8] + [hidden] * layers
        hidden_layers = [m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), nn.SiLU())]
        self.out = nn.Linear(hidden, act_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.net = nn.Sequential(*hidden_layers, self.out)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_var", torch.ones(obs_dim))
        self.register_buffer("is_identity", torch.tensor(True))  # until the first refit: skip the network
        self.register_buffer("freqs", 2.0 ** torch.arange(4, dtype=torch.float32))

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return ((obs - self.obs_mean) / torch.sqrt(self.obs_var + 1e-8)).clamp(-10.0, 10.0)

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.cos(self.freqs * t), torch.sin(self.freqs * t)], dim=-1)  # (B, 8)

    def velocity(self, s: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([s, x, self.embed(t)], dim=-1))  # s (B, obs_dim), x (B, d), t (B, 1) -> (B, d)

    def integrate(self, obs: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Euler from t = 1 (x = eps) to t = 0: x <- x - (1/N) v(s, x, t), no clipping; differentiable in eps."""
        s, x, dt = self.normalize(obs), eps, 1.0 / self.euler_steps
        for k in range(self.euler_steps):
            x = x - dt * self.velocity(s, x, torch.full_like(x[:, :1], 1.0 - k * dt))
        return x  # u, (B, d)

    def integrate_split(self, obs: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """`integrate` with W [s; x; emb] = W_s s + W_x x + W_e emb: the s and t shares once per decode (detail 12)."""
        first, *rest = [m for m in self.net if isinstance(m, nn.Linear)]
        w_s, w_x, w_e = first.weight.split([obs.shape[-1], eps.shape[-1], 8], dim=1)
        dt = 1.0 / self.euler_steps
        t = 1.0 - dt * torch.arange(self.euler_steps, dtype=eps.dtype, device=eps.device)[:, None]  # (N, 1)
        h_state = nn.functional.linear(self.normalize(obs), w_s, first.bias)  # (B, hidden)
        h_time, w_x, x = self.embed(t) @ w_e.T, w_x.T.contiguous(), eps  # (N, hidden), (d, hidden)
        for k in range(self.euler_steps):
            h = torch.addmm(h_state + h_time[k], x, w_x)  # the first layer, (B, hidden)
            for layer in rest:
                h = layer(nn.functional.silu(h))
            x = x - dt * h  # h is the velocity, (B, d)
        return x

    def forward(self, obs: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return eps
        return self.integrate_split(obs, eps) if self.split_first_layer else self.integrate(obs, eps)

class ReplayBuffer:
    """Ring buffer of (obs, action, u, reward, next_obs, terminated, truncated); `u` is the executed
    pre-tanh action, kept for refits. The critics only ever see `action`."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.capacity, self.size, self.ptr = capacity, 0, 0
        shapes = {"obs": obs_dim, "next_obs": obs_dim, "action": act_dim, "u": act_dim, "reward": (),
                  "terminated": (), "truncated": ()}
        self.data = {k: np.zeros((capacity, *np.atleast_1d(d).astype(int)), np.float32) for k, d in shapes.items()}

    def add(self, **batch: np.ndarray) -> None:
        idx = (self.ptr + np.arange(len(batch["obs"]))) % self.capacity
        for key, value in batch.items():
            self.data[key][idx] = value
        self.ptr, self.size = (self.ptr + len(idx)) % self.capacity, min(self.size + len(idx), self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator, device) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, self.size, batch_size)
        return {k: torch.as_tensor(v[idx], device=device) for k, v in self.data.items()}

    def latest(self, n: int) -> dict[str, np.ndarray]:
        """The newest min(n, size) transitions in time order (the ring unrolled first)."""
        idx = (self.ptr - min(n, self.size) + np.arange(min(n, self.size))) % self.capacity
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return {"ptr": self.ptr, "size": self.size, "data": {k: v[: self.size].copy() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.ptr, self.size = state["ptr"], state["size"]
        for k, v in state["data"].items():
            self.data[k][: self.size] = v

# ---- Phase 1: SAC in latent space ----

def gaussian_log_prob(eps: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(eps; mu, diag(sigma^2)) summed over dims, (B,): the latent log-likelihood."""
    return (-0.5 * ((eps - mu) / sigma).pow(2) - sigma.log() - 0.5 * np.log(2 * np.pi)).sum(-1)

def kl_to_prior(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) = 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2), (B,)."""
    return 0.5 * (mu.pow(2) + sigma.pow(2) - 1.0 - 2.0 * sigma.log()).sum(-1)

def sample_action(actor: LatentActor, decoder: FlowDecoder, obs: torch.Tensor):
    """eps = mu + sigma xi (reparameterised), u = g(s, eps), a = tanh(u). Returns a, u, logp, mu, sigma.
    logp, used by the entropy terms, is log pi(eps|s) minus SAC's tanh correction sum log(1 - tanh(u)^2);
    without it the latent grows wide and saturates the actions. The decoder's own Jacobian is left out:
    the entropy stays on the tractable side of the decoder (detail 10)."""
    mu, sigma = actor(obs)
    eps = mu + sigma * torch.randn_like(mu)
    u = decoder(obs, eps)
    # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), stable for large |u|
    logp = gaussian_log_prob(eps, mu, sigma) - (2.0 * (np.log(2.0) - u - nn.functional.softplus(-2.0 * u))).sum(-1)
    return torch.tanh(u), u, logp, mu, sigma

def q_target(batch, actor, decoder, qf_target, alpha: float, gamma: float) -> torch.Tensor:
    """r + gamma (1 - terminated) (min Q'(s', a') - alpha log pi(eps'|s')): a truncated transition
    bootstraps from its true next observation; only a termination cuts the return."""
    with torch.no_grad():
        next_action, _, next_logp, _, _ = sample_action(actor, decoder, batch["next_obs"])
        next_q = qf_target(batch["next_obs"], next_action).min(0).values - alpha * next_logp
        return batch["reward"] + gamma * (1.0 - batch["terminated"]) * next_q

def critic_update(batch, actor, decoder, qf, qf_target, q_optimizer, alpha: float, gamma: float):
    """One step on all critics. Returns (loss, Q values (n, B), gradient norm)."""
    target = q_target(batch, actor, decoder, qf_target, alpha, gamma)
    q = qf(batch["obs"], batch["action"])  # (n, B)
    q_loss = (q - target).pow(2).mean(1).sum()  # each critic's own mean squared error, summed over the critics
    q_optimizer.zero_grad(set_to_none=True)
    q_loss.backward()
    q_grad_norm = nn.utils.get_total_norm([p.grad for p in qf.parameters()])
    q_optimizer.step()
    return q_loss, q, q_grad_norm

def actor_update(batch, actor, decoder, qf, actor_optimizer, alpha: float, kl_coef: float):
    """alpha log pi(eps|s) - min Q(s, tanh(g(s, eps))) + beta KL(pi || N(0, I)), eps reparameterised. The
    gradient flows through the frozen decoder into eps; only the actor steps."""
    a_pi, _, logp, mu, sigma = sample_action(actor, decoder, batch["obs"])
    qf.requires_grad_(False)  # backward then skips the critics' weight gradients
    actor_loss = (alpha * logp - qf(batch["obs"], a_pi).min(0).values + kl_coef * kl_to_prior(mu, sigma)).mean()
    actor_optimizer.zero_grad(set_to_none=True)
    actor_loss.backward()
    actor_grad_norm = nn.utils.get_total_norm([p.grad for p in actor.parameters()])
    actor_optimizer.step()
    qf.requires_grad_(True)
    return actor_loss, actor_grad_norm, a_pi.detach(), logp.detach(), mu.detach(), sigma.detach()

# ---- Phase 2: refit the decoder by fixed-prior flow matching ----

def flow_matching_loss(decoder: FlowDecoder, s, u, draws: int, generator=None) -> torch.Tensor:
    """x_t = t eps + (1 - t) u, target velocity eps - u, with eps ~ N(0, I) drawn fresh, independent of
    the latent that produced u: the decoder learns to push the fixed prior onto the actions."""
    s, u = s.repeat(draws, 1), u.repeat(draws, 1)  # (draws * B, .)
    eps = torch.randn(u.shape, generator=generator, device=u.device)
    t = torch.rand((u.shape[0], 1), generator=generator, device=u.device)
    x_t = t * eps + (1.0 - t) * u
    return (decoder.velocity(s, x_t, t) - (eps - u)).pow(2).mean()

def fit_decoder(obs: torch.Tensor, targets, args: Args, obs_dim: int, act_dim: int, device, stop=lambda: None,
                var_floor: Optional[torch.Tensor] = None):
    """A fresh decoder fit on raw obs (M, obs_dim) and targets u (M, d), or idx -> fresh u at obs[idx]; the best
    validation weights, frozen, and stats. `stop` runs at every check (Ctrl-C); a non-finite loss ends the fit."""
    start = time.time()
    decoder = FlowDecoder(obs_dim, act_dim, args.decoder_hidden, args.decoder_layers, args.euler_steps,
                          args.decoder_split_first_layer).to(device)
    decoder.obs_mean.copy_(obs.mean(0))  # the refit data's own statistics, frozen from now on (detail 5)
    # A dimension near-constant in the refit window (a quiet touch sensor) must not divide by ~0 (detail 5).
    decoder.obs_var.copy_(obs.var(0) if var_floor is None else torch.maximum(obs.var(0), var_floor))
    decoder.is_identity.fill_(False)
    s = decoder.normalize(obs)
    draw = targets if callable(targets) else (lambda idx: targets[idx])
    perm = torch.randperm(len(obs), device=device)
    n_val = max(1, int(args.decoder_val_fraction * len(obs)))
    val, train = perm[:n_val], perm[n_val:]
    u_val = draw(val).clamp(-args.u_clip, args.u_clip)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=args.decoder_lr, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (
        1.0 + np.cos(np.pi * step / args.decoder_train_steps)) if args.decoder_cosine else 1.0)
    val_gen = torch.Generator(device=device)
    best, best_state, train_loss = float("inf"), None, float("nan")
    for step in range(1, args.decoder_train_steps + 1):
        idx = train[torch.randint(len(train), (args.decoder_batch_size,), device=device)]
        loss = flow_matching_loss(decoder, s[idx], draw(idx).clamp(-args.u_clip, args.u_clip), args.decoder_noise_draws)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        train_loss = 0.98 * train_loss + 0.02 * loss.item() if step > 1 else loss.item()
        if not np.isfinite(train_loss):
            break
        if step % args.decoder_val_every == 0 or step == args.decoder_train_steps:
            stop()
            val_gen.manual_seed(0)  # the same (eps, t) draws at every check, so checks compare
            with torch.no_grad():
                current = flow_matching_loss(decoder, s[val], u_val, args.decoder_noise_draws, val_gen).item()
            if current < best:
                best, best_state = current, {k: v.clone() for k, v in decoder.state_dict().items()}
    if best_state is not None:
        decoder.load_state_dict(best_state)
    return decoder.requires_grad_(False), {"train_loss": train_loss, "val_loss": best, "pairs": len(obs),
                                      "seconds": time.time() - start}

@torch.no_grad()
def boundary_diagnostics(actor, old_decoder, new_decoder, obs, generator, samples: int = 32) -> dict:
    """Action-space checks of a refit (detail 6): old composite policy tanh(g_old(s, mu + sigma xi))
    against the new one after the reset, tanh(g_new(s, xi))."""
    mu, sigma = actor(obs)
    xi = torch.randn((samples, *mu.shape), generator=generator, device=obs.device)  # (S, B, d)
    obs_rep = obs.expand(samples, *obs.shape).reshape(-1, obs.shape[-1])
    a_old = torch.tanh(old_decoder(obs_rep, (mu + sigma * xi).reshape(-1, mu.shape[-1]))).reshape(xi.shape)
    a_new = torch.tanh(new_decoder(obs_rep, xi.reshape(-1, mu.shape[-1]))).reshape(xi.shape)
    a_old_det, a_new_det = torch.tanh(old_decoder(obs, mu)), torch.tanh(new_decoder(obs, torch.zeros_like(mu)))
    return {"charts/boundary_action_rms": (a_old_det - a_new_det).pow(2).mean().sqrt().item(),
            "charts/boundary_action_mean_rms": (a_old.mean(0) - a_new.mean(0)).pow(2).mean().sqrt().item(),
            "charts/boundary_action_std_old": a_old.std(0).mean().item(),
            "charts/boundary_action_std_new": a_new.std(0).mean().item()}

@torch.no_grad()
def action_noise(actor, decoder, obs: torch.Tensor, generator, samples: int = 8) -> float:
    """The exploration noise the env sees: std over `samples` draws of tanh(g(s, mu + sigma xi)) per state."""
    mu, sigma = actor(obs.repeat(samples, 1))  # (samples * B, d)
    a = torch.tanh(decoder(obs.repeat(samples, 1), mu + sigma * torch.randn(mu.shape, generator=generator)))
    return a.reshape(samples, len(obs), -1).std(0).mean().item()

def reset_latent_actor(actor: LatentActor, optimizer: torch.optim.Optimizer) -> None:
    """Stage boundary: pi_theta(.|s) = N(0, I) exactly (zero heads: mu = 0, log sigma = 0), fresh Adam
    moments for the heads. The trunk, critics, targets, alpha and the buffer are kept."""
    with torch.no_grad():
        for p in [*actor.mu_head.parameters(), *actor.log_sigma_head.parameters()]:
            p.zero_()
            optimizer.state.pop(p, None)

def make_act(actor, decoder, device, stochastic_seed: Optional[int] = None):
    """The composite policy: a = tanh(g(s, mu)), or with a seed a = tanh(g(s, mu + sigma xi)) from its own
    generator (evaluating never moves the training random stream)."""
    generator = None if stochastic_seed is None else torch.Generator(device=device).manual_seed(stochastic_seed)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
        mu, sigma = actor(obs)
        eps = mu if generator is None else mu + sigma * torch.randn(mu.shape, generator=generator, device=device)
        return torch.tanh(decoder(obs, eps)).cpu().numpy()

    return act

def build_act(ckpt: dict, args: Args, device, stochastic_seed: Optional[int]):
    """--eval-only: the composite policy of a checkpoint."""
    actor = LatentActor(ckpt["obs_dim"], ckpt["act_dim"], args.hidden, args.layers).to(device)
    decoder = FlowDecoder(ckpt["obs_dim"], ckpt["act_dim"], args.decoder_hidden, args.decoder_layers,
                          args.euler_steps, args.decoder_split_first_layer).to(device)
    actor.load_state_dict(ckpt["actor"])
    decoder.load_state_dict(ckpt["decoder"])
    return make_act(actor, decoder, device, stochastic_seed)

def validate(args: Args) -> None:
    """Checks of this script's flags, before anything is created (common.Run checks the shared ones)."""
    for name in ("updates_per_step", "alpha"):
        if getattr(args, name) <= 0:
            raise common.UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.learning_starts < args.batch_size:
        raise common.UsageError(f"--learning-starts {args.learning_starts} is less than one --batch-size "
                                f"{args.batch_size}")
    if args.total_timesteps <= args.learning_starts:
        raise common.UsageError(f"--total-timesteps {args.total_timesteps} leaves no updates after "
                                f"--learning-starts {args.learning_starts}")
    ends = common.stage_ends(args.total_timesteps, args.num_stages, args.stage_fractions)
    if ends[0] <= args.learning_starts or min(np.diff([0] + ends)) < args.num_envs:
        raise common.UsageError(f"--total-timesteps {args.total_timesteps} gives stage ends {ends}: stage 0 must "
                                f"outlast --learning-starts {args.learning_starts} and every stage needs env steps")

if __name__ == "__main__":
    run = common.Run(Args, "gorl_sac", validate, build_act)  # command line, --resume, --eval-only, logs
    args, device = run.args, run.device
    stage_end = common.stage_ends(args.total_timesteps, args.num_stages, args.stage_fractions)  # in env steps
    rng = np.random.default_rng(args.seed)  # warm-up actions and replay sampling

    envs = common.VectorEnv(run.env, args.num_envs, args.seed, args.env_threads)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]  # latent dim = |A|
    actor = LatentActor(obs_dim, act_dim, args.hidden, args.layers).to(device)
    qf = Critics(obs_dim, act_dim, args.hidden, args.layers, args.num_critics, args.critic_layernorm).to(device)
    qf_target = copy.deepcopy(qf).requires_grad_(False)
    decoder = FlowDecoder(obs_dim, act_dim, args.decoder_hidden, args.decoder_layers, args.euler_steps,
                          args.decoder_split_first_layer).to(device).requires_grad_(False)  # only refit in Phase 2
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=True)
    q_optimizer = torch.optim.Adam(qf.parameters(), lr=args.q_lr, fused=True)
    log_alpha = torch.full((1,), float(np.log(args.alpha)), device=device, requires_grad=True)
    alpha_optimizer = torch.optim.Adam([log_alpha], lr=args.q_lr, fused=True)
    target_entropy = args.entropy_target * act_dim
    buffer = ReplayBuffer(args.buffer_size, obs_dim, act_dim)
    obs = run.restore(envs, lambda seed=None: make_act(actor, decoder, device, seed), actor=actor, qf=qf,
                      qf_target=qf_target, decoder=decoder, log_alpha=log_alpha, actor_optimizer=actor_optimizer,
                      q_optimizer=q_optimizer, alpha_optimizer=alpha_optimizer, buffer=buffer, np_rng=rng)
    alpha = log_alpha.exp().item() if args.autotune else args.alpha
    num_updates = int(args.updates_per_step * max(0, run.global_step - args.learning_starts))
    actor_loss = None  # the newest actor update's loss, for the logs

    for stage in range(run.stage, args.num_stages):
        # ---- Phase 1: SAC on the latent actor, decoder frozen ----
        while run.global_step < stage_end[stage]:
            if run.global_step < args.learning_starts:  # uniformly random warm-up
                action = rng.uniform(-1.0, 1.0, (args.num_envs, act_dim)).astype(np.float32)
                u = np.arctanh(np.clip(action, -0.999999, 0.999999))
            else:
                with torch.no_grad():
                    a_t, u_t, _, _, _ = sample_action(actor, decoder, torch.as_tensor(obs, device=device))
                action, u = a_t.cpu().numpy(), u_t.cpu().numpy()
            next_obs, reward, terminated, truncated, infos = envs.step(action)
            run.count_env_steps(args.num_envs * args.action_repeat, infos)
            real_next_obs = next_obs.copy()  # the true next state: a truncated episode still bootstraps from it
            if "final_obs" in infos:
                done = terminated | truncated
                real_next_obs[done] = infos["final_obs"][done]
            buffer.add(obs=obs, next_obs=real_next_obs, action=action, u=u, reward=reward, terminated=terminated,
                       truncated=truncated)
            obs = next_obs

            with run.timed("update"):
                while num_updates < int(args.updates_per_step * max(0, run.global_step - args.learning_starts)):
                    num_updates += 1
                    batch = buffer.sample(args.batch_size, rng, device)
                    q_loss, q, q_grad = critic_update(batch, actor, decoder, qf, qf_target, q_optimizer, alpha,
                                                      args.gamma)
                    checks = {"losses/q_loss": q_loss, "gradient norm of the critics": q_grad}
                    if num_updates % args.policy_frequency == 0:  # delayed, yet one actor step per critic step
                        for _ in range(args.policy_frequency):
                            actor_loss, actor_grad, a_pi, logp, mu, sigma = actor_update(
                                batch, actor, decoder, qf, actor_optimizer, alpha, args.kl_coef)
                            checks.update({"losses/actor_loss": actor_loss, "gradient norm of the actor": actor_grad})
                            if args.autotune:  # alpha tracks the entropy target
                                alpha_loss = -(log_alpha.exp() * (logp + target_entropy)).mean()
                                alpha_optimizer.zero_grad(set_to_none=True)
                                alpha_loss.backward()
                                alpha_optimizer.step()
                                alpha = checks["alpha"] = log_alpha.exp().item()
                    run.check_finite(checks)  # nothing is saved after a bad step: the checkpoint on disk stays good
                    with torch.no_grad():  # Polyak averaging, one fused op over all parameters
                        torch._foreach_lerp_(list(qf_target.parameters()), list(qf.parameters()), args.tau)
            if actor_loss is not None and run.claim_due("log", 1000):  # the newest update's statistics
                run.check_finite({"actor parameters": list(actor.parameters()),
                                  "critic parameters": list(qf.parameters())})
                run.log({"losses/q_loss": q_loss.item() / args.num_critics, "losses/q_values": q.mean().item(),
                         "losses/actor_loss": actor_loss.item(), "losses/alpha": alpha,
                         "losses/prior_kl": kl_to_prior(mu, sigma).mean().item(),
                         "losses/entropy_estimate": -logp.mean().item(), "charts/latent_sigma": sigma.mean().item(),
                         "charts/latent_mu_abs": mu.abs().mean().item(), "charts/action_abs": a_pi.abs().mean().item(),
                         "charts/action_noise_std": action_noise(actor, decoder, batch["obs"], torch.Generator(
                             device=device).manual_seed(run.global_step))})
            run.tick()  # evaluate, film, checkpoint when due; Ctrl-C
        run.end_stage()
        if stage == args.num_stages - 1:
            break

        # ---- Phase 2: refit the decoder to the current composite policy, on the newest buffer states ----
        before = run.evaluate("boundary_before")
        newest = buffer.latest(args.decoder_data_steps)
        data_obs = torch.as_tensor(newest["obs"], device=device)
        targets, old_decoder = torch.as_tensor(newest["u"], device=device), decoder  # executed pre-tanh actions
        if args.decoder_targets == "resampled":

            @torch.no_grad()
            def targets(idx):  # u = g_old(s, mu + sigma xi): fresh draws of the current composite policy
                return sample_action(actor, old_decoder, data_obs[idx])[1]

        # the decoder's observation std is at least 10% of the whole buffer's (detail 5)
        var_floor = torch.as_tensor(0.01 * buffer.data["obs"][: buffer.size].var(0), device=device)
        new_decoder, fit = fit_decoder(data_obs, targets, args, obs_dim, act_dim, device, run.stop_requested_in_refit,
                                       var_floor)
        run.check_finite({"losses/decoder_train": fit["train_loss"]})
        generator = torch.Generator(device=device).manual_seed(args.seed + stage)  # not the training stream
        probe = data_obs[torch.randperm(len(data_obs), generator=generator, device=device)[:2048]]
        diagnostics = boundary_diagnostics(actor, old_decoder, new_decoder, probe, generator)

        # ---- Stage boundary: actor reset to N(0, I); critics, targets, alpha and the buffer kept ----
        reset_latent_actor(actor, actor_optimizer)
        decoder.load_state_dict(new_decoder.state_dict())  # the composite policy now decodes with the refit
        after = run.start_stage(stage + 1)  # evaluates the new composite policy, then checkpoints
        run.log({**diagnostics, "losses/decoder_train": fit["train_loss"], "losses/decoder_val": fit["val_loss"],
                 "eval/boundary_before": before.mean(), "eval/boundary_after": after.mean(),
                 "charts/decoder_fit_seconds": fit["seconds"]})
        run.pbar.write(f"stage {stage} -> {stage + 1} at step {run.global_step}: eval {before.mean():.1f} -> "
                       f"{after.mean():.1f}; decoder val loss {fit['val_loss']:.3f} on {fit['pairs']} pairs, action "
                       f"RMS {diagnostics['charts/boundary_action_rms']:.3f}, {fit['seconds']:.1f}s; alpha {alpha:.4f}")
    run.finish(f", {num_updates} updates; updates {run.seconds.get('update', 0.0) / run.wall_time():.0%}")
