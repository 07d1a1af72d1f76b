"""gorl_sac.py: the actor gradient through the frozen decoder, the entropy and prior terms, Q targets, buffer, reset,
and end-to-end runs."""

import copy
import csv
import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import gorl_sac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nets(obs_dim=5, act_dim=2, hidden=32):
    torch.manual_seed(0)
    actor = gorl_sac.LatentActor(obs_dim, act_dim, hidden, 2)
    qf = gorl_sac.Critics(obs_dim, act_dim, hidden, 2, n=2)
    qf_target = copy.deepcopy(qf).requires_grad_(False)
    # a refit (non-identity) decoder with random weights, frozen as the script freezes it
    decoder = gorl_sac.FlowDecoder(obs_dim, act_dim, 16, 2, 10)
    for p in decoder.parameters():
        torch.nn.init.normal_(p, std=0.3)
    decoder.is_identity.fill_(False)
    decoder.requires_grad_(False)
    return actor, qf, qf_target, decoder


def _batch(obs_dim=5, act_dim=2, n=64, terminated=0.0, truncated=0.0):
    g = torch.Generator().manual_seed(1)
    return {"obs": torch.randn(n, obs_dim, generator=g), "next_obs": torch.randn(n, obs_dim, generator=g),
            "action": torch.rand(n, act_dim, generator=g) * 2 - 1, "reward": torch.rand(n, generator=g),
            "terminated": torch.full((n,), terminated), "truncated": torch.full((n,), truncated)}


def test_decoder_is_bit_identical_across_critic_and_actor_updates_while_the_actor_changes():
    actor, qf, qf_target, decoder = _nets()
    q_opt, a_opt = torch.optim.Adam(qf.parameters(), 1e-3), torch.optim.Adam(actor.parameters(), 1e-3)
    decoder_before = copy.deepcopy(decoder.state_dict())
    actor_before = copy.deepcopy(actor.state_dict())
    for _ in range(3):
        gorl_sac.critic_update(_batch(), actor, decoder, qf, qf_target, q_opt, 0.2, 0.99)
        gorl_sac.actor_update(_batch(), actor, decoder, qf, a_opt, 0.2, 1e-3)
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, decoder_before[k]), k
    assert all(p.grad is None for p in decoder.parameters())
    assert any(not torch.equal(v, actor_before[k]) for k, v in actor.state_dict().items())


def test_actor_update_follows_the_gradient_of_q_through_the_frozen_decoder():
    """With alpha = 0 and beta = 0 the actor's loss is -min Q(s, tanh(g(s, mu + sigma xi))): actor_update's gradient
    is that of Q reached through the decoder's Euler steps (detached or bypassed, it would differ or vanish)."""
    actor, qf, _, decoder = _nets()
    batch = _batch()
    torch.manual_seed(3)
    mu, sigma = actor(batch["obs"])
    eps = mu + sigma * torch.randn_like(mu)  # the draw actor_update makes after the same seed
    expected, bypassed = (torch.autograd.grad(-qf(batch["obs"], torch.tanh(u)).min(0).values.mean(),
                                              list(actor.parameters()), retain_graph=True)
                          for u in (decoder.integrate(batch["obs"], eps), eps))
    torch.manual_seed(3)
    gorl_sac.actor_update(batch, actor, decoder, qf, torch.optim.SGD(actor.parameters(), lr=0.0), 0.0, 0.0)
    for p, g, g_bypassed in zip(actor.parameters(), expected, bypassed):
        if g.abs().max() > 0:
            torch.testing.assert_close(p.grad, g)
            assert not torch.allclose(p.grad, g_bypassed)
    assert all(p.grad is None for p in qf.parameters()) and all(p.grad is None for p in decoder.parameters())


def test_the_entropy_term_is_the_latent_log_likelihood_with_the_tanh_correction():
    """With the identity decoder (stage 0), logp is the exact log-density of a = tanh(eps), eps ~ N(mu, sigma^2)."""
    actor, _, _, _ = _nets()
    identity = gorl_sac.FlowDecoder(5, 2, 16, 2, 10)
    torch.manual_seed(0)
    a, u, logp, mu, sigma = gorl_sac.sample_action(actor, identity, torch.randn(256, 5))
    tanh_gaussian = torch.distributions.TransformedDistribution(torch.distributions.Normal(mu, sigma),
                                                                torch.distributions.transforms.TanhTransform())
    torch.testing.assert_close(logp, tanh_gaussian.log_prob(a).sum(-1), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(a, torch.tanh(u))
    _, _, _, decoder = _nets()  # after a refit the correction is on u = g(s, eps), the decoder's Jacobian left out
    obs = torch.randn(256, 5)
    torch.manual_seed(1)
    a, u, logp, mu, sigma = gorl_sac.sample_action(actor, decoder, obs)
    torch.manual_seed(1)
    eps = mu + sigma * torch.randn_like(mu)
    assert (u - eps).abs().mean() > 0.1
    torch.testing.assert_close(logp, gorl_sac.gaussian_log_prob(eps, mu, sigma) - torch.log(1 - a.pow(2)).sum(-1),
                               rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("alpha, kl_coef", [(0.0, 1.0), (0.5, 0.0)])
def test_actor_prior_pull_and_entropy_terms_pull_the_right_way(alpha, kl_coef):
    """With a critic that is flat in the action, only the other terms move the actor: beta KL(pi || N(0, I))
    takes mu to 0 and sigma to 1; alpha log pi (maximising entropy) widens a narrow sigma."""
    actor, qf, _, decoder = _nets()
    with torch.no_grad():
        qf.net[-1].weight.zero_()
        actor.mu_head.bias.fill_(1.0)
        actor.log_sigma_head.bias.fill_(np.log(2.0) if kl_coef else -2.0)
    obs = _batch()["obs"]
    mu0, sigma0 = (x.mean().item() for x in actor(obs))
    optimizer = torch.optim.Adam(actor.parameters(), 1e-2)
    for _ in range(30):
        gorl_sac.actor_update(_batch(), actor, decoder, qf, optimizer, alpha, kl_coef)
    mu, sigma = (x.mean().item() for x in actor(obs))
    if kl_coef:
        assert abs(mu) < 0.5 * abs(mu0) and abs(sigma - 1.0) < 0.5 * abs(sigma0 - 1.0), (mu0, mu, sigma0, sigma)
    else:
        assert sigma > 1.5 * sigma0, (sigma0, sigma)


def test_q_target_bootstraps_on_truncation_but_not_on_termination():
    actor, _, qf_target, decoder = _nets()
    torch.manual_seed(0)
    terminal = gorl_sac.q_target(_batch(terminated=1.0), actor, decoder, qf_target, 0.2, 0.99)
    assert torch.equal(terminal, _batch()["reward"])
    torch.manual_seed(0)
    truncated = gorl_sac.q_target(_batch(truncated=1.0), actor, decoder, qf_target, 0.2, 0.99)
    torch.manual_seed(0)
    running = gorl_sac.q_target(_batch(), actor, decoder, qf_target, 0.2, 0.99)
    assert torch.equal(truncated, running) and not torch.equal(truncated, terminal)


@pytest.mark.parametrize("layernorm", [False, True])
def test_twin_critics_are_independent_networks_in_one_forward(layernorm):
    torch.manual_seed(0)
    qf = gorl_sac.Critics(5, 2, 32, 2, n=2, layernorm=layernorm)
    q = qf(torch.randn(16, 5), torch.rand(16, 2))
    assert q.shape == (2, 16) and not torch.allclose(q[0], q[1])
    q[0].sum().backward()  # no parameter is shared: critic 2's weights get no gradient from critic 1's loss
    assert all(p.grad[1].abs().max() == 0 and p.grad[0].abs().max() > 0 for p in qf.parameters())
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in qf.modules()) == (2 if layernorm else 0)


@pytest.mark.parametrize("n", [1, 2])
def test_q_target_takes_the_minimum_over_the_critics(n):
    actor, _, _, decoder = _nets()
    qf_target, batch = gorl_sac.Critics(5, 2, 32, 2, n=n), _batch()
    torch.manual_seed(1)
    target = gorl_sac.q_target(batch, actor, decoder, qf_target, 0.2, 0.99)
    torch.manual_seed(1)
    next_action, _, next_logp, _, _ = gorl_sac.sample_action(actor, decoder, batch["next_obs"])
    q = qf_target(batch["next_obs"], next_action)
    assert q.shape == (n, 64)
    assert torch.allclose(target, batch["reward"] + 0.99 * (q.min(0).values - 0.2 * next_logp))


def test_buffer_latest_is_time_ordered_and_survives_a_refit():
    buffer = gorl_sac.ReplayBuffer(capacity=10, obs_dim=5, act_dim=2)
    for step in range(13):  # wraps around
        buffer.add(obs=np.full((1, 5), step, np.float32), next_obs=np.zeros((1, 5), np.float32),
                   action=np.zeros((1, 2), np.float32), u=np.full((1, 2), step, np.float32),
                   reward=np.zeros(1, np.float32), terminated=np.zeros(1), truncated=np.zeros(1))
    assert buffer.size == 10
    assert buffer.latest(4)["obs"][:, 0].tolist() == [9, 10, 11, 12]
    before = {k: v.copy() for k, v in buffer.data.items()}
    actor, _, _, decoder = _nets()
    latest = buffer.latest(10)
    obs = torch.as_tensor(latest["obs"])
    args = gorl_sac.Args(decoder_train_steps=20, decoder_val_every=10, decoder_batch_size=8)
    gorl_sac.fit_decoder(obs, lambda idx: gorl_sac.sample_action(actor, decoder, obs[idx])[1].detach(), args, 5, 2,
                         torch.device("cpu"))
    for k, v in buffer.data.items():
        np.testing.assert_array_equal(v, before[k])


def test_stage_reset_gives_exact_prior_and_fresh_actor_moments():
    actor, qf, qf_target, decoder = _nets()
    a_opt = torch.optim.Adam(actor.parameters(), 1e-2)
    gorl_sac.actor_update(_batch(), actor, decoder, qf, a_opt, 0.2, 1e-3)
    gorl_sac.reset_latent_actor(actor, a_opt)
    mu, sigma = actor(torch.randn(128, 5) * 10)
    assert torch.equal(mu, torch.zeros_like(mu)) and torch.equal(sigma, torch.ones_like(sigma))
    assert all(p not in a_opt.state for p in [*actor.mu_head.parameters(), *actor.log_sigma_head.parameters()])
    assert all(p in a_opt.state for p in actor.trunk.parameters())


@pytest.mark.slow
def test_smoke_three_stages_and_checkpoint_round_trip(tmp_path):
    env = dict(os.environ, GORL_NO_PROGRESS="1", PYTHONPATH=ROOT)
    script = os.path.join(ROOT, "gorl_sac.py")
    args = ["--env-id", "cartpole-balance", "--total-timesteps", "1500", "--learning-starts", "300",
            "--num-stages", "3", "--batch-size", "32", "--hidden", "32", "--decoder-train-steps", "20",
            "--decoder-val-every", "10", "--decoder-data-steps", "300", "--eval-episodes", "1",
            "--eval-interval", "100000", "--updates-per-step", "0.5"]
    result = subprocess.run([sys.executable, script, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # the final line says where the wall time went: (.. N updates; updates X%, env Y% of wall time)
    shares = re.search(r"(\d+) updates; updates (\d+)%, env (\d+)% of wall time", result.stdout)
    assert shares and int(shares.group(1)) == 600 and 0 < int(shares.group(2)) + int(shares.group(3)) <= 100
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    with open(os.path.join(run_dir, "eval.csv")) as f:
        rows = list(csv.DictReader(f))
    tags = [r["tag"] for r in rows]
    assert tags.count("boundary_before") == 2 and tags.count("boundary_after") == 2 and tags[-1] == "final"
    assert {r["stage"] for r in rows} == {"0", "1", "2"}
    evaluated = subprocess.run([sys.executable, script, "--eval-only", "--checkpoint",
                                os.path.join(run_dir, "checkpoint.pt"), "--eval-episodes", "1"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    mean = float(re.search(r"return (-?[\d.]+) \+-", evaluated.stdout).group(1))
    assert abs(mean - float(rows[-1]["return_mean"])) < 1e-3
    wrong = subprocess.run([sys.executable, os.path.join(ROOT, "gorl_ppo.py"), "--eval-only", "--checkpoint",
                            os.path.join(run_dir, "checkpoint.pt")], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    assert wrong.returncode == 2 and "written by gorl_sac.py, not gorl_ppo.py" in wrong.stderr


@pytest.mark.slow
def test_learns_pendulum_and_keeps_it_across_a_refit(tmp_path):
    """GoRL-SAC with one late boundary on Pendulum-v1. The untrained policy scores about -1050 here
    and random-action episodes -1200 to -1500; a broken critic, actor or alpha update does not reach
    -400 before the boundary, and a broken refit or reset loses it after (measured with these
    settings: -135.3 before, -137.2 right after the refit, -131.7 at the end)."""
    env = dict(os.environ, GORL_NO_PROGRESS="1", PYTHONPATH=ROOT)
    args = ["--env-id", "Pendulum-v1", "--total-timesteps", "6000", "--learning-starts", "1000", "--num-stages", "2",
            "--stage-fractions", "4", "1", "--hidden", "64", "--batch-size", "128", "--eval-interval", "100000",
            "--eval-episodes", "5", "--decoder-train-steps", "1500", "--decoder-data-steps", "2000", "--seed", "1",
            "--updates-per-step", "1", "--action-repeat", "1", "--policy-frequency", "2", "--no-critic-layernorm",
            "--num-critics", "2"]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "gorl_sac.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    with open(os.path.join(run_dir, "eval.csv")) as f:
        rows = {r["tag"]: float(r["return_mean"]) for r in csv.DictReader(f)}
    assert rows["boundary_before"] > -400, rows
    assert rows["boundary_after"] > -400, rows
    assert rows["final"] > -400, rows


def test_diagnostics_and_logging_draw_nothing_from_the_training_random_stream():
    actor, _, _, decoder = _nets()
    obs = torch.randn(64, 5, generator=torch.Generator())
    before = torch.get_rng_state()
    gorl_sac.boundary_diagnostics(actor, decoder, decoder, obs, torch.Generator().manual_seed(1))
    gorl_sac.action_noise(actor, decoder, obs, torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_the_actor_takes_one_step_per_critic_step(tmp_path):
    """--policy-frequency 2 delays the actor, TD3-style, but then takes 2 actor steps: over a run the
    actor and alpha step as often as the critics (0.5 updates per env step x 400 env steps = 200)."""
    env = dict(os.environ, GORL_NO_PROGRESS="1", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "gorl_sac.py"), "--env-id", "Pendulum-v1",
                             "--total-timesteps", "600", "--learning-starts", "200", "--batch-size", "32",
                             "--hidden", "32", "--num-stages", "1", "--eval-episodes", "1", "--policy-frequency", "2",
                             "--updates-per-step", "0.5", "--action-repeat", "1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))[0], weights_only=False)
    names = ("q_optimizer", "actor_optimizer", "alpha_optimizer")
    steps = {name: int(ckpt[name]["state"][0]["step"]) for name in names}
    assert steps == {"q_optimizer": 200, "actor_optimizer": 200, "alpha_optimizer": 200}, steps


def test_the_decoder_input_normalisation_has_a_variance_floor():
    obs = torch.randn(256, 5)
    obs[:, 0] = 3.0  # constant in the refit window
    args = gorl_sac.Args(decoder_train_steps=5, decoder_val_every=5)
    decoder, _ = gorl_sac.fit_decoder(obs, torch.randn(256, 2), args, 5, 2, torch.device("cpu"),
                                      var_floor=torch.full((5,), 0.04))
    assert torch.all(decoder.obs_var >= 0.04) and decoder.normalize(obs + 0.1)[:, 0].abs().max() < 1.0


def test_kl_to_prior_matches_torch_distributions():
    torch.manual_seed(0)
    mu, sigma = torch.randn(32, 6), torch.rand(32, 6) * 2 + 0.05
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gorl_sac.kl_to_prior(mu, sigma), expected)
