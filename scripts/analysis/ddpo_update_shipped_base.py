#!/usr/bin/env python3
"""`scripts/fixtures/ddpo_update.py`'s full-g1 case (two updates) on the shipped base instead of the
tiny random UNet: `assets/testbed-base`'s UNet and scheduler, 3 x 32 x 32 images, 20 steps, 16
random token states of width 64. A measurement for docs/experiments/ddpo-parity.md, not a fixture:

    python scripts/analysis/ddpo_update_shipped_base.py --lr 1e-4 --out /tmp/ddpo-base
    TILLER_DDPO_FIXTURE=/tmp/ddpo-base cargo test -p tiller-align --test ddpo_reference \
        full_fine_tuning_without -- --nocapture

It runs the golden script's own code with those constants replaced (each replacement is checked
to apply), so the two cannot drift apart.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "fixtures" / "ddpo_update.py"

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--out", required=True)
args = ap.parse_args()

source = SCRIPT.read_text()
replacements = [
    ("STEPS = 4", "STEPS = 20"),
    ("TOKENS = 4", "TOKENS = 16"),
    ("torch.randn(1, TOKENS, 16, generator=g)", "torch.randn(1, TOKENS, 64, generator=g)"),
    ("torch.randn(n, 3, 8, 8, generator=g)", "torch.randn(n, 3, 32, 32, generator=g)"),
    (
        "    unet = UNet2DConditionModel(**UNET_CONFIG)\n    unet.load_state_dict(base_state)",
        f'    unet = UNet2DConditionModel.from_pretrained("{ROOT}/assets/testbed-base/unet")',
    ),
    (
        "    torch.manual_seed(0)\n    unet = UNet2DConditionModel(**UNET_CONFIG)\n"
        "    g = torch.Generator().manual_seed(1)\n    with torch.no_grad():\n"
        "        for p in unet.parameters():\n            p.add_(torch.randn(p.shape, generator=g) * 0.05)\n",
        f'    unet = UNet2DConditionModel.from_pretrained("{ROOT}/assets/testbed-base/unet")\n',
    ),
    (
        "    sched = DDIMScheduler(**SCHEDULER_CONFIG)",
        f'    sched = DDIMScheduler.from_pretrained("{ROOT}/assets/testbed-base/scheduler")',
    ),
    (
        "    cases = [run_case(c, out, base_state, sched) for c in CASES]",
        '    cases = [run_case(c, out, base_state, sched) for c in CASES if c["name"] == "full-g1"]',
    ),
    ("lr=1e-3, seed=11, updates=2", f"lr={args.lr!r}, seed=11, updates=2"),
]
for old, new in replacements:
    if old not in source:
        sys.exit(f"{SCRIPT} changed: `{old.splitlines()[0]}` not found; update this script")
    source = source.replace(old, new)
sys.argv = [str(SCRIPT), "--out", args.out]
exec(compile(source, str(SCRIPT), "exec"), {"__name__": "__main__", "__file__": str(SCRIPT)})
