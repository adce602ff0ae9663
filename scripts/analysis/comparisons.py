#!/usr/bin/env python3
"""Analyses of the comparisons.jsonl that `tiller reward eval --out <folder>` writes (one JSON line per
comparison).

    python3 scripts/analysis/comparisons.py gap  <comparisons.jsonl>
    python3 scripts/analysis/comparisons.py fuse <reward.jsonl> <caption-match.jsonl>

`gap`: non-tie pairwise accuracy of the reward, the caption match, the median annotator's utility
and the gold reward, binned by how far apart the two images' median utilities are (README,
"Where the gap is").

`fuse`: the reward of the first file plus the caption match of the second, each standardised over
the file's images and added with equal weights (nothing fitted to the labels), against each alone.
Both files must come from the same store and split (the comparisons are matched line by line).
Stdlib only.
"""
import json
import statistics
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def accuracy(rows, key):
    """Non-tie pairwise accuracy, a score tie counting half (as `tiller reward eval`)."""
    n = right = 0
    for r in rows:
        if r["target"] == 0.5:
            continue
        n += 1
        a, b = key(r["a"]), key(r["b"])
        right += 0.5 if a == b else float((a > b) == (r["target"] > 0.5))
    return right / n if n else float("nan")


def standardised(rows, field):
    values = [r[side][field] for r in rows for side in "ab"]
    mean, sd = statistics.mean(values), statistics.pstdev(values) or 1.0
    return lambda side: (side[field] - mean) / sd


def gap(path):
    rows = load(path)
    edges = [0, 0.01, 0.03, 0.06, 0.1, 0.2, 1.01]
    print("| utility difference | comparisons (non-tie) | reward | caption match | median utility | gold reward |")
    print("|---|---|---|---|---|---|")
    for lo, hi in zip(edges, edges[1:]):
        sel = [r for r in rows if r["target"] != 0.5 and lo <= abs(r["a"]["utility"] - r["b"]["utility"]) < hi]
        if not sel:
            continue
        cells = [f"{accuracy(sel, lambda s, k=k: s[k]):.3f}" for k in ("reward", "caption_match", "utility", "gold")]
        print(f"| {lo}-{min(hi, 1)} | {len(sel)} | " + " | ".join(cells) + " |")


def fuse(reward_path, match_path):
    rewards, matches = load(reward_path), load(match_path)
    if len(rewards) != len(matches):
        sys.exit(f"{reward_path} has {len(rewards)} comparisons, {match_path} {len(matches)}")
    zr, zc = standardised(rewards, "reward"), standardised(matches, "caption_match")
    fused = []
    for i, (x, y) in enumerate(zip(rewards, matches)):
        if x["prompt"] != y["prompt"] or x["target"] != y["target"]:
            sys.exit(f"comparison {i + 1} differs between the files: not the same store and split")
        fused.append({"target": x["target"], "a": zr(x["a"]) + zc(y["a"]), "b": zr(x["b"]) + zc(y["b"])})
    print(f"reward of {reward_path}: {accuracy(rewards, lambda s: s['reward']):.3f}")
    print(f"caption match of {match_path}: {accuracy(matches, lambda s: s['caption_match']):.3f}")
    print(f"the two standardised and added: {accuracy(fused, lambda s: s):.3f}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "gap":
        gap(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "fuse":
        fuse(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
