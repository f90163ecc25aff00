"""Photos at their own shape: does training at aspect-ratio buckets beat stretching them square or cropping them?

    python scripts/bucket_heldout.py                       # about 15 min on one idle thread
    python scripts/bucket_heldout.py --json docs/bucket_heldout.json --figure docs/images/bucket_heldout.png

Drawn edit scenes (``kh.AspectPairs``) cut to 4:3, 3:4 and 16:9 are written as a dataset folder at their own sizes
(192x144, 144x192, 192x108) and opened three times, once per resize policy of ``kh.KontextPairs``: ``"bucket"``
(each pair at the Kontext preferred resolution nearest its aspect ratio, at 128² pixels), ``"square"`` (stretched
to 128x128) and ``"crop"`` (the centre square). A ``cpu``-preset LoRA is trained on each. Every held-out scene
(other seeds) is then edited by all three at the scene's own shape (its bucket, as ``"bucket"`` reads it), and
scored against its target:

* ``in_db``: PSNR to the target inside the mask; ``out_db``: PSNR to the context outside it;
* ``mask_kept``: the share of the training masks' pixels that the policy's crop keeps (``"crop"`` cuts the sides
  of every landscape photo and the top and bottom of every portrait, and the masks there with them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kontext_helpers as kh  # noqa: E402

POLICIES = ("bucket", "square", "crop")
TRAIN_SEED, HELD_OUT_SEED = 0, 1  # drawn-scene streams: training scenes and held-out scenes never overlap
SAMPLE_SEED = 0
STEPS = 1500
TRAIN_SCENES, HELD_OUT_SCENES = 36, 36
NUM_INFERENCE_STEPS = 28


def write_scenes(pairs, root: str) -> None:
    """The scenes as a dataset folder at their own sizes (what a user's photos would be)."""
    kh.write_pair_folder(root, [p["context"] for p in pairs], [p["target"] for p in pairs],
                         [p["mask"] for p in pairs], [p["depth"] for p in pairs], [p["prompt"] for p in pairs],
                         names=[f"{i:03d}_{p['aspect'][0]}x{p['aspect'][1]}" for i, p in enumerate(pairs)],
                         resolution=128)


def mask_kept(pairs, policy: str, resolution: int) -> float:
    """The share of the scenes' mask pixels inside the box ``policy`` keeps (in the photos' own pixels)."""
    kept = total = 0.0
    shapes = kh.bucket_shapes(resolution)
    for p in pairs:
        mask = p["mask"][0]  # [H, W]
        h, w = mask.shape
        bucket = kh.nearest_bucket((w, h), shapes) if policy == "bucket" else (resolution, resolution)
        box = [round(v) for v in kh.crop_box((w, h), policy, bucket)]  # as KontextPairs cuts it
        kept += float(mask[box[1]:box[3], box[0]:box[2]].sum())
        total += float(mask.sum())
    return kept / total


def train_policy(root: str, policy: str, resolution: int, steps: int):
    """A ``cpu``-preset LoRA trained on the folder read with ``policy``: ``(pipe, region, depth, seconds, buckets)``."""
    dataset = kh.KontextPairs(root, resolution, resize=policy)
    pipe = kh.load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory(prefix="bucket_heldout_") as out:
        config = kh.TrainConfig.for_gpu("cpu", steps=steps, output_dir=out, checkpoint_every=0)
        t0 = time.perf_counter()
        result = kh.train(pipe, dataset, config, progress=False)
    buckets = {f"{w}x{h}": n for (w, h), n in dataset.buckets.items()}
    return pipe, result.region, result.depth, time.perf_counter() - t0, buckets


def edit(pipe, region, depth_module, item: dict) -> torch.Tensor:
    """One held-out edit at the item's own (bucket) shape -> ``[3, H, W]``."""
    _, h, w = item["context"].shape
    out = kh.sample_edit(pipe, item["context"], item["prompt"], mask=item["mask"], depth=item["depth"],
                         region=region, depth_module=depth_module, height=h, width=w, output_type="pt",
                         generator=torch.Generator().manual_seed(SAMPLE_SEED),
                         num_inference_steps=NUM_INFERENCE_STEPS, max_sequence_length=32)
    return out[0].float().cpu()  # [1, 3, H, W] -> [3, H, W]


def evaluate(pipe, region, depth_module, held_out) -> tuple[dict, list]:
    """Mean in-mask and outside PSNR over the held-out items, per aspect and in all, and the outputs."""
    outs, by_aspect = [], {}
    for item in held_out:
        out = edit(pipe, region, depth_module, item)
        m = kh.edit_metrics(out, item["context"], item["target"], item["mask"], lpips=False)
        by_aspect.setdefault(item["name"].split("_")[-1], []).append(
            (m["psnr_in_vs_target"], m["psnr_out_vs_context"]))
        outs.append(out)
    summary = {a: {"in_db": sum(v[0] for v in vals) / len(vals), "out_db": sum(v[1] for v in vals) / len(vals),
                   "cases": len(vals)} for a, vals in sorted(by_aspect.items())}
    every = [v for vals in by_aspect.values() for v in vals]
    summary["all"] = {"in_db": sum(v[0] for v in every) / len(every), "out_db": sum(v[1] for v in every) / len(every),
                      "cases": len(every)}
    return summary, outs


def bucket_figure(held_out, outputs: dict, path: str, count: int = 3) -> None:
    """Context, mask, target and each policy's edit of the first held-out scene of each aspect."""
    import matplotlib.pyplot as plt

    picked = [next(i for i, it in enumerate(held_out) if it["name"].endswith(a)) for a in
              dict.fromkeys(it["name"].split("_")[-1] for it in held_out)][:count]
    cols = ["context", "mask", "target", *outputs]
    fig, axes = plt.subplots(len(picked), len(cols), figsize=(2.2 * len(cols), 2.0 * len(picked)), squeeze=False)
    for r, i in enumerate(picked):
        item = held_out[i]
        images = [item["context"], item["mask"].expand(3, -1, -1), item["target"]] + [o[i] for o in outputs.values()]
        for c, (name, img) in enumerate(zip(cols, images)):
            ax = axes[r][c]
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())  # [3, H, W] -> [H, W, 3]
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"LoRA: {name}" if name in outputs else name, fontsize=9)
            if c == 0:
                ax.set_ylabel(item["name"].split("_")[-1], fontsize=9)
    fig.suptitle("Held-out photos at their own shape: each LoRA edits the same scenes", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    global NUM_INFERENCE_STEPS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--train-scenes", type=int, default=TRAIN_SCENES)
    parser.add_argument("--held-out-scenes", type=int, default=HELD_OUT_SCENES)
    parser.add_argument("--inference-steps", type=int, default=NUM_INFERENCE_STEPS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=os.path.join("outputs", "bucket_heldout.json"))
    parser.add_argument("--figure", default=os.path.join("outputs", "bucket_heldout.png"))
    args = parser.parse_args(argv)
    NUM_INFERENCE_STEPS = args.inference_steps
    torch.set_num_threads(args.threads)
    resolution = kh.TrainConfig.for_gpu("cpu").resolution
    train_pairs = kh.AspectPairs(TRAIN_SEED, args.train_scenes, resolution)
    held_pairs = kh.AspectPairs(HELD_OUT_SEED, args.held_out_scenes, resolution)
    report = {"command": "python scripts/bucket_heldout.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "steps": args.steps, "train_scenes": len(train_pairs), "held_out_scenes": len(held_pairs),
              "resolution": resolution, "num_inference_steps": NUM_INFERENCE_STEPS,
              "aspects": [f"{w}:{h}" for w, h in kh.PHOTO_ASPECTS], "l2_form": kh.TrainConfig().l2_form,
              "policies": {}}
    outputs = {}
    with tempfile.TemporaryDirectory(prefix="bucket_scenes_") as tmp:
        train_root, held_root = os.path.join(tmp, "train"), os.path.join(tmp, "held_out")
        write_scenes(train_pairs, train_root)
        write_scenes(held_pairs, held_root)
        held_out = list(kh.KontextPairs(held_root, resolution, resize="bucket"))  # each scene at its own shape
        for policy in args.policies:
            pipe, region, depth, seconds, buckets = train_policy(train_root, policy, resolution, args.steps)
            summary, outputs[policy] = evaluate(pipe, region, depth, held_out)
            report["policies"][policy] = {"held_out": summary, "mask_kept": mask_kept(train_pairs, policy, resolution),
                                          "train_buckets": buckets, "train_seconds": round(seconds, 1)}
            print(f"{policy:7s} in {summary['all']['in_db']:.2f} dB  out {summary['all']['out_db']:.2f} dB  "
                  f"masks kept {report['policies'][policy]['mask_kept']:.1%}  buckets {buckets}", flush=True)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=2)
    bucket_figure(held_out, outputs, args.figure)
    return report


if __name__ == "__main__":
    main()
