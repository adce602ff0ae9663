#!/usr/bin/env python3
"""docs/experiments/ddpo-parity.md section 4: per seed, the mean over updates 2-6 of (trained - lr-0)
training reward for Tiller and for the reference (same prompts and noise within each), then the
mean and its standard error over seeds. Run in the folder scripts/analysis/ddpo_parity_seeds.sh
wrote: `python3 scripts/analysis/ddpo_parity_seeds.py [seeds...]` (default 1 2 3). Stdlib only.
"""
import json, math, sys
from pathlib import Path
def rewards(run):
    out = {}
    for line in (Path(run) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "reward_mean" in row:
            out[int(row["step"])] = float(row["reward_mean"])
    return out
def mse(xs):
    m = sum(xs) / len(xs)
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else float("nan")
    return m, se
seeds = [int(s) for s in sys.argv[1:]] or [1, 2, 3]
rows = {}
for impl, trained, base in [("tiller", "tiller-s{}-lr1e-4", "tiller-s{}-lr1e-12"), ("reference", "ref-s{}-lr1e-4", "ref-s{}-lr0")]:
    diffs = []
    for s in seeds:
        t, b = rewards(trained.format(s)), rewards(base.format(s))
        steps = [k for k in sorted(t) if k in b and k >= 2]
        d = [t[k] - b[k] for k in steps]
        diffs.append(sum(d) / len(d))
        print(f"{impl} seed {s}: trained - lr0 over updates {steps[0]}-{steps[-1]}: {diffs[-1]:+.3f}  (trained {[round(t[k],3) for k in sorted(t)]}, lr0 {[round(b[k],3) for k in sorted(b)]})")
    m, se = mse(diffs)
    rows[impl] = diffs
    print(f"{impl}: mean over {len(seeds)} seeds {m:+.3f} ± {se:.3f}")
d = [a - b for a, b in zip(rows["tiller"], rows["reference"])]
m, se = mse(d)
print(f"tiller - reference (per seed, then mean): {m:+.3f} ± {se:.3f}")
