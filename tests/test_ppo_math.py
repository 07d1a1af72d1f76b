"""PPO-side maths of gorl_ppo.py: KL to the prior, log-probs, GAE, the stage-boundary reset."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import gorl_ppo


def test_analytic_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, sigma = torch.randn(32, 6), torch.rand(32, 6) * 2 + 0.05
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gorl_ppo.prior_penalty(mu, sigma, "kl"), expected)
    assert torch.all(gorl_ppo.prior_penalty(torch.zeros(3, 2), torch.ones(3, 2), "kl") == 0)


def test_gaussian_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    mu, sigma, eps = torch.randn(32, 4), torch.rand(32, 4) + 0.1, torch.randn(32, 4)
    expected = torch.distributions.Normal(mu, sigma).log_prob(eps).sum(-1)
    torch.testing.assert_close(gorl_ppo.gaussian_log_prob(eps, mu, sigma), expected)


def _brute_force_gae(r, v, v_next, term, done, gamma, lam):
    T, N = r.shape
    adv = np.zeros((T, N))
    for n in range(N):
        for t in range(T):
            total, weight = 0.0, 1.0
            for k in range(t, T):
                delta = r[k, n] + gamma * v_next[k, n] * (1 - term[k, n]) - v[k, n]
                total += weight * delta
                if done[k, n]:
                    break
                weight *= gamma * lam
            adv[t, n] = total
    return adv


def test_gae_matches_brute_force_with_truncation_and_termination():
    rng = np.random.default_rng(0)
    T, N = 9, 4
    r, v, v_next = rng.normal(size=(T, N)), rng.normal(size=(T, N)), rng.normal(size=(T, N))
    term = np.zeros((T, N))
    trunc = np.zeros((T, N))
    term[2, 0] = term[6, 1] = 1  # terminations: no bootstrap
    trunc[4, 0] = trunc[3, 2] = trunc[8, 3] = 1  # time limits: bootstrap from V(final obs)
    done = np.maximum(term, trunc)
    expected = _brute_force_gae(r, v, v_next, term, done, 0.99, 0.95)
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)
    adv, ret = gorl_ppo.compute_gae(t(r), t(v), t(v_next), t(term), t(done), 0.99, 0.95)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(ret.numpy(), expected + v, rtol=1e-10)
    # A truncated step bootstraps, a terminated one does not.
    assert adv[3, 2].item() == r[3, 2] + 0.99 * v_next[3, 2] - v[3, 2]
    assert adv[2, 0].item() == r[2, 0] - v[2, 0]


def test_stage_boundary_reset_gives_exact_prior_and_keeps_critic_and_normaliser():
    torch.manual_seed(0)
    obs_dim, act_dim = 7, 3
    policy = gorl_ppo.LatentPolicy(obs_dim, act_dim, 32, 2, "tanh")
    critic = gorl_ppo.Critic(obs_dim, 32, 2, "tanh")
    optimizer = torch.optim.Adam([*policy.parameters(), *critic.parameters()], lr=1e-2)
    rms = common.RunningMeanStd((obs_dim,))
    rms.update(np.random.default_rng(0).normal(3.0, 2.0, (100, obs_dim)))
    for _ in range(20):  # move everything away from its initial values
        mu, sigma = policy(torch.randn(64, obs_dim))
        loss = (mu - 1).pow(2).mean() + (sigma - 0.3).pow(2).mean() + critic(torch.randn(64, obs_dim)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mu, sigma = policy(torch.randn(8, obs_dim))
    assert mu.abs().min() > 0 and (sigma - 1).abs().min() > 0
    critic_before = copy.deepcopy(critic.state_dict())
    critic_adam_before = [optimizer.state[p]["exp_avg"].clone() for p in critic.parameters()]
    rms_before = rms.state_dict()
    trunk_before = copy.deepcopy(policy.trunk.state_dict())

    gorl_ppo.reset_latent_policy(policy, optimizer)

    mu, sigma = policy(torch.randn(256, obs_dim) * 10)
    assert torch.equal(mu, torch.zeros_like(mu)) and torch.equal(sigma, torch.ones_like(sigma))
    heads = (*policy.mu_head.parameters(), *policy.log_sigma_head.parameters(), policy.log_sigma)
    assert all(p not in optimizer.state for p in heads)  # fresh moments
    assert all(p in optimizer.state for p in policy.trunk.parameters())  # the trunk keeps its moments
    for k, v in critic.state_dict().items():
        assert torch.equal(v, critic_before[k])
    for p, m in zip(critic.parameters(), critic_adam_before):
        assert torch.equal(optimizer.state[p]["exp_avg"], m)
    for k, v in policy.trunk.state_dict().items():
        assert torch.equal(v, trunk_before[k])
    assert np.array_equal(rms.mean, rms_before["mean"]) and np.array_equal(rms.var, rms_before["var"])


def test_state_sigma_reads_the_trunk_without_training_it():
    """Detail 15: log sigma(s) = log_sigma + a head on the trunk's features through detach(), so a loss on sigma
    alone moves its head and never the trunk, while a loss on mu reaches the trunk."""
    torch.manual_seed(0)
    policy, s = gorl_ppo.LatentPolicy(5, 2, 16, 2, "tanh"), torch.randn(32, 5)
    mu, sigma = policy(s)
    assert sigma.std(0).min() > 0  # sigma depends on the state
    sigma.log().sum().backward()
    assert all(p.grad is None for p in policy.trunk.parameters())
    assert policy.log_sigma_head.weight.grad.abs().min() > 0 and policy.log_sigma.grad.abs().min() > 0
    policy(s)[0].sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in policy.trunk.parameters())


def test_stage_ends_split_the_budget():
    assert common.stage_ends(12, 3, (2.0, 1.0, 1.0)) == [6, 9, 12]
    assert common.stage_ends(7, 1, ()) == [7]
    assert common.stage_ends(30, 2, (2.0, 1.0)) == [20, 30]
    assert common.stage_ends(30, 3, ()) == [20, 25, 30]  # default: 2/3 for stage 0, the rest split equally


def test_running_mean_std_is_exact():
    rng = np.random.default_rng(0)
    data = rng.normal(5.0, 3.0, (1000, 4))
    rms = common.RunningMeanStd((4,))
    for chunk in np.array_split(data, 37):
        rms.update(chunk)
    np.testing.assert_allclose(rms.mean, data.mean(0), rtol=1e-10)
    np.testing.assert_allclose(rms.var, data.var(0), rtol=1e-10)


def test_boundary_diagnostics_draw_nothing_from_the_training_random_stream():
    torch.manual_seed(0)
    policy = gorl_ppo.LatentPolicy(4, 2, 16, 2, "tanh")
    old, new = gorl_ppo.FlowDecoder(4, 2, 16, 2, 5), gorl_ppo.FlowDecoder(4, 2, 16, 2, 5)
    new.is_identity.fill_(False)
    rms = common.RunningMeanStd((4,))
    before = torch.get_rng_state()
    gorl_ppo.boundary_diagnostics(policy, old, new, rms, torch.randn(64, 4, generator=torch.Generator()),
                                  torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), before)


def test_l2_prior_penalty_is_the_authors_mean_over_batch_and_dimensions():
    mu, sigma = torch.randn(32, 6), torch.rand(32, 6) + 0.1
    penalty = gorl_ppo.prior_penalty(mu, sigma, "l2").mean()
    torch.testing.assert_close(penalty, mu.pow(2).mean() + sigma.pow(2).mean())


class _Run:  # what update() and rollout() use of common.Run
    device = torch.device("cpu")

    def __init__(self):
        self.steps = 0

    def check_finite(self, named):
        pass

    def count_env_steps(self, n, infos):
        self.steps += n


def _policy_and_batch(adv_sign=1.0, n=512, obs_dim=4, act_dim=2):
    """Latents drawn half at mu + 0.5 and half at mu - 0.5; the upper half has advantage `adv_sign`."""
    torch.manual_seed(0)
    policy, critic = gorl_ppo.LatentPolicy(obs_dim, act_dim, 32, 2, "tanh"), gorl_ppo.Critic(obs_dim, 32, 2, "tanh")
    obs = torch.randn(n, obs_dim)
    with torch.no_grad():
        mu, sigma = policy(obs)
    side = torch.where(torch.arange(n) < n // 2, 1.0, -1.0)[:, None]
    eps = mu + 0.5 * side
    batch = {"obs": obs, "eps": eps, "logp": gorl_ppo.gaussian_log_prob(eps, mu, sigma), "u": eps,
             "advantages": adv_sign * side[:, 0], "values": torch.zeros(n), "returns": torch.full((n,), 3.0)}
    return policy, critic, batch


def _update(policy, critic, batch, lr=1e-2, **flags):
    args = gorl_ppo.Args(**{"update_epochs": 10, "num_minibatches": 2, "ent_coef": 0.0, **flags})
    optimizer = torch.optim.Adam([*policy.parameters(), *critic.parameters()], lr=lr)
    return gorl_ppo.update(policy, critic, optimizer, batch, args.clip_coef, args.kl_coef, args.ent_coef, args, _Run())


def test_update_raises_the_likelihood_of_advantaged_latents_and_fits_the_critic():
    for sign in (1.0, -1.0):
        policy, critic, batch = _policy_and_batch(sign)
        mu_before = policy(batch["obs"])[0].detach()
        v_before = (critic(batch["obs"]) - batch["returns"]).pow(2).mean().item()
        _update(policy, critic, batch, kl_coef=0.0)
        shift = (policy(batch["obs"])[0] - mu_before).mean().item()
        assert sign * shift > 0.02, (sign, shift)  # the mean moves toward the advantaged side
        assert (critic(batch["obs"]) - batch["returns"]).pow(2).mean().item() < 0.5 * v_before


def test_update_clips_the_probability_ratio():
    """Many epochs on one rollout at the script's learning rate: the clipped surrogate stops pushing once the ratio
    passes 1 + clip (at 1e-2, Adam's momentum alone carries the ratio well past it)."""
    ratios = {}
    for clip in (0.1, 100.0):
        policy, critic, batch = _policy_and_batch()
        _update(policy, critic, batch, lr=gorl_ppo.Args.learning_rate, kl_coef=0.0, clip_coef=clip, update_epochs=30)
        mu, sigma = policy(batch["obs"])
        upper = batch["advantages"] > 0
        ratios[clip] = (gorl_ppo.gaussian_log_prob(batch["eps"], mu, sigma) - batch["logp"])[upper].exp().mean().item()
    assert ratios[0.1] < 1.25 and ratios[100.0] > 1.5, ratios


@pytest.mark.parametrize("kind", ["kl", "l2"])
def test_update_prior_pull_moves_the_latent_toward_its_target(kind):
    """With zero advantages and no entropy bonus only the prior term moves the policy: mu toward 0, sigma
    toward 1 (the KL) or toward 0 (the authors' L2); the entropy bonus alone widens sigma."""
    policy, critic, batch = _policy_and_batch(0.0)
    with torch.no_grad():
        policy.mu_head.bias.fill_(1.0)
        policy.log_sigma.fill_(np.log(2.0))
    _update(policy, critic, batch, kl_coef=1.0, prior_penalty=kind)
    mu, sigma = policy(batch["obs"])
    assert mu.abs().mean() < 0.9 and sigma.mean() < 1.9
    policy, critic, batch = _policy_and_batch(0.0)
    _update(policy, critic, batch, kl_coef=0.0, ent_coef=0.1)
    assert policy(batch["obs"])[1].mean() > 1.01


def _returns():  # rollout's per-env discounted return and its running statistics, as the script makes them
    return torch.zeros(2, dtype=torch.float64), common.RunningMeanStd(())


class _TwoEnvs:  # reward 1 a step; at the second, env 0 is truncated (final obs 9), env 1 terminates (5)
    num_envs, t = 2, 0

    def step(self, actions):
        self.t += 1
        obs = np.full((2, 1), self.t + 1.0, np.float32)
        infos, terminated, truncated = {}, np.zeros(2, bool), np.zeros(2, bool)
        if self.t == 2:
            truncated[0], terminated[1] = True, True
            infos["final_obs"], obs[:] = np.array([[9.0], [5.0]], np.float32), 7.0
        return obs, np.ones(2), terminated, truncated, infos


def test_rollout_bootstraps_a_truncation_from_its_final_observation():
    """Two envs, three steps, gamma 0.5, lambda 0 (advantage = TD error), V(s) = s. At step 1 env 0 hits its time
    limit (final obs 9) and env 1 terminates (final obs 5); both restart at obs 7."""
    torch.manual_seed(0)
    args = gorl_ppo.Args(num_envs=2, num_steps=3, gamma=0.5, gae_lambda=0.0, reward_scale=2.0, action_repeat=1)
    policy, decoder = gorl_ppo.LatentPolicy(1, 1, 8, 1, "tanh"), gorl_ppo.FlowDecoder(1, 1, 8, 1, 2)
    rms, run = common.RunningMeanStd((1,)), _Run()  # mean 0, var 1: V sees the raw observation
    batch, obs = gorl_ppo.rollout(_TwoEnvs(), np.ones((2, 1), np.float32), policy, lambda s: s[:, 0], decoder, rms,
                                  *_returns(), args, run, frozen=True)
    adv = batch["advantages"].reshape(3, 2)  # (T, N)
    expected = torch.tensor([[2 + 0.5 * 2 - 1] * 2, [2 + 0.5 * 9 - 2, 2 - 2], [2 + 0.5 * 4 - 7] * 2])
    torch.testing.assert_close(adv, expected)
    assert run.steps == 6 and obs[0, 0] == 4.0


@pytest.mark.parametrize("norm_returns", [False, True])
def test_rollout_divides_rewards_by_the_std_of_the_discounted_return(norm_returns):
    """gamma 0.5, rewards 1: R = 1, 1.5, then both episodes end and R restarts at 1. The running std over all R so far
    is 0 (so 1 / 1e-4, clipped to 10), 0.25, then sqrt(2) / 6; without --norm-returns rewards pass through."""
    torch.manual_seed(0)
    args = gorl_ppo.Args(num_envs=2, num_steps=3, gamma=0.5, reward_scale=2.0, action_repeat=1,
                         norm_returns=norm_returns)
    policy, decoder = gorl_ppo.LatentPolicy(1, 1, 8, 1, "tanh"), gorl_ppo.FlowDecoder(1, 1, 8, 1, 2)
    ret, ret_rms = _returns()
    batch, _ = gorl_ppo.rollout(_TwoEnvs(), np.ones((2, 1), np.float32), policy, lambda s: s[:, 0], decoder,
                                common.RunningMeanStd((1,)), ret, ret_rms, args, _Run(), frozen=True)
    scale = torch.tensor([10.0, 4.0, 6.0 / 2.0**0.5]) if norm_returns else torch.ones(3)
    torch.testing.assert_close(batch["rewards"].reshape(3, 2), 2.0 * scale[:, None].expand(3, 2))
    torch.testing.assert_close(ret, torch.ones(2, dtype=torch.float64))  # carried into the next rollout
    assert ret_rms.count == 6
