"""benchmarks/run.py (grid, resumability, frozen code copy, executors), benchmarks/plot.py and the
multimodality figures. The runner's logic runs against a stub of the scripts' command-line interface;
one test runs the real scripts through it at tiny settings."""

import ast
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, GORL_NO_PROGRESS="1", PYTHONPATH=ROOT)
RUNNER = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py")]


def test_benchmarks_import_nothing_from_the_scripts():
    # The benchmarks run the scripts as processes and read their files; they never load them as modules.
    files = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))
    assert {os.path.basename(f) for f in files} >= {"run.py", "plot.py"}
    for path in files:
        with open(path) as f:
            source = f.read()
        for node in ast.walk(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("gorl_ppo", "gorl_sac", "common") for n in names), (path, names)
        assert "import_module" not in source and "__import__" not in source, path


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
    assert len(twins) == 40 and all(l.endswith("--exp-name twin --num-stages 1") for l in twins)
    assert not any("--num-stages" in l for l in runs if "__gorl__" in l)
    assert all("--total-timesteps 500000" in l for l in runs if l.split()[1].startswith("sac__"))
    assert all("--total-timesteps 10000000" in l for l in runs if l.split()[1].startswith("ppo__"))
    code = os.path.join(str(tmp_path / "grid"), "code")
    assert all(f" {code}/gorl_{l.split()[1][:3]}.py --env-id " in l for l in runs)
    assert not (tmp_path / "grid").exists()
    # A chosen --seeds applies to hopper-stand too (it once ran seeds 1-5 whatever --seeds said).
    for flags, expected in ((["--seeds", "3"], ["s3"]), (["--seeds", "3", "--hopper-seeds", "4", "5"], ["s4", "s5"])):
        result = subprocess.run(RUNNER + ["--dry-run", "--out", str(tmp_path / "grid"), "--scripts", "ppo", "--envs",
                                          "hopper-stand", "--variants", "twin"] + flags,
                                env=ENV, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert [l.split()[1].split("__")[-1].rstrip(":") for l in result.stdout.splitlines() if l.startswith("start ")] \
            == expected


# A stand-in for gorl_ppo.py / gorl_sac.py with the interface the runner relies on: --run-dir must not
# exist, eval.csv gets a row per 100 env steps and a 'final' row, checkpoint.pt (here JSON) after each,
# --resume RUN_DIR continues from it. It logs its argv to $STUB_CALLS and exits with CODE right after the
# checkpoint at step S of run NAME when $STUB_CRASH is NAME:S:CODE. return_std is its MARK, to tell copies apart.
STUB = '''import argparse, json, os, sys
MARK = 1.0
parser = argparse.ArgumentParser()
for flag in ("--env-id", "--run-dir", "--resume", "--exp-name"):
    parser.add_argument(flag)
for flag in ("--seed", "--total-timesteps", "--num-stages"):
    parser.add_argument(flag, type=int)
args, extra = parser.parse_known_args()
with open(os.environ["STUB_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if args.resume:
    run_dir = args.resume
    with open(os.path.join(run_dir, "checkpoint.pt")) as f:
        saved = json.load(f)
    print("resuming at step", saved["step"])
else:
    run_dir = args.run_dir
    os.makedirs(run_dir)
    saved = {"step": 0, "total": args.total_timesteps, "stages": args.num_stages or 2}
    with open(os.path.join(run_dir, "eval.csv"), "w") as f:
        f.write("global_step,stage,return_mean,return_std,wall_time_s,tag\\n")
while saved["step"] < saved["total"]:
    saved["step"] += 100
    stage = int(saved["stages"] > 1 and 2 * saved["step"] > saved["total"])
    with open(os.path.join(run_dir, "eval.csv"), "a") as f:
        f.write(f"{saved['step']},{stage},{saved['step'] / 10},{MARK},1.0,periodic\\n")
        if saved["step"] >= saved["total"]:
            f.write(f"{saved['step']},{stage},{saved['step'] / 10},{MARK},1.0,final\\n")
    with open(os.path.join(run_dir, "checkpoint.pt"), "w") as f:
        json.dump(saved, f)
    crash = os.environ.get("STUB_CRASH", "::").split(":")
    if not args.resume and crash[:2] == [os.path.basename(run_dir), str(saved["step"])]:
        sys.exit(int(crash[2]))
'''
STUB_GRID = ["--scripts", "ppo", "sac", "--envs", "toy", "--seeds", "1", "--ppo-steps", "400", "--sac-steps", "300",
             "--ppo-args=--num-envs 4"]


def _git(folder, *argv):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(folder), *argv],
                          capture_output=True, text=True, check=True).stdout.strip()


def _stub_repo(folder):
    """A git repository of its own holding the stub as both scripts, so the test needs no outer history."""
    folder.mkdir()
    for name in ("gorl_ppo.py", "gorl_sac.py"):
        (folder / name).write_text(STUB)
    _git(folder, "init", "-q")
    _git(folder, "add", ".")
    _git(folder, "commit", "-q", "-m", "stub")
    return _git(folder, "rev-parse", "HEAD")


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_grid_skips_finished_runs_resumes_interrupted_ones_and_keeps_its_code_copy(tmp_path):
    code, out, calls = tmp_path / "code", tmp_path / "grid", tmp_path / "calls.jsonl"
    sha = _stub_repo(code)
    env = dict(ENV, STUB_CALLS=str(calls))
    grid = RUNNER + STUB_GRID + ["--code", str(code), "--out", str(out)]

    def called():
        return [json.loads(l) for l in calls.read_text().splitlines()] if calls.exists() else []

    # A run directory without a checkpoint (died while starting): deleted, and the run starts afresh.
    (out / "runs" / "sac__toy__twin__s1").mkdir(parents=True)
    (out / "runs" / "sac__toy__twin__s1" / "junk").write_text("")
    # First pass: PPO GoRL stops after its checkpoint at step 200 (exit 0, yet no final row: not finished);
    # the other three finish.
    first = subprocess.run(grid, env=dict(env, STUB_CRASH="ppo__toy__gorl__s1:200:0"), capture_output=True,
                           text=True, timeout=120)
    assert first.returncode != 0 and "1 of 4 runs failed: ppo__toy__gorl__s1" in first.stderr, first.stdout + first.stderr
    assert first.stdout.count(": finished") == 3, first.stdout
    assert "ppo__toy__gorl__s1: failed (exit 0 without a final evaluation, see logs/ppo__toy__gorl__s1.log)" in first.stdout
    assert not (out / "runs" / "sac__toy__twin__s1" / "junk").exists()
    starts = {c[c.index("--run-dir") + 1].rsplit("/", 1)[1]: c for c in called()}
    assert sorted(starts) == ["ppo__toy__gorl__s1", "ppo__toy__twin__s1", "sac__toy__gorl__s1", "sac__toy__twin__s1"]
    for name, argv in starts.items():
        script, _, variant, _ = name.split("__")
        assert argv[:6] == ["--env-id", "toy", "--seed", "1", "--total-timesteps", "400" if script == "ppo" else "300"]
        assert argv[8:10] == ["--exp-name", variant]
        assert argv[10:] == (["--num-stages", "1"] if variant == "twin" else []) + (["--num-envs", "4"] if script == "ppo" else [])
    # The runs used a copy of the scripts, with the commit it came from.
    assert (out / "code" / "gorl_ppo.py").read_text() == STUB
    assert (out / "code" / "COMMIT").read_text() == sha + "\n"
    assert sorted(os.listdir(out / "csv")) == ["ppo__toy__twin__s1.csv", "sac__toy__gorl__s1.csv", "sac__toy__twin__s1.csv"]

    dry = subprocess.run(grid + ["--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert dry.stdout.splitlines()[-1] == "4 runs: 3 done, 1 to resume, 0 to branch, 0 to start", dry.stdout + dry.stderr
    resume = next(l for l in dry.stdout.splitlines() if l.startswith("resume "))
    assert resume.endswith(f"{out}/code/gorl_ppo.py --resume {out}/runs/ppo__toy__gorl__s1")

    # Editing the scripts does not change the grid in progress: the resumed run uses the copy.
    (code / "gorl_ppo.py").write_text(STUB.replace("MARK = 1.0", "MARK = 2.0"))
    second = subprocess.run(grid + ["--executor", "submitit-local"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.count(": finished") == 1 and second.stdout.count(": done") == 3, second.stdout
    assert called()[4:] == [["--resume", str(out / "runs" / "ppo__toy__gorl__s1")]]
    assert "resuming at step 200" in (out / "logs" / "ppo__toy__gorl__s1.log").read_text()
    rows = _rows(out / "csv" / "ppo__toy__gorl__s1.csv")
    assert [(r["global_step"], r["stage"], r["tag"]) for r in rows] == [
        ("100", "0", "periodic"), ("200", "0", "periodic"), ("300", "1", "periodic"), ("400", "1", "periodic"),
        ("400", "1", "final")]
    assert {r["return_std"] for r in rows} == {"1.0"}
    assert {r["stage"] for r in _rows(out / "csv" / "sac__toy__twin__s1.csv")} == {"0"}

    third = subprocess.run(grid + ["--workers", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and third.stdout.count(": done") == 4, third.stdout + third.stderr
    assert len(called()) == 5

    # A new grid copies the edited scripts and records that they were not committed.
    fresh = subprocess.run(RUNNER + ["--scripts", "ppo", "--envs", "toy", "--seeds", "1", "--variants", "twin",
                                     "--ppo-steps", "100", "--code", str(code), "--out", str(tmp_path / "new")],
                           env=env, capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert (tmp_path / "new" / "code" / "COMMIT").read_text() == sha + " (with uncommitted changes)\n"
    assert {r["return_std"] for r in _rows(tmp_path / "new" / "csv" / "ppo__toy__twin__s1.csv")} == {"2.0"}


def test_committed_csvs_count_as_done_without_run_directories(tmp_path):
    # A fresh clone holds OUT/csv/*.csv but neither run directories nor the code copy.
    out, calls = tmp_path / "grid", tmp_path / "calls.jsonl"
    (out / "csv").mkdir(parents=True)
    for name in ("ppo__toy__gorl__s1", "ppo__toy__twin__s1", "sac__toy__gorl__s1", "sac__toy__twin__s1"):
        _write_run(out / "csv" / f"{name}.csv", final=5.0)
    # a CSV copied before its run finished does not count
    with open(out / "csv" / "sac__toy__twin__s1.csv") as f:
        lines = f.readlines()
    (out / "csv" / "sac__toy__twin__s1.csv").write_text("".join(lines[:-1]))
    grid = RUNNER + STUB_GRID + ["--code", str(tmp_path / "nowhere"), "--out", str(out)]
    env = dict(ENV, STUB_CALLS=str(calls))
    dry = subprocess.run(grid + ["--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert dry.stdout.splitlines()[-1] == "4 runs: 3 done, 0 to resume, 0 to branch, 1 to start", dry.stdout + dry.stderr
    assert next(l for l in dry.stdout.splitlines() if l.startswith("start ")).startswith("start  sac__toy__twin__s1: ")
    # To run anything, the runner needs the scripts: a --code without them is one line of error.
    bad = subprocess.run(grid, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip() == f"error: --code {tmp_path / 'nowhere'} has no gorl_sac.py"
    # With every run done there is nothing to run: no code copy, no run directories, the CSVs untouched.
    (out / "csv" / "sac__toy__twin__s1.csv").write_text("".join(lines))
    result = subprocess.run(grid, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.count(": done") == 4, result.stdout + result.stderr
    assert sorted(os.listdir(out)) == ["csv"] and not calls.exists()


def test_grid_runs_the_real_scripts_and_twins_branch_from_stage_0_with_the_same_rows(tmp_path):
    # Both scripts, GoRL and twin, one seed, on a toy env at a few hundred steps: the flags the runner
    # passes and the files it reads (eval.csv with its 'final' row) are the scripts' own. One worker runs
    # GoRL before its twin, so the twin starts from GoRL's stage-0 checkpoint; twins run again from their
    # first step (--no-branch-twins) must give the same rows. Frequent checkpoints let the runner see one in stage 0.
    # With `--lr-schedule run` (the default; `stage` restarts the decay) PPO's stage 0 is the twin's run (detail 1).
    flags = ["--scripts", "ppo", "sac", "--envs", "tests.toy_envs:Toy-v0", "--seeds", "1", "--ppo-steps", "512",
             "--sac-steps", "800", "--ppo-args=--lr-schedule run --action-repeat 1 --num-envs 4 --num-steps 32 --decoder-train-steps 300 "
             "--eval-episodes 2 --eval-interval 256 --checkpoint-interval 128",
             "--sac-args=--learning-starts 200 --batch-size 32 --hidden 32 --decoder-train-steps 300 "
             "--decoder-data-steps 200 --eval-episodes 2 --eval-interval 200 --checkpoint-interval 100"]
    out, scratch = tmp_path / "grid", tmp_path / "scratch"
    result = subprocess.run(RUNNER + flags + ["--out", str(out), "--workers", "1"], env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.count(": finished") == 4, result.stdout + result.stderr
    assert result.stdout.count(": finished (branched)") == 2, result.stdout
    result = subprocess.run(RUNNER + flags + ["--out", str(scratch), "--variants", "twin", "--no-branch-twins"],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.count(": finished\n") == 2, result.stdout + result.stderr
    for script, steps in (("ppo", "512"), ("sac", "800")):
        gorl = _rows(out / "csv" / f"{script}__tests.toy_envs:Toy-v0__gorl__s1.csv")
        twin = _rows(out / "csv" / f"{script}__tests.toy_envs:Toy-v0__twin__s1.csv")
        assert gorl[-1]["tag"] == twin[-1]["tag"] == "final" and gorl[-1]["global_step"] == twin[-1]["global_step"] == steps
        assert any(r["tag"] == "boundary_after" for r in gorl) and {r["stage"] for r in gorl} == {"0", "1"}
        assert {r["stage"] for r in twin} == {"0"} and not any(r["tag"].startswith("boundary") for r in twin)
        alone = _rows(scratch / "csv" / f"{script}__tests.toy_envs:Toy-v0__twin__s1.csv")
        drop_wall = lambda rows: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]
        assert drop_wall(twin) == drop_wall(alone)
        log = (out / "logs" / f"{script}__tests.toy_envs:Toy-v0__twin__s1.log").read_text()
        branched_at = int(log.split("branched from ")[1].split(" at env step ")[1].split()[0])
        assert 0 < branched_at < int(steps), log
        gorl_log = (out / "logs" / f"{script}__tests.toy_envs:Toy-v0__gorl__s1.log").read_text()
        assert "runner:" not in gorl_log, gorl_log  # every stage-0 copy was made without a complaint
    dry = subprocess.run(RUNNER + flags + ["--out", str(out), "--dry-run"], env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert dry.stdout.splitlines()[-1] == "4 runs: 4 done, 0 to resume, 0 to branch, 0 to start", dry.stdout + dry.stderr
    # The stage-0 copy serves only a twin of its sibling's command and code: other flags start from the first step.
    name = "sac__tests.toy_envs:Toy-v0__twin__s1"
    shutil.rmtree(out / "runs" / name)
    os.remove(out / "csv" / f"{name}.csv")
    for steps, expected in (("800", "branch"), ("900", "start")):
        dry = subprocess.run(RUNNER + [f if f != "800" else steps for f in flags] + ["--out", str(out), "--dry-run"],
                             env=ENV, capture_output=True, text=True, timeout=120)
        assert f"{expected:6s} {name}: " in dry.stdout, dry.stdout + dry.stderr


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
    assert (tmp_path / "results.md").read_text() in text
    # 2 tasks x 2 variants x 3 seeds of PPO finished; the status names what the protocol still lacks.
    status = next(l for l in text.splitlines() if l.startswith("Protocol: "))
    assert status.startswith("Protocol: 4 of 24 cells have a finished run; 12 of 80 runs finished.")
    assert "PPO finger-spin GoRL" in status and "SAC walker-walk Gaussian twin (K=1)" in status
    assert "PPO cheetah-run GoRL" not in status
    # A README without the markers is an error, and is left as it was.
    readme.write_text("no markers\n")
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "plot.py"), "--out", str(tmp_path),
                          "--readme", str(readme)], env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "<!-- benchmark-results -->" in bad.stderr and readme.read_text() == "no markers\n"


def test_aggregate_scores_both_variants_on_the_seeds_they_share_when_cells_have_different_seed_counts(tmp_path):
    os.makedirs(tmp_path / "csv")
    finals = {("cheetah-run", "gorl"): {1: 500, 2: 600, 3: 700}, ("cheetah-run", "twin"): {1: 100, 2: 200, 3: 300},
              ("walker-walk", "gorl"): {1: 900, 2: 950}, ("walker-walk", "twin"): {1: 400}}
    # A SAC cell with unequal differences (+100, -300): its line must be their mean, not one seed's.
    finals |= {("finger-spin", "sac_gorl"): {1: 300, 2: 100}, ("finger-spin", "sac_twin"): {1: 200, 2: 400}}
    for (env, variant), per_seed in finals.items():
        script, variant = ("sac", variant[4:]) if variant.startswith("sac_") else ("ppo", variant)
        for seed, final in per_seed.items():
            _write_run(tmp_path / "csv" / f"{script}__{env}__{variant}__s{seed}.csv", final)
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
    assert ("(pairs GoRL is ahead in): PPO cheetah-run +400.0 (3/3); PPO walker-walk +500.0 (1/1); "
            "SAC finger-spin -100.0 (1/2). GoRL ahead in 5 of 6 pairs.") in text
    # The status names the cells short of the protocol's 3 seeds, with their counts, and no full cell.
    status = next(l for l in text.splitlines() if l.startswith("Protocol: "))
    assert status.endswith(" Fewer than 3 seeds: PPO walker-walk GoRL (2), PPO walker-walk Gaussian twin (K=1) (1), "
                           "SAC finger-spin GoRL (2), SAC finger-spin Gaussian twin (K=1) (2).")


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


def test_multimodality_plot_draws_two_action_dimensions_per_policy_and_state(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "toy.csv"
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["env_id", "policy", "state_step", "a0", "a1", "a2"])
        for policy, centre in (("A", 0.6), ("B", -0.6)):
            for step in (0, 5):
                for a in np.clip(centre + 0.1 * rng.standard_normal((300, 3)), -1, 1):
                    writer.writerow(["toy", policy, step, *np.round(a, 5)])
    tool = [sys.executable, os.path.join(ROOT, "benchmarks", "multimodality.py")]
    plot = subprocess.run(tool + [str(out), "--dims", "0", "2"], env=ENV, capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0 and (tmp_path / "toy_dims02.png").stat().st_size > 10_000, plot.stderr
    from PIL import Image

    width, height = Image.open(tmp_path / "toy_dims02.png").size
    assert 0.9 < width / height < 1.3  # 2 policies across, 2 states down
    bad = subprocess.run(tool + [str(out), "--dims", "0", "5"], env=ENV, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == "error: --dims 0 5: need two different action dimensions in 0..2"


def test_two_peaks_reward_and_the_repeat_toy_pay_for_covering_both_peaks():
    sys.path.insert(0, ROOT)
    from benchmarks import toy_two_peaks as toy

    assert abs(toy.reward([0.6, 0.6]) - 1.0) < 1e-3 and abs(toy.reward([-0.6, -0.6]) - 1.0) < 1e-3
    assert toy.reward([0.0, 0.0]) < 0.02 and toy.reward([0.6, -0.6]) < 0.02
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


def test_hopper_starts_splits_the_final_evaluation_by_the_initial_torso_angle(tmp_path):
    """Episodes 0, 8, 9 start with the torso near -1 rad (class A), 1-4, 6, 7 near +2.5 (class B), 5 near 0."""
    rows = [["global_step", "stage", "return_mean", "return_std", "wall_time_s", "tag", "episode_returns"],
            [500, 0, 0, 0, 1, "periodic", " ".join(["0"] * 10)],
            [1000, 0, 0, 0, 1, "periodic", " ".join(["400" if i in (0, 8, 9) else "0" for i in range(10)])],
            [1500, 1, 0, 0, 1, "final", " ".join(["900" if i in (0, 8, 9) else "600" if i == 5 else "30" for i in range(10)])]]
    with open(tmp_path / "eval.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "hopper_starts.py"), "--angles",
                             str(tmp_path / "eval.csv"), "--out", str(tmp_path / "classes.csv")], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    angles = [float(a) for a in result.stdout.split("[")[1].split("]")[0].split(",")]
    assert all(-1.5 < angles[i] < -0.5 for i in (0, 8, 9)) and all(angles[i] > 2.0 for i in (1, 2, 3, 4, 6, 7))
    (row,) = list(csv.DictReader(open(tmp_path / "classes.csv")))
    assert (row["class_A"], row["class_B"], row["upright"]) == ("900.0", "30.0", "600.0")
    assert (row["A_above_300_at"], row["B_above_300_at"]) == ("1000", "")
    # A missing file is a one-line error before anything is written.
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "hopper_starts.py"),
                             str(tmp_path / "eval.csv"), str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x.csv")],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nope.csv" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and not (tmp_path / "x.csv").exists()
