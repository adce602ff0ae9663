#!/usr/bin/env python3
"""The base diffusion model as a zero-shot preference model (Li et al. 2023, "Your Diffusion Model
is Secretly a Zero-Shot Classifier"): how often does it pick the annotators' choice?

    python scripts/analysis/diffusion_classifier.py <store> [split] [comparisons] [noise levels]
        [--base assets/testbed-base]

For an image x and prompt c the score is the drop in denoising error that conditioning on c brings,
averaged over K noise levels t (evenly spaced in 20..980) with one fixed noise draw per level,
shared by every image so that a pair's difference is not noise:

    s(x, c) = mean_t ||eps - eps_theta(x_t, t, "")||^2 - ||eps - eps_theta(x_t, t, c)||^2

Reads the store read-only (SQLite + content-addressed PNGs) and the pipeline folder with
diffusers/transformers (scripts/fixtures/requirements.txt); prints the pairwise accuracy on
non-tie comparisons of the split, overall, by noise band and by task. Analysis only: Tiller
never runs Python.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path)
    ap.add_argument("split", nargs="?", default="test")
    ap.add_argument("comparisons", nargs="?", type=int, default=300)
    ap.add_argument("levels", nargs="?", type=int, default=16)
    ap.add_argument("--base", type=Path, default=Path("assets/testbed-base"))
    args = ap.parse_args()

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from tokenizers import Tokenizer
    from transformers import CLIPTextModel

    torch.set_num_threads(1)
    unet = UNet2DConditionModel.from_pretrained(args.base / "unet").eval()
    te = CLIPTextModel.from_pretrained(args.base / "text_encoder").eval()
    tok = Tokenizer.from_file(str(args.base / "tokenizer" / "tokenizer.json"))
    cfg = json.loads((args.base / "text_encoder" / "config.json").read_text())
    length, pad = cfg["max_position_embeddings"], cfg["pad_token_id"]
    alphas = DDPMScheduler.from_pretrained(args.base / "scheduler").alphas_cumprod

    def encode(texts: list[str]) -> torch.Tensor:
        rows = [tok.encode(t).ids[:length] for t in texts]
        rows = [r + [pad] * (length - len(r)) for r in rows]
        with torch.no_grad():
            return te(input_ids=torch.tensor(rows)).last_hidden_state

    db = sqlite3.connect(f"file:{args.store / 'preferences.sqlite'}?mode=ro", uri=True)
    rows = db.execute(
        "select f.body, p.text, p.spec from feedback f join prompts p on f.prompt = p.id "
        "where f.kind = 'comparison' and p.split = ?",
        (args.split,),
    ).fetchall()
    np.random.default_rng(0).shuffle(rows)
    rows = [r for r in rows if json.loads(r[0])["choice"] != "tie"][: args.comparisons]

    k = args.levels
    ts = torch.linspace(20, 980, k).long()
    noise = torch.randn(k, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = alphas[ts].view(k, 1, 1, 1)
    empty = encode([""]).repeat(k, 1, 1)
    cache: dict[tuple[str, str], np.ndarray] = {}

    def score(image: str, text: str) -> np.ndarray:
        if (image, text) not in cache:
            path = args.store / "images" / image[:2] / f"{image[2:]}.png"
            x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1)
            x_t = a.sqrt() * x.permute(2, 0, 1)[None] + (1 - a).sqrt() * noise
            with torch.no_grad():
                cond = unet(x_t, ts, encoder_hidden_states=encode([text]).repeat(k, 1, 1)).sample
                uncond = unet(x_t, ts, encoder_hidden_states=empty).sample
            err = lambda e: ((noise - e) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
            cache[(image, text)] = (err(uncond) - err(cond)).numpy()
        return cache[(image, text)]

    by_task: dict[str, list[np.ndarray]] = {}
    for body, text, spec in rows:
        b = json.loads(body)
        sign = 1.0 if b["choice"] == "a" else -1.0
        d = sign * (score(b["image_a"], text) - score(b["image_b"], text))
        by_task.setdefault(json.loads(spec)["tag"], []).append(d)
    every = np.concatenate([np.stack(v) for v in by_task.values()])
    print(f"{len(every)} non-tie comparisons of the {args.split} split: pairwise accuracy {(every.mean(1) > 0).mean():.3f}")
    for lo, hi in [(0, k // 4), (k // 4, k // 2), (k // 2, 3 * k // 4), (3 * k // 4, k)]:
        print(f"  noise levels t = {int(ts[lo])}..{int(ts[hi - 1])} only: {(every[:, lo:hi].mean(1) > 0).mean():.3f}")
    for task, v in sorted(by_task.items()):
        v = np.stack(v)
        print(f"  {task}: {len(v)} comparisons, {(v.mean(1) > 0).mean():.3f}")


if __name__ == "__main__":
    main()
