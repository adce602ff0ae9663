#!/bin/bash
# The README's "Confirmed" table: pairwise accuracy (non-tie) of each reward on the three
# held-out sets: the test split (held-out prompt types) and the two collections of fresh pairs
# of training-split prompts, runs/prefs-iid (seed 7) and runs/prefs-iid2 (seed 11), which no
# reward model trained on. Needs the stores and folders the README names.
# Usage: scripts/analysis/confirm.sh [tiller binary] (default target/release/tiller)
set -euo pipefail
T=${1:-target/release/tiller}
# A field of `reward eval`'s report.json (the printed Markdown is for people, not scripts).
field() {
    local model=$1 store=$2 key=$3 out
    out=$(mktemp -d)/eval
    "$T" reward eval --model "$model" --store $store --out "$out" >/dev/null
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); v=r
for k in sys.argv[2].split("."): v=v[k]
print("n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else v)' "$out/report.json" "$key"
    rm -rf "$(dirname "$out")"
}
acc() {
    field "$1" "$2" pairwise_accuracy
}
echo "| reward | test split: held-out types | fresh pairs, iid | fresh pairs, iid2 |"
echo "|---|---|---|---|"
for m in runs/s12/rw-pthnf-x3-17k runs/s13/rw-17k-seed10 runs/s13/rw-17k-boot runs/s13/rw-22k \
    runs/s13/rw-22k-boot runs/s13/rw-22k-pm assets/testbed-reward; do
    echo "| \`$m\` | $(acc $m "runs/prefs --split test") | $(acc $m "runs/prefs-iid --split train") | $(acc $m "runs/prefs-iid2 --split train") |"
done
