#!/bin/bash
# The README's "Confirmed" table: pairwise accuracy (non-tie) of each reward on the three
# held-out sets: the test split (held-out prompt types) and the two collections of fresh pairs
# of training-split prompts, runs/prefs-iid (seed 7) and runs/prefs-iid2 (seed 11), which no
# reward model trained on. Needs the stores and folders the README names.
# Usage: scripts/analysis/confirm.sh [tiller binary] (default target/release/tiller)
set -euo pipefail
T=${1:-target/release/tiller}
source "$(dirname "$0")/lib.sh"
acc() {
    field "$1" "$2" pairwise_accuracy
}
echo "| reward | test split: held-out types | fresh pairs, iid | fresh pairs, iid2 |"
echo "|---|---|---|---|"
for m in runs/s12/rw-pthnf-x3-17k runs/s13/rw-17k-seed10 runs/s13/rw-17k-boot runs/s13/rw-22k \
    runs/s13/rw-22k-boot runs/s13/rw-22k-pm assets/testbed-reward; do
    echo "| \`$m\` | $(acc $m "runs/prefs --split test") | $(acc $m "runs/prefs-iid --split train") | $(acc $m "runs/prefs-iid2 --split train") |"
done
