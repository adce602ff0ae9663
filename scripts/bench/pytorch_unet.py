#!/usr/bin/env python3
"""PyTorch baseline for Tiller's UNet benchmarks.

Builds a diffusers UNet2DConditionModel (random init) from a config and measures, after a
warm-up, the median over --reps repetitions of:

  forward    no-grad forward pass of a batch            -> images/s
  train      forward + MSE to a random target + backward + AdamW(lr=1e-4) step -> steps/s
  sample     (optional, --ddim-steps N > 0) an N-step DDIM loop (eta=0, scaled-linear betas,
             epsilon prediction, no classifier-free guidance) over a batch -> seconds per image

plus peak RSS (resource.getrusage; the RSS right after imports is reported as the baseline).
Logs go to stderr; stdout gets exactly one JSON line, for the Rust benchmark to read.

    python scripts/bench/pytorch_unet.py [--config unet/config.json] [--batch 16] [--seq-len 8]
                                         [--threads 2] [--reps 10] [--warmup 2] [--ddim-steps 50]
                                         [--sample-reps 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

import torch  # noqa: E402  (imported before the RSS baseline is taken)
import diffusers  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


RSS_AFTER_IMPORT_MIB = rss_mib()

DEFAULT_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,
)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, reps: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="path to a diffusers UNet config.json (default: built-in small pixel-space UNet)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=8, help="encoder_hidden_states length")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repetitions before each measurement")
    ap.add_argument("--ddim-steps", type=int, default=50, help="steps of the sampling loop; 0 skips it")
    ap.add_argument("--sample-reps", type=int, default=1,
                    help="timed repetitions of the whole sampling loop (median reported; warm-up is one step)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    if args.config:
        with open(args.config) as f:
            cfg = json.load(f)
        config_name = args.config
    else:
        cfg = dict(DEFAULT_CONFIG)
        config_name = "builtin-small-pixel"
    model = UNet2DConditionModel.from_config(cfg).to(device)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    cad = c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
    log(f"config={config_name} params={n_params} batch={args.batch} input=[{args.batch},{c.in_channels},{size},{size}]"
        f" ehs=[{args.batch},{args.seq_len},{cad}] threads={torch.get_num_threads()} device={device}")
    rss_after_build = rss_mib()

    b = args.batch
    x = torch.randn(b, c.in_channels, size, size, device=device)
    ehs = torch.randn(b, args.seq_len, cad, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    target = torch.randn(b, c.out_channels, size, size, device=device)

    # ---- forward (no grad)
    model.eval()

    def fwd():
        with torch.no_grad():
            model(x, t, encoder_hidden_states=ehs)

    fwd_times = timeit(fwd, args.reps, args.warmup, device)
    fwd_med = statistics.median(fwd_times)
    rss_after_forward = rss_mib()
    log(f"forward: median {fwd_med * 1e3:.2f} ms/batch, {b / fwd_med:.1f} images/s")

    # ---- train step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x, t, encoder_hidden_states=ehs).sample
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        opt.step()

    train_times = timeit(step, args.reps, args.warmup, device)
    train_med = statistics.median(train_times)
    rss_after_train = rss_mib()
    log(f"train: median {train_med * 1e3:.2f} ms/step, {1 / train_med:.2f} steps/s, {b / train_med:.1f} images/s")

    # ---- DDIM-like sampling loop (optional)
    sample_result = None
    if args.ddim_steps > 0:
        model.eval()
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        acp = torch.cumprod(1 - betas, 0).float()
        stride = 1000 // args.ddim_steps
        timesteps = list(range(0, 1000, stride))[::-1][: args.ddim_steps]

        def sample_loop(n_steps: int):
            with torch.no_grad():
                lat = torch.randn(b, c.in_channels, size, size, device=device)
                for ts in timesteps[:n_steps]:
                    eps = model(lat, torch.full((b,), ts, device=device), encoder_hidden_states=ehs).sample
                    a_t = acp[ts]
                    a_prev = acp[ts - stride] if ts - stride >= 0 else torch.tensor(1.0)
                    x0 = (lat - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                    lat = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            return lat

        sreps = max(1, args.sample_reps)
        sample_loop(1)  # warm-up
        sync(device)
        stimes = []
        for _ in range(sreps):
            t0 = time.perf_counter()
            sample_loop(len(timesteps))
            sync(device)
            stimes.append(time.perf_counter() - t0)
        smed = statistics.median(stimes)
        sample_result = {
            "steps": len(timesteps),
            "reps": sreps,
            "median_s_per_batch": smed,
            "s_per_image": smed / b,
        }
        log(f"sample: {len(timesteps)} steps, median {smed:.3f} s/batch, {smed / b * 1e3:.1f} ms/image")

    result = {
        "bench": "pytorch_unet",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "config": config_name,
        "params": n_params,
        "batch": b,
        "seq_len": args.seq_len,
        "sample_size": size,
        "in_channels": c.in_channels,
        "cross_attention_dim": cad,
        "reps": args.reps,
        "warmup": args.warmup,
        "forward": {
            "median_s": fwd_med,
            "images_per_s": b / fwd_med,
            "times_s": fwd_times,
        },
        "train": {
            "median_s": train_med,
            "steps_per_s": 1 / train_med,
            "images_per_s": b / train_med,
            "times_s": train_times,
        },
        "sample": sample_result,
        "rss_mib": {
            "after_import": RSS_AFTER_IMPORT_MIB,
            "peak_after_build": rss_after_build,
            "peak_after_forward": rss_after_forward,
            "peak_after_train": rss_after_train,
            "peak": rss_mib(),
        },
    }
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
