#!/usr/bin/env python3
"""Summarise `tiller compare` runs of the few-step methods over seeds
(docs/experiments/few-step-methods.md): each method's final gain in held-out gold accuracy,
per seed and as the mean over seeds with its standard error (the seeds' spread), and the final
gold reward.

    python scripts/analysis/few_step_seeds.py runs/compare-fewstep-s1 runs/compare-fewstep-s2 runs/compare-fewstep-s3
"""

import json
import math
import sys


def main(folders):
    rows = {}
    for folder in folders:
        with open(f"{folder}/compare.json") as f:
            data = json.load(f)
        for m in data["methods"]:
            first, last = m["points"][0], m["points"][-1]
            rows.setdefault(m["name"], []).append(
                (first["gold_accuracy"], last["gold_accuracy"], last["gain"], last["gain_se"],
                 first["gold_reward"], last["gold_reward"])
            )
    print("| method | " + " | ".join(f"seed {i + 1}: before -> after (gain ± SE)" for i in range(len(folders)))
          + " | mean gain ± SE over seeds | gold reward, mean before -> after |")
    print("|---|" + "---|" * (len(folders) + 2))
    for name, runs in rows.items():
        cells = [f"{b:.3f} -> {a:.3f} ({g:+.3f} ± {se:.3f})" for b, a, g, se, _, _ in runs]
        gains = [g for _, _, g, _, _, _ in runs]
        n = len(gains)
        mean = sum(gains) / n
        sd = math.sqrt(sum((g - mean) ** 2 for g in gains) / (n - 1)) if n > 1 else float("nan")
        r0 = sum(r[4] for r in runs) / n
        r1 = sum(r[5] for r in runs) / n
        print(f"| {name} | " + " | ".join(cells) + f" | {mean:+.3f} ± {sd / math.sqrt(n):.3f} | {r0:.3f} -> {r1:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
