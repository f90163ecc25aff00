"""What does each form of the L2 stabiliser do? The same ``cpu``-preset run with each ``TrainConfig.l2_form``.

    python scripts/l2_forms.py --threads 1                       # about 20 min on one thread
    python scripts/l2_forms.py --steps 2 --seeds 0 --held-out 1 --json /tmp/l2.json --figure /tmp/l2.png  # smoke
    python scripts/l2_forms.py --json docs/l2_forms.json --figure docs/images/l2_forms.png

The tiny model gets the ``cpu`` preset's LoRA (rank 8, attention + feed-forward, lr 3e-3, 800 updates) on the ten
pairs of ``data_samples/``, as notebook 04 trains it, once per variant and seed:

* ``none``: both lambdas 0;
* ``mean_square``: ``lambda * mean(p^2)`` in the loss (a gradient of ``2 lambda p / n`` per weight);
* ``sum``: ``lambda * sum(p^2)``, the original design's form (``2 lambda p`` per weight);
* ``decoupled``: no loss term; AdamW's weight decay ``lambda`` on the LoRA's and the region module's groups
  (each step shrinks a weight by ``lr * lambda``), at torch's default decay 1e-2, at 1e-1 and at 1.

The form with the lowest held-out evaluation loss (``err_in + err_out``, mean over seeds and held-out pairs) is
reported as ``best``; TrainConfig's default ``l2_form`` follows it (tests/test_l2_forms.py).

Each run reports the LoRA's size three ways (``param_norm``: ``sqrt(sum p^2)`` over every ``lora_A`` and
``lora_B`` entry; ``a_norm``, ``b_norm`` the same over each kind; ``delta_norm``: ``sqrt(sum over layers of
||(alpha / r) B A||_F^2)``, the size of what the LoRA adds to the frozen weights), along the run and at its end,
and two yardsticks: the fixed evaluation loss (``kh.evaluation_loss``: fixed noise and sigmas, ``err_in`` in the
mask against the target, ``err_out`` outside against the context) on the training pairs and on held-out pairs
(``kh.DrawnPairs`` stream 7, as notebook 04), and edits of the held-out pairs (``kh.sample_edit`` with the mask,
region and depth, 28 steps, guidance 2.5, seed 0) scored with ``kh.edit_metrics``: PSNR to the target inside the
mask, to the context outside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kontext_helpers as kh  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (l2_form, l2_lora_lambda, l2_region_lambda); the region lambda stays at TrainConfig's default
VARIANTS = {
    "none": ("mean_square", 0.0, 0.0),
    "mean_square": ("mean_square", 1e-4, 1e-4),
    "sum": ("sum", 1e-4, 1e-4),
    "decoupled 1e-2": ("decoupled", 1e-2, 1e-4),
    "decoupled 1e-1": ("decoupled", 1e-1, 1e-4),
    "decoupled 1": ("decoupled", 1.0, 1e-4),
}
HELD_OUT_STREAM = 7  # kh.DrawnPairs stream of the held-out pairs (notebook 04's)
NORM_EVERY = 50  # updates between two norm records


def lora_norms(transformer, scale: float) -> dict[str, float]:
    """The LoRA's size: every parameter, the A and the B matrices, and ``scale * B A`` summed over layers."""
    named = dict(kh.collect_lora_named_params(transformer))
    a = [p.detach().float() for n, p in named.items() if ".lora_A." in n]
    b = [p.detach().float() for n, p in named.items() if ".lora_B." in n]
    delta = sum(float((scale * named[n.replace(".lora_A.", ".lora_B.")].detach().float() @ p.detach().float())
                      .pow(2).sum()) for n, p in named.items() if ".lora_A." in n)  # [d_out, r] @ [r, d_in]
    sq = lambda ps: sum(float(p.pow(2).sum()) for p in ps)  # noqa: E731
    return {"param_norm": math.sqrt(sq(a) + sq(b)), "a_norm": math.sqrt(sq(a)), "b_norm": math.sqrt(sq(b)),
            "delta_norm": math.sqrt(delta), "n_params": sum(p.numel() for p in a + b)}


def mean_eval(pipe, region, depth, cache) -> dict[str, float]:
    """``kh.evaluation_loss`` averaged over every sample of ``cache``."""
    rows = [kh.evaluation_loss(pipe, region, cache, index=i, depth_module=depth) for i in range(len(cache.samples))]
    return {k: statistics.fmean(r[k] for r in rows) for k in ("err_in", "err_out")}


def edit_scores(pipe, region, depth, pairs) -> dict[str, float]:
    """Mean PSNR in the mask (to the target) and outside it (to the context) of edits of ``pairs``."""
    rows = []
    for item in pairs:
        out = kh.sample_edit(pipe, item["context"], item["prompt"], region=region, depth_module=depth,
                             mask=item["mask"] if region is not None else None,
                             depth=item["depth"] if depth is not None else None,
                             generator=torch.Generator().manual_seed(0), output_type="pt",
                             max_sequence_length=32)[0].float()  # [1, 3, H, W] -> [3, H, W]
        rows.append(kh.edit_metrics(out, item["context"], item["target"], item["mask"], lpips=False))
    return {"psnr_in": statistics.fmean(r["psnr_in_vs_target"] for r in rows),
            "psnr_out": statistics.fmean(r["psnr_out_vs_context"] for r in rows)}


def run(name: str, seed: int, steps: int, train_set, caches: dict, held_out) -> dict:
    """One training run of variant ``name`` and its measurements."""
    form, lora_lambda, region_lambda = VARIANTS[name]
    pipe = kh.load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory(prefix="l2_forms_") as out:
        cfg = kh.TrainConfig.for_gpu("cpu", steps=steps, seed=seed, output_dir=out, checkpoint_every=0,
                                     l2_form=form, l2_lora_lambda=lora_lambda, l2_region_lambda=region_lambda)
        scale = (cfg.alpha or cfg.rank) / cfg.rank
        with torch.random.fork_rng(devices=[]):  # the LoRA train() would attach (it keeps an attached one)
            torch.manual_seed(cfg.seed)
            kh.add_lora(pipe.transformer, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.lora_targets,
                        include_ip_adapter=cfg.lora_ip_adapter)
        trace = [{"step": 0, **lora_norms(pipe.transformer, scale)}]

        def track(record):
            if "preview" not in record and (record["step"] % NORM_EVERY == 0 or record["step"] == steps):
                trace.append({"step": record["step"], "loss": record["loss"],
                              **lora_norms(pipe.transformer, scale)})

        t0 = time.perf_counter()
        result = kh.train(pipe, train_set, cfg, cache=caches["train"], progress=False, callback=track)
        seconds = time.perf_counter() - t0
    region_norm = math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in result.region.parameters()))
    return {"variant": name, "l2_form": form, "l2_lora_lambda": lora_lambda, "l2_region_lambda": region_lambda,
            "seed": seed, "train_seconds": round(seconds, 1), "final": trace[-1], "trace": trace,
            "region_norm": region_norm, "train_eval": mean_eval(pipe, result.region, result.depth, caches["train"]),
            "held_out_eval": mean_eval(pipe, result.region, result.depth, caches["held_out"]),
            "held_out_edits": edit_scores(pipe, result.region, result.depth, held_out)}


def summarise(runs: list[dict]) -> dict:
    """Per variant: the mean over seeds of each final figure, and each seed's held-out in-mask PSNR."""
    out = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        mean = lambda get, mine=mine: statistics.fmean(get(r) for r in mine)  # noqa: E731
        out[name] = {
            "l2_form": mine[0]["l2_form"], "l2_lora_lambda": mine[0]["l2_lora_lambda"],
            "param_norm": mean(lambda r: r["final"]["param_norm"]), "a_norm": mean(lambda r: r["final"]["a_norm"]),
            "b_norm": mean(lambda r: r["final"]["b_norm"]), "delta_norm": mean(lambda r: r["final"]["delta_norm"]),
            "region_norm": mean(lambda r: r["region_norm"]),
            "train_err_in": mean(lambda r: r["train_eval"]["err_in"]),
            "held_out_err_in": mean(lambda r: r["held_out_eval"]["err_in"]),
            "held_out_err_out": mean(lambda r: r["held_out_eval"]["err_out"]),
            "held_out_psnr_in": mean(lambda r: r["held_out_edits"]["psnr_in"]),
            "held_out_psnr_out": mean(lambda r: r["held_out_edits"]["psnr_out"]),
            "held_out_eval_loss": mean(lambda r: r["held_out_eval"]["err_in"] + r["held_out_eval"]["err_out"]),
            "held_out_eval_loss_per_seed": [r["held_out_eval"]["err_in"] + r["held_out_eval"]["err_out"] for r in mine],
            "held_out_psnr_in_per_seed": [r["held_out_edits"]["psnr_in"] for r in mine],
            "held_out_psnr_out_per_seed": [r["held_out_edits"]["psnr_out"] for r in mine],
        }
    return out


def markdown_rows(report: dict) -> list[str]:
    """The table docs/design.md quotes (note 9), one row per variant, from a report this script wrote."""
    lines = ["| variant | form | lambda (LoRA) | LoRA norm, start -> end | B A norm | training pairs' err_in | "
             "held-out eval loss (seeds) | held-out edits: PSNR in / out (dB) |", "|---" * 8 + "|"]
    start = statistics.fmean(r["trace"][0]["param_norm"] for r in report["runs"])
    for name, s in report["summary"].items():
        seeds = " / ".join(f"{v:.3f}" for v in s["held_out_eval_loss_per_seed"])
        form = f"`{s['l2_form']}`" if s["l2_lora_lambda"] else "-"
        lines.append(f"| `{name}` | {form} | {s['l2_lora_lambda']:g} | {start:.1f} -> {s['param_norm']:.1f} | "
                     f"{s['delta_norm']:.1f} | {s['train_err_in']:.4f} | {s['held_out_eval_loss']:.4f} ({seeds}) | "
                     f"{s['held_out_psnr_in']:.2f} / {s['held_out_psnr_out']:.2f} |")
    return lines


def figure(runs: list[dict], path: str) -> None:
    """The LoRA's parameter norm and delta norm along each run (seed 0 solid, others dashed)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    colors = dict(zip(VARIANTS, ("black", "tab:blue", "tab:red", "tab:green", "tab:olive", "tab:purple")))
    for r in runs:
        steps = [t["step"] for t in r["trace"]]
        for ax, key in zip(axes, ("param_norm", "delta_norm")):
            ax.plot(steps, [t[key] for t in r["trace"]], color=colors[r["variant"]], lw=1,
                    ls="-" if r["seed"] == runs[0]["seed"] else "--",
                    label=r["variant"] if r["seed"] == runs[0]["seed"] else None)
    axes[0].set_title("sqrt(sum p^2) over every lora_A and lora_B entry", fontsize=9)
    axes[1].set_title("sqrt(sum over layers ||(alpha/r) B A||_F^2): what the LoRA adds", fontsize=9)
    for ax in axes:
        ax.set_xlabel("update")
        ax.legend(fontsize=7)
    fig.suptitle("The LoRA's size along a cpu-preset run on the tiny model, one line per L2 form", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=kh.TrainConfig.for_gpu("cpu").steps)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--held-out", type=int, default=8, help="held-out drawn pairs (kh.DrawnPairs stream 7)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=os.path.join("outputs", "l2_forms.json"))
    parser.add_argument("--figure", default=os.path.join("outputs", "l2_forms.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    resolution = kh.TrainConfig.for_gpu("cpu").resolution
    train_set = kh.KontextPairs(os.path.join(ROOT, "data_samples"), resolution=resolution)
    held_out = kh.DrawnPairs(HELD_OUT_STREAM, args.held_out, resolution)
    pipe = kh.load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    seq = kh.TrainConfig.for_gpu("cpu").max_sequence_length
    caches = {name: kh.build_train_cache(pipe, data, max_sequence_length=seq, progress=False)
              for name, data in (("train", train_set), ("held_out", held_out))}
    base = {"held_out_eval": mean_eval(pipe, None, None, caches["held_out"]),
            "held_out_edits": edit_scores(pipe, None, None, held_out)}  # the base model: no LoRA, region or depth
    runs = []
    for seed in args.seeds:
        for name in args.variants:
            runs.append(run(name, seed, args.steps, train_set, caches, held_out))
            f, e = runs[-1]["final"], runs[-1]["held_out_edits"]
            print(f"seed {seed} {name:<15} param norm {f['param_norm']:8.3f}  delta norm {f['delta_norm']:7.3f}  "
                  f"held-out PSNR in {e['psnr_in']:5.2f} out {e['psnr_out']:5.2f}  "
                  f"({runs[-1]['train_seconds']:.0f} s)", flush=True)
    summary = summarise(runs)
    forms = {n: s for n, s in summary.items() if n != "none"}
    best = min(forms, key=lambda n: forms[n]["held_out_eval_loss"])
    report = {
        "command": "python scripts/l2_forms.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "tiny", "preset": "cpu", "steps": args.steps, "seeds": args.seeds, "resolution": resolution,
        "train_pairs": len(train_set), "held_out_pairs": len(held_out), "held_out_stream": HELD_OUT_STREAM,
        "lora_params": runs[0]["final"]["n_params"], "learning_rate": kh.TrainConfig.for_gpu("cpu").learning_rate,
        "rank": kh.TrainConfig.for_gpu("cpu").rank, "threads": args.threads,
        "variants": {n: dict(zip(("l2_form", "l2_lora_lambda", "l2_region_lambda"), VARIANTS[n]))
                     for n in args.variants},
        "base_model": base, "summary": summary, "runs": runs,
        "rule": "best: the lowest held-out evaluation loss (err_in + err_out), mean over seeds, among the forms",
        "best": {"variant": best, "l2_form": forms[best]["l2_form"],
                                  "l2_lora_lambda": forms[best]["l2_lora_lambda"]},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(f"\n{'variant':<15} {'param':>7} {'A':>7} {'B':>7} {'delta':>7} {'train in':>9} {'held in':>8} "
          f"{'held out':>8} {'PSNR in':>8} {'PSNR out':>8}")
    for n, s in summary.items():
        print(f"{n:<15} {s['param_norm']:7.3f} {s['a_norm']:7.3f} {s['b_norm']:7.3f} {s['delta_norm']:7.3f} "
              f"{s['train_err_in']:9.4f} {s['held_out_err_in']:8.4f} {s['held_out_err_out']:8.4f} "
              f"{s['held_out_psnr_in']:8.2f} {s['held_out_psnr_out']:8.2f}")
    print(f"total {report['seconds']:.0f} s\n\n" + "\n".join(markdown_rows(report)))
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(report, fh, indent=2)
    figure(runs, args.figure)
    return report


if __name__ == "__main__":
    main()
