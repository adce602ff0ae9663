#!/usr/bin/env bash
# One short GPU check of a Tiller binary built with the `vulkan` feature, on a machine with a
# Vulkan driver (NVIDIA: the proprietary driver ships libvulkan and its ICD). Rust is not needed
# there: build on any machine with
#
#     cargo build --release -p tiller-cli --features vulkan
#
# and copy target/release/tiller and this repository's fixtures and configs (the checkout).
#
#     scripts/gpu/check.sh path/to/tiller [device]        # device: vulkan (default) or vulkan:N
#
# 1. Parity: a UNet forward (the SD 1.x and SDXL fixtures) on the GPU against the CPU, through
#    `tiller model check --compare` (fails above 1e-3 relative).
# 2. Parity of a training step: one DRaFT-K update of the shipped testbed run on the GPU and on
#    the CPU from the same seed; the first update's loss and reward are printed side by side.
# 3. Speed: `tiller bench` (forward, train step, reward-backprop memory) on the GPU and on the
#    CPU for the bench UNet; with PyTorch on the machine, scripts/bench/pytorch_unet.py gives the
#    baseline for the same config (`--baseline`), as on the CPU.
set -euo pipefail
TILLER=${1:?usage: scripts/gpu/check.sh path/to/tiller [vulkan|vulkan:N]}
DEVICE=${2:-vulkan}
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
FIX=crates/tiller-diffusion/tests/fixtures
echo "== outputs in $OUT"

echo "== 1. UNet forward parity ($DEVICE vs cpu)"
for unet in tiny-unet-sd1 tiny-unet-sdxl; do
    # The fixture's inputs, as model check reads them (it ignores the other tensors).
    in="$FIX/$unet/io.safetensors"
    "$TILLER" model check "$FIX/$unet" --inputs "$in" --out "$OUT/$unet-cpu.safetensors" --device cpu >/dev/null
    "$TILLER" model check "$FIX/$unet" --inputs "$in" --out "$OUT/$unet-gpu.safetensors" --device "$DEVICE" \
        --compare "$OUT/$unet-cpu.safetensors" --tolerance 1e-3 | grep compare
done

echo "== 2. One DRaFT-K update ($DEVICE vs cpu)"
SMALL=(--set train.updates=1 --set train.batch_size=4 --set sampling.steps=10
       --set prompts.val_per_task=1 --set log.val_every=0 --seed 0)
for run in cpu:cpu "gpu:$DEVICE"; do
    name=${run%%:*} dev=${run#*:}
    start=$SECONDS
    "$TILLER" align --config configs/draft-k-testbed.toml --out "$OUT/draft-$name" --device "$dev" \
        "${SMALL[@]}" >/dev/null 2>&1
    echo "   $dev: $((SECONDS - start)) s"
    grep -m1 '"loss"' "$OUT/draft-$name/metrics.jsonl" | sed "s/^/   $dev: /"
done

echo "== 3. Speed ($DEVICE, then cpu)"
"$TILLER" bench --device "$DEVICE" --reps 5
"$TILLER" bench --device cpu --reps 3
echo "== done"
