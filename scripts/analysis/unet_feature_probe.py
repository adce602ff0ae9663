#!/usr/bin/env python3
"""The base model's UNet features as a frozen reward backbone: how well does a head on them predict
the annotators' choices on held-out prompts?

    python scripts/analysis/unet_feature_probe.py <store> [--t 50] [--base assets/testbed-base]

Reward heads on frozen backbones are common (the LAION aesthetic predictor on CLIP; LRM/LPO use a
diffusion model's own features). Each image is noised to timestep t with one fixed noise draw and
run through the base UNet conditioned on its prompt; the features are the mid block's and the
first up block's maps average-pooled to 4x4 plus their spatial mean and max and the second down
block's mean (2336 numbers). Heads (a linear score and two MLPs, Bradley-Terry loss on non-tie
comparisons, AdamW, 3000 steps of 128 pairs) are trained on the training split and scored on the
test split's non-tie comparisons, overall and by task. Reads the store read-only; analysis only
(Tiller never runs Python).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def features(args, keys):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from tokenizers import Tokenizer
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(args.base / "unet").eval()
    te = CLIPTextModel.from_pretrained(args.base / "text_encoder").eval()
    tok = Tokenizer.from_file(str(args.base / "tokenizer" / "tokenizer.json"))
    cfg = json.loads((args.base / "text_encoder" / "config.json").read_text())
    length, pad = cfg["max_position_embeddings"], cfg["pad_token_id"]
    alpha = DDPMScheduler.from_pretrained(args.base / "scheduler").alphas_cumprod[args.t]

    def encode(texts):
        rows = [tok.encode(t).ids[:length] for t in texts]
        rows = [r + [pad] * (length - len(r)) for r in rows]
        return te(input_ids=torch.tensor(rows)).last_hidden_state

    maps = {}

    def keep(name):
        def hook(_module, _inputs, out):
            maps[name] = out[0] if isinstance(out, tuple) else out

        return hook

    unet.mid_block.register_forward_hook(keep("mid"))
    unet.up_blocks[0].register_forward_hook(keep("up0"))
    unet.down_blocks[1].register_forward_hook(keep("down1"))
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = []
    for s in range(0, len(keys), 64):
        chunk = keys[s : s + 64]
        xs = []
        for image, _ in chunk:
            path = args.store / "images" / image[:2] / f"{image[2:]}.png"
            x = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1
            xs.append(torch.from_numpy(x).permute(2, 0, 1))
        x = torch.stack(xs)
        x_t = alpha.sqrt() * x + (1 - alpha).sqrt() * noise
        with torch.no_grad():
            unet(x_t, torch.full((len(chunk),), args.t), encoder_hidden_states=encode([t for _, t in chunk]))
        mid, up0, d1 = maps["mid"], maps["up0"], maps["down1"]
        out.append(
            torch.cat(
                [
                    F.adaptive_avg_pool2d(mid, 4).flatten(1),
                    F.adaptive_avg_pool2d(up0, 4).flatten(1),
                    mid.mean((2, 3)),
                    mid.amax((2, 3)),
                    up0.mean((2, 3)),
                    up0.amax((2, 3)),
                    d1.mean((2, 3)),
                ],
                1,
            )
        )
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path)
    ap.add_argument("--t", type=int, default=50)
    ap.add_argument("--base", type=Path, default=Path("assets/testbed-base"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    db = sqlite3.connect(f"file:{args.store / 'preferences.sqlite'}?mode=ro", uri=True)
    rows = db.execute(
        "select f.body, p.text, p.split, p.spec from feedback f join prompts p on f.prompt = p.id "
        "where f.kind = 'comparison'"
    ).fetchall()
    pairs = []
    for body, text, split, spec in rows:
        b = json.loads(body)
        if b["choice"] != "tie":
            pairs.append((b["image_a"], b["image_b"], float(b["choice"] == "a"), text, split, json.loads(spec)["tag"]))
    keys = sorted({(p[0], p[3]) for p in pairs} | {(p[1], p[3]) for p in pairs})
    index = {k: i for i, k in enumerate(keys)}
    feats = features(args, keys)

    def split(name):
        ps = [p for p in pairs if p[4] == name]
        a = torch.tensor([index[(p[0], p[3])] for p in ps])
        b = torch.tensor([index[(p[1], p[3])] for p in ps])
        return a, b, torch.tensor([p[2] for p in ps]), [p[5] for p in ps]

    train, test = split("train"), split("test")
    seen = torch.cat([train[0], train[1]])
    x = (feats - feats[seen].mean(0)) / (feats[seen].std(0) + 1e-5)
    print(f"{len(train[2])} training / {len(test[2])} held-out non-tie comparisons, t = {args.t}")
    for hidden, wd, drop in [(0, 1e-2, 0.0), (0, 1e-1, 0.0), (128, 1e-2, 0.3), (256, 5e-2, 0.5)]:
        torch.manual_seed(0)
        if hidden:
            net = torch.nn.Sequential(
                torch.nn.Dropout(drop), torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(),
                torch.nn.Dropout(drop), torch.nn.Linear(hidden, 1),
            )
        else:
            net = torch.nn.Linear(x.shape[1], 1)
        opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=wd)
        a, b, y, _ = train
        for _ in range(3000):
            pick = torch.randint(0, len(y), (128,))
            net.train()
            logit = net(x[a[pick]])[:, 0] - net(x[b[pick]])[:, 0]
            loss = F.binary_cross_entropy_with_logits(logit, y[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()

        def correct(s):
            a, b, y, _ = s
            with torch.no_grad():
                return ((net(x[a])[:, 0] > net(x[b])[:, 0]).float() == y).float()

        c = correct(test)
        tasks = {}
        for ok, tag in zip(c.tolist(), test[3]):
            tasks.setdefault(tag, []).append(ok)
        name = f"MLP {hidden}, dropout {drop}" if hidden else "linear"
        by_task = ", ".join(f"{k} {np.mean(v):.3f}" for k, v in sorted(tasks.items()))
        print(f"{name}, weight decay {wd}: training {correct(train).mean():.3f}, held-out {c.mean():.3f} ({by_task})")


if __name__ == "__main__":
    main()
