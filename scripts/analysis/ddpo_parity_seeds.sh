#!/bin/bash
# docs/experiments/ddpo-parity.md section 4: DDPO in Tiller and in the reference (scripts/reference/
# ddpo_testbed.py on the Tiller run's prompts), trained (lr 1e-4) and lr-0 controls with the same
# noise, 6 updates each, seeds 1-3; then scripts/analysis/ddpo_parity_seeds.py in the same folder.
# Usage: scripts/analysis/ddpo_parity_seeds.sh [out folder] (TILLER=<binary>, default
# target/release/tiller); about 35 min on 2 cores.
set -u
T=${TILLER:-target/release/tiller}
R=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-runs/parity-seeds}; mkdir -p "$OUT"; cd "$OUT"; case $T in /*) ;; *) T=$R/$T;; esac
common=(--config $R/configs/ddpo-testbed.toml --set reward=gold --set adapter.kind=full
  --set train.batch_size=64 --set train.images_per_prompt=4 --set sampling.guidance=1
  --set sampling.eta=1 --set sampling.steps=20 --set method.ddpo.timestep_fraction=1
  --set method.ddpo.stat_min_count=4 --set train.updates=6
  --set 'prompts.tasks=["single_object","two_object","counting","colors"]'
  --set log.val_every=0 --set prompts.val_per_task=1 --set log.checkpoint_every=6)
for s in 1 2 3; do
  for lr in 1e-4 1e-12; do
    tag=tiller-s$s-lr$lr
    [ -e $tag/metrics.jsonl ] || { /usr/bin/time -f "$tag %e s" $T align "${common[@]}" --set train.learning_rate=$lr --seed $s --out $tag > $tag.log 2>&1; tail -1 $tag.log; }
  done
  for lr in 1e-4 0; do
    tag=ref-s$s-lr$lr
    [ -e $tag/metrics.jsonl ] || { /usr/bin/time -f "$tag %e s" python3 $R/scripts/reference/ddpo_testbed.py --base $R/assets/testbed-base --rollouts tiller-s$s-lr1e-4/rollouts.jsonl --updates 6 --tiller $T --out $tag --threads 2 --lr $lr --seed $s > $tag.log 2>&1; tail -1 $tag.log; }
  done
done
echo done
