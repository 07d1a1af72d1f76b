"""Action distributions of trained policies at fixed states: GoRL next to its Gaussian twin.

    # 1. sample (needs the checkpoints; writes a small CSV that is committed)
    python benchmarks/multimodality.py sample --checkpoints RUN_A/checkpoint.pt RUN_B/checkpoint.pt \
        --labels GoRL "Gaussian twin" --out benchmarks/results/multimodality/walker-walk_sac.csv
    # 2. plot (from the CSV alone)
    python benchmarks/multimodality.py plot benchmarks/results/multimodality/walker-walk_sac.csv --dims 0 1

The states are those a deterministic episode of the first checkpoint's policy visits (env seeded
--seed) at --steps; every policy is sampled at the same raw observations. Each sample is one
stochastic action a = tanh(g(s, mu + sigma * xi)) of the composite policy (the decoder is the
identity for a Gaussian twin). The plot shows, per state (rows) and policy (columns), a 2-D
histogram of two action dimensions with their std in the title; `sample` prints the per-state std of
every dimension.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2 (as the training scripts do)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_policy(path: str, seed: int):
    """(env_id, sample, mean) of a gorl_ppo.py or gorl_sac.py checkpoint: sample(obs (B, obs_dim)) draws
    stochastic actions (generator seeded `seed`), mean(obs) is the deterministic policy."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False) if os.path.isfile(path) else None
    except Exception as err:  # a truncated or foreign file: one line, not a traceback
        fail(f"{path!r} is not readable ({type(err).__name__})")
    if not isinstance(payload, dict) or payload.get("script") not in ("gorl_ppo", "gorl_sac"):
        fail(f"{path!r} is not a gorl_ppo.py or gorl_sac.py checkpoint")
    if payload["script"] == "gorl_ppo":
        import gorl_ppo as script

        args = script.saved_args(payload)
        policy, decoder, obs_rms = script.build_from_checkpoint(payload, args, torch.device("cpu"))
        return args.env_id, script.make_act(policy, decoder, obs_rms, torch.device("cpu"), seed), \
            script.make_act(policy, decoder, obs_rms, torch.device("cpu"))
    import gorl_sac as script

    args = script.saved_args(payload)
    actor, decoder = script.build_from_checkpoint(payload, args, torch.device("cpu"))
    return args.env_id, script.make_act(actor, decoder, torch.device("cpu"), seed), \
        script.make_act(actor, decoder, torch.device("cpu"))


def sample(cli) -> None:
    if cli.labels and len(cli.labels) != len(cli.checkpoints):
        fail(f"--labels has {len(cli.labels)} names for {len(cli.checkpoints)} checkpoints")
    labels = cli.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in cli.checkpoints]
    policies = [load_policy(p, cli.seed) for p in cli.checkpoints]
    env_ids = {env_id for env_id, _, _ in policies}
    if len(env_ids) != 1:
        fail(f"the checkpoints are for different tasks: {sorted(env_ids)}")
    env_id = env_ids.pop()
    # States: one deterministic episode of the first policy.
    envs = common.make_vector_env(env_id, 1, cli.seed)
    obs, _ = envs.reset(seed=cli.seed)
    states, t = {}, 0
    while t <= max(cli.steps):
        if t in cli.steps:
            states[t] = obs[0].copy()
        obs, _, terminated, truncated, _ = envs.step(policies[0][2](obs))
        t += 1
        if terminated[0] or truncated[0]:
            break
    envs.close()
    if missing := [t for t in cli.steps if t not in states]:
        print(f"the episode ended after {t} steps: no states at steps {missing}", file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(cli.out)), exist_ok=True)
    with open(cli.out, "w", newline="") as f:
        writer = csv.writer(f)
        act_dim = None
        for label, (_, act, _) in zip(labels, policies):
            for t, s in states.items():
                a = act(np.repeat(s[None], cli.samples, axis=0))  # (samples, act_dim)
                if act_dim is None:
                    act_dim = a.shape[1]
                    writer.writerow(["env_id", "policy", "state_step", *[f"a{i}" for i in range(act_dim)]])
                writer.writerows([env_id, label, t, *np.round(row, 5)] for row in a)
                print(f"{label:>20s} state at step {t:4d}: action std per dim {[round(float(x), 3) for x in a.std(0)]}")
    print(f"wrote {cli.out}")


def plot(cli) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isfile(cli.csv):
        fail(f"{cli.csv!r} does not exist (write it with 'sample')")
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
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="sample actions of trained policies at fixed states into a CSV")
    s.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint.pt files, same task")
    s.add_argument("--labels", nargs="+", default=None, help="one name per checkpoint (default: run folder)")
    s.add_argument("--steps", type=int, nargs="+", default=[0, 100, 300, 600], help="episode steps of the states")
    s.add_argument("--samples", type=int, default=1000, help="actions per state and policy")
    s.add_argument("--seed", type=int, default=10_000, help="env seed of the episode and the sampling seed")
    s.add_argument("--out", required=True, help="CSV to write")
    p = sub.add_parser("plot", help="draw the CSV written by 'sample'")
    p.add_argument("csv")
    p.add_argument("--dims", type=int, nargs=2, default=[0, 1], help="the two action dimensions to draw")
    p.add_argument("--out", default=None, help="PNG (default: next to the CSV)")
    cli = parser.parse_args()
    sample(cli) if cli.command == "sample" else plot(cli)


if __name__ == "__main__":
    main()
