"""Curves and table for benchmarks/ppo_twin.sh: GoRL-PPO vs its Gaussian twin, paired seeds.

    python benchmarks/plot_ppo_twin.py [RESULTS_DIR]

Copies each finished or running run's eval.csv from RESULTS_DIR/runs/ to RESULTS_DIR/csv/
(committed), then builds everything from RESULTS_DIR/csv/ alone: curves.png, results.md, and the
table in README.md between the ppo-twin-results markers.
"""

import csv
import glob
import os
import re
import shutil
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "benchmarks", "results", "ppo_twin")
# variant key -> (label, colour, results folder); "1" and "2" are the current protocol, the others
# earlier GoRL arms kept as evidence (their README.md says what differed).
VARIANTS = {
    "1": ("Gaussian twin (K=1)", "tab:blue", RESULTS),
    "2": ("GoRL (K=2)", "tab:red", RESULTS),
    "2-refit2000": ("GoRL, earlier 2000-step refit", "tab:gray", RESULTS + "_decoder2000"),
    "2-executed": ("GoRL, earlier executed-action refit", "tab:olive", RESULTS + "_executed_targets"),
}
LABEL = {k: v[0] for k, v in VARIANTS.items()}

runs = {}  # (env, variant) -> {seed: rows}
for variant, (_, _, folder) in VARIANTS.items():
    csv_dir = os.path.join(folder, "csv")
    os.makedirs(csv_dir, exist_ok=True) if os.path.isdir(folder) else None
    for path in sorted(glob.glob(os.path.join(folder, "runs", "*", "eval.csv"))):
        m = re.match(r"(.+)__twin__K(\d+)__(\d+)__\d+$", os.path.basename(os.path.dirname(path)))
        if m and (folder != RESULTS or m.group(2) == variant):
            shutil.copy(path, os.path.join(csv_dir, f"{m.group(1)}__K{m.group(2)}__s{m.group(3)}.csv"))
    for path in sorted(glob.glob(os.path.join(csv_dir, "*.csv"))):
        env, k, seed = re.match(r"(.+)__K(\d+)__s(\d+)\.csv$", os.path.basename(path)).groups()
        if folder != RESULTS or k == variant:
            with open(path) as f:
                runs.setdefault((env, variant), {})[int(seed)] = list(csv.DictReader(f))

envs = sorted({env for env, _ in runs})
fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.8), squeeze=False)
for ax, env in zip(axes[0], envs):
    for k, (label, color, _) in VARIANTS.items():
        for seed, rows in sorted(runs.get((env, k), {}).items()):
            curve = [r for r in rows if r["tag"] in ("periodic", "final", "boundary_after")]
            ax.plot([int(r["global_step"]) for r in curve], [float(r["return_mean"]) for r in curve], color=color,
                    alpha=0.8, lw=1.2, ls="-" if k == "1" else "--", label=label if seed == min(runs[(env, k)]) else None)
            after = [r for r in rows if r["tag"] == "boundary_after"]
            ax.scatter([int(r["global_step"]) for r in after], [float(r["return_mean"]) for r in after],
                       color=color, marker="v", s=25, zorder=3)
    ax.set_title(env)
    ax.set_xlabel("env steps")
    ax.set_ylabel("deterministic eval return (10 episodes)")
    ax.grid(alpha=0.3)
for ax in axes[0]:
    ax.legend(fontsize=7)
fig.suptitle("GoRL-PPO vs its Gaussian twin, one line per seed (triangles: right after a decoder refit)", fontsize=10)
fig.tight_layout()
fig.savefig(os.path.join(RESULTS, "curves.png"), dpi=110)

lines = ["| task | variant | seeds | final return, mean ± std over seeds | per seed | boundary before → after (per seed) | env steps | wall time per run |",
         "|---|---|---|---|---|---|---|---|"]
for env in envs:
    for k in VARIANTS:
        seeds = runs.get((env, k), {})
        if not seeds and k not in ("1", "2"):
            continue
        done = {s: rows for s, rows in seeds.items() if rows and rows[-1]["tag"] == "final"}
        if not done:
            lines.append(f"| {env} | {LABEL[k]} | 0 finished | - | - | - | - | - |")
            continue
        finals = np.array([float(rows[-1]["return_mean"]) for rows in done.values()])
        per_seed = ", ".join(f"{v:.1f}" for v in finals)
        boundary = "; ".join(
            " ".join(f"{float(b['return_mean']):.0f}→{float(a['return_mean']):.0f}" for b, a in zip(
                [r for r in rows if r["tag"] == "boundary_before"], [r for r in rows if r["tag"] == "boundary_after"]))
            for rows in done.values()).strip("; ") or "-"
        steps = {int(rows[-1]["global_step"]) for rows in done.values()}
        wall = np.mean([float(rows[-1]["wall_time_s"]) for rows in done.values()])
        lines.append(f"| {env} | {LABEL[k]} | {len(done)} | {finals.mean():.1f} ± {finals.std():.1f} | {per_seed} | "
                     f"{boundary} | {', '.join(map(str, sorted(steps)))} | {wall / 60:.0f} min |")
table = "\n".join(lines)
with open(os.path.join(RESULTS, "results.md"), "w") as f:
    f.write(table + "\n")
readme = os.path.join(ROOT, "README.md")
text = open(readme).read()
start, end = "<!-- ppo-twin-results -->", "<!-- /ppo-twin-results -->"
if start in text and end in text:
    text = text[: text.index(start) + len(start)] + "\n" + table + "\n" + text[text.index(end):]
    open(readme, "w").write(text)
print(table)
