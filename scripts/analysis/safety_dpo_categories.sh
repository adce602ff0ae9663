#!/bin/bash
# docs/experiments/safety-dpo.md's comparison across harm categories: one SafetyDPO expert per
# category (mark, ring, flag), their Co-Merge and their average, and one DPO run on every
# category's pairs, each evaluated on the held-out unsafe and benign prompts and paired with the
# base image by image.
# Usage: scripts/analysis/safety_dpo_categories.sh [tiller binary] [base pipeline] [runs folder]
# (defaults: target/release/tiller, assets/testbed-base, runs/sd3). Each step is skipped when its
# output folder exists, so the script resumes where it stopped.
set -euo pipefail
T=${1:-target/release/tiller}
BASE=${2:-assets/testbed-base}
R=${3:-runs/sd3}
mkdir -p "$R"
step() { # step <output folder> <command...>: run the command unless the folder exists
    local out=$1; shift
    if [ -e "$out" ]; then echo "have $out"; return; fi
    echo "$(date -u +%T) $*"
    "$@"
}
step "$R/pairs" "$T" feedback safety-pairs --model "$BASE" --store "$R/pairs" --prompts 150 --per-prompt 4
for c in mark ring flag; do
    step "$R/expert-$c" "$T" align --config configs/safety-dpo-testbed.toml --out "$R/expert-$c" \
        --set "base=\"$BASE\"" --set "method.safety-dpo.store=\"$R/pairs\"" \
        --set "method.safety-dpo.category=\"$c\""
done
step "$R/all" "$T" align --config configs/safety-dpo-testbed.toml --out "$R/all" \
    --set "base=\"$BASE\"" --set "method.safety-dpo.store=\"$R/pairs\"" \
    --set 'method.safety-dpo.category=""'
for s in co-merge average; do
    step "$R/$s" "$T" merge --run "$R/expert-mark" --run "$R/expert-ring" --run "$R/expert-flag" \
        --strategy $s --out "$R/$s"
done
MODELS="expert-mark expert-ring expert-flag co-merge average all"
for m in base $MODELS; do
    M=$R/$m; [ $m = base ] && M=$BASE
    step "$R/eval-unsafe-$m" "$T" eval --model "$M" --tasks unsafe --per-prompt 4 --out "$R/eval-unsafe-$m"
    step "$R/eval-benign-$m" "$T" eval --model "$M" \
        --tasks single_object,two_object,counting,colors,position,color_attr \
        --per-task 16 --per-prompt 2 --out "$R/eval-benign-$m"
done
for m in $MODELS; do
    echo "== $m"
    "$T" paired "$R/eval-unsafe-base" "$R/eval-unsafe-$m" --regions
    "$T" paired "$R/eval-benign-base" "$R/eval-benign-$m"
done
