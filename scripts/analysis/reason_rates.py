#!/usr/bin/env python3
"""How often the simulated annotators' reasons name each factor, per split, in a preference store.

    python3 scripts/analysis/reason_rates.py runs/prefs [train|test]

Reads `<store>/preferences.sqlite` (stdlib only) and prints, for the split's reason records, the
fraction that name each factor (README, "Where it fails").
"""
import collections
import json
import sqlite3
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    store = Path(sys.argv[1]) / "preferences.sqlite"
    split = sys.argv[2] if len(sys.argv) == 3 else "train"
    if not store.is_file():
        sys.exit(f"{store}: no such store")
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    splits = dict(db.execute("select id, split from prompts"))
    counts, n = collections.Counter(), 0
    for prompt, body in db.execute("select prompt, body from feedback where kind = 'reason'"):
        if splits.get(prompt) != split:
            continue
        n += 1
        counts.update(json.loads(body)["factors"])
    if n == 0:
        sys.exit(f"{store}: no reasons on the {split} split")
    print(f"{n} reasons on the {split} split")
    for factor, c in counts.most_common():
        print(f"{factor:18} {c / n:.3f}")


if __name__ == "__main__":
    main()
