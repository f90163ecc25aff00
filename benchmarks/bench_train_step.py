"""Training-step time on the tiny model: cached step vs the seed's uncached step, side by side in one run.

    .venv/bin/python benchmarks/bench_train_step.py [--resolution 128] [--repeats 20] [--threads 1]

The seed encoded the prompt (T5 + CLIP), both images (VAE) and the depth map (CLIP vision) at every step;
we encode once and cache (docs/design.md, correction 2). Both variants run interleaved in the same
process, so machine noise hits them alike; the ratio is the figure to read. Absolute times are for this
machine only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import kontext_helpers as kh

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_samples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-sequence-length", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = kh.load_pipeline("tiny", seed=0)
    data = kh.KontextPairs(DATA, resolution=args.resolution)
    cfg = kh.TrainConfig(resolution=args.resolution, max_sequence_length=args.max_sequence_length)
    cache = kh.build_train_cache(pipe, data, max_sequence_length=cfg.max_sequence_length, progress=False)
    lora = kh.add_lora(pipe.transformer, rank=16)
    region = kh.MaskRegionToken(cache.h_tok, cache.w_tok, 64)
    params = [p for _, p in lora] + list(region.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    item = data[0]
    noise = torch.randn(1, cache.h_tok * cache.w_tok, 64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5])

    def cached_step():
        loss, _ = kh.training_loss(pipe.transformer, region, cache.batch([0]), cache.txt_ids, cache.h_tok,
                                   cache.w_tok, noise, sigma, cfg, lora_named_params=lora)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def uncached_step():  # the seed's loop: every constant encoded again
        fresh = kh.build_train_cache(pipe, [item], max_sequence_length=cfg.max_sequence_length, progress=False)
        loss, _ = kh.training_loss(pipe.transformer, region, fresh.batch([0]), fresh.txt_ids, fresh.h_tok,
                                   fresh.w_tok, noise, sigma, cfg, lora_named_params=lora)
        loss.backward()
        opt.step()
        opt.zero_grad()

    times = {"cached": [], "uncached": []}
    for fn in (cached_step, uncached_step):  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in (("cached", cached_step), ("uncached", uncached_step)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tiny model, {args.resolution} px, {args.threads} thread(s), T5 length {cfg.max_sequence_length}, "
          f"{args.repeats} interleaved repeats")
    for name, values in times.items():
        print(f"  {name:9s} step: median {med[name] * 1000:7.1f} ms  (min {min(values) * 1000:.1f}, "
              f"max {max(values) * 1000:.1f})")
    print(f"  uncached / cached = {med['uncached'] / med['cached']:.2f}x")


if __name__ == "__main__":
    main()
