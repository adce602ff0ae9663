#!/usr/bin/env python3
"""A plain PyTorch/diffusers DDPO on the testbed, the reference that `tiller align` is compared
with in docs/experiments/ddpo-parity.md.

    python scripts/reference/ddpo_testbed.py --rollouts runs/<tiller run>/rollouts.jsonl \
        --tiller target/release/tiller --out runs/ddpo-reference

It trains on exactly the prompts the Tiller run drew (its `rollouts.jsonl`: per update, each
rollout's prompt, in order) and scores its images with the same reward through `tiller reward
score`, so the two runs differ only in their implementations (and their random noise). The update
is ddpo-pytorch's `scripts/train.py` with `config/base.py`'s settings except where a flag says:
full fine-tuning, AdamW (eps 1e-8, weight decay 1e-4), `clip_grad_norm_` 1.0, DDIM with eta 1,
per-prompt advantages (`PerPromptStatTracker`, buffer 16, `--stat-min-count`), clipped to +-5,
PPO clip 1e-4, one backward per timestep of loss / steps, every timestep, one inner epoch. The DDIM
step and the PPO loss are `ddpo_update.py`'s (the golden's reference), on diffusers' float32
schedule as ddpo-pytorch has it. Writes `metrics.jsonl` (update, reward mean and std, loss, grad
norm, approx_kl, wall time) under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from PIL import Image
from tokenizers import Tokenizer
from transformers import CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import ddpo_update as ref  # noqa: E402  (the golden's DDIM step, log-prob and schedule)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=Path("assets/testbed-base"))
    ap.add_argument("--rollouts", type=Path, required=True, help="a Tiller run's rollouts.jsonl")
    ap.add_argument("--tiller", type=Path, required=True, help="the tiller binary (for `reward score`)")
    ap.add_argument("--reward", default="gold")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--stat-min-count", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--updates", type=int, help="wait for this many updates of a running Tiller run")
    ap.add_argument("--batch", type=int, default=64, help="rollouts per update (with --updates)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.out.exists():
        sys.exit(f"--out {args.out} exists; choose a new folder")
    args.out.mkdir(parents=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    def prompts_of(update: int) -> list[str]:
        """The Tiller run's prompts of `update`, waiting for them while that run is still going
        (`--updates`, `--batch`): the two runs can go side by side."""
        while True:
            rows = [json.loads(l) for l in args.rollouts.read_text().splitlines() if l.strip()]
            prompts = [r["prompt"] for r in rows if r["update"] == update]
            if len(prompts) >= args.batch or (args.updates is None and prompts):
                return prompts
            if args.updates is None:
                raise SystemExit(f"{args.rollouts} has no update {update}")
            time.sleep(5)

    unet = UNet2DConditionModel.from_pretrained(args.base / "unet")
    text_encoder = CLIPTextModel.from_pretrained(args.base / "text_encoder").eval()
    tokenizer = Tokenizer.from_file(str(args.base / "tokenizer" / "tokenizer.json"))
    cfg = json.loads((args.base / "text_encoder" / "config.json").read_text())
    length, pad = cfg["max_position_embeddings"], cfg["pad_token_id"]
    sched = DDIMScheduler.from_pretrained(args.base / "scheduler")
    sched.set_timesteps(args.steps)
    ref.FLOAT32_SCHEDULE = True  # diffusers' alphas_cumprod, as ddpo-pytorch samples with
    timesteps = [int(t) for t in sched.timesteps]

    def encode(texts: list[str]) -> torch.Tensor:
        rows = [tokenizer.encode(t).ids[:length] for t in texts]
        rows = [r + [pad] * (length - len(r)) for r in rows]
        with torch.no_grad():
            return text_encoder(input_ids=torch.tensor(rows)).last_hidden_state

    def score(images: torch.Tensor, prompts: list[str]) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            with open(tmp / "manifest.jsonl", "w") as f:
                for i, (px, p) in enumerate(zip(pixels, prompts)):
                    Image.fromarray(px).save(tmp / f"{i}.png")
                    f.write(json.dumps({"image": f"{i}.png", "prompt": p}) + "\n")
            subprocess.run(
                [str(args.tiller), "reward", "score", "--manifest", str(tmp / "manifest.jsonl"),
                 "--reward", args.reward, "--out", str(tmp / "scores.jsonl")],
                check=True,
            )
            return np.array([json.loads(l)["reward"] for l in (tmp / "scores.jsonl").read_text().splitlines()])

    params = [p for p in unet.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    buffers: dict[str, deque] = defaultdict(lambda: deque(maxlen=16))
    metrics = open(args.out / "metrics.jsonl", "w")
    started = time.time()
    uncond_1 = encode([""])
    last = args.updates or max(json.loads(l)["update"] for l in args.rollouts.read_text().splitlines() if l.strip())
    for update in range(1, last + 1):
        prompts = prompts_of(update)
        n = len(prompts)
        context = encode(prompts)
        uncond = uncond_1.repeat(n, 1, 1)

        # ---- sampling: DDIM eta = 1, every x_t and log-prob recorded (no graph)
        unet.eval()
        with torch.no_grad():
            x = torch.randn(n, 3, unet.config.sample_size, unet.config.sample_size)
            latents, log_probs = [x], []
            for t in timesteps:
                eps = ref.predict(unet, x, t, context, uncond, args.guidance)
                mean, std = ref.ddim_step(sched, eps, t, x)
                mean, std = mean.float(), std.float()
                x = mean + std * torch.randn_like(x)
                latents.append(x)
                log_probs.append(ref.log_prob(x, mean, std))
        rewards = score(latents[-1], prompts)

        # ---- advantages: ddpo-pytorch's PerPromptStatTracker
        adv = np.empty(n)
        for p in dict.fromkeys(prompts):
            idx = [i for i, q in enumerate(prompts) if q == p]
            buffers[p].extend(rewards[idx].tolist())
            if len(buffers[p]) < args.stat_min_count:
                m, s = rewards.mean(), rewards.std() + 1e-6
            else:
                m, s = np.mean(buffers[p]), np.std(buffers[p]) + 1e-6
            adv[idx] = (rewards[idx] - m) / s
        adv = torch.tensor(np.clip(adv, -ref.ADV_CLIP_MAX, ref.ADV_CLIP_MAX), dtype=torch.float32)

        # ---- one update: every timestep, one backward each, loss / steps
        unet.train()
        optimizer.zero_grad()
        losses, kls = [], []
        for i, t in enumerate(timesteps):
            eps = ref.predict(unet, latents[i], t, context, uncond, args.guidance)
            mean, std = ref.ddim_step(sched, eps, t, latents[i])
            lp = ref.log_prob(latents[i + 1], mean.float(), std.float())
            ratio = torch.exp(lp - log_probs[i])
            clipped = torch.clamp(ratio, 1.0 - ref.CLIP_RANGE, 1.0 + ref.CLIP_RANGE)
            loss = torch.mean(torch.maximum(-adv * ratio, -adv * clipped))
            (loss / len(timesteps)).backward()
            losses.append(loss.item())
            kls.append(0.5 * torch.mean((lp - log_probs[i]) ** 2).item())
        norm = torch.nn.utils.clip_grad_norm_(params, ref.MAX_GRAD_NORM)
        optimizer.step()
        row = {
            "step": update,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "loss": float(np.mean(losses)),
            "grad_norm": float(norm),
            "approx_kl": float(np.mean(kls)),
            "wall_s": time.time() - started,
        }
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        print(f"update {update}: reward {row['reward_mean']:.3f} grad norm {row['grad_norm']:.3g} ({row['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
