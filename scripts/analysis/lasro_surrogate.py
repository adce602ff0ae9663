#!/usr/bin/env python3
"""LaSRO's surrogate agreement per query round of a run (docs/experiments/few-step-methods.md):
the fraction of the round's new within-prompt pairs, ranked by the true reward, that the surrogate
ranks the same way before it adapts to them (held out) and after; mean ± standard error over the
rounds.

    python scripts/analysis/lasro_surrogate.py runs/compare-fewstep-s1/lasro/metrics.jsonl ...
"""

import json
import math
import sys

for path in sys.argv[1:]:
    rounds = {}
    with open(path) as f:
        for line in f:
            v = json.loads(line)
            if "loss" in v and "surrogate_acc_before" in v:
                # Every update of a round logs the round's adaptation; one row per round.
                rounds[v["reward_queries"]] = (v["surrogate_acc_before"], v["surrogate_acc_after"])
    before = [b for b, _ in rounds.values()]
    after = [a for _, a in rounds.values()]
    n = len(before)
    mean = sum(before) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in before) / (n - 1) / n)
    print(f"{path}: {n} rounds, before {mean:.3f} ± {se:.3f}, after {sum(after) / n:.3f}")
