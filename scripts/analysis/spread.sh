#!/bin/bash
# The README's ensemble-spread table (the issue's "uncertainty higher on held-out prompt types than
# on training ones"): each ensemble's mean member std on the test split's held-out-combination
# images, on the test split's other images (training prompt types, unseen prompts), and on the
# two fresh training-distribution collections (runs/prefs-iid, runs/prefs-iid2).
# Usage: scripts/analysis/spread.sh [tiller binary] (default target/release/tiller)
set -euo pipefail
T=${1:-target/release/tiller}
source "$(dirname "$0")/lib.sh"
DIGITS=4
row() {
    echo "| \`$1\` | $(field "$1" "runs/prefs --split test" mean_uncertainty_held_out_types) | $(field "$1" "runs/prefs --split test" mean_uncertainty_training_types) | $(field "$1" "runs/prefs-iid --split train" mean_uncertainty_training_types) | $(field "$1" "runs/prefs-iid2 --split train" mean_uncertainty_training_types) |"
}
echo "| ensemble | test split: held-out types | test split: training types | fresh pairs (iid) | fresh pairs (iid2) |"
echo "|---|---|---|---|---|"
row assets/testbed-reward
row runs/s11/rw-pthnf-x3
row runs/s12/rw-pthnf-x3-12k
row runs/s12/rw-pthnf-x3-17k
row runs/s13/rw-17k-seed10
row runs/s13/rw-17k-boot
row runs/s13/rw-22k
row runs/s13/rw-22k-boot
row runs/s13/rw-22k-pm
