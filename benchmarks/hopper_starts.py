"""hopper-stand's evaluation episodes by how they start: final return per class of start, for eval.csv files.

The ten evaluation episodes (eval seeds 10000-10009, envpool) start with the torso at three kinds of angle
(rooty, the second entry of the `position` observation): near -1 rad (episodes 0, 8, 9: class A), near
+2.5 rad, close to upside down (episodes 1-4, 6, 7: class B), or near upright (episode 5). A run can learn
to stand from one class and never from the other, which the mean over ten episodes hides.

    python benchmarks/hopper_starts.py benchmarks/results/*/csv/*hopper-stand*.csv --out FILE.csv
"""

import argparse
import csv
import os

CLASSES = {"A": (0, 8, 9), "B": (1, 2, 3, 4, 6, 7), "upright": (5,)}


def start_angles(seed: int = 10_000, n: int = 10) -> list:
    import envpool  # only for the class check; reading CSVs needs nothing but the standard library

    env = envpool.make_dm("HopperStand-v1", num_envs=n, seed=seed)
    return [round(float(a), 2) for a in env.reset().observation.position[:, 1]]


def first_step_above(rows: list, idx: tuple, level: float):
    for r in rows:
        e = [float(x) for x in r["episode_returns"].split()]
        if sum(e[i] for i in idx) / len(idx) > level:
            return int(r["global_step"])
    return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csvs", nargs="+")
    p.add_argument("--out", default=None, help="also write the table to this CSV")
    p.add_argument("--angles", action="store_true", help="print each eval episode's initial torso angle (envpool)")
    a = p.parse_args()
    missing = [path for path in a.csvs if not os.path.isfile(path)]
    if missing:
        p.error(f"no such file: {missing[0]} (give eval.csv files of hopper-stand runs)")
    if a.angles:
        print("initial torso angle (rad) of eval episodes 0-9:", start_angles())
    head = ["file", "global_step", "final", "class_A", "class_B", "upright", "A_above_300_at", "B_above_300_at"]
    table = []
    for path in a.csvs:
        rows = [r for r in csv.DictReader(open(path)) if len(r.get("episode_returns", "").split()) == 10]
        if not rows:
            continue
        e = [float(x) for x in rows[-1]["episode_returns"].split()]
        means = [sum(e[i] for i in idx) / len(idx) for idx in CLASSES.values()]
        table.append([path, rows[-1]["global_step"], rows[-1]["return_mean"], *[f"{m:.1f}" for m in means],
                      first_step_above(rows, CLASSES["A"], 300), first_step_above(rows, CLASSES["B"], 300)])
    for row in table:
        print(" ".join(str(x) for x in row))
    if a.out:
        with open(a.out, "w", newline="") as f:
            csv.writer(f).writerows([head] + table)


if __name__ == "__main__":
    main()
