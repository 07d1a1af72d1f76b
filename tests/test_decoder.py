"""The flow-matching decoder of gorl_ppo.py (spec §3)."""

import numpy as np
import torch

import common
import gorl_ppo


def test_decoder_is_exactly_identity_at_init():
    torch.manual_seed(0)
    decoder = gorl_ppo.FlowDecoder(obs_dim=5, act_dim=3, hidden=64, layers=4, euler_steps=10)
    obs, eps = torch.randn(64, 5) * 3, torch.randn(64, 3) * 2
    # The zero last layer makes the velocity 0, so the Euler integration returns eps bit for bit
    assert bool(decoder.is_identity) and torch.equal(decoder(obs, eps), eps)
    assert torch.equal(decoder.velocity(decoder.normalize(obs), eps, torch.rand(64, 1)), torch.zeros(64, 3))
    decoder.is_identity.fill_(False)  # the shortcut used while no refit has happened gives the same
    assert torch.equal(decoder(obs, eps), eps)


def test_euler_sampler_follows_a_known_velocity():
    """With v(s, x, t) = x - c (a linear flow), 10 Euler steps from t=1 to 0 give
    x_N = c + (1 - 1/N)^N (eps - c); checks direction, step size and step count."""
    decoder = gorl_ppo.FlowDecoder(obs_dim=2, act_dim=2, hidden=8, layers=1, euler_steps=10)
    c = torch.tensor([0.5, -1.0])
    decoder.velocity = lambda s, x, t: x - c
    decoder.is_identity.fill_(False)
    eps = torch.randn(16, 2)
    expected = c + (1 - 0.1) ** 10 * (eps - c)
    torch.testing.assert_close(decoder(torch.zeros(16, 2), eps), expected)


def _toy_args(**overrides):
    args = gorl_ppo.Args(decoder_train_steps=1500, decoder_batch_size=256, decoder_noise_draws=4,
                         decoder_val_every=250)
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def test_decoder_learns_a_bimodal_target_that_a_gaussian_cannot():
    torch.manual_seed(0)
    n, obs_dim = 4000, 3
    obs = torch.randn(n, obs_dim)

    def targets(idx):  # every state: u = -1 or +1, 50/50, drawn anew at each call (resampled targets)
        return torch.where(torch.rand(len(idx), 1) < 0.5, -1.0, 1.0)

    decoder, fit = gorl_ppo.fit_decoder(obs, targets, _toy_args(), obs_dim, 1, torch.device("cpu"))

    states = torch.randn(4000, obs_dim)
    with torch.no_grad():
        samples = decoder(states, torch.randn(4000, 1)).squeeze(-1).numpy()
    frac_neg, frac_pos = np.mean(samples < -0.3), np.mean(samples > 0.3)
    frac_mid = np.mean(np.abs(samples) < 0.3)
    assert frac_neg >= 0.30 and frac_pos >= 0.30, (frac_neg, frac_pos)
    assert frac_mid < 0.10, frac_mid
    # The criterion is not trivially met: the best Gaussian fit to the same data, N(0, 1),
    # puts ~24% of its mass in |u| < 0.3.
    u = targets(torch.arange(n))
    gaussian = np.random.default_rng(0).normal(u.mean().item(), u.std().item(), 4000)
    assert np.mean(np.abs(gaussian) < 0.3) > 0.10


def test_flow_matching_noise_is_fresh_and_loss_is_the_cfm_objective():
    """For a zero network the loss is E||eps - u||^2 / d = 1 + E[u^2] per dim, whatever eps was
    stored: the target uses fresh noise, independent of any latent."""
    torch.manual_seed(0)
    decoder = gorl_ppo.FlowDecoder(obs_dim=2, act_dim=2, hidden=8, layers=1, euler_steps=10)
    u = torch.full((20000, 2), 2.0)
    loss = gorl_ppo.flow_matching_loss(decoder, torch.zeros(20000, 2), u, draws=1)
    assert abs(loss.item() - 5.0) < 0.1


def test_fit_on_executed_actions_keeps_the_best_validation_weights():
    torch.manual_seed(0)
    obs = torch.randn(512, 2)
    u = obs[:, :1] * 2.0  # deterministic target u = 2 s_0
    args = _toy_args(decoder_train_steps=300, decoder_val_every=50)
    decoder, fit = gorl_ppo.fit_decoder(obs, u, args, 2, 1, torch.device("cpu"))
    assert not bool(decoder.is_identity)
    assert fit["pairs"] == 512 and np.isfinite(fit["val_loss"])
    # the decoder statistics are those of the refit data, frozen with it
    torch.testing.assert_close(decoder.obs_mean, obs.mean(0))
    # the fit learned something: a zero network scores E||eps - u||^2 = 1 + E[u^2] = 5 per dim
    assert fit["val_loss"] < 1.5


def test_a_near_constant_observation_dimension_does_not_saturate_the_decoder_inputs():
    """A touch sensor quiet in the refit window has variance ~0 there: the floor (10% of the run's std)
    keeps a later deviation of one run-std at 10 normalised units instead of far beyond the +-10 clip."""
    torch.manual_seed(0)
    obs = torch.randn(512, 3)
    obs[:, 2] = 1e-4 * torch.randn(512)  # quiet in the window
    floor = torch.full((3,), 0.01)  # the run's variance there is 1
    decoder, _ = gorl_ppo.fit_decoder(obs, torch.randn(512, 1), _toy_args(decoder_train_steps=10), 3, 1,
                                      torch.device("cpu"), var_floor=floor)
    assert torch.all(decoder.obs_var >= floor)
    assert decoder.normalize(torch.tensor([[0.0, 0.0, 0.5]]))[0, 2].abs() < 10.0
