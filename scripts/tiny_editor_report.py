"""The tiny model's figures, recomputed from the shipped weights: VAE, base model, and the ``cpu`` preset's LoRA.

    python scripts/tiny_editor_report.py                      # all figures, pairs 0 1 7 (about 6 min, one thread)
    python scripts/tiny_editor_report.py --pairs 0 5 --skip-lora
    python scripts/tiny_editor_report.py --json outputs/tiny_editor_report.json

Every figure is measured on the held-out ``data_samples`` pairs at the ``cpu`` preset's resolution:

* ``vae``: PSNR of each context after encode + decode;
* ``base_keep``: ``sample_edit`` with its defaults (28 steps, guidance 2.5, 512 T5 tokens) and an empty
  prompt: PSNR of the output against the context, next to the VAE's own PSNR (for seeds 0 to 3, to show how
  much the noise alone moves it);
* ``depth_alone``: the same from a blank grey context, without and with the pair's depth map: how much of
  the scene the depth path alone carries, and which of the ten contexts each output lies nearest;
* ``lora``: for each pair, ``kh.train`` with ``TrainConfig.for_gpu("cpu")`` on that pair alone, then
  ``kh.edit_metrics`` of the edit with the LoRA, the region token and depth, against the base model with the
  same seed and prompt; and with the region token or depth left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kontext_helpers as kh  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 0
KEEP_SEEDS = tuple(range(SEED, SEED + 4))  # base_keep: the empty-prompt figure from several noises, SEED first
WEIGHTS = None  # --weights: another weights file than the shipped one


def tiny_pipe():
    """The pretrained tiny pipeline: the shipped weights, or the file given with ``--weights``."""
    return kh.load_pipeline("tiny") if WEIGHTS is None else kh.build_tiny_pipeline(weights=WEIGHTS)


class OnePair(torch.utils.data.Dataset):
    """Pair ``index`` of a :class:`kh.KontextPairs` as a dataset of its own (what a one-pair LoRA trains on)."""

    def __init__(self, pairs, index: int):
        self.resolution = pairs.resolution
        self.item = pairs[index]

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.item


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


@torch.no_grad()
def vae_figures(pipe, pairs) -> list[float]:
    """PSNR (dB) of every context after the VAE's encode + decode."""
    out = []
    for i in range(len(pairs)):
        ctx = pairs[i]["context"][None]  # [1, 3, H, W]
        z = pipe.vae.encode(kh.normalize_01_to_m11(ctx)).latent_dist.mode()
        rec = (pipe.vae.decode(z).sample.clamp(-1, 1) + 1) / 2  # [1, 3, H, W] in [0, 1]
        out.append(psnr(rec, ctx))
    return out


def edit(pipe, item, prompt, seed: int = SEED, **kw):
    """``kh.sample_edit`` as a ``[3, H, W]`` tensor, seed fixed."""
    out = kh.sample_edit(pipe, item["context"], prompt, generator=torch.Generator().manual_seed(seed),
                         output_type="pt", **kw)
    return out[0].float().cpu()  # [1, 3, H, W] -> [3, H, W]


def base_keep_figures(pipe, pairs, vae_psnr: list[float]) -> list[dict]:
    rows = []
    for i in range(len(pairs)):
        item = pairs[i]
        by_seed = [psnr(edit(pipe, item, "", seed=s), item["context"]) for s in KEEP_SEEDS]
        rows.append({"pair": pairs.names[i], "vae_db": vae_psnr[i], "empty_prompt_db": by_seed[0],  # SEED's
                     "empty_prompt_db_by_seed": by_seed,
                     "keep_prompt_db": psnr(edit(pipe, item, "keep the scene"), item["context"])})
    return rows


def depth_alone_figures(pipe, pairs) -> list[dict]:
    """From a blank grey context and an empty prompt: PSNR to the real context without and with its depth map,
    and which of the contexts each output lies nearest (the depth map is all that tells the scenes apart)."""
    items = [pairs[i] for i in range(len(pairs))]
    contexts = [item["context"] for item in items]
    rows = []
    for i, item in enumerate(items):
        blank = dict(item, context=torch.full_like(item["context"], 0.5))  # [3, H, W], mid grey
        outs = {"no_depth": edit(pipe, blank, ""), "depth": edit(pipe, blank, "", depth=item["depth"])}
        row = {"pair": pairs.names[i]}
        for name, out in outs.items():
            scores = [psnr(out, c) for c in contexts]
            row[f"{name}_db"] = scores[i]
            row[f"{name}_nearest"] = pairs.names[max(range(len(scores)), key=scores.__getitem__)]
        rows.append(row)
    return rows


def lora_figures(pairs, index: int, config_overrides: dict) -> dict:
    """Train the ``cpu`` preset on one pair; metrics of base, LoRA (region + depth), and without each."""
    item = pairs[index]
    common = dict(max_sequence_length=kh.TrainConfig.for_gpu("cpu").max_sequence_length)
    base_pipe = tiny_pipe()
    metrics = lambda pred: kh.edit_metrics(pred, item["context"], item["target"], item["mask"], lpips=False)  # noqa: E731
    row = {"pair": pairs.names[index], "prompt": item["prompt"]}
    row["base"] = metrics(edit(base_pipe, item, item["prompt"], depth=item["depth"], **common))
    pipe = tiny_pipe()
    with tempfile.TemporaryDirectory(prefix="tiny_report_") as out:
        config = kh.TrainConfig.for_gpu("cpu", output_dir=out, **config_overrides)
        t0 = time.perf_counter()
        result = kh.train(pipe, OnePair(pairs, index), config, progress=False)
        row["train_seconds"] = round(time.perf_counter() - t0, 1)
    region, mask = result.region, item["mask"]
    row["lora"] = metrics(edit(pipe, item, item["prompt"], mask=mask, region=region, depth=item["depth"], **common))
    row["lora_no_region"] = metrics(edit(pipe, item, item["prompt"], depth=item["depth"], **common))
    row["lora_no_depth"] = metrics(edit(pipe, item, item["prompt"], mask=mask, region=region, **common))
    return row


def keep_gap_lines(rows: list[dict]) -> list[str]:
    """How far under the VAE the empty-prompt output lies, for seed 0 and for every seed."""
    if not rows:
        return []
    first = [r["vae_db"] - r["empty_prompt_db"] for r in rows]
    every = [r["vae_db"] - db for r in rows for db in r["empty_prompt_db_by_seed"]]
    worst = max(rows, key=lambda r: r["vae_db"] - min(r["empty_prompt_db_by_seed"]))
    return [f"base keep, seed {SEED}: {sum(g <= 1.0 for g in first)} of {len(first)} within 1 dB of the VAE, "
            f"gap mean {sum(first) / len(first):.2f}, max {max(first):.2f} dB",
            f"base keep, seeds {KEEP_SEEDS[0]}-{KEEP_SEEDS[-1]}: {sum(g <= 1.0 for g in every)} of {len(every)} "
            f"within 1 dB, gap mean {sum(every) / len(every):.2f}, max {max(every):.2f} dB ({worst['pair']})"]


def summary_lines(report: dict) -> list[str]:
    lines = []
    vae = report["vae_db"]
    lines.append(f"VAE on {len(vae)} contexts: mean {sum(vae) / len(vae):.2f} dB, min {min(vae):.2f} dB")
    for row in report.get("base_keep", []):
        lines.append(f"base keep {row['pair']}: VAE {row['vae_db']:.2f}  empty prompt {row['empty_prompt_db']:.2f}  "
                     f"'keep the scene' {row['keep_prompt_db']:.2f} dB")
    lines += keep_gap_lines(report.get("base_keep", []))
    lines.append(f"image embeddings of the depth maps: spread {100 * report['depth_embedding_spread']:.1f}% of "
                 "their length")
    for row in report.get("depth_alone", []):
        lines.append(f"blank context {row['pair']}: to the context without depth {row['no_depth_db']:.2f} dB, "
                     f"with depth {row['depth_db']:.2f} dB; nearest context without depth {row['no_depth_nearest']}, "
                     f"with depth {row['depth_nearest']}")
    if report.get("depth_alone"):
        own = {k: sum(r[f"{k}_nearest"] == r["pair"] for r in report["depth_alone"]) for k in ("no_depth", "depth")}
        lines.append(f"blank context: the output lies nearest its own scene in {own['depth']} of "
                     f"{len(report['depth_alone'])} with depth, {own['no_depth']} without")
    for row in report.get("lora", []):
        b, lo, nr, nd = row["base"], row["lora"], row["lora_no_region"], row["lora_no_depth"]
        lines.append(f"LoRA {row['pair']} ({row['train_seconds']} s): in-mask to target base "
                     f"{b['psnr_in_vs_target']:.2f} -> LoRA {lo['psnr_in_vs_target']:.2f} dB "
                     f"(no region {nr['psnr_in_vs_target']:.2f}, no depth {nd['psnr_in_vs_target']:.2f}); "
                     f"out-of-mask to context {lo['psnr_out_vs_context']:.2f} dB (no region "
                     f"{nr['psnr_out_vs_context']:.2f}, no depth {nd['psnr_out_vs_context']:.2f})")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs="*", default=[0, 1, 7], help="data_samples pairs for the LoRA")
    parser.add_argument("--skip-lora", action="store_true", help="only the VAE and base-model figures")
    parser.add_argument("--skip-base", action="store_true", help="no base-model keep figures")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    parser.add_argument("--json", default=os.path.join(REPO, "outputs", "tiny_editor_report.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--weights", default=None, help="a weights file other than the shipped one")
    args = parser.parse_args(argv)
    global WEIGHTS
    WEIGHTS = args.weights
    torch.set_num_threads(args.threads)
    resolution = kh.TrainConfig.for_gpu("cpu").resolution
    pairs = kh.KontextPairs(os.path.join(REPO, "data_samples"), resolution=resolution)
    pipe = tiny_pipe()
    report = {"resolution": resolution, "weights": args.weights or kh.TINY_WEIGHTS_FILE,
              "preset": kh.GPU_PRESETS["cpu"]}
    report["vae_db"] = vae_figures(pipe, pairs)
    if not args.skip_base:
        report["base_keep"] = base_keep_figures(pipe, pairs, report["vae_db"])
        report["depth_alone"] = depth_alone_figures(pipe, pairs)
    report["depth_embedding_spread"] = kh.depth_embedding_spread(
        pipe, [kh.depth_to_pil(pairs[i]["depth"]) for i in range(len(pairs))])
    if not args.skip_lora:
        overrides = {"steps": args.steps} if args.steps else {}
        report["lora"] = [lora_figures(pairs, i, overrides) for i in args.pairs]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print("\n".join(summary_lines(report)))
    print(f"written to {args.json}")
    return report


if __name__ == "__main__":
    main()
