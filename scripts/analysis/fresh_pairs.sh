#!/bin/bash
# The README's "Held-out pairs, held-out prompt types" table: each reward's pairwise accuracy on
# the test split (held-out prompt types), on fresh pairs of training-split prompts
# (runs/prefs-iid), on those of them whose prompt runs/prefs-s12c (the largest training store) never held, and on
# its own training store's images (in sample). Needs the stores and folders the README names.
# Usage: scripts/analysis/fresh_pairs.sh [tiller binary] (default target/release/tiller)
set -euo pipefail
T=${1:-target/release/tiller}
source "$(dirname "$0")/lib.sh"
acc() {
    field "$1" "$2" pairwise_accuracy
}
row() {
    local own=""
    if [ -n "${2:-}" ]; then own=$(acc "$1" "$2 --split train"); fi
    echo "| \`$1\` | $(acc "$1" "runs/prefs --split test") | $(acc "$1" "runs/prefs-iid --split train") | $(acc "$1" "runs/prefs-iid --split train --unseen-in runs/prefs-s12c") | $own |"
}
echo "| reward | test split: held-out types | fresh pairs | fresh, prompts never labelled | its training images |"
echo "|---|---|---|---|---|"
row assets/testbed-reward runs/prefs
row runs/s11/rw-pthn-x3 runs/prefs
row runs/s11/rw-pthnf-x3 runs/prefs
row runs/s11/rw-pthnf8-x3 runs/prefs
row runs/s12/rw-pthnf-x3-fi runs/prefs
row runs/s12/rw-pthnf-x3-shift runs/prefs
row runs/s12/rw-pthnf-x3-9k runs/prefs-s12
row runs/s12/rw-pthnf-x3-12k runs/prefs-s12b
row runs/s12/rw-pthnf8-x3-12k runs/prefs-s12b
row runs/s12/rw-pthnf-x3-17k runs/prefs-s12c
row runs/s12/fuse-3ens
row runs/s12/fuse-pthnf
row runs/s12/fuse-9k
row runs/s12/fuse-12k
row runs/s12/fuse-2ens-12k
