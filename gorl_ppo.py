"""GoRL-PPO: PPO on a Gaussian latent policy, composed with a flow-matching action decoder.

    eps ~ pi_theta(eps | s)   latent policy, diagonal Gaussian: PPO trains it (fast timescale, Phase 1)
    u   = g_phi(s, eps)       flow-matching decoder: frozen during RL, refit between stages (slow, Phase 2)
    a   = tanh(u)             env action in [-1, 1]

Zhang et al., "GoRL", arXiv 2512.02581. `--num-stages 1` is tanh-Gaussian PPO at identical settings (the twin).
(detail N) cites the README's numbered implementation details."""

from __future__ import annotations

import collections
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
    env_id: str = "hopper-stand"
    """dm_control 'domain-task' (or 'dm_control/domain-task-v0'), or a gymnasium id with a Box action space"""
    total_timesteps: int = 10_000_000
    """env steps of training, all stages together (fresh refit data included)"""
    num_envs: int = 64
    """parallel envs; the policy and the decoder run batched across them"""
    num_steps: int = 32
    """agent steps per env per rollout"""
    action_repeat: int = 4
    """simulator steps each action is held for (rewards summed); every simulator step counts as an env step"""
    # ---- PPO on the latent policy (Phase 1) ----
    learning_rate: float = 1e-3
    """Adam learning rate of the latent policy and the critic"""
    lr_schedule: Literal["run", "stage", "constant"] = "run"
    """linear decay to 0 over the whole run, over each stage, or none (the authors')"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 10
    """epochs over each rollout"""
    clip_coef: float = 0.2
    """PPO clip coefficient"""
    clip_coef_late: Optional[float] = None
    """clip coefficient from stage 1 on (default: --clip-coef)"""
    ent_coef: float = 0.03
    """entropy bonus on the latent Gaussian"""
    ent_decay: bool = True
    """decay the entropy bonus linearly to 0 over the whole run (detail 14)"""
    state_sigma: bool = True
    """log sigma(s) = log_sigma + a head on the policy's detached features (detail 15); off: log_sigma alone"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """gradient-norm clip, applied to the policy and to the critic separately"""
    norm_returns: bool = False
    """divide rewards by the running std of each env's discounted return so far, then clip them to +-10"""
    reward_scale: float = 1.0
    """rewards are multiplied by this before GAE"""
    kl_coef: float = 1e-3
    """beta: weight of the penalty that pulls pi_theta(.|s) to N(0, I)"""
    kl_coef_late: Optional[float] = None
    """beta from stage 1 on (default: --kl-coef)"""
    prior_penalty: Literal["kl", "l2"] = "kl"
    """'kl': analytic KL(pi || N(0, I)); 'l2': the authors' mean(mu^2 + sigma^2)"""
    policy_hidden: int = 64
    """width of the latent policy MLP"""
    policy_layers: int = 2
    """hidden layers of the latent policy MLP"""
    critic_hidden: int = 64
    """width of the critic MLP"""
    critic_layers: int = 2
    """hidden layers of the critic MLP"""
    activation: Literal["tanh", "silu"] = "tanh"
    """activation of the policy and critic MLPs"""
    # ---- GoRL stages ----
    num_stages: int = 2
    """K: RL stages, K - 1 decoder refits; 1 is the tanh-Gaussian PPO twin"""
    stage_fractions: tuple[float, ...] = ()
    """relative budget of each stage (K numbers); default: 2/3 for stage 0, the rest split equally"""
    fresh_networks_each_stage: bool = False
    """re-initialise the policy trunk and the critic at each boundary (the authors' recipe)"""
    # ---- decoder (Phase 2) ----
    decoder_hidden: int = 64
    """width of the velocity MLP"""
    decoder_layers: int = 4
    """hidden layers of the velocity MLP"""
    euler_steps: int = 10
    """N: Euler steps from t = 1 (noise) to t = 0 (action)"""
    decoder_data_steps: int = 65536
    """refit on the states of the latest this-many env steps (at least num_envs x episode length)"""
    decoder_fresh_steps: int = 0
    """if > 0: refit on the executed actions of this many env steps collected at the boundary instead"""
    decoder_targets: Literal["executed", "resampled"] = "resampled"
    """'executed': the pre-tanh u actually executed; 'resampled': fresh u ~ composite policy at each step"""
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
    eval_interval: int = 500_000
    """env steps between deterministic evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation (fixed seeds, so evaluations are paired)"""
    eval_seed: int = 10_000
    """seed of the first eval episode; eval env i uses eval_seed + i"""
    # ---- run ----
    exp_name: str = "gorl_ppo"
    """first part of the run name"""
    seed: int = 1
    """seed of the run (train env i uses seed + i)"""
    env_backend: str = "auto"
    """auto (envpool's C++ dm_control where it matches the Python suite), envpool, or dm_control"""
    env_threads: int = 2
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
    video_interval: int = 500_000
    """env steps between training videos"""
    save_model: bool = True
    """write <run>/checkpoint.pt every --checkpoint-interval env steps, at stage ends, on Ctrl-C and at the end"""
    checkpoint_interval: int = 500_000
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

def layer_init(layer: nn.Linear, std: float = np.sqrt(2)) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, 0.0)
    return layer

def mlp(in_dim: int, hidden: int, layers: int, activation: str) -> nn.Sequential:
    dims, act = [in_dim] + [hidden] * layers, nn.Tanh if activation == "tanh" else nn.SiLU
    return nn.Sequential(*[m for a, b in zip(dims[:-1], dims[1:]) for m in (layer_init(nn.Linear(a, b)), act())])

class LatentPolicy(nn.Module):
    """pi_theta(eps | s) = N(mu(s), diag(sigma(s)^2)); log sigma(s) = log_sigma (+ a head on detached features)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int, activation: str, state_sigma=True):
        super().__init__()
        self.trunk = mlp(obs_dim, hidden, layers, activation)
        self.mu_head = layer_init(nn.Linear(hidden, act_dim), std=0.01)
        self.log_sigma_head = layer_init(nn.Linear(hidden, act_dim), std=0.01) if state_sigma else None
        self.log_sigma = nn.Parameter(torch.zeros(act_dim))

    def forward(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(s)  # (B, hidden)
        share = 0.0 if self.log_sigma_head is None else self.log_sigma_head(h.detach())  # only mu trains h (detail 15)
        mu = self.mu_head(h)  # (B, d)
        return mu, (self.log_sigma + share).clamp(-5.0, 2.0).exp().expand_as(mu)

class Critic(nn.Sequential):  # V(s): (B, obs_dim) -> (B,)
    def __init__(self, obs_dim: int, hidden: int, layers: int, activation: str):
        super().__init__(mlp(obs_dim, hidden, layers, activation), layer_init(nn.Linear(hidden, 1), 1.0), nn.Flatten(0))

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

def make_networks(obs_dim: int, act_dim: int, args: Args, device) -> tuple[LatentPolicy, Critic, FlowDecoder]:
    return (LatentPolicy(obs_dim, act_dim, args.policy_hidden, args.policy_layers, args.activation,
                         args.state_sigma).to(device),
            Critic(obs_dim, args.critic_hidden, args.critic_layers, args.activation).to(device),
            FlowDecoder(obs_dim, act_dim, args.decoder_hidden, args.decoder_layers, args.euler_steps,
                        args.decoder_split_first_layer).to(device))

# ---- Phase 1: PPO in latent space ----

def gaussian_log_prob(eps: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """log N(eps; mu, diag(sigma^2)) summed over dims, (B,): the latent log-likelihood."""
    return (-0.5 * ((eps - mu) / sigma).pow(2) - sigma.log() - 0.5 * np.log(2 * np.pi)).sum(-1)

def prior_penalty(mu: torch.Tensor, sigma: torch.Tensor, kind: str) -> torch.Tensor:
    """Pull to N(0, I), (B,): KL = 0.5 sum(mu^2 + sigma^2 - 1 - log sigma^2), or the authors' mean(mu^2 + sigma^2)."""
    if kind == "kl":
        return 0.5 * (mu.pow(2) + sigma.pow(2) - 1.0 - 2.0 * sigma.log()).sum(-1)
    return (mu.pow(2) + sigma.pow(2)).mean(-1)

def compute_gae(rewards, values, next_values, terminated, dones, gamma: float, lam: float):
    """GAE over (T, N). next_values[t] is V of the true next state (the final observation at an episode's end): a
    time limit still bootstraps, a termination does not; `dones` cuts the recursion between episodes."""
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        last = delta + gamma * lam * (1.0 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values

@torch.no_grad()
def rollout(envs, obs, policy, critic, decoder, obs_rms, ret, ret_rms, args: Args, run: common.Run, frozen=False):
    """num_steps of eps ~ pi(.|s), u = g(s, eps), a = tanh(u) in every env: the batch (T * N, ...) with GAE, and the
    next obs. frozen: the observation statistics stay as they are (the policy is exactly the one being refit)."""
    keys = ("obs", "raw_obs", "eps", "u", "logp", "values", "rewards", "terminated", "dones", "final_values")
    b = {k: [] for k in keys}
    for step in range(args.num_steps):
        if not frozen:
            obs_rms.update(obs)
        raw = torch.as_tensor(obs, dtype=torch.float32, device=run.device)
        s = torch.as_tensor(obs_rms.normalize(obs), device=run.device)
        mu, sigma = policy(s)
        eps = mu + sigma * torch.randn_like(mu)  # latent action (N, d)
        logp, value = gaussian_log_prob(eps, mu, sigma), critic(s)
        u = decoder(raw, eps)  # pre-tanh action (N, d)
        obs, reward, terminated, truncated, infos = envs.step(torch.tanh(u).cpu().numpy())
        run.count_env_steps(args.num_envs * args.action_repeat, infos)
        done = terminated | truncated
        ret_rms.update(ret.mul_(args.gamma).add_(torch.as_tensor(reward)).numpy())  # R <- gamma R + r per env, (N,)
        reward = np.clip(reward / np.sqrt(ret_rms.var + 1e-8), -10.0, 10.0) if args.norm_returns else reward
        ret[torch.as_tensor(done)] = 0.0  # each env's discounted return restarts with its episode
        final_values = torch.zeros(args.num_envs, device=run.device)
        if done.any():  # V of the true last observation: a truncated episode still bootstraps from it
            final_values[done] = critic(torch.as_tensor(obs_rms.normalize(infos["final_obs"][done]), device=run.device))
        for k, v in zip(b, (s, raw, eps, u, logp, value, reward * args.reward_scale, terminated, done, final_values)):
            b[k].append(torch.as_tensor(v, dtype=torch.float32, device=run.device))
    b = {k: torch.stack(v) for k, v in b.items()}  # (T, N, ...)
    last_values = critic(torch.as_tensor(obs_rms.normalize(obs), device=run.device))
    next_values = torch.where(b["dones"].bool(), b["final_values"], torch.cat([b["values"][1:], last_values[None]]))
    b["advantages"], b["returns"] = compute_gae(b["rewards"], b["values"], next_values, b["terminated"], b["dones"],
                                                args.gamma, args.gae_lambda)
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in b.items()}, obs

def update(policy, critic, optimizer, b: dict, clip_coef: float, kl_coef: float, ent_coef: float, args: Args,
           run: common.Run) -> dict:
    """PPO epochs over one rollout. The ratio is over eps, so neither the decoder nor tanh enters it."""
    batch_size, minibatch_size = len(b["obs"]), len(b["obs"]) // args.num_minibatches
    clipfracs, approx_kls = [], []
    for epoch in range(args.update_epochs):
        perm = torch.randperm(batch_size, device=run.device)
        for start in range(0, batch_size, minibatch_size):
            mb = perm[start:start + minibatch_size]
            mu, sigma = policy(b["obs"][mb])
            log_ratio = gaussian_log_prob(b["eps"][mb], mu, sigma) - b["logp"][mb]
            ratio = log_ratio.exp()
            approx_kls.append(((ratio - 1) - log_ratio).mean().item())  # .item(): no graph is kept
            clipfracs.append(((ratio - 1.0).abs() > clip_coef).float().mean().item())
            adv = b["advantages"][mb]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)  # normalised per minibatch
            pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
            v_loss = 0.5 * (critic(b["obs"][mb]) - b["returns"][mb]).pow(2).mean()
            entropy = (sigma.log() + 0.5 * np.log(2 * np.pi * np.e)).sum(-1).mean()
            penalty = prior_penalty(mu, sigma, args.prior_penalty).mean()
            loss = pg_loss - ent_coef * entropy + args.vf_coef * v_loss + kl_coef * penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Clipped separately: the critic's large early gradients must not shrink the policy's step (detail 3).
            policy_grad = nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            critic_grad = nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            if not torch.isfinite(loss + policy_grad + critic_grad):  # checked before the step reaches the weights
                run.check_finite({"losses/policy_loss": pg_loss, "losses/value_loss": v_loss,
                                  f"losses/prior_{args.prior_penalty}": penalty, "losses/entropy": entropy,
                                  "policy gradient norm": policy_grad, "critic gradient norm": critic_grad})
            optimizer.step()
    run.check_finite({"policy parameters": list(policy.parameters()), "critic parameters": list(critic.parameters())})
    explained_var = 1.0 - (b["returns"] - b["values"]).var() / (b["returns"].var() + 1e-8)
    return {"losses/policy_loss": pg_loss.item(), "losses/value_loss": v_loss.item(), "losses/entropy": entropy.item(),
            f"losses/prior_{args.prior_penalty}": penalty.item(), "losses/approx_kl": np.mean(approx_kls),
            "losses/clipfrac": np.mean(clipfracs), "losses/explained_variance": explained_var.item(),
            "charts/learning_rate": optimizer.param_groups[0]["lr"], "charts/ent_coef": ent_coef,
            "charts/latent_mu_abs": mu.abs().mean().item(), "charts/latent_sigma": sigma.mean().item(),
            "charts/action_abs": torch.tanh(b["u"]).abs().mean().item()}

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
def boundary_diagnostics(policy, old_decoder, new_decoder, obs_rms, obs, generator, samples: int = 32) -> dict:
    """Action-space checks of a refit (detail 6): tanh(g_old(s, mu + sigma xi)) against tanh(g_new(s, xi))."""
    mu, sigma = policy(torch.as_tensor(obs_rms.normalize(obs.cpu().numpy()), device=obs.device))
    xi = torch.randn((samples, *mu.shape), generator=generator, device=obs.device)  # (S, B, d)
    obs_rep = obs.expand(samples, *obs.shape).reshape(-1, obs.shape[-1])
    a_old = torch.tanh(old_decoder(obs_rep, (mu + sigma * xi).reshape(-1, mu.shape[-1]))).reshape(xi.shape)
    a_new = torch.tanh(new_decoder(obs_rep, xi.reshape(-1, mu.shape[-1]))).reshape(xi.shape)
    a_old_det, a_new_det = torch.tanh(old_decoder(obs, mu)), torch.tanh(new_decoder(obs, torch.zeros_like(mu)))
    return {"charts/boundary_action_rms": (a_old_det - a_new_det).pow(2).mean().sqrt().item(),
            "charts/boundary_action_mean_rms": (a_old.mean(0) - a_new.mean(0)).pow(2).mean().sqrt().item(),
            "charts/boundary_action_std_old": a_old.std(0).mean().item(),
            "charts/boundary_action_std_new": a_new.std(0).mean().item()}

def reset_latent_policy(policy: LatentPolicy, optimizer: torch.optim.Optimizer) -> None:
    """Stage boundary: pi_theta(.|s) = N(0, I) exactly, fresh Adam moments for all but the trunk; all else is kept."""
    for p in [p for name, p in policy.named_parameters() if not name.startswith("trunk.")]:  # heads, log_sigma
        nn.init.zeros_(p)
        optimizer.state.pop(p, None)

def make_act(policy, decoder, obs_rms, device, stochastic_seed: Optional[int] = None):
    """a = tanh(g(s, mu)), statistics frozen; with a seed mu + sigma xi from its own generator, not the training one."""
    frozen = copy.deepcopy(obs_rms)
    generator = None if stochastic_seed is None else torch.Generator(device=device).manual_seed(stochastic_seed)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        mu, sigma = policy(torch.as_tensor(frozen.normalize(obs), device=device))
        eps = mu if generator is None else mu + sigma * torch.randn(mu.shape, generator=generator, device=device)
        return torch.tanh(decoder(torch.as_tensor(obs, dtype=torch.float32, device=device), eps)).cpu().numpy()

    return act

def build_act(ckpt: dict, args: Args, device, stochastic_seed: Optional[int]):
    """--eval-only: the composite policy of a checkpoint."""
    policy, _, decoder = make_networks(ckpt["obs_dim"], ckpt["act_dim"], args, device)
    obs_rms = common.RunningMeanStd((ckpt["obs_dim"],))
    for part, name in ((policy, "policy"), (decoder, "decoder"), (obs_rms, "obs_rms")):
        part.load_state_dict(ckpt[name])
    return make_act(policy, decoder, obs_rms, device, stochastic_seed)

def validate(args: Args) -> None:
    """Checks of this script's flags, before anything is created (common.Run checks the shared ones)."""
    if (args.num_envs * args.num_steps) % args.num_minibatches:
        raise common.UsageError(f"--num-envs {args.num_envs} x --num-steps {args.num_steps} transitions do not split "
                                f"into --num-minibatches {args.num_minibatches}")
    batch = args.num_envs * args.num_steps * args.action_repeat  # env steps per rollout
    fresh = -(-args.decoder_fresh_steps // batch) * (args.num_stages - 1)
    ends = common.stage_ends(args.total_timesteps // batch - fresh, args.num_stages, args.stage_fractions)
    if min(np.diff([0] + ends)) < 1:
        raise common.UsageError(f"--total-timesteps {args.total_timesteps} is less than one rollout ({batch} steps) "
                                f"per stage for --num-stages {args.num_stages}")
    if args.decoder_fresh_steps and args.decoder_targets != "executed":
        raise common.UsageError("--decoder-fresh-steps refits on the executed actions: add --decoder-targets executed")

if __name__ == "__main__":
    run = common.Run(Args, "gorl_ppo", validate, build_act)  # command line, --resume, --eval-only, logs
    args, device = run.args, run.device
    batch_size = args.num_envs * args.num_steps * args.action_repeat  # env steps per rollout
    fresh_rollouts = -(-args.decoder_fresh_steps // batch_size)  # collected at each boundary for the refit
    num_iterations = args.total_timesteps // batch_size - fresh_rollouts * (args.num_stages - 1)
    stage_end = common.stage_ends(num_iterations, args.num_stages, args.stage_fractions)  # in PPO iterations
    envs = common.VectorEnv(run.env, args.num_envs, args.seed, args.env_threads)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    policy, critic, decoder = make_networks(obs_dim, act_dim, args, device)
    optimizer = torch.optim.Adam([*policy.parameters(), *critic.parameters()], args.learning_rate, eps=1e-5, fused=True)
    obs_rms = common.RunningMeanStd((obs_dim,))
    ret, ret_rms = torch.zeros(args.num_envs, dtype=torch.float64), common.RunningMeanStd(())  # --norm-returns
    # (raw obs, executed u) of the latest rollouts: the current composite policy's, for the next refit (detail 4)
    refit_data = collections.deque(maxlen=fresh_rollouts or -(-args.decoder_data_steps // batch_size))
    obs = run.restore(envs, lambda seed=None: make_act(policy, decoder, obs_rms, device, seed), policy=policy,
                      critic=critic, decoder=decoder, optimizer=optimizer, obs_rms=obs_rms, refit_data=refit_data,
                      ret=ret, ret_rms=ret_rms)

    for stage in range(run.stage, args.num_stages):
        # ---- Phase 1: PPO on the latent policy, decoder frozen ----
        clip_coef = args.clip_coef_late if stage and args.clip_coef_late is not None else args.clip_coef
        kl_coef = args.kl_coef_late if stage and args.kl_coef_late is not None else args.kl_coef
        start, end = (0, num_iterations) if args.lr_schedule == "run" else (([0] + stage_end)[stage], stage_end[stage])
        for iteration in range(run.global_step // batch_size - stage * fresh_rollouts, stage_end[stage]):
            decay = 1.0 - (iteration - start) / (end - start) if args.lr_schedule != "constant" else 1.0  # detail 2
            optimizer.param_groups[0]["lr"] = decay * args.learning_rate
            ent_coef = args.ent_coef * (1.0 - iteration / num_iterations) if args.ent_decay else args.ent_coef
            batch, obs = rollout(envs, obs, policy, critic, decoder, obs_rms, ret, ret_rms, args, run)
            refit_data.append((batch["raw_obs"], batch["u"]))
            run.log(update(policy, critic, optimizer, batch, clip_coef, kl_coef, ent_coef, args, run))
            run.tick()  # evaluate, film, checkpoint when due; Ctrl-C
        run.end_stage()
        if stage == args.num_stages - 1:
            break

        # ---- Phase 2: refit the decoder to the current composite policy ----
        for _ in range(fresh_rollouts):  # --decoder-fresh-steps: on-policy data of the frozen policy; these steps count
            batch, obs = rollout(envs, obs, policy, critic, decoder, obs_rms, ret, ret_rms, args, run, frozen=True)
            refit_data.append((batch["raw_obs"], batch["u"]))  # its maxlen is fresh_rollouts: these push the rest out
            run.stop_requested_in_refit()
        before = run.evaluate("boundary_before")
        data_obs = torch.cat([o for o, _ in refit_data])  # (M, obs_dim), raw
        targets, old_decoder = torch.cat([u for _, u in refit_data]), decoder  # (M, d): executed pre-tanh actions
        if args.decoder_targets == "resampled":
            data_s = torch.as_tensor(obs_rms.normalize(data_obs.cpu().numpy()), device=device)

            @torch.no_grad()
            def targets(idx):  # u = g_old(s, mu + sigma xi): fresh draws of the current composite policy
                mu, sigma = policy(data_s[idx])
                return old_decoder(data_obs[idx], mu + sigma * torch.randn_like(mu))
        # the decoder's observation std is at least 10% of the running statistics' (detail 5)
        var_floor = torch.as_tensor(0.01 * obs_rms.var, dtype=torch.float32, device=device)
        new_decoder, fit = fit_decoder(data_obs, targets, args, obs_dim, act_dim, device, run.stop_requested_in_refit,
                                       var_floor)
        run.check_finite({"losses/decoder_train": fit["train_loss"]})
        generator = torch.Generator(device=device).manual_seed(args.seed + stage)  # not the training stream
        probe = data_obs[torch.randperm(len(data_obs), generator=generator, device=device)[:2048]]
        diagnostics = boundary_diagnostics(policy, old_decoder, new_decoder, obs_rms, probe, generator)

        # ---- Stage boundary: latent policy reset to N(0, I); critic and observation statistics kept ----
        if args.fresh_networks_each_stage:  # fresh trunk and critic, fresh Adam moments (the authors' recipe)
            for net, fresh in zip((policy, critic), make_networks(obs_dim, act_dim, args, device)):
                net.load_state_dict(fresh.state_dict())
            optimizer.state.clear()
        reset_latent_policy(policy, optimizer)
        decoder.load_state_dict(new_decoder.state_dict())  # the composite policy now decodes with the refit
        refit_data.clear()  # the next refit sees only the next stage's composite policy
        after = run.start_stage(stage + 1)  # evaluates the new composite policy, then checkpoints
        run.log({**diagnostics, "losses/decoder_train": fit["train_loss"], "losses/decoder_val": fit["val_loss"],
                 "eval/boundary_before": before.mean(), "eval/boundary_after": after.mean(),
                 "charts/decoder_fit_seconds": fit["seconds"]})
        run.pbar.write(f"stage {stage} -> {stage + 1} at step {run.global_step}: eval {before.mean():.1f} -> "
                       f"{after.mean():.1f}; decoder val loss {fit['val_loss']:.3f} on {fit['pairs']} pairs, action "
                       f"RMS {diagnostics['charts/boundary_action_rms']:.3f}, {fit['seconds']:.1f}s")
    run.finish()
