"""Figures and the results table of the benchmark grid, from the committed per-run CSVs alone.

    python benchmarks/plot.py [--out benchmarks/results/grid] [--readme README.md]

Reads OUT/csv/<script>__<env>__<variant>__s<seed>.csv (eval.csv of each run, copied by
benchmarks/run.py) and writes
  OUT/curves_<script>.png   per task: deterministic eval return vs env steps and vs wall time,
                            mean over seeds with a 95% t-interval of the mean (a band needs 2+ seeds);
                            y-axis 0-1000, the dm_control range, widened if a mean leaves it
  OUT/aggregate.png         IQM over tasks x seeds of the final return / 1000, with 95% stratified
                            bootstrap intervals, per script and variant (seeds both variants finished)
  OUT/results.md            the table, the IQM and per-seed-pair outcomes, also written into the README between
                            <!-- benchmark-results --> and <!-- /benchmark-results -->.
A run counts once its last row is 'final'; unfinished runs are drawn but not tabulated.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

NAME = re.compile(r"(?P<script>ppo|sac)__(?P<env>.+)__(?P<variant>gorl|twin)__s(?P<seed>\d+)\.csv$")
LABEL = {"gorl": "GoRL", "twin": "Gaussian twin (K=1)"}
COLOR = {"gorl": "tab:blue", "twin": "tab:orange"}
MARK = ("<!-- benchmark-results -->", "<!-- /benchmark-results -->")


def load(out: str) -> dict:
    """{(script, env, variant): {seed: rows}} with numeric columns."""
    runs: dict = defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(out, "csv", "*.csv"))):
        match = NAME.search(os.path.basename(path))
        if not match:
            continue
        with open(path) as f:
            rows = [{"step": int(r["global_step"]), "stage": int(r["stage"]), "ret": float(r["return_mean"]),
                     "wall": float(r["wall_time_s"]), "tag": r["tag"]} for r in csv.DictReader(f)]
        if rows:
            runs[(match["script"], match["env"], match["variant"])][int(match["seed"])] = rows
    return runs


def finished(rows: list[dict]) -> bool:
    return rows[-1]["tag"] == "final"


def curve(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Periodic evaluations and the final one (boundary rows are paired checks, not curve points)."""
    points = {r["step"]: (r["ret"], r["wall"]) for r in rows if r["tag"] in ("periodic", "final")}
    steps = np.array(sorted(points))
    return steps, np.array([points[s][0] for s in steps]), np.array([points[s][1] for s in steps])


def mean_ci(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 and the half-width of its 95% t-interval (0 for a single seed)."""
    n = values.shape[0]
    if n < 2:
        return values.mean(0), np.zeros(values.shape[1])
    return values.mean(0), stats.t.ppf(0.975, n - 1) * values.std(0, ddof=1) / np.sqrt(n)


def plot_curves(runs: dict, script: str, path: str) -> None:
    envs = sorted({env for (s, env, _) in runs if s == script})
    if not envs:
        return
    fig, axes = plt.subplots(len(envs), 2, figsize=(10, 2.6 * len(envs)), squeeze=False)
    for row, env in enumerate(envs):
        # dm_control returns lie in [0, 1000]; the y-axis shows that range (widened if a mean curve
        # leaves it), so 2-seed t-bands (t = 12.7) may run off the axes instead of flattening the means.
        low, high = 0.0, 1000.0
        for variant in ("gorl", "twin"):
            seeds = runs.get((script, env, variant), {})
            if not seeds:
                continue
            curves = [curve(rows) for rows in seeds.values()]
            common = sorted(set.intersection(*(set(c[0].tolist()) for c in curves)))
            returns = np.array([[dict(zip(c[0], c[1]))[s] for s in common] for c in curves])
            walls = np.array([[dict(zip(c[0], c[2]))[s] for s in common] for c in curves])
            mean, half = mean_ci(returns)
            low, high = min(low, mean.min()), max(high, mean.max())
            label = f"{LABEL[variant]} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
            for col, x in enumerate((np.array(common), walls.mean(0) / 60)):
                ax = axes[row, col]
                ax.plot(x, mean, color=COLOR[variant], label=label)
                ax.fill_between(x, mean - half, mean + half, color=COLOR[variant], alpha=0.2)
        axes[row, 0].set_title(f"{script.upper()} {env}: return vs env steps", fontsize=9)
        axes[row, 1].set_title(f"{script.upper()} {env}: return vs wall time", fontsize=9)
        axes[row, 0].set_xlabel("env steps")
        axes[row, 1].set_xlabel("wall time (min, mean over seeds)")
        for ax in axes[row]:
            ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
            ax.set_ylabel("eval return")
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def iqm_interval(per_task: list[np.ndarray], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """IQM of all runs pooled (the mean of the middle 50%), and its 95% stratified bootstrap interval:
    each replicate resamples every task's runs with replacement, so tasks keep their weight. Written
    out here because rliable needs one seed count for every task, and the grid's cells differ."""
    rng = np.random.default_rng(seed)
    boot = [stats.trim_mean(np.concatenate([rng.choice(x, len(x)) for x in per_task]), 0.25) for _ in range(reps)]
    return float(stats.trim_mean(np.concatenate(per_task), 0.25)), *np.percentile(boot, [2.5, 97.5])


def paired_seeds(runs: dict, script: str) -> dict[str, list[int]]:
    """{env: seeds that both GoRL and its twin finished}, for the tasks that have any."""
    paired = {}
    for env in sorted({env for (s, env, _) in runs if s == script}):
        done = [{s for s, r in runs.get((script, env, v), {}).items() if finished(r)} for v in ("gorl", "twin")]
        if done[0] & done[1]:
            paired[env] = sorted(done[0] & done[1])
    return paired


def plot_aggregate(runs: dict, path: str) -> list[str]:
    """IQM of final return / 1000 over tasks x seeds, per script and variant; per task, only the seeds
    both variants finished, so GoRL and its twin are scored on the same runs."""
    scores, notes = {}, []
    for script in ("ppo", "sac"):
        paired = paired_seeds(runs, script)
        if not paired:
            continue
        for variant in ("gorl", "twin"):
            per_task = [np.array([runs[(script, env, variant)][s][-1]["ret"] / 1000 for s in seeds])
                        for env, seeds in paired.items()]
            name = f"{script.upper()} {LABEL[variant]}"
            scores[name] = iqm_interval(per_task)
            notes.append(f"{name}: {scores[name][0]:.3f} [{scores[name][1]:.3f}, {scores[name][2]:.3f}] over "
                         f"{len(paired)} tasks, {sum(map(len, per_task))} runs")
    if not scores:
        return notes
    names = list(scores)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(names)))
    for i, name in enumerate(names):
        point, lo, hi = scores[name]
        ax.plot([lo, hi], [i, i], color=COLOR["gorl" if "GoRL" in name else "twin"], lw=6, alpha=0.5)
        ax.plot(point, i, "k|", ms=14)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("IQM of final return / 1000 (95% stratified bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return notes


def table(runs: dict) -> str:
    lines = ["| script | task | variant | seeds | final return, mean ± std over seeds | per seed | "
             "boundary before → after | env steps | wall time per run |", "|---|---|---|---|---|---|---|---|---|"]
    for (script, env, variant) in sorted(runs):
        seeds = {s: r for s, r in sorted(runs[(script, env, variant)].items()) if finished(r)}
        unfinished = len(runs[(script, env, variant)]) - len(seeds)
        pending = f" (+{unfinished} running)" if unfinished else ""
        if not seeds:
            lines.append(f"| {script.upper()} | {env} | {LABEL[variant]} | 0{pending} | - | - | - | - | - |")
            continue
        finals = np.array([r[-1]["ret"] for r in seeds.values()])
        boundaries = "; ".join(
            ", ".join(f"{b['ret']:.0f}→{a['ret']:.0f}" for b, a in zip(
                [x for x in r if x["tag"] == "boundary_before"], [x for x in r if x["tag"] == "boundary_after"]))
            for r in seeds.values()) if variant == "gorl" else "-"
        steps = sorted({r[-1]["step"] for r in seeds.values()})
        wall = np.mean([r[-1]["wall"] for r in seeds.values()]) / 60
        lines.append(f"| {script.upper()} | {env} | {LABEL[variant]} | {len(seeds)}{pending} | "
                     f"{finals.mean():.1f} ± {finals.std():.1f} | {', '.join(f'{x:.1f}' for x in finals)} | "
                     f"{boundaries} | {', '.join(map(str, steps))} | {wall:.0f} min |")
    return "\n".join(lines)


def paired_outcomes(runs: dict) -> str:
    """GoRL's final return minus its twin's per (script, task), averaged over the seeds both variants finished."""
    cells = [(f"{script.upper()} {env}", [runs[(script, env, "gorl")][seed][-1]["ret"]
                                          - runs[(script, env, "twin")][seed][-1]["ret"] for seed in seeds])
             for script in ("ppo", "sac") for env, seeds in paired_seeds(runs, script).items() if seeds]
    if not cells:
        return ""
    ahead, pairs = sum(d > 0 for _, ds in cells for d in ds), sum(len(ds) for _, ds in cells)
    return ("GoRL minus twin, final return, mean over seed pairs (pairs GoRL is ahead in): "
            + "; ".join(f"{name} {np.mean(ds):+.1f} ({sum(d > 0 for d in ds)}/{len(ds)})" for name, ds in cells)
            + f". GoRL ahead in {ahead} of {pairs} pairs.")


def protocol_status(runs: dict) -> str:
    """How much of the protocol grid (benchmarks/run.py's defaults) has finished runs, which cells have
    none, which have fewer than the protocol's minimum seed count (run.SEEDS, 3), and which
    hopper-stand cells have not yet reached its extra seeds (run.HOPPER_SEEDS, 5, "where time allows")."""
    import run  # benchmarks/run.py: the protocol's tasks and seeds are defined there once

    defaults = run.Args()
    cells, finished_runs, total_runs, missing, short, below_wanted = 0, 0, 0, [], [], []
    for script in defaults.scripts:
        for env in defaults.envs:
            for variant in defaults.variants:
                wanted = len(run.HOPPER_SEEDS if env == "hopper-stand" else run.SEEDS)
                done = sum(finished(r) for r in runs.get((script, env, variant), {}).values())
                cells += done > 0
                finished_runs += min(done, wanted)
                total_runs += wanted
                if not done:
                    missing.append(f"{script.upper()} {env} {LABEL[variant]}")
                elif done < len(run.SEEDS):
                    short.append(f"{script.upper()} {env} {LABEL[variant]} ({done})")
                elif done < wanted:
                    below_wanted.append(f"{script.upper()} {env} {LABEL[variant]} ({done})")
    n_cells = len(defaults.scripts) * len(defaults.envs) * len(defaults.variants)
    text = f"Protocol: {cells} of {n_cells} cells have a finished run; {finished_runs} of {total_runs} runs finished."
    if missing:
        text += " No finished run yet: " + ", ".join(missing) + "."
    if short:
        text += f" Fewer than {len(run.SEEDS)} seeds: " + ", ".join(short) + "."
    if below_wanted:
        text += f" hopper-stand short of its {len(run.HOPPER_SEEDS)} seeds: " + ", ".join(below_wanted) + "."
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/grid")
    parser.add_argument("--readme", default="README.md", help="file whose marked block gets the table ('' = none)")
    cli = parser.parse_args()
    runs = load(cli.out)
    if not runs:
        raise SystemExit(f"error: no per-run CSVs in {os.path.join(cli.out, 'csv')}")
    for script in ("ppo", "sac"):
        plot_curves(runs, script, os.path.join(cli.out, f"curves_{script}.png"))
    notes = plot_aggregate(runs, os.path.join(cli.out, "aggregate.png"))
    text = table(runs)
    if notes:
        text += "\n\nAggregate, IQM of final return / 1000 [95% CI]: " + "; ".join(notes) + "."
    pairs = paired_outcomes(runs)
    text += ("\n\n" + pairs if pairs else "") + "\n\n" + protocol_status(runs)
    with open(os.path.join(cli.out, "results.md"), "w") as f:
        f.write(text + "\n")
    if cli.readme:
        with open(cli.readme) as f:
            readme = f.read()
        if MARK[0] not in readme or MARK[1] not in readme:
            raise SystemExit(f"error: {cli.readme} has no {MARK[0]} ... {MARK[1]} block")
        head, rest = readme.split(MARK[0], 1)
        _, tail = rest.split(MARK[1], 1)
        with open(cli.readme, "w") as f:
            f.write(f"{head}{MARK[0]}\n{text}\n{MARK[1]}{tail}")
    print(text)


if __name__ == "__main__":
    main()
