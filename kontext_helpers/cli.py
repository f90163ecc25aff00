"""The command line: ``python -m kontext_helpers train --data DIR --out DIR [options]``, ``memory-plan`` and
``rehearsal-model FOLDER`` and ``pretrain-tiny`` (the shipped tiny weights).

Every :class:`TrainConfig` field is a flag (``--rank 8``, ``--no-use-depth``, ``--depth-kind tokens``,
``--depth-source target``, ``--depth-dropout 0.1``) and a key of ``--config run.yaml``
(the flags win); it also runs under ``accelerate launch`` for several GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import typing

from .adapters import push_adapter, save_adapter
from .config import GPU_PRESETS, TrainConfig
from .data import RESIZE_POLICIES, KontextPairs
from .memory import memory_plan
from .pretrain import PretrainConfig, export_run_state, pretrain_tiny
from .rehearsal import build_rehearsal_model
from .training import TrainResult, checkpoint_to_resume, load_for_training, train


def _cli_parser():
    parser = argparse.ArgumentParser(prog="python -m kontext_helpers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a LoRA + region and depth modules on a dataset folder "
                       "(works under accelerate launch)")
    p.add_argument("--config", default=None, help="a YAML file of settings: any TrainConfig field, and data, out, "
                   "model, preset, resize, preview_data, push_to_hub; the flags below override it")
    p.add_argument("--data", default=None, help="dataset folder: context/ target/ masks/ depth/ prompts.txt")
    p.add_argument("--out", default=None, help="output folder (checkpoints/, previews/, adapter/)")
    p.add_argument("--model", default=None, help="'tiny' (the default), a Hub id or a local pipeline folder")
    p.add_argument("--preset", default=None, help="GPU preset: auto, " + ", ".join(sorted(GPU_PRESETS)))
    p.add_argument("--resize", default=None, choices=list(RESIZE_POLICIES),
                   help="how pairs become training images: bucket (the default: each at its own aspect ratio, "
                   "Kontext's preferred resolutions at the resolution's area), square (stretch) or crop (centre "
                   "square)")
    p.add_argument("--preview-data", dest="preview_data", default=None, metavar="FOLDER",
                   help="a dataset folder whose first pair the previews edit (one training never sees); "
                   "default: the training set's first pair")
    p.add_argument("--push-to-hub", dest="push_to_hub", default=None, metavar="REPO_ID",
                   help="upload the adapter with a model card to this Hub repository (private; your login's token)")
    m = sub.add_parser("memory-plan", help="what FLUX.1 Kontext [dev] keeps in memory for each GPU preset")
    m.add_argument("--preset", nargs="*", default=["t4", "l4", "a100-40", "a100-80", "h100"],
                   help="GPU presets to plan (default: all but cpu)")
    r = sub.add_parser("rehearsal-model", help="write FLUX.1 Kontext [dev] at real width, one block each, random "
                       "weights (2.2 GB): the GPU path on a CPU")
    r.add_argument("folder", help="where to write it (reused when complete)")
    _pretrain_parser(sub)
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("output_dir", "expected_peak_memory_gb", "peak_memory_source"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            base = next((t for t in (int, float, str) if t in typing.get_args(kind) or kind is t), str)
            p.add_argument(flag, type=base, default=None, help=f"default {f.default!r}")
    return parser


RUN_KEYS = {"data": None, "out": None, "model": "tiny", "preset": None, "resize": "bucket",
            "preview_data": None, "push_to_hub": None}  # the run's own settings, not TrainConfig fields
_FILE_ONLY = ("expected_peak_memory_gb", "peak_memory_source")  # set by presets, never by hand


def read_config_file(path: str) -> dict:
    """The settings of a ``--config`` YAML file: a mapping of :class:`TrainConfig` fields and :data:`RUN_KEYS`.

    Raises one ``ValueError`` naming the file and every unknown key (with the closest known name) or mistyped
    value.
    """
    import difflib

    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--config {path}: no such file") from err
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path} is not valid YAML: {err}") from err
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings (key: value), got {type(data).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    known = sorted((set(hints) - set(_FILE_ONLY)) | set(RUN_KEYS))
    problems = []
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            problems.append(f"unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        elif key in hints and not _fits(value, hints[key]):
            problems.append(f"{key}: {value!r} is not a {hints[key]}")
    if problems:
        raise ValueError(f"--config {path}:\n  - " + "\n  - ".join(problems))
    return data


def _fits(value, hint) -> bool:
    """Whether a YAML value fits a TrainConfig field's type (an int is a fine float; a bool is not an int)."""
    allowed = typing.get_args(hint) or (hint,)
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and (int in allowed or float in allowed):
        return True
    return any(value is None if t is type(None) else isinstance(value, t) for t in allowed)


def _run_settings(args) -> tuple[dict, dict]:
    """``(run keys, TrainConfig overrides)``: the ``--config`` file's settings, then the flags over them."""
    from_file = read_config_file(args.config) if args.config else {}
    run = {k: args_value if (args_value := getattr(args, k)) is not None else from_file.get(k, default)
           for k, default in RUN_KEYS.items()}
    missing = [k for k in ("data", "out") if run[k] is None]
    if missing:
        raise SystemExit(f"train needs {' and '.join('--' + k for k in missing)} (a flag or a key of --config)")
    overrides = {k: v for k, v in from_file.items() if k not in RUN_KEYS}
    overrides.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                      if getattr(args, f.name, None) is not None})
    overrides["output_dir"] = run["out"]
    return run, overrides


def _pretrain_parser(sub) -> None:
    """``pretrain-tiny``: every :class:`PretrainConfig` field is a flag (``--base-steps 3000``)."""
    p = sub.add_parser("pretrain-tiny", help="pretrain the tiny model on drawn scenes; writes the shipped weights")
    p.add_argument("--out", default="outputs/pretrain-tiny", help="run folder: rendered scenes, resumable state")
    p.add_argument("--weights", default=None, help="where the fp16 weights go (default: the package's file)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--export-only", action="store_true", help="write --out's last saved state as weights")
    p.add_argument("--decoder-from", default=None, help="with --export-only: the VAE decoder of this run folder")
    for f in dataclasses.fields(PretrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"default {f.default!r}")


def _memory_plans(presets: list[str]) -> dict:
    """``python -m kontext_helpers memory-plan``: one plan per preset, then a Markdown table of them."""
    configs = {name: TrainConfig.for_gpu(name) for name in presets}
    plans = {name: memory_plan(cfg) for name, cfg in configs.items()}
    print("\n| preset | GPU | LoRA | GPU weights + LoRA states, at least | estimated training peak (GPU) | "
          "encoders in system RAM, at least |")
    print("|---|---|---|---|---|---|")
    for name, plan in plans.items():
        cfg = configs[name]
        peak = "-" if cfg.expected_peak_memory_gb is None else f"{cfg.expected_peak_memory_gb:.1f} GB"
        print(f"| {name} | {GPU_PRESETS[name]['label']} | rank {cfg.rank}, {cfg.resolution} px | "
              f"{plan['gpu_weights_gb']:.1f} GB | {peak} | {plan['ram_weights_gb']:.1f} GB |")
    return plans


def _rehearsal_model(folder: str) -> dict:
    """``python -m kontext_helpers rehearsal-model FOLDER``: build it, then say how to run the notebooks on it."""
    kwargs = build_rehearsal_model(folder)
    print(f"rehearsal model in {os.path.abspath(folder)}; run every notebook's GPU path on it (quick, T4 preset):\n"
          f"  KONTEXT_MODEL={os.path.abspath(folder)} KONTEXT_PRESET=t4 KONTEXT_QUICK=1 make demo")
    return kwargs


def main(argv: list[str] | None = None) -> TrainResult | dict:
    """Entry point of ``python -m kontext_helpers train``; returns the :class:`TrainResult`."""
    args = _cli_parser().parse_args(argv)
    if args.command == "memory-plan":
        return _memory_plans(args.preset)
    if args.command == "rehearsal-model":
        return _rehearsal_model(args.folder)
    if args.command == "pretrain-tiny" and args.export_only:
        return export_run_state(args.out, args.weights, args.decoder_from)
    if args.command == "pretrain-tiny":
        cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
        return pretrain_tiny(cfg, args.out, args.weights, progress=not args.quiet)
    run, overrides = _run_settings(args)
    config = TrainConfig.for_gpu(run["preset"], **overrides) if run["preset"] else TrainConfig(**overrides)
    dataset = KontextPairs(run["data"], resolution=config.resolution, resize=run["resize"])
    config.validate(dataset)
    preview_pair = None
    if run["preview_data"]:  # opened (and checked) before any model work, like the training set
        preview_pair = KontextPairs(run["preview_data"], resolution=config.resolution, resize=run["resize"])[0]
    checkpoint_to_resume(config, verbose=False)  # a checkpoint of other settings fails here, before loading a model
    pipe, cache = load_for_training(run["model"], dataset, config)  # in stages when the preset says so (T4, L4)
    result = train(pipe, dataset, config, cache=cache, preview_pair=preview_pair)
    from accelerate import PartialState

    if PartialState().is_main_process:
        path = save_adapter(pipe, result.region, os.path.join(run["out"], "adapter"), config=config,
                            depth_module=result.depth)
        print(f"adapter saved to {path}")
        if run["push_to_hub"]:
            previews = sorted(glob.glob(os.path.join(run["out"], "previews", "*.png")))[-1:]
            prompts = list(dict.fromkeys(dataset.prompts))  # unique, in dataset order
            print("pushed to", push_adapter(path, run["push_to_hub"], prompts=prompts, images=previews))
        last = result.history[-1] if result.history else {}
        print(f"done: {len(result.history)} steps, final loss {last.get('loss', float('nan')):.4f}")
    return result
