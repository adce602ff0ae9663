#!/usr/bin/env bash
# The exact commands that produced the shipped testbed assets (assets/testbed-base,
# assets/testbed-reward, assets/testbed-reward-17k, assets/testbed-fewstep-{4,2}) and the README's tables. Each step is a plain `tiller` command; run from
# the repository root with a release build. Times are on 2 CPU cores.
set -euo pipefail
T=${TILLER:-target/release/tiller}
RUN=${RUN:-runs/testbed-base}
STEP=${STEP:-20000}   # the checkpoint step that was shipped

# 1. The base model: train (stopped and resumed freely with --resume latest), then export the EMA
#    weights of checkpoint $STEP as a diffusers-layout pipeline.
[ -d "$RUN" ] || $T base train --config configs/testbed-base.toml --out "$RUN"
$T base export --run "$RUN" --checkpoint "$RUN/checkpoints/step-$(printf %08d "$STEP")" --out assets/testbed-base

# 1b. The base grown to three harm categories (the mark, the ring, the flag): the asset above
#     fine-tuned on the grown world in three stages, then shipped in its place (docs/experiments/base-model.md,
#     "The base with three harm categories"). The tables of step 2 and after were measured on
#     the first asset, at their commits.
if [ "${GROWN:-1}" = 1 ]; then
  [ -d runs/testbed-base-v1 ] || cp -r assets/testbed-base runs/testbed-base-v1
  [ -d runs/base-categories ] || $T base train --config configs/testbed-base-categories.toml --out runs/base-categories \
    --set init=\"runs/testbed-base-v1\"
  [ -d runs/base-categories-2 ] || $T base train --config configs/testbed-base-categories.toml --out runs/base-categories-2 \
    --set init=\"runs/base-categories/pipeline\" --set data.task_weights.unsafe=4.0 \
    --set train.steps=1800 --set train.learning_rate=2e-4
  [ -d runs/base-categories-3 ] || $T base train --config configs/testbed-base-categories.toml --out runs/base-categories-3 \
    --set init=\"runs/base-categories-2/pipeline\" --set data.task_weights.unsafe=6 \
    --set train.steps=2400 --set train.learning_rate=2e-4
  rm -rf assets/testbed-base && cp -r runs/base-categories-3/pipeline assets/testbed-base
  $T eval --out runs/eval-base-categories-3
fi

# 2. Its evaluation table: ancestral sampling with the step count chosen on training prompts
#    (the README has why), then the whole held-out suite.
for n in 10 20 30 50; do
  $T eval --suite testbed-train --per-task 16 --per-prompt 2 --scheduler ddpm --steps $n --out runs/sweep-train/steps-$n
done
$T eval --model assets/testbed-base --scheduler ddpm --steps 30 --out runs/eval-base

# 3. Simulated feedback on its samples, the reward ensemble, and their evaluations.
$T feedback collect --model assets/testbed-base --store runs/prefs --prompts 300 --steps 25 --scheduler ddpm
$T feedback collect --model assets/testbed-base --store runs/prefs --prompts 600 --seed 2 --steps 25 --scheduler ddpm
$T feedback collect --model assets/testbed-base --store runs/prefs --split test --prompts 50 --seed 1 --steps 25 --scheduler ddpm
# 150 more held-out prompts (900 comparisons), so that reward variants can be told apart
# (README: "A four times larger held-out set").
$T feedback collect --model assets/testbed-base --store runs/prefs --split test --prompts 150 --seed 3 --steps 25 --scheduler ddpm --agreement-pairs 600
$T reward train --config configs/reward-testbed.toml --store runs/prefs --out assets/testbed-reward
$T reward eval --model assets/testbed-reward --store runs/prefs --out runs/reward-eval
$T eval --model assets/testbed-base --per-task 8 --per-prompt 1 --steps 25 --scheduler ddpm \
  --best-of 8 --reward assets/testbed-reward --out runs/eval-best-of-8

# 3b. The larger reward (README: "Held-out pairs, held-out prompt types"): towers pretrained on
#     flaw-heavy drawings, three more training collections appended to copies of the store
#     (17 400 comparisons in runs/prefs-s12c), 3 members without the bootstrap; and the fresh
#     training-distribution pairs it is measured on (runs/prefs-iid, never trained on). The
#     shipped folder's train.toml names the towers' session path, runs/s11/pt-mean-hn-flaws-3000.
$T reward pretrain --config configs/reward-testbed.toml --out runs/s11/pt-mean-hn-flaws-3000 \
  --set net.text_pool=mean --set pretrain.hard_negatives=true \
  --set pretrain.render.soft_edge_rate=0.5 --set pretrain.render.speckle_rate=0.5
$T feedback collect --model assets/testbed-base --store runs/prefs-iid --split train --prompts 400 --seed 7 --steps 25 --scheduler ddpm --agreement-pairs 600
cp -r runs/prefs runs/prefs-s12
$T feedback collect --model assets/testbed-base --store runs/prefs-s12 --prompts 600 --seed 8 --steps 25 --scheduler ddpm
cp -r runs/prefs-s12 runs/prefs-s12b
$T feedback collect --model assets/testbed-base --store runs/prefs-s12b --prompts 600 --seed 9 --steps 25 --scheduler ddpm
cp -r runs/prefs-s12b runs/prefs-s12c
$T feedback collect --model assets/testbed-base --store runs/prefs-s12c --prompts 800 --seed 10 --steps 25 --scheduler ddpm
$T reward train --config configs/reward-testbed.toml --store runs/prefs-s12c --out assets/testbed-reward-17k \
  --set members=3 --set init=runs/s11/pt-mean-hn-flaws-3000 --set net.text_pool=mean \
  --set train.bootstrap=false --set train.factor_loss_weight=3
$T reward eval --model assets/testbed-reward-17k --store runs/prefs
$T reward eval --model assets/testbed-reward-17k --store runs/prefs-iid --split train --unseen-in runs/prefs-s12c
#     Its confirmation (README: "Confirmed"): a second collection of fresh pairs, a second
#     training seed, and the 22 200-comparison store the later rows of the table train on.
$T feedback collect --model assets/testbed-base --store runs/prefs-iid2 --split train --prompts 400 --seed 11 --steps 25 --scheduler ddpm --agreement-pairs 600
$T reward eval --model assets/testbed-reward-17k --store runs/prefs-iid2 --split train
$T reward train --config configs/reward-testbed.toml --store runs/prefs-s12c --out runs/s13/rw-17k-seed10 \
  --set members=3 --set init=runs/s11/pt-mean-hn-flaws-3000 --set net.text_pool=mean \
  --set train.bootstrap=false --set train.factor_loss_weight=3 --set train.seed=10
cp -r runs/prefs-s12c runs/prefs-s13
$T feedback collect --model assets/testbed-base --store runs/prefs-s13 --prompts 800 --seed 12 --steps 25 --scheduler ddpm
#     The table's other rows: the bootstrap at 17 400 and 22 200 comparisons, 22 200 without it,
#     and one set of pretrained towers per member (two more pretrained as the first, seeds 1, 2).
R="--set members=3 --set net.text_pool=mean --set train.factor_loss_weight=3"
$T reward train --config configs/reward-testbed.toml --store runs/prefs-s12c --out runs/s13/rw-17k-boot \
  $R --set init=runs/s11/pt-mean-hn-flaws-3000 --set train.bootstrap=true
$T reward train --config configs/reward-testbed.toml --store runs/prefs-s13 --out runs/s13/rw-22k \
  $R --set init=runs/s11/pt-mean-hn-flaws-3000 --set train.bootstrap=false
$T reward train --config configs/reward-testbed.toml --store runs/prefs-s13 --out runs/s13/rw-22k-boot \
  $R --set init=runs/s11/pt-mean-hn-flaws-3000 --set train.bootstrap=true
for s in 1 2; do
  $T reward pretrain --config configs/reward-testbed.toml --out runs/s13/pt-flaws-seed$s \
    --set net.text_pool=mean --set pretrain.hard_negatives=true \
    --set pretrain.render.soft_edge_rate=0.5 --set pretrain.render.speckle_rate=0.5 --set pretrain.seed=$s
done
$T reward train --config configs/reward-testbed.toml --store runs/prefs-s13 --out runs/s13/rw-22k-pm \
  $R --set train.bootstrap=false \
  --set 'init=["runs/s11/pt-mean-hn-flaws-3000", "runs/s13/pt-flaws-seed1", "runs/s13/pt-flaws-seed2"]'
scripts/analysis/confirm.sh "$T"
scripts/analysis/spread.sh "$T"

# 4. The alignment comparison on these assets, the KL-regularised DRaFT-K run, and every run's
#    final weights on the whole held-out suite, paired image by image with the base.
$T compare --budget 480 --set prompts.val_per_task=12 --out runs/compare
$T align --config configs/draft-k-testbed.toml --out runs/compare-kl-v2/draft-k+kl \
  --set train.kl_weight=0.1 --set train.reward_budget=480 --set train.updates=30 \
  --set log.val_every=6 --set log.checkpoint_every=30 --set prompts.val_per_task=12
$T eval --model assets/testbed-base --per-prompt 1 --scheduler ddpm --steps 20 --out runs/eval-full/base
for m in ddpo diffusion-dpo draft-k; do
  $T eval --model runs/compare/$m --per-prompt 1 --scheduler ddpm --steps 20 --out runs/eval-full/$m
  $T paired runs/eval-full/base runs/eval-full/$m
done

# 5. The few-step models (docs/experiments/few-step-model.md): two stages of progressive
#    distillation from the base, 8 guided DDIM steps -> 4 -> 2, each student the next teacher.
$T base distill --out runs/distill-4 --set train.steps=1500
$T base distill --out runs/distill-2 --set teacher=runs/distill-4/pipeline \
  --set distill.teacher_steps=4 --set distill.guidance=1 --set train.steps=1000
cp -r runs/distill-4/pipeline assets/testbed-fewstep-4
cp -r runs/distill-2/pipeline assets/testbed-fewstep-2
