#!/usr/bin/env python3
"""The side-by-side table of docs/experiments/ddpo-parity.md: training reward per update of a
Tiller DDPO run and of reference runs of `scripts/reference/ddpo_testbed.py` on its prompts.

    python scripts/analysis/ddpo_parity.py --tiller runs/parity-tiller \
        --reference trained=runs/parity-reference --reference lr0=runs/parity-reference-lr0

Reads each run's metrics.jsonl (rows with `reward_mean`) and prints a Markdown table, then the
mean over the first and the last five updates of each run with its standard error (over updates),
and each reference's mean paired difference from Tiller over the updates both have.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def rewards(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "reward_mean" in row:
            out[int(row["step"])] = float(row["reward_mean"])
    return out


def mean_se(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{m:.3f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.3f} ± {sd / math.sqrt(len(xs)):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiller", type=Path, required=True)
    ap.add_argument("--reference", action="append", default=[], help="NAME=run folder")
    args = ap.parse_args()
    runs = {"tiller": rewards(args.tiller)}
    for spec in args.reference:
        name, _, path = spec.partition("=")
        runs[name] = rewards(Path(path))
    updates = sorted(set().union(*runs.values()))
    names = list(runs)
    print("| update | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for u in updates:
        print(f"| {u} | " + " | ".join(f"{runs[n][u]:.3f}" if u in runs[n] else "" for n in names) + " |")
    print()
    print("| run | updates | first five | last five |")
    print("|---|---|---|---|")
    for n in names:
        xs = [runs[n][u] for u in sorted(runs[n])]
        print(f"| {n} | {len(xs)} | {mean_se(xs[:5])} | {mean_se(xs[-5:]) if len(xs) >= 10 else '-'} |")
    print()
    for n in names[1:]:
        both = [u for u in updates if u in runs[n] and u in runs["tiller"]]
        diffs = [runs[n][u] - runs["tiller"][u] for u in both]
        print(f"{n} - tiller over updates {both[0]}-{both[-1]}: {mean_se(diffs)} (mean ± se over updates)")


if __name__ == "__main__":
    main()
