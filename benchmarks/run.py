"""Run the benchmark grid {script} x {env} x {variant} x {seed}: GoRL and its Gaussian twin
(`--num-stages 1`) for gorl_ppo.py and gorl_sac.py.

    python benchmarks/run.py --dry-run                      # print the grid, run nothing
    python benchmarks/run.py                                # this machine: a pool of --workers runs
    python benchmarks/run.py --executor slurm --slurm-partition cpu   # a SLURM cluster, via submitit

Each run writes to OUT/runs/<script>__<env>__<variant>__s<seed>/ (one torch thread, no progress
bar) and its stdout to OUT/logs/. The grid is resumable: a run whose eval.csv ends with its
'final' row is skipped, a run with a checkpoint is continued with --resume, anything else starts
afresh. When a run finishes, its eval.csv is copied to OUT/csv/<name>.csv, the per-run files that
benchmarks/plot.py reads and that get committed (run directories hold checkpoints and are not).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import glob
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import tyro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("cheetah-run", "finger-spin", "finger-turn_hard", "fish-swim", "hopper-stand", "walker-walk")
# envpool's finger tasks are not dm_control's: under random actions the spinning hinge moves less (its
# velocity's std 0.74x on finger-spin, 0.65x on finger-turn_hard) and finger-spin pays 0.06 per episode
# against 0.50 (benchmarks/backend_parity.py, results/backend_parity*.csv). They run on dm_control's suite.
DM_CONTROL_BACKEND = ("finger-spin", "finger-turn_hard")
# The protocol's seeds: 3 per cell, 5 on hopper-stand (its outcomes vary most between seeds).
SEEDS = (1, 2, 3)
HOPPER_SEEDS = (1, 2, 3, 4, 5)


@dataclass
class Args:
    scripts: tuple[Literal["ppo", "sac"], ...] = ("ppo", "sac")
    """which scripts: gorl_ppo.py, gorl_sac.py"""
    envs: tuple[str, ...] = TASKS
    """env ids (default: the paper's six dm_control tasks)"""
    variants: tuple[Literal["gorl", "twin"], ...] = ("gorl", "twin")
    """gorl: the script's default stages; twin: --num-stages 1, everything else identical"""
    seeds: tuple[int, ...] = SEEDS
    """seeds of every cell (hopper-stand too, unless --hopper-seeds is given)"""
    hopper_seeds: Optional[tuple[int, ...]] = None
    """seeds on hopper-stand (default: 1-5 with the default --seeds, else --seeds)"""
    ppo_steps: int = 3_000_000
    """env steps of each gorl_ppo.py run"""
    sac_steps: int = 500_000
    """env steps of each gorl_sac.py run"""
    ppo_args: str = ""
    """extra flags for every gorl_ppo.py run; pass as --ppo-args='--num-envs 32 ...' (with '=')"""
    sac_args: str = ""
    """extra flags for every gorl_sac.py run; pass as --sac-args='...' (with '=')"""
    out: str = "benchmarks/results/grid"
    """results folder: runs/, logs/, csv/, and the code copy the runs use"""
    workers: int = 2
    """runs at a time with --executor local (one per core here)"""
    executor: Literal["local", "submitit-local", "slurm"] = "local"
    """local: a process pool on this machine; submitit-local / slurm: submitit's local or SLURM executor"""
    slurm_partition: Optional[str] = None
    """SLURM partition (--executor slurm)"""
    slurm_time_min: int = 600
    """SLURM time limit per run in minutes; an interrupted run continues from its checkpoint when the grid is run again"""
    dry_run: bool = False
    """print the grid and what would happen to each run, then exit"""
    python: str = sys.executable
    """python interpreter that runs the scripts"""


def grid(args: Args) -> list[dict]:
    # A --seeds the user chose applies to hopper-stand too: its two extra protocol seeds are not run behind their back.
    hopper_seeds = args.hopper_seeds or (HOPPER_SEEDS if args.seeds == SEEDS else args.seeds)
    jobs = []
    for script in args.scripts:
        for env_id in args.envs:
            for variant in args.variants:
                for seed in (hopper_seeds if env_id == "hopper-stand" else args.seeds):
                    name = f"{script}__{env_id}__{variant}__s{seed}"
                    jobs.append({
                        "name": name, "script": script, "env_id": env_id, "variant": variant, "seed": seed,
                        "steps": args.ppo_steps if script == "ppo" else args.sac_steps,
                        "extra": (args.ppo_args if script == "ppo" else args.sac_args).split()
                        + (["--env-backend", "dm_control"] if env_id in DM_CONTROL_BACKEND else []),
                        "out": os.path.abspath(args.out), "python": args.python,
                    })
    return jobs


def _finished(eval_csv: str) -> bool:
    if not os.path.exists(eval_csv):
        return False
    with open(eval_csv) as f:
        rows = list(csv.DictReader(f))
    return bool(rows) and rows[-1]["tag"] == "final"


def sibling(job: dict) -> str:
    """The GoRL run whose stage 0 a twin shares: same script, env and seed."""
    return f"{job['script']}__{job['env_id']}__gorl__s{job['seed']}"


def stage0_checkpoint(job: dict) -> Optional[str]:
    """A twin's branch point: its GoRL sibling's stage-0-end checkpoint, where it exists (gorl_sac.py
    keeps one). With the same seed and flags, the twin's first T_0 env steps compute exactly what
    GoRL's stage 0 computed (tests/test_benchmarks.py checks this), so the twin continues from there
    with --num-stages 1 instead of recomputing them: a third of a SAC twin's 500k steps."""
    if job["variant"] != "twin":
        return None
    path = os.path.join(job["out"], "runs", sibling(job), "stage0_end.pt")
    return path if os.path.exists(path) else None


def state(job: dict) -> str:
    """'done', 'resume' (has a checkpoint), 'branch' (a twin that continues from its GoRL sibling's
    stage 0) or 'start'. The committed OUT/csv/<name>.csv counts as done too: run directories are not
    committed, so a fresh clone has only the CSVs of finished runs."""
    run_dir = os.path.join(job["out"], "runs", job["name"])
    if _finished(os.path.join(run_dir, "eval.csv")) or _finished(os.path.join(job["out"], "csv", f"{job['name']}.csv")):
        return "done"
    if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        return "resume"
    return "branch" if stage0_checkpoint(job) else "start"


def branch(job: dict) -> str:
    """Make the twin's run directory from its GoRL sibling's stage-0-end checkpoint: the arguments
    change only where the twin's own command differs (one stage, its name and directory); eval.csv
    and the tensorboard events are the sibling's up to that step. Then --resume continues it."""
    import torch  # only here: the rest of the runner does not need it

    source = stage0_checkpoint(job)
    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    run_dir = os.path.join(job["out"], "runs", job["name"])
    ckpt["args"].update(num_stages=1, stage_fractions=None, exp_name=job["variant"], run_dir=run_dir)
    os.makedirs(run_dir)
    gorl_dir = os.path.dirname(source)
    with open(os.path.join(gorl_dir, "eval.csv")) as f:
        rows = f.readlines()[: 1 + ckpt["logger"]["eval_rows"]]
    with open(os.path.join(run_dir, "eval.csv"), "w") as f:
        f.writelines(rows)
    copy_shared_events(gorl_dir, run_dir, ckpt["global_step"], os.path.getmtime(source))
    torch.save(ckpt, os.path.join(run_dir, "checkpoint.pt"))  # last: until here the twin is still 'branch'
    return f"# branched from {source} at env step {ckpt['global_step']}\n"


def copy_shared_events(gorl_dir: str, run_dir: str, step: int, written: float) -> None:
    """Copy the GoRL sibling's tensorboard events that the twin shares: every step before `step`, and
    those at `step` logged before the stage-0 checkpoint was `written` (wall time). The sibling's
    boundary scalars (eval/boundary_*, decoder losses), logged at `step` after the checkpoint, stay out."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    for path in sorted(glob.glob(os.path.join(gorl_dir, "events.out.tfevents.*"))):
        staging = os.path.join(run_dir, ".events")
        writer = EventFileWriter(staging)
        for event in LegacyEventFileLoader(path).Load():  # as written: no conversion of scalars to tensors
            if event.HasField("file_version"):
                continue  # the writer wrote its own
            if event.step < step or (event.step == step and event.wall_time <= written):
                writer.add_event(event)
        writer.close()
        # Keep the sibling's file name: tensorboard reads files in name (= creation time) order, and
        # the resumed twin's own file must come after this one.
        (copied,) = glob.glob(os.path.join(staging, "events.out.tfevents.*"))
        os.replace(copied, os.path.join(run_dir, os.path.basename(path)))
        os.rmdir(staging)


def command(job: dict) -> list[str]:
    script = os.path.join(job["out"], "code", f"gorl_{job['script']}.py")
    run_dir = os.path.join(job["out"], "runs", job["name"])
    if state(job) in ("resume", "branch"):
        return [job["python"], script, "--resume", run_dir]
    stages = ["--num-stages", "1"] if job["variant"] == "twin" else []
    return [job["python"], script, "--env-id", job["env_id"], "--seed", str(job["seed"]), "--total-timesteps",
            str(job["steps"]), "--run-dir", run_dir, "--exp-name", job["variant"], *stages, *job["extra"]]


def run_job(job: dict) -> dict:
    """One grid cell, start to finish (or resumed); module-level so submitit can pickle it."""
    status = state(job)
    if status != "done":
        run_dir = os.path.join(job["out"], "runs", job["name"])
        if status in ("start", "branch") and os.path.exists(run_dir):
            shutil.rmtree(run_dir)  # died before its first checkpoint: nothing to keep
        note = branch(job) if status == "branch" else ""
        os.makedirs(os.path.join(job["out"], "logs"), exist_ok=True)
        cmd = command(job)
        env = dict(os.environ, GORL_NO_PROGRESS="1")
        with open(os.path.join(job["out"], "logs", f"{job['name']}.log"), "a") as log:
            log.write(f"{note}$ {' '.join(cmd)}\n")
            log.flush()
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=job["out"])
        if code != 0:
            return {"name": job["name"], "status": f"failed (exit {code}, see logs/{job['name']}.log)"}
        status = "finished"
    eval_csv = os.path.join(job["out"], "runs", job["name"], "eval.csv")
    if os.path.exists(eval_csv):  # absent when only the committed CSV is left (a fresh clone)
        os.makedirs(os.path.join(job["out"], "csv"), exist_ok=True)
        shutil.copyfile(eval_csv, os.path.join(job["out"], "csv", f"{job['name']}.csv"))
    return {"name": job["name"], "status": status}


SCRIPTS = ("gorl_ppo.py", "gorl_sac.py", "common.py")


def restore_code(code: str) -> None:
    """Rebuild the frozen copies from git in a fresh clone (they are not committed, COMMIT is). Each
    line of COMMIT that starts with a commit hash names the scripts taken from that commit, or
    none for all three; later lines override earlier ones."""
    source = {}
    with open(os.path.join(code, "COMMIT")) as f:
        for line in f:
            sha = line.split()[0] if line.strip() else ""
            if len(sha) != 40 or any(c not in "0123456789abcdef" for c in sha):
                continue
            if "with uncommitted changes" in line:
                sys.exit(f"error: {code}/COMMIT records uncommitted changes ({sha}); the frozen scripts cannot "
                         "be rebuilt from git, restore them by hand or start a new --out")
            named = [name for name in SCRIPTS if name in line]
            source.update({name: sha for name in (named or SCRIPTS)})
    for name in SCRIPTS:
        if name not in source:
            sys.exit(f"error: {code}/COMMIT names no commit for {name}; allowed: lines '<40-hex commit> (files)'")
        shown = subprocess.run(["git", "show", f"{source[name]}:{name}"], cwd=REPO, capture_output=True, text=True)
        if shown.returncode != 0:
            sys.exit(f"error: cannot rebuild {name} from commit {source[name]} ({shown.stderr.strip()})")
        with open(os.path.join(code, name), "w") as f:
            f.write(shown.stdout)


def freeze_code(out: str) -> None:
    """Runs use a copy of the scripts (with the commit it came from, in COMMIT), so editing the
    repository does not change a grid in progress; the copy is kept once made, and rebuilt from
    COMMIT in a fresh clone."""
    code = os.path.join(out, "code")
    if all(os.path.exists(os.path.join(code, name)) for name in SCRIPTS):
        return
    if os.path.exists(os.path.join(code, "COMMIT")):
        restore_code(code)
        return
    os.makedirs(code, exist_ok=True)
    for name in SCRIPTS:
        shutil.copyfile(os.path.join(REPO, name), os.path.join(code, name))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "gorl_ppo.py", "gorl_sac.py", "common.py"],
                           cwd=REPO).returncode != 0
    with open(os.path.join(code, "COMMIT"), "w") as f:
        f.write(commit + (" (with uncommitted changes)" if dirty else "") + "\n")


def main(args: Args) -> None:
    if args.workers <= 0:
        sys.exit(f"error: --workers must be positive, got {args.workers}")
    if args.executor == "slurm" and args.slurm_partition is None:
        sys.exit("error: --executor slurm needs --slurm-partition")
    jobs = grid(args)
    if args.dry_run:
        for job in jobs:
            print(f"{state(job):6s} {job['name']}: {' '.join(command(job))}")
        counts = {s: sum(state(j) == s for j in jobs) for s in ("done", "resume", "branch", "start")}
        print(f"{len(jobs)} runs: {counts['done']} done, {counts['resume']} to resume, {counts['branch']} to branch, "
              f"{counts['start']} to start")
        return
    os.makedirs(args.out, exist_ok=True)
    freeze_code(os.path.abspath(args.out))
    start = time.time()
    if args.executor == "local":
        # A SAC twin waits until its GoRL sibling in this grid has a stage-0 checkpoint to branch from
        # or has ended; meanwhile the workers take other runs. (gorl_ppo.py keeps no such checkpoint.)
        names = {job["name"] for job in jobs}
        waiting, running = list(jobs), {}

        def ready(job: dict) -> bool:
            return (job["variant"] != "twin" or job["script"] != "sac" or sibling(job) not in names
                    or state(job) != "start"
                    or not any(j["name"] == sibling(job) for j in waiting + list(running.values())))

        with concurrent.futures.ProcessPoolExecutor(max_workers=args.workers) as pool:
            while waiting or running:
                for job in [j for j in waiting if ready(j)][: args.workers - len(running)]:
                    waiting.remove(job)
                    running[pool.submit(run_job, job)] = job
                finished, _ = concurrent.futures.wait(running, timeout=10,
                                                      return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    del running[future]
                    result = future.result()
                    print(f"[{time.time() - start:7.0f}s] {result['name']}: {result['status']}", flush=True)
        return
    import submitit

    folder = os.path.join(os.path.abspath(args.out), "submitit", "%j")
    if args.executor == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=args.slurm_time_min)
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(slurm_partition=args.slurm_partition, timeout_min=args.slurm_time_min,
                                   cpus_per_task=1, mem_gb=4, slurm_array_parallelism=256)
    submitted = executor.map_array(run_job, jobs)
    print(f"submitted {len(submitted)} runs ({args.executor}); logs in {os.path.dirname(folder)}", flush=True)
    for job, result in zip(jobs, (s.result() for s in submitted)):
        print(f"[{time.time() - start:7.0f}s] {result['name']}: {result['status']}", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
