"""benchmarks/run.py (grid, resumability, submitit's local executor) and benchmarks/plot.py."""

import csv
import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, GORL_NO_PROGRESS="1", PYTHONPATH=ROOT)
RUNNER = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py")]


def test_dry_run_prints_the_whole_protocol_grid(tmp_path):
    result = subprocess.run(RUNNER + ["--dry-run", "--out", str(tmp_path / "grid")], env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    runs = [l for l in lines if l.startswith("start ")]
    # 2 scripts x 2 variants x (5 tasks x 3 seeds + hopper-stand x 5 seeds)
    assert len(runs) == 80 and lines[-1] == "80 runs: 0 done, 0 to resume, 0 to branch, 80 to start"
    for task in ("cheetah-run", "finger-spin", "finger-turn_hard", "fish-swim", "hopper-stand", "walker-walk"):
        assert sum(f"__{task}__" in l for l in runs) == (20 if task == "hopper-stand" else 12)
    twins = [l for l in runs if "__twin__" in l]
    assert len(twins) == 40 and all("--num-stages 1" in l for l in twins)
    assert not any("--num-stages" in l for l in runs if "__gorl__" in l)
    assert all("--total-timesteps 500000" in l for l in runs if l.split()[1].startswith("sac__"))
    # envpool's finger tasks differ from dm_control's (README, Benchmarks): those run on the Python suite
    assert all(("--env-backend dm_control" in l) == ("__finger-" in l) for l in runs)
    assert not (tmp_path / "grid").exists()
    # A chosen --seeds applies to hopper-stand too (it once ran seeds 1-5 whatever --seeds said).
    for flags, expected in ((["--seeds", "3"], ["s3"]), (["--seeds", "3", "--hopper-seeds", "4", "5"], ["s4", "s5"])):
        result = subprocess.run(RUNNER + ["--dry-run", "--out", str(tmp_path / "grid"), "--scripts", "ppo", "--envs",
                                          "hopper-stand", "--variants", "twin"] + flags,
                                env=ENV, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert [l.split()[1].split("__")[-1].rstrip(":") for l in result.stdout.splitlines() if l.startswith("start ")] \
            == expected


TINY = ["--scripts", "sac", "--envs", "tests.toy_envs:Toy-v0", "--seeds", "1", "2", "--sac-steps", "800",
        "--sac-args=--learning-starts 200 --batch-size 32 --hidden 32 --decoder-train-steps 50 "
        "--decoder-data-steps 200 --eval-episodes 2 --eval-interval 200 --checkpoint-interval 200"]


def test_grid_runs_through_submitit_skips_finished_runs_and_resumes_interrupted_ones(tmp_path):
    out = tmp_path / "grid"
    # An interrupted run in the grid's place: started by hand, stopped by Ctrl-C after two evaluations.
    dry = subprocess.run(RUNNER + TINY + ["--out", str(out), "--dry-run"], env=ENV, capture_output=True, text=True)
    first = next(l for l in dry.stdout.splitlines() if "__gorl__s1" in l).split(": ", 1)[1].split()
    first[1] = os.path.join(ROOT, "gorl_sac.py")  # the grid's code copy does not exist before it runs
    proc = subprocess.Popen(first, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = out / "runs" / "sac__tests.toy_envs:Toy-v0__gorl__s1"
    while proc.poll() is None:
        if (run_dir / "eval.csv").exists() and len((run_dir / "eval.csv").read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    assert proc.wait(timeout=120) == 130
    dry = subprocess.run(RUNNER + TINY + ["--out", str(out), "--dry-run"], env=ENV, capture_output=True, text=True)
    assert dry.stdout.splitlines()[-1] == "4 runs: 0 done, 1 to resume, 0 to branch, 3 to start"

    result = subprocess.run(RUNNER + TINY + ["--out", str(out), "--executor", "submitit-local"], env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": finished") == 4, result.stdout
    assert "resuming" in (out / "logs" / "sac__tests.toy_envs:Toy-v0__gorl__s1.log").read_text()
    csvs = sorted(os.path.basename(p) for p in glob.glob(str(out / "csv" / "*.csv")))
    assert len(csvs) == 4 and all(name.startswith("sac__tests.toy_envs:Toy-v0__") for name in csvs)
    with open(out / "csv" / "sac__tests.toy_envs:Toy-v0__twin__s2.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["tag"] == "final" and rows[-1]["global_step"] == "800" and {r["stage"] for r in rows} == {"0"}

    again = subprocess.run(RUNNER + TINY + ["--out", str(out), "--workers", "2"], env=ENV, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count(": done") == 4, again.stdout + again.stderr


def test_fresh_clone_counts_committed_csvs_as_done_and_rebuilds_the_frozen_code_from_commit(tmp_path):
    # A fresh clone holds OUT/csv/*.csv and OUT/code/COMMIT but neither run directories nor code copies.
    out = tmp_path / "grid"
    (out / "csv").mkdir(parents=True)
    for variant in ("gorl", "twin"):
        for seed in (1, 2):
            _write_run(out / "csv" / f"sac__tests.toy_envs:Toy-v0__{variant}__s{seed}.csv", final=5.0)
    (out / "code").mkdir()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    first = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split()[0]
    # HEAD for every script, then HEAD again for gorl_sac.py with a note; a line that is no commit is ignored
    (out / "code" / "COMMIT").write_text(f"{head}\n{head} (gorl_sac.py, a note)\nnot a commit line\n")
    dry = subprocess.run(RUNNER + TINY + ["--out", str(out), "--dry-run"], env=ENV, capture_output=True, text=True)
    assert dry.stdout.splitlines()[-1] == "4 runs: 4 done, 0 to resume, 0 to branch, 0 to start", dry.stdout + dry.stderr
    result = subprocess.run(RUNNER + TINY + ["--out", str(out)], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.count(": done") == 4, result.stdout + result.stderr
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())
    for name in ("gorl_ppo.py", "gorl_sac.py", "common.py"):
        shown = subprocess.run(["git", "show", f"{head}:{name}"], cwd=ROOT, capture_output=True, text=True).stdout
        assert (out / "code" / name).read_text() == shown, name

    # the per-script override: gorl_sac.py from an older commit than the rest
    for name in ("gorl_ppo.py", "gorl_sac.py", "common.py"):
        (out / "code" / name).unlink()
    def show(rev, name):
        return subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, capture_output=True, text=True).stdout

    # an older commit whose gorl_sac.py differs from HEAD's, so that ignoring the override would show
    touching = subprocess.run(["git", "log", "--format=%H", head, "--", "gorl_sac.py"], cwd=ROOT,
                              capture_output=True, text=True).stdout.split()
    sac_sha = next((sha for sha in touching if show(sha, "gorl_sac.py") not in ("", show(head, "gorl_sac.py"))), None)
    assert sac_sha, "needs the repository's history (a full clone, as .ci/run gets)"
    (out / "code" / "COMMIT").write_text(f"{head}\n{sac_sha} (gorl_sac.py)\n")
    assert subprocess.run(RUNNER + TINY + ["--out", str(out)], env=ENV, capture_output=True).returncode == 0
    assert (out / "code" / "gorl_sac.py").read_text() == show(sac_sha, "gorl_sac.py")
    assert (out / "code" / "gorl_sac.py").read_text() != show(head, "gorl_sac.py")
    assert (out / "code" / "gorl_ppo.py").read_text() == show(head, "gorl_ppo.py")  # other scripts keep HEAD

    # a copy made from uncommitted changes cannot be rebuilt: one line, naming the commit
    for name in ("gorl_ppo.py", "gorl_sac.py", "common.py"):
        (out / "code" / name).unlink(missing_ok=True)
    (out / "code" / "COMMIT").write_text(f"{first} (with uncommitted changes)\n")
    bad = subprocess.run(RUNNER + TINY + ["--out", str(out)], env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "uncommitted changes" in bad.stderr and first in bad.stderr
    assert "Traceback" not in bad.stderr


def test_twin_continues_from_gorl_stage0_and_computes_what_a_twin_from_scratch_computes(tmp_path):
    one_seed = TINY[:6] + TINY[7:]  # seed 1 only
    assert one_seed[4:7] == ["--seeds", "1", "--sac-steps"]
    out, scratch = tmp_path / "grid", tmp_path / "scratch"
    # Two workers: the twin must wait for GoRL's stage 0 rather than start at once.
    result = subprocess.run(RUNNER + one_seed + ["--out", str(out), "--workers", "2"], env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.count(": finished") == 2, result.stdout + result.stderr
    log = (out / "logs" / "sac__tests.toy_envs:Toy-v0__twin__s1.log").read_text()
    assert log.startswith("# branched from ") and "stage0_end.pt at env step 533" in log and "resuming" in log, log

    # The same twin from its first step, in a grid of its own (no GoRL sibling to branch from).
    dry = subprocess.run(RUNNER + one_seed + ["--out", str(scratch), "--variants", "twin", "--dry-run"], env=ENV,
                         capture_output=True, text=True)
    cmd = dry.stdout.splitlines()[0].split(": ", 1)[1].split()
    assert dry.stdout.startswith("start ") and "--num-stages 1" in " ".join(cmd)
    cmd[1] = str(out / "code" / "gorl_sac.py")
    assert subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, timeout=300).returncode == 0

    def rows(path):
        with open(path) as f:
            return [(r["global_step"], r["stage"], r["return_mean"], r["return_std"], r["tag"]) for r in csv.DictReader(f)]

    branched, fresh = rows(out / "csv" / "sac__tests.toy_envs:Toy-v0__twin__s1.csv"), rows(
        scratch / "runs" / "sac__tests.toy_envs:Toy-v0__twin__s1" / "eval.csv")
    assert branched == fresh and fresh[-1][0] == "800" and {r[1] for r in fresh} == {"0"}
    gorl = rows(out / "csv" / "sac__tests.toy_envs:Toy-v0__gorl__s1.csv")
    assert any(r[4] == "boundary_after" for r in gorl) and gorl[-1] != fresh[-1]  # GoRL did go on differently

    # tensorboard: the twin holds the shared history but none of GoRL's boundary scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(run):
        acc = EventAccumulator(str(out / "runs" / f"sac__tests.toy_envs:Toy-v0__{run}__s1"), size_guidance={"scalars": 0})
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    twin_tb, gorl_tb = scalars("twin"), scalars("gorl")
    assert "eval/boundary_after" in gorl_tb and not any(tag.startswith("eval/boundary") for tag in twin_tb)
    assert "losses/decoder_train" in gorl_tb and "losses/decoder_train" not in twin_tb
    shared = [point for point in gorl_tb["eval/return_mean"] if point[0] <= 533]
    assert shared and twin_tb["eval/return_mean"][: len(shared)] == shared
    assert twin_tb["eval/return_mean"][-1][0] == 800


def _write_run(path, final, boundary=None):
    rows = [(s, 0, final * s / 3000, 5.0, s / 100, "periodic") for s in range(0, 3001, 500)]
    if boundary:
        rows.insert(5, (2000, 0, boundary[0], 5.0, 20.5, "boundary_before"))
        rows.insert(6, (2000, 1, boundary[1], 5.0, 22.0, "boundary_after"))
    rows.append((3000, 1 if boundary else 0, final, 5.0, 31.0, "final"))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["global_step", "stage", "return_mean", "return_std", "wall_time_s", "tag"])
        writer.writerows(rows)


def test_report_rebuilds_figures_and_the_readme_table_from_csvs_in_under_a_minute(tmp_path):
    os.makedirs(tmp_path / "csv")
    for env in ("cheetah-run", "walker-walk"):
        for seed in (1, 2, 3):
            _write_run(tmp_path / "csv" / f"ppo__{env}__gorl__s{seed}.csv", 500 + 10 * seed, (400, 390 + seed))
            _write_run(tmp_path / "csv" / f"ppo__{env}__twin__s{seed}.csv", 450 + 10 * seed)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- benchmark-results -->\nold\n<!-- /benchmark-results -->\noutro\n")
    start = time.time()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "plot.py"), "--out", str(tmp_path),
                             "--readme", str(readme)], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert time.time() - start < 60
    for figure in ("curves_ppo.png", "aggregate.png"):
        assert os.path.getsize(tmp_path / figure) > 10_000
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert "| PPO | cheetah-run | GoRL | 3 | 520.0 ± 8.2 | 510.0, 520.0, 530.0 | 400→391; 400→392; 400→393 | 3000 |" in text
    assert "| PPO | walker-walk | Gaussian twin (K=1) | 3 | 470.0 ± 8.2 |" in text
    assert "PPO GoRL: 0.520 [" in text and "over 2 tasks, 6 runs" in text
    # 2 tasks x 2 variants x 3 seeds of PPO finished; the status names what the protocol still lacks.
    status = next(l for l in text.splitlines() if l.startswith("Protocol: "))
    assert status.startswith("Protocol: 4 of 24 cells have a finished run; 12 of 80 runs finished.")
    assert "PPO finger-spin GoRL" in status and "SAC walker-walk Gaussian twin (K=1)" in status
    assert "PPO cheetah-run GoRL" not in status


def test_aggregate_scores_both_variants_on_the_seeds_they_share_when_cells_have_different_seed_counts(tmp_path):
    os.makedirs(tmp_path / "csv")
    finals = {("cheetah-run", "gorl"): {1: 500, 2: 600, 3: 700}, ("cheetah-run", "twin"): {1: 100, 2: 200, 3: 300},
              ("walker-walk", "gorl"): {1: 900, 2: 950}, ("walker-walk", "twin"): {1: 400}}
    for (env, variant), per_seed in finals.items():
        for seed, final in per_seed.items():
            _write_run(tmp_path / "csv" / f"ppo__{env}__{variant}__s{seed}.csv", final)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "plot.py"), "--out", str(tmp_path),
                             "--readme", ""], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "results.md").read_text()
    # walker-walk gorl seed 2 has no twin partner and is left out: 3 + 1 runs per variant. IQM of
    # [0.5, 0.6, 0.7, 0.9] is the mean of the middle two (0.65); of [0.1, 0.2, 0.3, 0.4], 0.25.
    gorl = text.split("PPO GoRL: ")[1].split(" over ")[0]
    twin = text.split("PPO Gaussian twin (K=1): ")[1].split(" over ")[0]
    assert gorl.startswith("0.650 [") and twin.startswith("0.250 [")
    lo, hi = (float(x) for x in gorl.split("[")[1].rstrip("]").split(", "))
    assert 0.5 <= lo < 0.65 < hi <= 0.9
    assert text.count("over 2 tasks, 4 runs") == 2
    assert ("GoRL ahead in 4 of 4 pairs. PPO cheetah-run s1 +400.0; PPO cheetah-run s2 +400.0; "
            "PPO cheetah-run s3 +400.0; PPO walker-walk s1 +500.0.") in text
    # The status names the cells short of the protocol's 3 seeds, with their counts, and no full cell.
    status = next(l for l in text.splitlines() if l.startswith("Protocol: "))
    assert status.endswith(" Fewer than 3 seeds: PPO walker-walk GoRL (2), PPO walker-walk Gaussian twin (K=1) (1).")


def test_two_peaks_reward_and_multimodality_sample_and_plot(tmp_path):
    sys.path.insert(0, ROOT)
    from benchmarks import toy_two_peaks

    assert abs(toy_two_peaks.reward([0.6, 0.6]) - 1.0) < 1e-3 and abs(toy_two_peaks.reward([-0.6, -0.6]) - 1.0) < 1e-3
    assert toy_two_peaks.reward([0.0, 0.0]) < 0.02 and toy_two_peaks.reward([0.6, -0.6]) < 0.02
    # A tiny GoRL-PPO run on the toy (two stages, so the composite goes through a fitted decoder).
    run = subprocess.run([sys.executable, os.path.join(ROOT, "gorl_ppo.py"), "--env-id",
                          "benchmarks.toy_two_peaks:TwoPeaks-v0", "--num-envs", "8", "--num-steps", "16",
                          "--total-timesteps", "1024", "--decoder-train-steps", "50", "--eval-episodes", "2",
                          "--run-dir", str(tmp_path / "run")], env=ENV, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    tool = [sys.executable, os.path.join(ROOT, "benchmarks", "multimodality.py")]
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    out = tmp_path / "mm" / "toy.csv"
    sample = subprocess.run(tool + ["sample", "--checkpoints", ckpt, ckpt, "--labels", "A", "B", "--steps", "0",
                                    "--samples", "300", "--out", str(out)], env=ENV, capture_output=True, text=True)
    assert sample.returncode == 0, sample.stderr[-2000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 600 and {r["policy"] for r in rows} == {"A", "B"}
    actions = [(float(r["a0"]), float(r["a1"])) for r in rows]
    assert all(-1 <= a <= 1 and -1 <= b <= 1 for a, b in actions) and len(set(actions)) > 100  # sampled, not the mean
    # Same checkpoint and sampling seed: both columns hold the same samples.
    assert [r["a0"] for r in rows[:300]] == [r["a0"] for r in rows[300:]]
    plot = subprocess.run(tool + ["plot", str(out), "--dims", "0", "1"], env=ENV, capture_output=True, text=True)
    assert plot.returncode == 0 and (tmp_path / "mm" / "toy_dims01.png").stat().st_size > 10_000, plot.stderr
    bad = subprocess.run(tool + ["plot", str(out), "--dims", "0", "5"], env=ENV, capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error: --dims 0 5")


def test_two_peaks_repeat_pays_for_covering_both_peaks():
    sys.path.insert(0, ROOT)
    from benchmarks import toy_two_peaks as toy

    env = toy.TwoPeaksRepeat()
    obs, _ = env.reset(seed=0)
    rewards, ends = [], []
    for _ in range(toy.HORIZON):  # the same peak every step: each hit is worth half the one before
        obs, r, terminated, truncated, _ = env.step(toy.PEAKS[0])
        rewards.append(r)
        ends.append((terminated, truncated))
    assert np.allclose(rewards, 0.5 ** np.arange(toy.HORIZON), atol=1e-4)
    assert ends[-1] == (True, False) and not any(t for t, _ in ends[:-1])
    assert np.allclose(obs, [1.0, 0.0])  # neither the time nor the hits are observed: no clock to alternate by
    env.reset()
    env.step(toy.PEAKS[0])
    assert abs(env.step(toy.PEAKS[1])[1] - 1.0) < 1e-4  # the other peak is still fresh
    one_peak, both = toy.expected_return(1.0, episodes=50), toy.expected_return(0.5, episodes=2000)
    assert abs(one_peak - 2 * (1 - 0.5**toy.HORIZON)) < 1e-3 and 3.4 < both < 3.8


def _plot_module(monkeypatch):
    """benchmarks/plot.py imported in-process (it imports run.py from its own folder)."""
    import importlib.util

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("grid_plot", os.path.join(ROOT, "benchmarks", "plot.py"))
    plot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    return plot


def test_curve_panels_keep_the_dm_control_range_unless_a_mean_leaves_it(tmp_path, monkeypatch):
    plot = _plot_module(monkeypatch)
    os.makedirs(tmp_path / "csv")
    # cheetah-run: two seeds far apart, so the 2-seed t-band (t = 12.7) reaches far past 0..1000;
    # walker-walk: a mean curve ends at 1200, so its row must widen to show it.
    for seed, final in ((1, 100), (2, 900)):
        _write_run(tmp_path / "csv" / f"ppo__cheetah-run__gorl__s{seed}.csv", final)
    _write_run(tmp_path / "csv" / "ppo__walker-walk__gorl__s1.csv", 1200)
    figures = []
    monkeypatch.setattr(plot.plt, "close", figures.append)
    plot.plot_curves(plot.load(str(tmp_path)), "ppo", str(tmp_path / "curves_ppo.png"))
    (fig,) = figures
    cheetah, walker = fig.axes[0:2], fig.axes[2:4]
    for ax in cheetah:
        assert ax.get_ylim() == (-50.0, 1050.0)
    for ax in walker:
        assert ax.get_ylim() == (-60.0, 1260.0)


def test_status_names_hopper_cells_short_of_their_five_seeds(tmp_path, monkeypatch):
    plot = _plot_module(monkeypatch)
    os.makedirs(tmp_path / "csv")
    # hopper-stand wants 5 seeds: SAC GoRL has 4 (short), SAC twin 5 (complete), PPO GoRL 2 (below 3).
    for seed in range(1, 6):
        _write_run(tmp_path / "csv" / f"sac__hopper-stand__twin__s{seed}.csv", 2)
        if seed < 5:
            _write_run(tmp_path / "csv" / f"sac__hopper-stand__gorl__s{seed}.csv", 2)
        if seed < 3:
            _write_run(tmp_path / "csv" / f"ppo__hopper-stand__gorl__s{seed}.csv", 2)
    status = plot.protocol_status(plot.load(str(tmp_path)))
    assert status.startswith("Protocol: 3 of 24 cells have a finished run; 11 of 80 runs finished.")
    assert status.endswith(" Fewer than 3 seeds: PPO hopper-stand GoRL (2)."
                           " hopper-stand short of its 5 seeds: SAC hopper-stand GoRL (4).")
