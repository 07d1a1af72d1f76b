"""Env steps/s of the real gorl_sac.py loop after a refit (10-step decoder in the loop), for a few
settings that a checkpoint can change: the update-to-data ratio and the split-layer decode.

    python benchmarks/flow_stage_rate_sac.py RUN_DIR --seconds 100 --configs plain05:0.5:0 split05:0.5:1 split025:0.25:1

RUN_DIR is a gorl_sac.py run directory whose checkpoint is in a later stage (after a refit). For
each config NAME:RATIO:SPLIT the run is copied to /tmp, its saved arguments changed, resumed with
--resume, and stopped by SIGTERM after --seconds; the rate counts env steps from the 'resuming'
line to the stop (loading the buffer is not counted; evaluations that fall in the window are).
Rows are appended to --out. Network widths cannot change this way: they are the checkpoint's.
"""

import argparse
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--seconds", type=float, default=100.0, help="how long each config runs after resuming")
    parser.add_argument("--configs", nargs="+", default=["plain05:0.5:0", "split05:0.5:1", "split025:0.25:1"],
                        help="NAME:UPDATES_PER_STEP:SPLIT (SPLIT 1 or 0: --decoder-split-first-layer)")
    parser.add_argument("--out", default="benchmarks/results/flow_stage_rate_sac.csv")
    cli = parser.parse_args()
    ckpt_path = os.path.join(cli.run_dir, "checkpoint.pt")
    if not os.path.isfile(ckpt_path):
        sys.exit(f"error: no checkpoint.pt in {cli.run_dir!r}")
    rows = []
    for config in cli.configs:
        try:
            name, ratio, split = config.split(":")
            ratio, split = float(ratio), {"1": True, "0": False}[split]
        except (ValueError, KeyError):
            sys.exit(f"error: --configs {config!r} is not NAME:UPDATES_PER_STEP:SPLIT with SPLIT 0 or 1")
        work = os.path.join(tempfile.mkdtemp(prefix="flow_rate_"), name)
        shutil.copytree(cli.run_dir, work)
        ckpt = torch.load(os.path.join(work, "checkpoint.pt"), weights_only=False)
        if ckpt["loop"]["stage"] == 0:
            sys.exit(f"error: {ckpt_path} is in stage 0 (decoder = identity); this measures the stages after a refit")
        ckpt["args"].update(updates_per_step=ratio, decoder_split_first_layer=split)
        torch.save(ckpt, os.path.join(work, "checkpoint.pt"))
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "gorl_sac.py"), "--resume", work],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, GORL_NO_PROGRESS="1", PYTHONUNBUFFERED="1"))
        start = None  # the child is unbuffered: a block-buffered 'resuming' line would arrive late and skew t0
        for line in proc.stdout:
            if m := re.search(r"resuming .* at env step (\d+)", line):
                start, t0 = int(m.group(1)), time.time()
                break
        time.sleep(cli.seconds)
        proc.send_signal(signal.SIGTERM)
        t1 = time.time()
        tail = proc.stdout.read()
        proc.wait()
        stop = re.search(r"interrupted by SIGTERM at env step (\d+)", tail)
        if start is None or stop is None:
            sys.exit(f"error: config {name}: the resumed run did not start or stop as expected:\n{tail[-2000:]}")
        steps = int(stop.group(1)) - start
        rows.append({"config": name, "updates_per_step": ratio, "split_first_layer": split,
                     "hidden": ckpt["args"]["hidden"], "env_id": ckpt["args"]["env_id"], "from_step": start,
                     "env_steps": steps, "seconds": round(t1 - t0, 1), "steps_per_s": round(steps / (t1 - t0), 1)})
        print(rows[-1], flush=True)
        shutil.rmtree(os.path.dirname(work), ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(cli.out)), exist_ok=True)
    new = not os.path.exists(cli.out)
    with open(cli.out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
