"""The flow-matching decoder and its refit, and that both scripts carry the same copy of them."""

import difflib
import inspect

import numpy as np
import pytest
import torch

import gorl_ppo
import gorl_sac

SCRIPTS = [gorl_ppo, gorl_sac]


@pytest.mark.parametrize("name", ["FlowDecoder", "flow_matching_loss", "fit_decoder", "gaussian_log_prob"])
def test_the_two_scripts_carry_the_same_decoder_and_refit(name):
    """The decoder is written out in each script on purpose; the two copies must stay the same lines."""
    ppo, sac = (inspect.getsource(getattr(m, name)).splitlines() for m in SCRIPTS)
    changed = [line for line in difflib.unified_diff(ppo, sac, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert not changed, "\n".join(changed)


def test_the_decoder_flags_are_the_same_in_both_scripts():
    ppo, sac = ({f for f in m.Args.__dataclass_fields__ if f.startswith(("decoder_", "euler_", "u_clip"))}
                for m in SCRIPTS)
    assert ppo - {"decoder_fresh_steps"} == sac


@pytest.mark.parametrize("split", [False, True])
def test_decoder_is_exactly_identity_at_init(split):
    torch.manual_seed(0)
    decoder = gorl_ppo.FlowDecoder(obs_dim=5, act_dim=3, hidden=64, layers=4, euler_steps=10, split_first_layer=split)
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


def test_euler_sampler_runs_time_from_one_to_zero():
    """With v = t c, the steps at t = 1, 0.9, ..., 0.1 move x by -(1/N) c sum_k (1 - k/N) = -0.55 c."""
    decoder = gorl_ppo.FlowDecoder(obs_dim=2, act_dim=2, hidden=8, layers=1, euler_steps=10)
    c = torch.tensor([1.0, -2.0])
    decoder.velocity = lambda s, x, t: t * c
    decoder.is_identity.fill_(False)
    eps = torch.randn(16, 2)
    torch.testing.assert_close(decoder(torch.zeros(16, 2), eps), eps - 0.55 * c)


def test_split_first_layer_decode_equals_the_plain_euler_loop():
    torch.manual_seed(0)
    decoder = gorl_ppo.FlowDecoder(5, 2, 16, 2, 10)
    for p in decoder.parameters():
        torch.nn.init.normal_(p, std=0.3)
    decoder.is_identity.fill_(False)
    decoder.obs_mean.normal_()
    decoder.obs_var.uniform_(0.5, 2.0)
    for n in (1, 64):
        obs = torch.randn(n, 5)
        eps = torch.randn(n, 2, requires_grad=True)
        u_plain = decoder.integrate(obs, eps)
        (g_plain,) = torch.autograd.grad(u_plain.pow(2).sum(), eps)
        u_split = decoder.integrate_split(obs, eps)
        (g_split,) = torch.autograd.grad(u_split.pow(2).sum(), eps)
        assert (u_plain - eps).abs().max() > 0.1  # a decoder that does something
        torch.testing.assert_close(u_split, u_plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_split, g_plain, rtol=1e-5, atol=1e-5)
    # forward() takes the plain loop by default and the split path when asked
    assert torch.equal(decoder(obs, eps), decoder.integrate(obs, eps))
    decoder.split_first_layer = True
    assert torch.equal(decoder(obs, eps), decoder.integrate_split(obs, eps))


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


def test_flow_matching_loss_is_zero_for_the_exact_conditional_velocity():
    """x_t = t eps + (1 - t) u moves with velocity eps - u = (x_t - u) / t. A network that returns exactly that
    (it reads each row's u from s here) has zero loss; a flipped target (u - eps) or a flipped path (t u +
    (1 - t) eps) does not. A zero network scores E||eps - u||^2 / d = 1 + E[u^2] per dimension."""
    torch.manual_seed(0)
    decoder = gorl_ppo.FlowDecoder(obs_dim=2, act_dim=2, hidden=8, layers=1, euler_steps=10)
    u = torch.randn(20000, 2) * 2.0
    assert abs(gorl_ppo.flow_matching_loss(decoder, u, u, draws=1).item() - 5.0) < 0.15
    seen = []

    def exact(s, x, t):
        seen.append((s, x, t))
        return (x - s) / t

    decoder.velocity = exact
    assert gorl_ppo.flow_matching_loss(decoder, u, u, draws=3).item() < 1e-8
    ((s, x, t),) = seen  # t ~ U[0, 1] and eps ~ N(0, I), fresh for each (pair, draw)
    assert t.shape == (60000, 1) and t.min() >= 0 and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.01 and abs(t.var().item() - 1 / 12) < 0.005
    eps = ((x - (1 - t) * s) / t).reshape(3, 20000, 2)
    assert abs(eps.std().item() - 1.0) < 0.02  # independent draws differ by 2 / sqrt(pi) = 1.13 on average:
    assert (eps[0] - eps[1]).abs().mean() > 1.0 and (eps[1] - eps[2]).abs().mean() > 1.0


def _capture_decoders(monkeypatch, module):
    created = []

    class Capturing(module.FlowDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(module, "FlowDecoder", Capturing)
    return created


def test_fit_keeps_the_best_validation_weights_not_the_last(monkeypatch):
    """From the third validation check on, `stop` (called at each check) ruins the weights being trained: the
    fit must return the weights of the best check (the second), whose validation loss it reports."""
    torch.manual_seed(0)
    created = _capture_decoders(monkeypatch, gorl_ppo)
    obs = torch.randn(512, 2)
    u = obs[:, :1] * 2.0  # deterministic target u = 2 s_0
    checks = []  # the largest output bias at each check, after any ruin

    def stop():
        if len(checks) >= 2:
            with torch.no_grad():
                created[0].out.bias.add_(10.0)
        checks.append(created[0].out.bias.abs().max().item())

    args = _toy_args(decoder_train_steps=300, decoder_val_every=50)
    decoder, fit = gorl_ppo.fit_decoder(obs, u, args, 2, 1, torch.device("cpu"), stop)
    assert len(checks) == 6 and min(checks[2:]) > 10  # the weights being trained were ruined from check 3 on
    assert not bool(decoder.is_identity) and decoder.out.bias.abs().max() < 5  # the returned one was not
    assert fit["pairs"] == 512 and fit["val_loss"] < 3.0  # a zero network scores 1 + E[u^2] = 5 per dim
    # the decoder statistics are those of the refit data, frozen with it
    torch.testing.assert_close(decoder.obs_mean, obs.mean(0))
    assert not any(p.requires_grad for p in decoder.parameters())  # returned frozen


def test_fit_clips_the_targets(monkeypatch):
    seen = []
    loss = gorl_ppo.flow_matching_loss
    monkeypatch.setattr(gorl_ppo, "flow_matching_loss",
                        lambda decoder, s, u, *rest: seen.append(u.abs().max()) or loss(decoder, s, u, *rest))
    obs = torch.randn(256, 2)
    gorl_ppo.fit_decoder(obs, torch.randn(256, 1) * 10, _toy_args(decoder_train_steps=20, decoder_val_every=10,
                                                                   u_clip=3.0), 2, 1, torch.device("cpu"))
    assert len(seen) == 22 and max(seen) == 3.0  # 20 training steps and 2 validation checks, all clipped


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
