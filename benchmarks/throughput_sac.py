"""What one GoRL-SAC gradient update costs on this CPU, and what each speed measure buys.

Times one update (critic step, every other step an actor + alpha step, Polyak averaging) at
walker-walk sizes (obs 24, action 6), batch 256, 256x256 networks, before the first refit
(decoder = identity, skipped) and after it (10-step flow decoder in the target and actor passes).
Variants switch one measure off at a time, so each row says what that measure is worth:

    python benchmarks/throughput_sac.py [--updates 50 --rounds 7] [--compile] [--out benchmarks/results/throughput_sac.csv]

Whole-run env steps/s come from the learning runs' logs (benchmarks/sac_runs.sh), not from here.
"""

import argparse
import copy
import csv
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gorl_sac as G  # noqa: E402

OBS, ACT = 24, 6
HIDDEN, BATCH = G.Args.hidden, G.Args.batch_size  # the script's defaults; --hidden / --batch-size change them


class SeparateTwinQ(nn.Module):
    """Two independent critics evaluated one after the other (the usual way), for comparison."""

    def __init__(self):
        super().__init__()
        self.q = nn.ModuleList(nn.Sequential(nn.Linear(OBS + ACT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN),
                                             nn.ReLU(), nn.Linear(HIDDEN, 1)) for _ in range(2))

    def forward(self, obs, action):
        x = torch.cat([obs, action], -1)
        return torch.stack([q(x).squeeze(-1) for q in self.q])


def actor_update_with_critic_grads(batch, actor, decoder, qf, actor_optimizer, alpha, kl_coef):
    """The actor update without the requires_grad switch: backward also computes critic weight grads."""
    a_pi, _, logp, mu, sigma = G.sample_action(actor, decoder, batch["obs"])
    q_pi = qf(batch["obs"], a_pi).min(0).values
    loss = (alpha * logp - q_pi + kl_coef * G.kl_to_prior(mu, sigma)).mean()
    actor_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    actor_optimizer.step()
    qf.zero_grad(set_to_none=True)
    return loss, None, a_pi.detach(), logp.detach(), mu.detach(), sigma.detach()


def make_update(flow, threads=1, separate=False, fused_polyak=True, skip_critic_grads=True, compile_=False):
    """Build one variant's networks and return a function doing its i-th update."""
    torch.manual_seed(0)
    actor = G.LatentActor(OBS, ACT, HIDDEN, 2)
    qf = SeparateTwinQ() if separate else G.TwinQ(OBS, ACT, HIDDEN, 2)
    qf_target = copy.deepcopy(qf).requires_grad_(False)
    decoder = G.FlowDecoder(OBS, ACT, 64, 4, 10)
    if flow:
        for p in decoder.parameters():
            nn.init.normal_(p, std=0.1)
        decoder.is_identity.fill_(False)
    decoder.requires_grad_(False)
    if compile_:
        actor, qf, qf_target = torch.compile(actor), torch.compile(qf), torch.compile(qf_target)
        decoder.integrate = torch.compile(decoder.integrate)
    a_opt, q_opt = torch.optim.Adam(actor.parameters(), 3e-4), torch.optim.Adam(qf.parameters(), 1e-3)
    rng = np.random.default_rng(0)
    buffer = G.ReplayBuffer(100_000, OBS, ACT)
    m = 50_000
    buffer.add(obs=rng.normal(size=(m, OBS)), next_obs=rng.normal(size=(m, OBS)), action=rng.uniform(-1, 1, (m, ACT)),
               u=rng.normal(size=(m, ACT)), reward=rng.uniform(size=m), terminated=np.zeros(m), truncated=np.zeros(m))
    actor_update = G.actor_update if skip_critic_grads else actor_update_with_critic_grads
    targets, sources = list(qf_target.parameters()), list(qf.parameters())

    def one(i):
        torch.set_num_threads(threads)
        batch = buffer.sample(BATCH, rng, "cpu")
        G.critic_update(batch, actor, decoder, qf, qf_target, q_opt, 0.1, 0.99)
        if i % 2 == 0:
            actor_update(batch, actor, decoder, qf, a_opt, 0.1, 1e-3)
        with torch.no_grad():
            if fused_polyak:
                torch._foreach_lerp_(targets, sources, 0.005)
            else:
                for t, s in zip(targets, sources):
                    t.data.mul_(0.995).add_(0.005 * s.data)

    for i in range(60 if compile_ else 20):  # warm-up (and compilation)
        one(i)
    return one


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=50, help="updates per variant and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--hidden", type=int, default=G.Args.hidden, help="width of actor and critic MLPs")
    parser.add_argument("--batch-size", type=int, default=G.Args.batch_size, help="transitions per update")
    parser.add_argument("--default-only", action="store_true", help="time only the script's default variant")
    parser.add_argument("--out", default="benchmarks/results/throughput_sac.csv")
    cli = parser.parse_args()
    global HIDDEN, BATCH
    HIDDEN, BATCH = cli.hidden, cli.batch_size
    variants = [
        ("all measures (script default)", {}),
        ("2 torch threads", {"threads": 2}),
        ("two separate critics", {"separate": True}),
        ("per-parameter Polyak loop", {"fused_polyak": False}),
        ("critic weight grads in actor update", {"skip_critic_grads": False}),
    ]
    if cli.default_only:
        variants = variants[:1]
    if cli.compile:
        variants.append(("torch.compile of actor, critics, decoder", {"compile_": True}))
    # Variants are timed in interleaved rounds and the median kept, so that a neighbour process
    # taking the second core slows every variant alike instead of whichever ran at that moment.
    rows = []
    for flow in (False, True):
        updates = {name: make_update(flow, **kwargs) for name, kwargs in variants}
        times = {name: [] for name in updates}
        for _ in range(cli.rounds):
            for name, one in updates.items():
                start = time.perf_counter()
                for i in range(cli.updates):
                    one(i)
                times[name].append((time.perf_counter() - start) / cli.updates * 1e3)
        for name in updates:
            ms = float(np.median(times[name]))
            rows.append({"decoder": "flow (after a refit)" if flow else "identity (stage 0)", "variant": name,
                         "ms_per_update": round(ms, 2), "updates_per_s": round(1e3 / ms, 1),
                         "hidden": HIDDEN, "batch_size": BATCH, "rounds": cli.rounds,
                         "updates_per_round": cli.updates})
            print(rows[-1], flush=True)
    os.makedirs(os.path.dirname(cli.out), exist_ok=True)
    with open(cli.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
