"""common.py: env ids, backends, SAME_STEP autoreset semantics, evaluation pairing."""

import dataclasses

import numpy as np
import pytest
import torch

import common


@pytest.mark.parametrize("env_id,obs_dim,act_dim", [
    ("hopper-stand", 15, 4), ("dm_control/cheetah-run-v0", 17, 6), ("ball_in_cup-catch", 8, 2),
    ("finger-turn_hard", 12, 2), ("Pendulum-v1", 3, 1),
])
def test_make_env_accepts_all_id_styles(env_id, obs_dim, act_dim):
    env = common.make_env(common.resolve_env(env_id), seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (obs_dim,) and obs.dtype == np.float32
    assert env.action_space.shape == (act_dim,)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
    assert obs.dtype == np.float32 and np.isfinite(reward)


def test_unknown_env_id_suggests_close_matches():
    with pytest.raises(common.UsageError, match="unknown --env-id 'hopper-stnd'.*hopper-stand"):
        common.resolve_env("hopper-stnd")
    with pytest.raises(common.UsageError, match="Discrete action space"):
        common.resolve_env("CartPole-v1")


def test_dm_control_time_limit_is_truncation_not_termination():
    env = common.make_env(common.resolve_env("cartpole-balance"), seed=0)
    env.reset(seed=0)
    for step in range(1, 1001):
        _, _, terminated, truncated, _ = env.step(np.zeros(1, np.float32))
        assert not terminated
        if truncated:
            break
    assert step == 1000 and truncated


@pytest.mark.parametrize("backend", ["envpool", "dm_control"])
def test_vector_env_same_step_autoreset(backend):
    envs = common.VectorEnv(common.resolve_env("cartpole-balance", backend), num_envs=3, seed=0)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (3, 5) and obs.dtype == np.float32
    for step in range(1, 1001):
        obs, reward, terminated, truncated, infos = envs.step(np.zeros((3, 1), np.float32))
        if step < 1000:
            assert not truncated.any() and "final_obs" not in infos
    assert truncated.all() and not terminated.any()
    final = infos["final_obs"]
    assert final.shape == (3, 5) and not np.allclose(final, obs)  # obs is already the next episode's
    _, reward, _, _, _ = envs.step(np.zeros((3, 1), np.float32))
    assert np.all(np.isfinite(reward))
    envs.close()


def test_backends_agree_on_observation_layout():
    a = common.VectorEnv(common.resolve_env("hopper-stand", "envpool"), 2, 0)
    b = common.VectorEnv(common.resolve_env("hopper-stand", "dm_control"), 2, 0)
    assert a.single_observation_space.shape == b.single_observation_space.shape
    assert a.single_action_space.shape == b.single_action_space.shape
    # touch sensors are the last 2 entries in both layouts and are non-negative
    assert np.all(a.reset()[0][:, -2:] >= 0) and np.all(b.reset(seed=0)[0][:, -2:] >= 0)


@pytest.mark.parametrize("backend", ["envpool", "dm_control"])
def test_evaluation_is_paired_by_seed(backend):
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(5, 1))
    act = lambda obs: np.tanh(obs @ weights).astype(np.float32)
    r1 = common.evaluate(common.resolve_env("cartpole-balance", backend), act, num_episodes=3, seed=7)
    r2 = common.evaluate(common.resolve_env("cartpole-balance", backend), act, num_episodes=3, seed=7)
    r3 = common.evaluate(common.resolve_env("cartpole-balance", backend), act, num_episodes=3, seed=8)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(r1, r3)


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(common.UsageError, match="does not exist"):
        common.load_checkpoint(str(tmp_path / "missing.pt"), "gorl_ppo")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(common.UsageError, match="not readable"):
        common.load_checkpoint(str(bad), "gorl_ppo")
    other = tmp_path / "sac.pt"
    torch.save({"script": "gorl_sac"}, str(other))
    with pytest.raises(common.UsageError, match="written by gorl_sac.py"):
        common.load_checkpoint(str(other), "gorl_ppo")


def test_envpool_threads_do_not_change_results():
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (50, 4, 6)).astype(np.float32)
    runs = []
    for threads in (1, 2):
        envs = common.VectorEnv(common.resolve_env("cheetah-run", "envpool"), 4, seed=5, threads=threads)
        obs = [envs.reset()[0]]
        obs += [envs.step(a)[0] for a in actions]
        runs.append(np.stack(obs))
        envs.close()
    np.testing.assert_array_equal(runs[0], runs[1])


def test_auto_backend_avoids_envpool_where_its_port_differs():
    # envpool's finger tasks differ from the Python suite (README, detail 12)
    assert common.resolve_env("finger-spin", "auto").backend == "dm_control"
    assert common.resolve_env("dm_control/finger-turn_hard-v0", "auto").backend == "dm_control"
    assert common.resolve_env("finger-spin", "envpool").backend == "envpool"  # still reachable on request
    assert common.resolve_env("cheetah-run", "auto").backend == "envpool"
    assert common.resolve_env("Pendulum-v1", "auto").backend == "gym"


@pytest.mark.parametrize("backend", ["envpool", "dm_control"])
def test_action_repeat_holds_the_action_and_sums_rewards(backend):
    spec = common.resolve_env("cartpole-balance", backend)
    once, twice = common.VectorEnv(spec, 2, 0), common.VectorEnv(dataclasses.replace(spec, action_repeat=2), 2, 0)
    once.reset(), twice.reset()
    actions = np.random.default_rng(0).uniform(-1, 1, (500, 2, 1)).astype(np.float32)
    for step, a in enumerate(actions, 1):
        obs_1, r_1, *_ = once.step(a)
        obs_1, r_2, _, truncated_1, infos_1 = once.step(a)
        obs_2, r, _, truncated_2, infos = twice.step(a)
        assert np.allclose(r, r_1 + r_2) and (truncated_1 == truncated_2).all() and np.array_equal(obs_1, obs_2)
    assert truncated_2.all() and np.array_equal(infos_1["final_obs"], infos["final_obs"])  # 1000 simulator steps
    assert (infos["episodes"][2] == 1000).all()  # episode lengths are counted in simulator steps


def test_action_repeat_stops_at_the_episode_end():
    spec = dataclasses.replace(common.resolve_env("tests.toy_envs:Toy-v0"), action_repeat=3)
    envs = common.VectorEnv(spec, 1, 0)
    envs.reset()
    ends = [step for step in range(1, 15) if envs.step(np.zeros((1, 2), np.float32))[3].any()]
    assert ends == [7, 14]  # 20-step episodes: six full repeats, then 2 of 3 steps
