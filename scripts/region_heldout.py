"""Does the mask decide where the edit happens? A held-out test where only the mask can tell.

    python scripts/region_heldout.py                         # every region kind, about 20 min on one thread
    python scripts/region_heldout.py --kinds none marked --steps 600
    python scripts/region_heldout.py --json docs/region_heldout.json --figure docs/images/region_heldout.png

Twin scenes (``kh.render_twin_scene``): two identical objects and one prompt that fits both ("make the red
sphere blue"); target ``k`` recolours object ``k`` alone, so nothing but the mask says which one to change.
For each region kind (``kh.REGION_KINDS`` and ``"none"``, a LoRA alone) the tiny model gets a ``cpu``-preset
LoRA trained on the training scenes (each with both masks, tight and box); then every held-out scene is edited
with the mask on each object in turn, with a tight mask (the silhouette) and a rough one (a box):

* ``accuracy``: the share of cases where the masked object changed and the other did not. An object counts as
  changed when its mean colour lies nearer its recoloured target than the context;
* ``in_db``: PSNR to the target inside the object's silhouette mask (the same pixels for tight and box masks);
* ``out_db``: PSNR to the context outside the mask the edit was given.

Variants: each kind with its region signal, with and without latent blending (``sample_edit(..., blend=True)``,
the inpaint pipeline's hard constraint); the LoRA alone, with and without blending; and diffusers'
``FluxKontextInpaintPipeline`` with the same LoRA alone.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kontext_helpers as kh  # noqa: E402
from kontext_helpers.images import depth_to_pil, image_to_pil_rgb, mask_to_pil  # noqa: E402

KINDS = ("none", "linear", "cells", "marked_context", "marked")
TRAIN_SEED, HELD_OUT_SEED = 0, 1  # twin-scene streams: training scenes and held-out scenes never overlap
SAMPLE_SEED = 0
STEPS = 1500  # LoRA updates per kind
TRAIN_SCENES, HELD_OUT_SCENES = 24, 12
NUM_INFERENCE_STEPS = 28  # sample_edit's default
DEPTH_MODULE = None  # the depth module of the LoRA being evaluated (depth kind "tokens"), set by main()


class BothMasks(torch.utils.data.Dataset):
    """Twin training pairs with tight and box masks (four samples per scene)."""

    def __init__(self, seed: int, indices, resolution: int):
        tight = kh.TwinPairs(seed, indices, resolution)
        box = copy.copy(tight)  # the same renders, rendered once
        box.mask_kind = "box"
        self.parts = [tight, box]
        self.resolution = resolution

    def __len__(self):
        return sum(len(p) for p in self.parts)

    def __getitem__(self, i):
        n = len(self.parts[0])
        return self.parts[0][i] if i < n else self.parts[1][i - n]


def score(out: torch.Tensor, scene: dict, k: int, mask: torch.Tensor) -> dict:
    """One case: the mask on object ``k``; the other object is ``1 - k``."""
    ctx, objs = scene["context"], scene["objects"]
    changed = kh.object_changed(out, ctx, scene["targets"][k], objs[k])
    other = kh.object_changed(out, ctx, scene["targets"][1 - k], objs[1 - k])
    in_mask = kh.edit_metrics(out, ctx, scene["targets"][k], scene["masks"][k], lpips=False)  # the silhouette's
    given = kh.edit_metrics(out, ctx, None, mask, lpips=False)  # outside the mask the edit was given
    return {"right": changed and not other, "masked_changed": changed, "other_changed": other,
            "in_db": in_mask["psnr_in_vs_target"], "out_db": given["psnr_out_vs_context"]}


def edit(pipe, scene: dict, mask, **kw) -> torch.Tensor:
    out = kh.sample_edit(pipe, scene["context"], scene["prompt"], mask=mask, depth=scene["depth"],
                         depth_module=DEPTH_MODULE, generator=torch.Generator().manual_seed(SAMPLE_SEED),
                         output_type="pt", num_inference_steps=NUM_INFERENCE_STEPS, max_sequence_length=32, **kw)
    return out[0].float().cpu()  # [1, 3, H, W] -> [3, H, W]


@functools.lru_cache(maxsize=1)
def inpainter_for(pipe):
    """diffusers' ``FluxKontextInpaintPipeline`` from ``pipe``'s components (the LoRA on), built once per pipe."""
    from diffusers import FluxKontextInpaintPipeline

    inpainter = FluxKontextInpaintPipeline(**pipe.components)
    inpainter.set_progress_bar_config(disable=True)
    return inpainter


def inpaint(pipe, scene: dict, mask) -> torch.Tensor:
    """The inpaint pipeline with the same LoRA, the same seed and depth."""
    inpainter = inpainter_for(pipe)
    size = scene["context"].shape[-1]
    out = inpainter(image=image_to_pil_rgb(scene["context"]), mask_image=mask_to_pil(mask),
                    prompt=scene["prompt"], strength=1.0, height=size, width=size, max_area=size * size,
                    num_inference_steps=NUM_INFERENCE_STEPS, guidance_scale=2.5, max_sequence_length=32,
                    ip_adapter_image=depth_to_pil(scene["depth"]), _auto_resize=False,
                    generator=torch.Generator().manual_seed(SAMPLE_SEED), output_type="pt").images
    return out[0].float().cpu()


def variants(kind: str) -> dict:
    """``{variant name: sampler(pipe, region, scene, mask)}`` for a LoRA trained with ``kind``."""
    if kind == "none":
        return {"LoRA alone": lambda p, r, s, m: edit(p, s, None),
                "LoRA alone + blend": lambda p, r, s, m: edit(p, s, m, blend=True),
                "inpaint pipeline + LoRA": lambda p, r, s, m: inpaint(p, s, m)}
    return {kind: lambda p, r, s, m: edit(p, s, m, region=r),
            f"{kind} + blend": lambda p, r, s, m: edit(p, s, m, region=r, blend=True)}


def train_kind(kind: str, train_set, steps: int, depth_kind: str):
    """A ``cpu``-preset LoRA with region ``kind`` and the context's depth as ``depth_kind``: ``(pipe, region, depth
    module or None, seconds)``."""
    pipe = kh.load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory(prefix="region_heldout_") as out:
        config = kh.TrainConfig.for_gpu("cpu", steps=steps, region_kind=kind, depth_kind=depth_kind, output_dir=out,
                                        checkpoint_every=0)
        t0 = time.perf_counter()
        result = kh.train(pipe, train_set, config, progress=False)
    return pipe, result.region, result.depth, time.perf_counter() - t0


def evaluate(pipe, region, kind: str, scenes: list[dict], keep_images: int) -> tuple[dict, dict]:
    """``{variant: {mask kind: summary}}`` and the first scenes' outputs ``{variant: [[out_a, out_b], ...]}``."""
    summary, images = {}, {}
    for name, run in variants(kind).items():
        summary[name] = {}
        for mask_kind in ("tight", "box"):
            cases = []
            for si, scene in enumerate(scenes):
                masks = scene["masks"] if mask_kind == "tight" else scene["boxes"]
                outs = [run(pipe, region, scene, masks[k]) for k in (0, 1)]
                cases += [score(outs[k], scene, k, masks[k]) for k in (0, 1)]
                if mask_kind == "tight" and si < keep_images:
                    images.setdefault(name, []).append(outs)
            summary[name][mask_kind] = summarise(cases)
    return summary, images


def summarise(cases: list[dict]) -> dict:
    n = len(cases)
    return {"cases": n, "accuracy": sum(c["right"] for c in cases) / n,
            "masked_changed": sum(c["masked_changed"] for c in cases) / n,
            "other_changed": sum(c["other_changed"] for c in cases) / n,
            "in_db": sum(c["in_db"] for c in cases) / n, "out_db": sum(c["out_db"] for c in cases) / n}


def table_lines(report: dict) -> list[str]:
    lines = [f"{'variant':28s} {'mask':5s} {'accuracy':>9s} {'masked':>7s} {'other':>6s} {'in dB':>6s} {'out dB':>7s}"]
    for name, by_mask in report["variants"].items():
        for mask_kind, s in by_mask.items():
            lines.append(f"{name:28s} {mask_kind:5s} {s['accuracy']:9.0%} {s['masked_changed']:7.0%} "
                         f"{s['other_changed']:6.0%} {s['in_db']:6.1f} {s['out_db']:7.1f}")
    lines.append("train seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["train_seconds"].items()))
    return lines


def heldout_figure(scenes: list[dict], images: dict, path: str) -> None:
    """Rows: held-out scenes with the mask on object a, then b; columns: context + mask, target, each variant."""
    import matplotlib.pyplot as plt

    names = list(images)
    rows = [(si, k) for si in range(len(next(iter(images.values())))) for k in (0, 1)]
    fig, axes = plt.subplots(len(rows), len(names) + 2, figsize=(1.6 * (len(names) + 2), 1.7 * len(rows)))
    for r, (si, k) in enumerate(rows):
        scene = scenes[si]
        panels = [scene["context"], scene["targets"][k]] + [images[n][si][k] for n in names]
        titles = ["context + mask", "target"] + names
        for c, (img, title) in enumerate(zip(panels, titles)):
            ax = axes[r, c]
            ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())  # [3, H, W] -> [H, W, 3]
            if c == 0:
                ax.contour(scene["masks"][k][0].numpy(), levels=[0.5], colors="white", linewidths=1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
        axes[r, 0].set_ylabel(scene["prompt"], fontsize=6)
    fig.suptitle("Held-out twin scenes (tiny model, 128 px): the edit should follow the mask (white outline)",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    global NUM_INFERENCE_STEPS, DEPTH_MODULE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--train-scenes", type=int, default=TRAIN_SCENES)
    parser.add_argument("--held-out-scenes", type=int, default=HELD_OUT_SCENES)
    parser.add_argument("--inference-steps", type=int, default=NUM_INFERENCE_STEPS, help="denoising steps per edit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--depth-kind", default=kh.DEFAULT_DEPTH_KIND, choices=[*kh.DEPTH_KINDS, "none"],
                        help="how the twin scenes' (context) depth reaches the model while training and editing")
    parser.add_argument("--json", default=os.path.join("outputs", "region_heldout.json"))
    parser.add_argument("--figure", default=os.path.join("outputs", "region_heldout.png"))
    args = parser.parse_args(argv)
    NUM_INFERENCE_STEPS = args.inference_steps
    torch.set_num_threads(args.threads)
    resolution = kh.TrainConfig.for_gpu("cpu").resolution
    train_set = BothMasks(TRAIN_SEED, range(args.train_scenes), resolution)
    scenes = [kh.render_twin_scene(HELD_OUT_SEED, i, resolution) for i in range(args.held_out_scenes)]
    report = {"command": "python scripts/region_heldout.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "steps": args.steps, "train_samples": len(train_set), "held_out_scenes": len(scenes),
              "resolution": resolution, "num_inference_steps": NUM_INFERENCE_STEPS, "depth_kind": args.depth_kind,
              "variants": {}, "train_seconds": {}}
    all_images = {}
    for kind in args.kinds:
        pipe, region, DEPTH_MODULE, seconds = train_kind(kind, train_set, args.steps, args.depth_kind)
        report["train_seconds"][kind] = round(seconds, 1)
        summary, images = evaluate(pipe, region, kind, scenes, keep_images=2)
        report["variants"].update(summary)
        all_images.update(images)
        print("\n".join(table_lines(report)[-len(summary) * 2 - 1: -1]), flush=True)
    print("\n".join(table_lines(report)))
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=2)
    heldout_figure(scenes, all_images, args.figure)
    return report


if __name__ == "__main__":
    main()
