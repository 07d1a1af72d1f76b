"""Run lifecycle of both scripts: exact resume, Ctrl-C/SIGTERM, non-finite stop,
--eval-only with video, and one-line errors for bad input. Scripts run as subprocesses, as a user
runs them."""

import csv
import glob
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, GORL_NO_PROGRESS="1", PYTHONPATH=ROOT)


def script(name):
    return [sys.executable, os.path.join(ROOT, f"{name}.py")]


def start(name, args, cwd):
    """A run in the background, stdout and stderr together."""
    return subprocess.Popen(script(name) + args, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def run(name, args, cwd, timeout=600):
    return subprocess.run(script(name) + args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def eval_rows(run_dir):
    """eval.csv without the wall-time column (the only one that may differ between two runs)."""
    path = os.path.join(run_dir, "eval.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in csv.DictReader(f)]


def the_run_dir(cwd, exp_name):
    (run_dir,) = glob.glob(str(cwd / "runs" / f"*__{exp_name}__*"))
    return run_dir


def interrupt_when(name, args, cwd, exp_name, ready, sig):
    """Start a run, send `sig` once `ready(eval rows)` holds, and return (returncode, stdout)."""
    proc = start(name, args + ["--exp-name", exp_name], cwd)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        dirs = glob.glob(str(cwd / "runs" / f"*__{exp_name}__*"))
        if dirs and ready(eval_rows(dirs[0])):
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# ---- resume: the environments are rebuilt exactly, then whole runs continue identically ----


@pytest.mark.parametrize("env_id,backend", [("cartpole-balance", "envpool"), ("cartpole-balance", "dm_control"),
                                            ("Pendulum-v1", "auto")])
def test_env_replay_rebuilds_the_exact_env_state_across_episode_ends(env_id, backend):
    n, steps, cut = 3, 2300, 2100  # cartpole episodes are 1000 steps, Pendulum's 200: several resets
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, n, 1)).astype(np.float32)
    envs = common.VectorEnv(common.resolve_env(env_id, backend), n, 5)
    obs, _ = envs.reset(seed=5)
    outcomes = []
    for j in range(steps):
        if j == cut:
            state, obs_at_cut = envs.state_dict(), obs.copy()
        obs, reward, terminated, truncated, _ = envs.step(actions[j])
        outcomes.append((obs.copy(), reward.copy(), truncated.copy()))
    assert state["resets"].min() >= 3
    fresh = common.VectorEnv(common.resolve_env(env_id, backend), n, 5)
    np.testing.assert_array_equal(fresh.load_state_dict(state), obs_at_cut)
    for j in range(cut, steps):
        obs, reward, terminated, truncated, _ = fresh.step(actions[j])
        for got, want in zip((obs, reward, truncated), outcomes[j]):
            np.testing.assert_array_equal(got, want)


PPO_RUN = ["--env-id", "cartpole-balance", "--action-repeat", "1", "--num-envs", "8", "--num-steps", "32",
           "--num-minibatches", "2", "--update-epochs", "2", "--total-timesteps", "6144", "--num-stages", "3",
           "--decoder-train-steps", "400", "--decoder-batch-size", "64", "--decoder-noise-draws", "2",
           "--euler-steps", "5", "--decoder-val-every", "20", "--decoder-data-steps", "2048", "--eval-episodes", "1",
           "--eval-interval", "1024", "--checkpoint-interval", "2048", "--seed", "3", "--norm-returns"]


def test_ppo_interrupted_in_phase_1_and_in_a_refit_then_resumed_writes_the_same_eval_rows(tmp_path):
    reference = start("gorl_ppo", PPO_RUN + ["--exp-name", "whole"], tmp_path)
    # 1) Ctrl-C in the middle of stage 0 (mid-episode: the envs must be replayed on resume).
    code, out = interrupt_when("gorl_ppo", PPO_RUN, tmp_path, "cut", lambda rows: len(rows) >= 2, signal.SIGINT)
    run_dir = the_run_dir(tmp_path, "cut")
    assert code == 130, out
    assert f"python gorl_ppo.py --resume {os.path.relpath(run_dir, tmp_path)}" in out
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert ckpt["stage"] == 0 and 0 < ckpt["global_step"] < 4096 and not ckpt["finished"]
    assert ckpt["envs"]["history"], "interrupted at an episode start: the replay path is not exercised"
    # 2) resumed, then SIGINT again while the first decoder refit runs (right after boundary_before).
    proc = start("gorl_ppo", ["--resume", run_dir], tmp_path)
    while proc.poll() is None and not any(r["tag"] == "boundary_before" for r in eval_rows(run_dir)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert "stage-end checkpoint (the refit restarts)" in out
    # 3) resumed to the end.
    result = run("gorl_ppo", ["--resume", run_dir], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    reference.communicate(timeout=600)
    assert reference.returncode == 0
    whole = eval_rows(the_run_dir(tmp_path, "whole"))
    assert [r["tag"] for r in whole].count("boundary_after") == 2
    assert eval_rows(run_dir) == whole
    # tensorboard: the events the interrupted processes logged past their checkpoints are purged
    assert scalars(run_dir, "eval/return_mean") == scalars(the_run_dir(tmp_path, "whole"), "eval/return_mean")
    assert scalars(run_dir, "losses/value_loss") == scalars(the_run_dir(tmp_path, "whole"), "losses/value_loss")
    again = run("gorl_ppo", ["--resume", run_dir], tmp_path)
    assert again.returncode == 2 and "already finished (6144 env steps)" in again.stderr


SAC_RUN = ["--env-id", "Pendulum-v1", "--total-timesteps", "1600", "--learning-starts", "300", "--num-stages", "3",
           "--hidden", "32", "--batch-size", "64", "--decoder-train-steps", "100", "--decoder-val-every", "20",
           "--decoder-data-steps", "400", "--eval-episodes", "2", "--eval-interval", "200",
           "--checkpoint-interval", "300", "--seed", "4"]


def test_sac_stopped_by_sigterm_then_resumed_writes_the_same_eval_rows_and_keeps_the_buffer(tmp_path):
    reference = start("gorl_sac", SAC_RUN + ["--exp-name", "whole"], tmp_path)
    code, out = interrupt_when("gorl_sac", SAC_RUN, tmp_path, "cut", lambda rows: len(rows) >= 4, signal.SIGTERM)
    run_dir = the_run_dir(tmp_path, "cut")
    assert code == 143, out
    assert f"python gorl_sac.py --resume {os.path.relpath(run_dir, tmp_path)}" in out
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    step = ckpt["global_step"]
    transitions = step // ckpt["args"]["action_repeat"]  # one per action; each action is action_repeat env steps
    assert ckpt["buffer"]["size"] == transitions and ckpt["buffer"]["data"]["obs"].shape[0] == transitions
    result = run("gorl_sac", ["--resume", run_dir], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"resuming {run_dir} at env step {step}" in result.stdout
    reference.communicate(timeout=600)
    assert reference.returncode == 0
    whole = eval_rows(the_run_dir(tmp_path, "whole"))
    assert [r["tag"] for r in whole].count("boundary_after") == 2
    assert eval_rows(run_dir) == whole


# ---- non-finite values stop the run; the last good checkpoint stays ----


def test_resume_leaves_the_checkpoints_eval_rows_on_disk_at_once(tmp_path):
    # --resume truncates eval.csv to the rows logged up to the checkpoint. Those rows must be on disk before
    # training goes on: a resumed run killed before its next evaluation once left an empty eval.csv.
    args = ["--env-id", "tests.toy_envs:Toy-v0", "--total-timesteps", "2000", "--learning-starts", "100",
            "--batch-size", "32", "--hidden", "32", "--num-stages", "1", "--eval-episodes", "1",
            "--eval-interval", "1000", "--checkpoint-interval", "100"]
    code, out = interrupt_when("gorl_sac", args, tmp_path, "cut", lambda rows: len(rows) >= 1, signal.SIGTERM)
    assert code == 143, out
    run_dir = the_run_dir(tmp_path, "cut")
    saved = eval_rows(run_dir)
    assert len(saved) == torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["run"]["eval_rows"]
    proc = subprocess.Popen(script("gorl_sac") + ["--resume", run_dir], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(ENV, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if line.startswith("resuming"):  # printed after eval.csv was truncated, long before the next evaluation
            proc.kill()
            break
    proc.wait(timeout=60)
    assert saved and eval_rows(run_dir) == saved


def test_a_checkpoint_from_before_num_critics_resumes_with_its_two_critics(tmp_path):
    run_dir = str(tmp_path / "old")
    result = run("gorl_sac", ["--env-id", "Pendulum-v1", "--total-timesteps", "1200", "--learning-starts", "1000",
                              "--num-stages", "1", "--num-critics", "2", "--eval-episodes", "2", "--run-dir", run_dir],
                 tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    path = os.path.join(run_dir, "checkpoint.pt")
    ckpt = torch.load(path, weights_only=False)
    del ckpt["args"]["num_critics"]  # as written before the flag existed
    ckpt["finished"], ckpt["args"]["total_timesteps"] = False, 1300
    torch.save(ckpt, path)
    result = run("gorl_sac", ["--resume", run_dir], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming {run_dir} at env step 1200" in result.stdout


def test_first_nonfinite_names_the_first_bad_quantity():
    params = [torch.ones(3), torch.ones(2, 2)]
    assert common.first_nonfinite({"loss": torch.tensor(1.0), "alpha": 0.5, "params": params}) is None
    assert common.first_nonfinite({"loss": torch.tensor(1.0), "alpha": float("nan"), "params": params}) == "alpha"
    params[1][0, 1] = float("inf")
    assert common.first_nonfinite({"loss": torch.tensor(1.0), "alpha": 0.5, "params": params}) == "params"


@pytest.mark.parametrize("name,args", [
    ("gorl_ppo", ["--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2", "--update-epochs", "2",
                  "--action-repeat", "1", "--total-timesteps", "4096", "--checkpoint-interval", "64",
                  "--decoder-train-steps", "50"]),
    ("gorl_sac", ["--total-timesteps", "2000", "--learning-starts", "100", "--batch-size", "32", "--hidden", "32",
                  "--checkpoint-interval", "50", "--decoder-train-steps", "50", "--decoder-data-steps", "100"]),
])
def test_a_nan_reward_stops_with_one_line_and_the_last_checkpoint_is_good(tmp_path, name, args):
    # ToyNaN-v0 returns NaN rewards from its 150th step on.
    result = run(name, ["--env-id", "tests.toy_envs:ToyNaN-v0", "--eval-episodes", "2", *args], tmp_path)
    assert result.returncode == 1
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    match = re.match(r"error: non-finite (.+) at stage 0, env step (\d+); stopped \(the last good checkpoint",
                     errors[0])
    assert match and ("loss" in match.group(1)), errors[0]
    ckpt = torch.load(glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))[0], weights_only=False)
    assert 0 < ckpt["global_step"] < int(match.group(2))
    weights = [v for key in ("policy", "critic", "actor", "qf") if key in ckpt for v in ckpt[key].values()]
    assert weights and all(torch.isfinite(w).all() for w in weights)


# ---- a checkpoint that cannot be written (a full disk) stops the run with one line; the last good one stays ----


def _disk_full(obj, f, *args, **kwargs):
    """torch.save on a full disk: a few bytes get written, then the OS error."""
    (f if hasattr(f, "write") else open(f, "wb")).write(b"partial")
    raise OSError(28, "No space left on device")


def test_write_checkpoint_fails_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    common.write_checkpoint(path, {"global_step": 1})
    good = (tmp_path / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(torch, "save", _disk_full)
    with pytest.raises(common.CheckpointWriteError) as failure:
        common.write_checkpoint(path, {"global_step": 2})
    assert str(failure.value) == f"could not write checkpoint {path}: No space left on device"
    assert os.listdir(tmp_path) == ["checkpoint.pt"] and (tmp_path / "checkpoint.pt").read_bytes() == good


# `python -c SECOND_SAVE_FAILS script.py ARGS` runs the script with its second torch.save failing as on a full disk.
SECOND_SAVE_FAILS = """
import runpy, sys, torch
save, calls = torch.save, []

def first_save_only(obj, f, *args, **kwargs):
    calls.append(f)
    if len(calls) == 1:
        return save(obj, f, *args, **kwargs)
    (f if hasattr(f, "write") else open(f, "wb")).write(b"partial")
    raise OSError(28, "No space left on device")

torch.save = first_save_only
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_failed_checkpoint_write_stops_the_run_with_one_line(tmp_path):
    args = ["--env-id", "tests.toy_envs:Toy-v0", "--total-timesteps", "600", "--learning-starts", "200",
            "--batch-size", "32", "--hidden", "32", "--decoder-train-steps", "50", "--decoder-data-steps", "200",
            "--eval-episodes", "2", "--checkpoint-interval", "100", "--run-dir", "runs/full"]
    result = subprocess.run([sys.executable, "-c", SECOND_SAVE_FAILS, *script("gorl_sac")[1:], *args], cwd=tmp_path,
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    path = os.path.join("runs", "full", "checkpoint.pt")
    assert errors == [f"error: could not write checkpoint {path}: No space left on device"], result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert sorted(os.listdir(tmp_path / "runs" / "full")) == ["checkpoint.pt", "eval.csv"] + sorted(
        os.path.basename(p) for p in glob.glob(str(tmp_path / "runs" / "full" / "events.out.tfevents.*")))
    ckpt = torch.load(tmp_path / path, weights_only=False)
    assert ckpt["global_step"] == 100 and not ckpt["finished"]


# ---- --eval-only restores everything, and writes a video without GL on a numpy-rendered env ----


@pytest.mark.parametrize("name,args", [
    ("gorl_ppo", ["--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2", "--total-timesteps", "1024",
                  "--decoder-train-steps", "100", "--action-repeat", "1"]),
    ("gorl_sac", ["--total-timesteps", "600", "--learning-starts", "200", "--batch-size", "32", "--hidden", "32",
                  "--decoder-train-steps", "100", "--decoder-data-steps", "200"]),
])
def test_eval_only_reproduces_the_final_return_and_writes_a_video(tmp_path, name, args):
    result = run(name, ["--env-id", "tests.toy_envs:Toy-v0", "--eval-episodes", "3", "--capture-video",
                        "--video-interval", "256", *args], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    videos = sorted(os.path.basename(v) for v in glob.glob(os.path.join(run_dir, "videos", "*.mp4")))
    assert {"stage0_end", "stage1_start", "stage1_end", "train"} == {v.rsplit("_step", 1)[0] for v in videos}
    assert sum(v.startswith("train_step") for v in videos) >= 2
    final = eval_rows(run_dir)[-1]
    assert final["tag"] == "final" and final["stage"] == "1"  # the decoder was refit once: not the identity
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    evaluated = run(name, ["--eval-only", "--checkpoint", ckpt, "--eval-episodes", "3", "--capture-video"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    mean = float(re.search(r"deterministic return (-?[\d.]+) \+-", evaluated.stdout).group(1))
    assert abs(mean - float(final["return_mean"])) < 1e-3
    (video,) = glob.glob(os.path.join(run_dir, "videos", "eval_step*_deterministic_seed10000.mp4"))
    assert os.path.getsize(video) > 1000
    stochastic = run(name, ["--eval-only", "--checkpoint", ckpt, "--eval-episodes", "3", "--eval-stochastic"],
                     tmp_path)
    assert stochastic.returncode == 0 and "stochastic return" in stochastic.stdout
    assert float(re.search(r"stochastic return (-?[\d.]+) \+-", stochastic.stdout).group(1)) != mean


# ---- bad input: one line on stderr, exit 2, nothing created or overwritten ----


def _write(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(payload, bytes):
        with open(path, "wb") as f:
            f.write(payload)
    else:
        torch.save(payload, path)


BAD_INPUT = [
    # (script, args, files to create first {relative path: payload}, expected message)
    ("gorl_sac", ["--env-id", "walker-wlak"], {}, "did you mean walker-walk"),
    ("gorl_sac", ["--env-id", "CartPole-v1"], {}, "Discrete action space"),
    ("gorl_sac", ["--batch-size", "0"], {}, "--batch-size must be positive, got 0"),
    ("gorl_sac", ["--total-timesteps", "4000", "--learning-starts", "5000"], {}, "leaves no updates"),
    ("gorl_sac", ["--total-timesteps", "6000", "--num-stages", "3", "--stage-fractions", "1", "1"], {},
     "must be 3 positive numbers"),
    ("gorl_sac", ["--total-timesteps", "5100", "--num-stages", "3"], {}, "stage 0 must outlast --learning-starts"),
    ("gorl_sac", ["--learning-starts", "100"], {}, "less than one --batch-size 128"),
    ("gorl_ppo", ["--checkpoint-interval", "0"], {}, "--checkpoint-interval must be positive"),
    ("gorl_ppo", ["--num-stages", "2", "--stage-fractions", "1", "-1"], {}, "must be 2 positive numbers"),
    ("gorl_ppo", ["--eval-stochastic"], {}, "--eval-stochastic only applies with --eval-only"),
    ("gorl_ppo", ["--resume", "runs/nope"], {}, "--resume 'runs/nope': no such run directory"),
    ("gorl_sac", ["--resume", "runs/empty"], {"runs/empty/eval.csv": b"x"}, "holds no checkpoint.pt"),
    ("gorl_ppo", ["--resume", "runs/bad"], {"runs/bad/checkpoint.pt": b"not a checkpoint"}, "is not readable"),
    ("gorl_sac", ["--eval-only", "--checkpoint", "runs/other/checkpoint.pt"],
     {"runs/other/checkpoint.pt": {"script": "gorl_ppo"}}, "written by gorl_ppo.py, not gorl_sac.py"),
    ("gorl_ppo", ["--resume", "runs/other"], {"runs/other/checkpoint.pt": {"script": "gorl_sac"}},
     "written by gorl_sac.py, not gorl_ppo.py"),
    ("gorl_ppo", ["--eval-only", "--checkpoint", "runs/dict/checkpoint.pt"], {"runs/dict/checkpoint.pt": {"a": 1}},
     "is not a GoRL checkpoint"),
    ("gorl_ppo", ["--resume", "runs/x", "--eval-only"], {"runs/x/checkpoint.pt": {"script": "gorl_ppo"}},
     "--resume continues training"),
    ("gorl_sac", ["--run-dir", "runs/taken"], {"runs/taken/eval.csv": b"x"}, "already exists; continue it with"),
]


@pytest.mark.parametrize("name,args,files,message", BAD_INPUT)
def test_bad_input_gives_one_line_and_touches_nothing(tmp_path, name, args, files, message):
    for rel, payload in files.items():
        _write(str(tmp_path / rel), payload)
    before = {p: os.path.getmtime(p) for p in glob.glob(str(tmp_path / "**"), recursive=True)}
    result = run(name, args, tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip() and "warn" not in l.lower()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    after = {p: os.path.getmtime(p) for p in glob.glob(str(tmp_path / "**"), recursive=True)}
    assert after == before  # no run directory created, nothing overwritten
