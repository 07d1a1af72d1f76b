"""Run the benchmark grid {script} x {env} x {variant} x {seed}: GoRL and its Gaussian twin
(`--num-stages 1`, everything else identical) for gorl_ppo.py and gorl_sac.py.

    python benchmarks/run.py --dry-run                      # print the grid and each run's state, run nothing
    python benchmarks/run.py                                # this machine: a pool of --workers runs
    python benchmarks/run.py --executor slurm --slurm-partition cpu   # a SLURM cluster, via submitit

Every run is a process of its own; the runner knows the scripts only by their command line and
their files. It starts a run as

    gorl_<script>.py --env-id ENV --seed SEED --total-timesteps N --run-dir OUT/runs/NAME
                     --exp-name VARIANT [--num-stages 1] [--ppo-args / --sac-args]

(NAME = <script>__<env>__<variant>__s<seed>), continues it with `gorl_<script>.py --resume OUT/runs/NAME`,
and reads two files of the run directory:
eval.csv (the run is finished once its last row's tag is 'final') and checkpoint.pt (present: the
run can be resumed). So the grid is resumable: finished runs are skipped, a run with a checkpoint
is resumed, anything else starts afresh (a run directory without a checkpoint is deleted first).
A finished run's eval.csv is copied to OUT/csv/NAME.csv; those files are what benchmarks/plot.py
reads and what gets committed, and a run whose OUT/csv/NAME.csv is finished counts as done even
without its run directory (a fresh clone has only the CSVs).

Runs use a copy of the scripts made when the grid first runs anything: OUT/code/ holds every
top-level *.py of --code (default: this repository) and COMMIT, the git commit it was copied from,
so editing the repository does not change a grid in progress. Delete OUT/code/ to take up the
current scripts. Run directories, logs and the copy stay on the machine (.gitignore).

Twins branch from their GoRL sibling (--branch-twins, on by default): with the same seed and flags, GoRL's
stage 0 is its twin's run step for step (the decoder is the identity until the first refit), so while a GoRL
run trains, the runner keeps a copy of its newest stage-0 checkpoint (OUT/runs/NAME.stage0/, with eval.csv and
the tensorboard events), and a twin started later continues it as `--resume` of a run with `--num-stages 1`.
A twin started after its sibling's stage 0 (the local pool runs each cell's GoRL seeds first) runs a third
of a K=2 run. Not with `--lr-schedule stage` or `--decoder-fresh-steps` (PPO), which make stage 0 depend on
the stages; a twin with no stage-0 copy from the same command and code (SLURM starts all at once) runs from
its first step.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import glob
import json
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
# The protocol's seeds: 3 per cell, 5 on hopper-stand (its outcomes vary most between seeds).
SEEDS = (1, 2, 3)
HOPPER_SEEDS = (1, 2, 3, 4, 5)
STATES = ("done", "resume", "branch", "start")


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
    ppo_steps: int = 10_000_000
    """env steps of each gorl_ppo.py run"""
    sac_steps: int = 500_000
    """env steps of each gorl_sac.py run"""
    ppo_args: str = ""
    """extra flags for every gorl_ppo.py run; pass as --ppo-args='--num-envs 32 ...' (with '=')"""
    sac_args: str = ""
    """extra flags for every gorl_sac.py run; pass as --sac-args='...' (with '=')"""
    out: str = "benchmarks/results/grid"
    """results folder: code/, runs/, logs/ (all uncommitted) and csv/"""
    code: str = REPO
    """folder whose gorl_ppo.py, gorl_sac.py and other top-level *.py files are copied to OUT/code/ once"""
    branch_twins: bool = True
    """start each twin from its GoRL sibling's newest stage-0 checkpoint, when the runner kept one"""
    workers: int = 2
    """runs at a time with --executor local (one per core here)"""
    executor: Literal["local", "submitit-local", "slurm"] = "local"
    """local: a pool on this machine; submitit-local / slurm: submitit's local or SLURM executor"""
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
                    jobs.append({
                        "name": f"{script}__{env_id}__{variant}__s{seed}", "script": script, "env_id": env_id,
                        "variant": variant, "seed": seed, "steps": args.ppo_steps if script == "ppo" else args.sac_steps,
                        "extra": (args.ppo_args if script == "ppo" else args.sac_args).split(),
                        "out": os.path.abspath(args.out), "python": args.python, "branch": args.branch_twins,
                    })
    return jobs


def finished(eval_csv: str) -> bool:
    if not os.path.exists(eval_csv):
        return False
    with open(eval_csv) as f:
        rows = list(csv.DictReader(f))
    return bool(rows) and rows[-1].get("tag") == "final"


def run_dir(job: dict) -> str:
    return os.path.join(job["out"], "runs", job["name"])


def stage0_dir(job: dict) -> str:
    """Where the runner keeps the newest stage-0 checkpoint of the job's GoRL sibling (the job itself if GoRL)."""
    return os.path.join(job["out"], "runs", f"{job['script']}__{job['env_id']}__gorl__s{job['seed']}.stage0")


def sibling_record(job: dict) -> dict:
    """What a stage-0 copy must have come from to serve `job`'s twin: its GoRL sibling's command and code."""
    gorl = dict(job, variant="gorl", name=f"{job['script']}__{job['env_id']}__gorl__s{job['seed']}")
    commit = os.path.join(job["out"], "code", "COMMIT")
    return {"command": start_command(gorl), "code": open(commit).read() if os.path.exists(commit) else None}


def state(job: dict) -> str:
    """'done' (its run directory's or the committed OUT/csv/ eval.csv is finished), 'resume' (has a
    checkpoint), 'branch' (a twin whose GoRL sibling, same flags and code, left a stage-0 copy) or 'start'."""
    if finished(os.path.join(run_dir(job), "eval.csv")) or finished(os.path.join(job["out"], "csv", f"{job['name']}.csv")):
        return "done"
    if os.path.exists(os.path.join(run_dir(job), "checkpoint.pt")):
        return "resume"
    if job["variant"] == "twin" and job["branch"]:
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(stage0_dir(job), "sibling.json")) as f:
                if json.load(f) == sibling_record(job):
                    return "branch"
    return "start"


def start_command(job: dict) -> list[str]:
    script = os.path.join(job["out"], "code", f"gorl_{job['script']}.py")
    stages = ["--num-stages", "1"] if job["variant"] == "twin" else []
    return [job["python"], script, "--env-id", job["env_id"], "--seed", str(job["seed"]), "--total-timesteps",
            str(job["steps"]), "--run-dir", run_dir(job), "--exp-name", job["variant"], *stages, *job["extra"]]


def command(job: dict, status: str) -> list[str]:
    if status in ("resume", "branch"):
        return [job["python"], os.path.join(job["out"], "code", f"gorl_{job['script']}.py"), "--resume", run_dir(job)]
    return start_command(job)


def branchable(saved_args: dict) -> bool:
    """Is this GoRL run's stage 0 step for step its twin's run? Not when a PPO schedule spans a stage or the budget
    sets env steps aside for fresh refit data."""
    return saved_args.get("lr_schedule") != "stage" and not saved_args.get("decoder_fresh_steps")


def keep_stage0(job: dict, seen: Optional[int], log) -> Optional[int]:
    """If the GoRL run wrote a new checkpoint and it is still in stage 0, copy it with the rows and events logged
    up to it to stage0_dir (checkpoint first: eval.csv can only be newer). Returns the checkpoint's modification
    time, to call again with."""
    import torch

    path = os.path.join(run_dir(job), "checkpoint.pt")
    try:
        mtime = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return seen
    if mtime == seen:
        return seen
    tmp = stage0_dir(job) + ".tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        shutil.copyfile(path, os.path.join(tmp, "checkpoint.pt"))
        for name in os.listdir(run_dir(job)):
            if name == "eval.csv" or name.startswith("events.out.tfevents"):
                shutil.copyfile(os.path.join(run_dir(job), name), os.path.join(tmp, name))
        try:
            ckpt = torch.load(os.path.join(tmp, "checkpoint.pt"), map_location="cpu", weights_only=False)
            with open(os.path.join(tmp, "eval.csv")) as f:
                complete = len(f.readlines()) >= 1 + ckpt["run"]["eval_rows"]
        except Exception:  # not a checkpoint of the scripts: nothing to branch from
            ckpt, complete = {"stage": None}, False
        if complete and ckpt["stage"] == 0 and not ckpt["finished"] and branchable(ckpt["args"]):
            with open(os.path.join(tmp, "sibling.json"), "w") as f:
                json.dump(sibling_record(job), f)
            old = stage0_dir(job) + ".old"
            shutil.rmtree(old, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.replace(stage0_dir(job), old)
            os.replace(tmp, stage0_dir(job))
            shutil.rmtree(old, ignore_errors=True)  # absent after the first copy
        else:
            shutil.rmtree(tmp)
    except OSError as err:  # e.g. a full disk: the run goes on; its twin may run from its first step
        log.write(f"runner: no stage-0 copy at this checkpoint ({err})\n")
    return mtime


def branch_twin(job: dict) -> int:
    """The twin's run directory as its GoRL sibling's at a stage-0 checkpoint, the checkpoint's arguments those
    of the twin's command (one stage), made aside and renamed into place; `--resume` continues it. Returns the
    step it branches at."""
    import torch

    tmp = run_dir(job) + ".tmp"
    for attempt in range(10):  # the sibling may replace the folder while it is copied: copy until consistent
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            shutil.copytree(stage0_dir(job), tmp)
            ckpt = torch.load(os.path.join(tmp, "checkpoint.pt"), map_location="cpu", weights_only=False)
            with open(os.path.join(tmp, "eval.csv")) as f:
                if len(f.readlines()) >= 1 + ckpt["run"]["eval_rows"]:
                    break
        time.sleep(1.0)
    else:
        raise OSError(f"no consistent copy of {stage0_dir(job)}")
    os.remove(os.path.join(tmp, "sibling.json"))
    ckpt["args"].update(num_stages=1, stage_fractions=(), exp_name="twin", run_dir=run_dir(job))
    torch.save(ckpt, os.path.join(tmp, "checkpoint.pt"))
    os.replace(tmp, run_dir(job))
    return ckpt["global_step"]


def run_job(job: dict) -> dict:
    """One grid cell, start to finish (or resumed); module-level so submitit can pickle it."""
    status = state(job)
    eval_csv = os.path.join(run_dir(job), "eval.csv")
    if status != "done":
        if status in ("start", "branch") and os.path.exists(run_dir(job)):
            shutil.rmtree(run_dir(job))  # died before its first checkpoint: nothing to keep
        if status == "start" and job["variant"] == "gorl":
            shutil.rmtree(stage0_dir(job), ignore_errors=True)  # a copy from an earlier attempt
        os.makedirs(os.path.join(job["out"], "logs"), exist_ok=True)
        with open(os.path.join(job["out"], "logs", f"{job['name']}.log"), "a") as log:
            if status == "branch":
                try:
                    log.write(f"branched from {os.path.basename(stage0_dir(job))} at env step {branch_twin(job)}\n")
                except OSError as err:
                    status = "start"
                    log.write(f"runner: no branch ({err}); the twin runs from its first step\n")
            cmd = command(job, status)
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=job["out"],
                                    env=dict(os.environ, GORL_NO_PROGRESS="1"))
            seen = None
            while proc.poll() is None:  # a GoRL run: keep its newest stage-0 checkpoint for the twin
                if job["variant"] == "gorl" and job["branch"]:
                    seen = keep_stage0(job, seen, log)
                time.sleep(0.2)
            code = proc.returncode
        if code != 0 or not finished(eval_csv):
            why = f"exit {code}" if code != 0 else "exit 0 without a final evaluation"
            return {"name": job["name"], "status": f"failed ({why}, see logs/{job['name']}.log)"}
        status = "finished" if status != "branch" else "finished (branched)"
    if finished(eval_csv):  # absent when only the committed CSV is left (a fresh clone)
        os.makedirs(os.path.join(job["out"], "csv"), exist_ok=True)
        shutil.copyfile(eval_csv, os.path.join(job["out"], "csv", f"{job['name']}.csv"))
    return {"name": job["name"], "status": status}


def _git(folder: str, *argv: str) -> Optional[str]:
    try:
        result = subprocess.run(["git", "-C", folder, *argv], capture_output=True, text=True)
    except OSError:  # no git on this machine
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def freeze_code(out: str, source: str, scripts: set[str]) -> None:
    """Copy the top-level *.py of `source` to OUT/code/ (once: an existing copy is kept) and write
    COMMIT, the commit they came from; COMMIT is written last, so a copy interrupted halfway is redone."""
    code = os.path.join(out, "code")
    if not os.path.exists(os.path.join(code, "COMMIT")):
        files = sorted(glob.glob(os.path.join(source, "*.py")))
        if missing := [s for s in sorted(scripts) if os.path.join(source, s) not in files]:
            sys.exit(f"error: --code {source} has no {', '.join(missing)}")
        os.makedirs(code, exist_ok=True)
        for path in files:
            shutil.copyfile(path, os.path.join(code, os.path.basename(path)))
        commit = _git(source, "rev-parse", "HEAD")
        dirty = _git(source, "status", "--porcelain", "--", *map(os.path.basename, files))
        with open(os.path.join(code, "COMMIT"), "w") as f:
            if commit is None:
                f.write(f"unknown: {source} is not a git checkout\n")
            else:
                f.write(commit + (" (with uncommitted changes)" if dirty else "") + "\n")
    if missing := [s for s in sorted(scripts) if not os.path.exists(os.path.join(code, s))]:
        sys.exit(f"error: {code} has no {', '.join(missing)}; delete {code} to copy the scripts again")


def main(args: Args) -> None:
    if args.workers <= 0:
        sys.exit(f"error: --workers must be positive, got {args.workers}")
    if args.executor == "slurm" and args.slurm_partition is None:
        sys.exit("error: --executor slurm needs --slurm-partition")
    jobs = grid(args)
    states = {job["name"]: state(job) for job in jobs}
    if args.dry_run:
        for job in jobs:
            print(f"{states[job['name']]:6s} {job['name']}: {' '.join(command(job, states[job['name']]))}")
        counts = {s: sum(v == s for v in states.values()) for s in STATES}
        print(f"{len(jobs)} runs: {counts['done']} done, {counts['resume']} to resume, {counts['branch']} to branch, "
              f"{counts['start']} to start")
        return
    todo = {f"gorl_{job['script']}.py" for job in jobs if states[job["name"]] != "done"}
    if todo:
        os.makedirs(args.out, exist_ok=True)
        freeze_code(os.path.abspath(args.out), os.path.abspath(args.code), todo)
    start, results = time.time(), []

    def report(result: dict) -> None:
        results.append(result)
        print(f"[{time.time() - start:7.0f}s] {result['name']}: {result['status']}", flush=True)

    if args.executor == "local":
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:
            for future in concurrent.futures.as_completed([pool.submit(run_job, job) for job in jobs]):
                report(future.result())
    else:
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
        for future in submitted:
            report(future.result())
    failed = [r["name"] for r in results if r["status"].startswith("failed")]
    if failed:
        sys.exit(f"error: {len(failed)} of {len(jobs)} runs failed: {', '.join(failed)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
