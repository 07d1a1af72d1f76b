"""2-D histograms of sampled actions: GoRL next to its Gaussian twin, from a committed CSV.

    python benchmarks/multimodality.py benchmarks/results/multimodality/cheetah-run_ppo_s1.csv --dims 0 3

The CSV has the columns env_id, policy, state_step, a0, a1, ...: one row per sampled action
a = tanh(g(s, mu + sigma * xi)) of a trained policy's composite (the decoder is the identity for a
Gaussian twin) at a state its episode visited. The figure shows, per state (rows) and policy
(columns), a histogram of two action dimensions with their std in the title, and is written next to
the CSV as <csv>_dims<i><j>.png. benchmarks/results/STUDIES.md says how the committed CSVs were sampled.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def plot(cli) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isfile(cli.csv):
        fail(f"{cli.csv!r} does not exist")
    with open(cli.csv) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        fail(f"{cli.csv} holds no samples")
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    steps = list(dict.fromkeys(int(r["state_step"]) for r in rows))
    i, j = cli.dims
    act_dim = sum(k.startswith("a") and k[1:].isdigit() for k in rows[0])
    if not (0 <= i < act_dim and 0 <= j < act_dim and i != j):
        fail(f"--dims {i} {j}: need two different action dimensions in 0..{act_dim - 1}")
    fig, axes = plt.subplots(len(steps), len(policies), figsize=(3.2 * len(policies), 3.0 * len(steps)),
                             squeeze=False, sharex=True, sharey=True)
    bins = np.linspace(-1, 1, 61)
    for c, policy in enumerate(policies):
        for r, step in enumerate(steps):
            a = np.array([[float(x[f"a{i}"]), float(x[f"a{j}"])] for x in rows
                          if x["policy"] == policy and int(x["state_step"]) == step])
            ax = axes[r][c]
            ax.hist2d(a[:, 0], a[:, 1], bins=[bins, bins], cmap="viridis")
            ax.set_title(f"{policy}, state at step {step}\nstd {a[:, 0].std():.2f}, {a[:, 1].std():.2f}", fontsize=8)
            if r == len(steps) - 1:
                ax.set_xlabel(f"action dim {i}")
            if c == 0:
                ax.set_ylabel(f"action dim {j}")
    fig.suptitle(f"{rows[0]['env_id']}: {len(rows) // (len(policies) * len(steps))} sampled actions per state", fontsize=9)
    fig.tight_layout()
    out = cli.out or os.path.splitext(cli.csv)[0] + f"_dims{i}{j}.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="samples: env_id, policy, state_step, a0, a1, ...")
    parser.add_argument("--dims", type=int, nargs=2, default=[0, 1], help="the two action dimensions to draw")
    parser.add_argument("--out", default=None, help="PNG (default: next to the CSV)")
    plot(parser.parse_args())


if __name__ == "__main__":
    main()
