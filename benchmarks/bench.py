"""make bench: step cost against a plain diffusers-style step, memory per block at real width, preset peaks.

    .venv/bin/python benchmarks/bench.py [--quick] [--out outputs/bench/bench.json] [--threads 1] [--block-threads 2]
    .venv/bin/python benchmarks/bench.py --presets-only   # preset peaks again from the committed block figures

Four parts, one JSON (``outputs/bench/bench.json``) and one printed table:

1. ``steps``: training-step time on the tiny model (``kh.load_pipeline("tiny")``), every variant interleaved
   in one process (the order rotates each round), medians and minimums, each as a ratio to the reference, and
   the median of the per-round ratios (each round's step over the same round's reference step): ``reference``,
   a plain diffusers-style Kontext LoRA step (``train_dreambooth_lora_flux_kontext.py``'s loop: ``[noisy target
   | context]`` into the transformer, one velocity MSE over the target tokens, cached latents and prompts, the
   same LoRA targets and rank, no region, no depth); ``project``, the step of ``kh.train`` with the default
   config (``_one_update``'s body written with the public functions: sampled index, noise and sigma, depth
   dropout, ``kh.training_loss`` with the ``"marked"`` region, the ``"tokens"`` depth module and L2, clipping,
   AdamW over LoRA, region and depth, schedule); ``project_no_depth`` (the region alone), ``project_no_region``
   (the depth tokens alone), ``project_ip_adapter`` (depth kind ``"ip_adapter"``: the cached CLIP embedding
   through the IP-Adapter instead of the depth tokens); ``project_bucket`` (the ``project`` step on the sample pairs
   cut to 4:3 and read at their aspect-ratio bucket, 144x112 px at 128: 63 tokens against the square's 64, so about
   1.0x ``project``); ``original``, the original design's step as written
   (docs/design.md, correction 2): reading and resizing the sample's files, encoding the prompt at 512 T5
   tokens, both images through the VAE and the depth map through CLIP vision, then the update with the
   IP-Adapter's depth. One thread by default: the tiny model's small matrices gain little from more, and
   other processes' noise hits one thread least. ``depth_cost`` sums up the requirement: the step with the
   chosen depth kind (``project``) against the plain step, at most :data:`DEPTH_COST_LIMIT` times its time,
   on the tiny model and at real width (the region and depth work measured at D = 3072 beside the
   transformer's 19 + 38 blocks, timed in part 3).
2. ``rss``: peak RSS of each variant's set-up and steps, in its own process, net of the import floor.
3. ``blocks``: one double and one single block of FLUX.1 Kontext [dev] at real width (D = 3072), forward +
   backward with a LoRA in bf16, at 256, 512 and 1024 px, with and without gradient checkpointing
   (``benchmarks/real_width.py``). At 1024 px the checkpointed run is not repeated (it would double the
   bench's time): its time is the plain run's plus one forward, its peak the plain run's, and it says
   ``"derived": true``; at 256 and 512 px both are measured, so the table shows how close that rule is.
4. ``presets``: ``kh.estimate_peak`` for every GPU preset, from these block figures. A full run writes
   ``kontext_helpers/block_calibration.json`` (the figures and the preset peaks that ``kh.GPU_PRESETS``
   reads); ``--quick`` (64 px, T5 length 64, 2 rounds, blocks at D = 256: a test of the code, not a
   measurement) never does.

Absolute times are for this machine and thread count only; read the ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)  # this checkout's kontext_helpers, whichever copy is installed

import torch  # noqa: E402
from real_width import reset_peak, rss_mb  # noqa: E402

import kontext_helpers as kh  # noqa: E402

DATA = os.path.join(REPO, "data_samples")
VARIANTS = ("reference", "project", "project_bucket", "project_no_depth", "project_no_region", "project_ip_adapter",
            "original")
DEPTH_COST_LIMIT = 1.10  # the step with the chosen depth kind, at most this many plain steps (issue: "Cost")
# a subprocess where large tensors are their own mappings, returned on free: RSS follows the tensors
MEASURE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}


def _constant_schedule(opt):
    """diffusers' ``get_scheduler("constant")``, stepped after every update as both training loops do."""
    from diffusers.optimization import get_scheduler

    return get_scheduler("constant", optimizer=opt)


def _update(loss, params, opt, schedule, max_grad_norm: float) -> None:
    """The update both loops end with: backward, clip, optimizer and schedule step, zero the gradients."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    schedule.step()
    opt.zero_grad(set_to_none=True)


def _project_step(pipe, cache, region, depth, lora, opt, cfg):
    """``kh.train``'s update with the public functions: batch, noise, sigma, depth dropout, loss, backward, clip,
    step. ``region`` and ``depth`` (either may be ``None``) are the modules trained beside the LoRA."""
    params = [p for _, p in lora] + [p for m in (region, depth) if m is not None for p in m.parameters()]
    schedule = _constant_schedule(opt)

    def step(i: int, cache=cache):
        idx = kh.sample_indices(len(cache.samples), cfg.seed, i, 1)
        g = torch.Generator().manual_seed(i)
        batch = cache.batch(idx)
        noise = torch.randn(batch["tgt_tok"].shape, generator=g)  # [1, N, 4C]
        sigma = kh.sample_sigmas(1, cfg, g)  # [1]
        if depth is not None and cfg.depth_dropout > 0:  # drawn last, as _one_update draws it
            batch["depth_keep"] = (torch.rand(1, generator=g) >= cfg.depth_dropout).float()  # [1]
        loss, _ = kh.training_loss(pipe.transformer, region, batch, cache.txt_ids, cache.h_tok, cache.w_tok,
                                   noise, sigma, cfg, lora_named_params=lora, depth_module=depth)
        _update(loss, params, opt, schedule, cfg.max_grad_norm)

    return step


def _reference_step(plain, cache, lora, opt, cfg):
    """A plain diffusers-style Kontext LoRA step (the shape of diffusers' ``train_dreambooth_lora_flux_kontext``):
    ``[noisy target | context]``, the pipeline's ids, one velocity MSE over the target tokens."""
    from diffusers import FluxKontextPipeline

    h, w = cache.h_tok, cache.w_tok
    tgt_ids = FluxKontextPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)  # [N, 3]
    ctx_ids = tgt_ids.clone()
    ctx_ids[:, 0] = 1  # the pipeline marks the context image's tokens with 1
    img_ids = torch.cat([tgt_ids, ctx_ids])  # [2N, 3]
    params = [p for _, p in lora]
    schedule = _constant_schedule(opt)

    def step(i: int):
        batch = cache.batch(kh.sample_indices(len(cache.samples), cfg.seed, i, 1))
        g = torch.Generator().manual_seed(i)
        tgt, ctx = batch["tgt_tok"], batch["ctx_tok"]  # [1, N, 4C]
        noise = torch.randn(tgt.shape, generator=g)
        sigma = kh.sample_sigmas(1, cfg, g)  # [1]
        noisy = (1 - sigma[:, None, None]) * tgt + sigma[:, None, None] * noise
        pred = plain.transformer(hidden_states=torch.cat([noisy, ctx], dim=1), timestep=sigma,  # [1, 2N, 4C]
                                 guidance=torch.full([1], cfg.guidance),
                                 pooled_projections=batch["pooled_prompt_embeds"],
                                 encoder_hidden_states=batch["prompt_embeds"], txt_ids=cache.txt_ids, img_ids=img_ids,
                                 return_dict=False)[0][:, : h * w]  # -> [1, N, 4C], the target part
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - tgt).float())
        _update(loss, params, opt, schedule, cfg.max_grad_norm)

    return step


def _original_step(pipe, data, project_step, cfg):
    """The original design's step: read the files, encode prompt (512 T5 tokens), VAE, depth through CLIP vision
    (the IP-Adapter's depth), then update."""

    def step(i: int):
        idx = kh.sample_indices(len(data), cfg.seed, i, 1)[0]
        fresh = kh.build_train_cache(pipe, [data[idx]], max_sequence_length=cfg.max_sequence_length,
                                     depth_kind="ip_adapter", progress=False)
        project_step(0, cache=fresh)

    return step


def _cache(pipe, data, cfg, **depth):
    """The training cache of ``data`` (``depth``: ``use_depth`` / ``depth_kind`` of :func:`kh.build_train_cache`)."""
    return kh.build_train_cache(pipe, data, max_sequence_length=cfg.max_sequence_length, progress=False, **depth)


def landscape_pairs(data, resolution: int) -> kh.KontextPairs:
    """``data``'s pairs cut to 4:3 and read with buckets: every pair at the 4:3 bucket nearest (144x112 at 128 px)."""
    import tempfile

    items = [kh.crop_to_aspect(data[i], (4, 3)) for i in range(len(data))]
    parts = [[it[k] for it in items] for k in ("context", "target", "mask", "depth", "prompt")]
    root = os.path.join(tempfile.mkdtemp(prefix="bench_bucket_"), "pairs")
    return kh.write_pair_folder(root, *parts, resolution=resolution, resize="bucket")


def _project_steps(pipe, data, cfg, variants) -> dict:
    """The project's variants (all but ``reference``) on one pipeline, one LoRA and one optimizer over the LoRA,
    the region module and the depth module, with ``kh.train``'s learning rates."""
    cache = _cache(pipe, data, cfg, depth_kind=cfg.depth_kind)  # "tokens": depth features per token
    c_in = pipe.transformer.config.in_channels
    lora = kh.add_lora(pipe.transformer, rank=cfg.rank, targets=cfg.lora_targets)
    region = kh.make_region_module(cfg.region_kind, cache.h_tok, cache.w_tok, c_in)  # "marked"
    depth = kh.make_depth_module(cfg.depth_kind, c_in)  # a DepthTokenEmbedding
    opt = torch.optim.AdamW([{"params": [p for _, p in lora], "lr": cfg.learning_rate},
                             {"params": list(region.parameters()), "lr": cfg.region_learning_rate},
                             {"params": list(depth.parameters()), "lr": cfg.depth_learning_rate}])
    project = _project_step(pipe, cache, region, depth, lora, opt, cfg)
    ip_cache = _cache(pipe, data, cfg, depth_kind="ip_adapter") if "project_ip_adapter" in variants else None
    bucket_cache = _cache(pipe, landscape_pairs(data, cfg.resolution), cfg) if "project_bucket" in variants else None
    no_depth = _cache(pipe, data, cfg, use_depth=False) if "project_no_depth" in variants else None
    makers = {
        "project": lambda: project,
        "project_bucket": lambda: _project_step(pipe, bucket_cache, region, depth, lora, opt, cfg),
        "project_no_depth": lambda: _project_step(pipe, no_depth, region, None, lora, opt, cfg),
        "project_no_region": lambda: _project_step(pipe, cache, None, depth, lora, opt, cfg),
        "project_ip_adapter": lambda: _project_step(pipe, ip_cache, region, None, lora, opt, cfg),
        "original": lambda: _original_step(pipe, data, _project_step(pipe, cache, region, None, lora, opt, cfg),
                                           cfg),
    }
    return {v: makers[v]() for v in variants if v in makers}


def build_steps(resolution: int, seq_len: int = 512, variants=VARIANTS) -> dict:
    """``{variant: step(i)}`` for the requested variants, sharing the tiny model where they can."""
    cfg = kh.TrainConfig(resolution=resolution, max_sequence_length=seq_len)  # rank 16, "attn", "marked", "tokens"
    data = kh.KontextPairs(DATA, resolution=resolution)
    steps = {}
    if "reference" in variants:
        plain = kh.load_pipeline("tiny", seed=0, ip_adapter=None)  # what plain diffusers trains: no IP-Adapter
        lora = kh.add_lora(plain.transformer, rank=cfg.rank, targets=cfg.lora_targets)
        opt = torch.optim.AdamW([p for _, p in lora], lr=cfg.learning_rate)
        steps["reference"] = _reference_step(plain, _cache(plain, data, cfg, use_depth=False), lora, opt, cfg)
    if any(v != "reference" for v in variants):
        steps.update(_project_steps(kh.load_pipeline("tiny", seed=0), data, cfg, variants))
    return steps


def time_steps(steps: dict, repeats: int) -> dict:
    """Every step once to warm up, then ``repeats`` rounds, each running every variant once (order rotating).

    Per variant: median and minimum time, each over the reference's, and ``paired_ratio``, the median over the
    rounds of the variant's time over the reference's in the same round (noise that lasts a round cancels)."""
    names = list(steps)
    for name in names:
        steps[name](0)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name](r + 1)
            times[name].append(time.perf_counter() - t0)
    ref = "reference" if "reference" in times else names[0]
    med_ref, min_ref = statistics.median(times[ref]), min(times[ref])
    return {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
                   "median_ratio": statistics.median(t) / med_ref, "min_ratio": min(t) / min_ref,
                   "paired_ratio": statistics.median(a / b for a, b in zip(t, times[ref])), "repeats": len(t)}
            for name, t in times.items()}


def _signal_work(region, depth, ctx, noisy, feat, mask, h_tok: int, w_tok: int) -> None:
    """What the region and depth signals add to a step, outside the transformer: the ``"marked"`` region's and
    the depth tokens' offsets on the target and context tokens, and their backward."""
    reg = kh.region_inputs(region, ctx, mask, h_tok, w_tok)  # context [1, N, 4C], target offset [1, N, 4C]
    d_tgt, d_ctx = kh.depth_inputs(depth, feat, keep=torch.ones(1))  # [1, N, 4C] each
    out = (noisy + reg.target_offset + d_tgt).sum() + (reg.context + d_ctx).sum()
    out.backward()


def real_width_signal_cost(blocks: dict, threads: int, layers: tuple[int, int] = (19, 38),
                           repeats: int = 5) -> list[dict]:
    """At each measured resolution: the region and depth work of one step (:func:`_signal_work`, timed at the
    real model's ``4C = 64`` token channels, fp32) against the step of the transformer's ``layers`` blocks (the
    plain step's bulk: part 3's block times, without checkpointing). ``ratio``: (blocks + that work) / blocks."""
    c_in = kh.memory.real_model_config()["transformer"]["in_channels"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        for px in sorted({r["px"] for r in blocks["rows"]}):
            h = w = px // 16
            g = torch.Generator().manual_seed(px)
            ctx, noisy = (torch.randn(1, h * w, c_in, generator=g).requires_grad_(True) for _ in range(2))  # [1, N, 64]
            feat = kh.depth_token_features(torch.rand(1, 1, px, px, generator=g), h, w)  # [1, N, 256]
            mask = (torch.rand(1, 1, h, w, generator=g) > 0.5).float()  # [1, 1, H', W']
            region = kh.make_region_module("marked", h, w, c_in)
            depth = kh.make_depth_module("tokens", c_in)
            seconds = []
            for _ in range(repeats + 1):  # the first run warms up
                t0 = time.perf_counter()
                _signal_work(region, depth, ctx, noisy, feat, mask, h, w)
                seconds.append(time.perf_counter() - t0)
            plain = {r["kind"]: r["seconds"] for r in blocks["rows"] if r["px"] == px and not r["checkpointing"]}
            step_s = layers[0] * plain["double"] + layers[1] * plain["single"]
            extra_s = statistics.median(seconds[1:])
            rows.append({"px": px, "tokens": h * w, "signal_ms": 1e3 * extra_s, "blocks_s": step_s,
                         "ratio": (step_s + extra_s) / step_s, "width": blocks["width"], "layers": list(layers)})
    finally:
        torch.set_num_threads(before)
    return rows


def depth_cost(steps: dict, real_width: list[dict]) -> dict:
    """The requirement in one record: the step with the chosen depth kind against the plain step, on the tiny
    model (``project`` over ``reference``) and at real width, and the limit."""
    cfg = kh.TrainConfig()
    tiny = steps["project"]
    against_region = (steps["project"]["paired_ratio"] / steps["project_no_depth"]["paired_ratio"]
                      if "project_no_depth" in steps else None)
    worst = max([tiny["paired_ratio"], tiny["median_ratio"]] + [r["ratio"] for r in real_width])
    return {"depth_kind": cfg.depth_kind, "region_kind": cfg.region_kind, "variant": "project",
            "against": "reference", "limit": DEPTH_COST_LIMIT, "tiny_median_ratio": tiny["median_ratio"],
            "tiny_paired_ratio": tiny["paired_ratio"], "tiny_min_ratio": tiny["min_ratio"],
            "tiny_over_region_only": against_region, "real_width": real_width,
            "within_limit": worst <= DEPTH_COST_LIMIT}


def rss_of_variant(variant: str, resolution: int, seq_len: int, steps: int = 3) -> dict:
    """In this (fresh) process: the import floor, then one variant's set-up and ``steps`` steps; peak RSS in MB."""
    import diffusers  # noqa: F401  (every heavy library the variants use, in the floor)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    reset_peak()
    floor = rss_mb()
    step = build_steps(resolution, seq_len, (variant,))[variant]
    for i in range(steps):
        step(i)
    return {"floor_mb": floor, "peak_mb": rss_mb("VmHWM"), "net_mb": rss_mb("VmHWM") - floor}


def _run_json(args: list[str], timeout: int) -> dict:
    """Run a measuring script in a fresh process and read the JSON on its last stdout line."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=MEASURE_ENV, timeout=timeout,
                          cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_args(variant: str, resolution: int, seq_len: int, threads: int) -> list[str]:
    """The command line measuring one variant's peak RSS in its own process."""
    return [__file__, "--rss-of", variant, "--resolution", str(resolution), "--max-sequence-length", str(seq_len),
            "--threads", str(threads)]


def blocks_args(resolutions: list[int], threads: int, derive: tuple[int, ...], quick: bool) -> list[str]:
    """``real_width.py blocks``: checkpointed runs at ``derive`` resolutions are derived, not run."""
    return [os.path.join(HERE, "real_width.py"), "blocks", "--threads", str(threads), "--resolutions",
            *map(str, resolutions), "--derive", *map(str, derive), *(["--quick"] if quick else [])]


def measure_in_processes(jobs: dict, together: bool) -> dict:
    """``{name: JSON}`` of each measuring command, one fresh process each: one after the other (timings stay
    clean), or all at once (``together``, for ``--quick``, where only the code path matters)."""
    if not together:
        return {name: _run_json(args, 1800) for name, args in jobs.items()}
    procs = {name: subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=MEASURE_ENV, cwd=REPO) for name, args in jobs.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{stderr[-3000:]}")
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


def machine(threads: int) -> dict:
    """Where the figures were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "system": platform.system()}


def calibration_record(blocks: dict, machine_info: dict) -> dict:
    """What ``kontext_helpers/block_calibration.json`` keeps: the block rows and where they were measured."""
    return {"source": "benchmarks/bench.py (make bench), benchmarks/real_width.py blocks",
            "measured": time.strftime("%Y-%m-%d", time.gmtime()), "machine": machine_info,
            "units": "MiB of RSS above the model and the block's inputs; seconds of one forward + backward",
            **blocks}


def preset_peaks(calibration: dict) -> dict:
    """``kh.memory.estimate_peak`` of every GPU preset (full depth, 19 + 38 blocks), from ``calibration``."""
    out = {}
    for name in kh.GPU_PRESETS:
        if name == "cpu":
            continue
        cfg = kh.TrainConfig.for_gpu(name)
        est = kh.estimate_peak(cfg, calibration=calibration)
        out[name] = {**{k: round(v, 3) if isinstance(v, float) else v for k, v in est.items()},
                     "resolution": cfg.resolution, "gradient_checkpointing": cfg.gradient_checkpointing,
                     "quantize_base": cfg.quantize_base, "optimizer": cfg.optimizer, "rank": cfg.rank}
    return out


def print_presets(presets: dict) -> None:
    """Part 3 of the table: the estimated peak of every GPU preset."""
    print("\n4. estimated training peak, 19 + 38 blocks (weights + IP-Adapter + LoRA states + activations; "
          "no CUDA context)")
    print(f"  {'preset':<9}{'px':>6}{'ckpt':>6}{'base':>6}{'weights':>9}{'LoRA':>7}{'activ.':>8}{'total GB':>10}")
    for name, p in presets.items():
        print(f"  {name:<9}{p['resolution']:>6}{'yes' if p['gradient_checkpointing'] else 'no':>6}"
              f"{p['quantize_base'] or 'bf16':>6}{p['weights_gb'] + p['ip_adapter_gb']:>9.1f}{p['lora_gb']:>7.2f}"
              f"{p['activations_gb']:>8.1f}{p['total_gb']:>10.1f}")


def refresh_presets() -> dict:
    """Recompute the preset peaks from the committed calibration (after a change to the estimator or to the
    presets) and write them back, without measuring anything again."""
    path = kh.config.BLOCK_CALIBRATION_FILE
    with open(path, encoding="utf-8") as fh:
        calibration = json.load(fh)
    calibration["presets"] = preset_peaks(calibration)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(calibration, fh, indent=1)
        fh.write("\n")
    return calibration["presets"]


def bucket_cost(steps: dict, resolution: int) -> dict:
    """The ``project_bucket`` step over the ``project`` step: median over median, and the median of the rounds'
    ratios (both are paired with the reference in the same rounds, so their paired ratios divide)."""
    bucket = kh.nearest_bucket((4, 3), kh.bucket_shapes(resolution))
    a, b = steps["project_bucket"], steps["project"]
    return {"bucket": list(bucket), "tokens": (bucket[0] // 16) * (bucket[1] // 16),
            "square_tokens": (resolution // 16) ** 2, "median_ratio": a["median_ms"] / b["median_ms"],
            "paired_ratio": a["paired_ratio"] / b["paired_ratio"]}


def print_table(result: dict) -> None:
    """The bench's findings, side by side."""
    m = result["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; {m['threads']} thread(s) for the steps, "
          f"{m['block_threads']} for the blocks")
    s = result["steps_setup"]
    print(f"\n1. training step, tiny model, {s['resolution']} px, T5 length {s['max_sequence_length']}, "
          f"{s['repeats']} interleaved rounds (ratio to the plain diffusers-style step; paired: the median of the "
          "rounds' ratios)")
    print(f"  {'variant':<20}{'median':>9}{'paired':>9}{'min':>9}{'median ms':>11}{'min ms':>9}{'peak RSS MB':>13}")
    for name, t in result["steps"].items():
        rss = result["rss"].get(name)
        rss_text = f"{rss['net_mb']:.0f}" if rss else "-"
        print(f"  {name:<20}{t['median_ratio']:>8.2f}x{t['paired_ratio']:>8.2f}x{t['min_ratio']:>8.2f}x"
              f"{t['median_ms']:>11.1f}{t['min_ms']:>9.1f}{rss_text:>13}")
    bc = result["bucket_cost"]
    print(f"  a non-square bucket ({bc['bucket'][0]}x{bc['bucket'][1]} px, {bc['tokens']} tokens against the square's "
          f"{bc['square_tokens']}) over the square step: {bc['median_ratio']:.2f}x median, {bc['paired_ratio']:.2f}x "
          "paired")
    print_depth_cost(result["depth_cost"])
    b = result["blocks"]
    width = "real width, D = 3072" if b["width"] == 3072 else f"D = {b['width']} (a code test, not a measurement)"
    print(f"\n3. one block at {width}, forward + backward, {b['dtype']}, rank {b['rank']} LoRA, "
          f"{b['text_tokens']} text tokens")
    print(f"  {'block':<8}{'px':>6}{'tokens':>8}{'ckpt':>6}{'seconds':>9}{'held MB':>9}{'peak MB':>9}")
    for r in b["rows"]:
        note = "  (derived)" if r.get("derived") else ""
        print(f"  {r['kind']:<8}{r['px']:>6}{r['tokens']:>8}{'yes' if r['checkpointing'] else 'no':>6}"
              f"{r['seconds']:>9.2f}{r['saved_mb']:>9.0f}{r['peak_mb']:>9.0f}{note}")
    print_presets(result["presets"])


def print_depth_cost(cost: dict) -> None:
    """Part 2 of the table: the step with the chosen depth kind over the plain step, and the limit."""
    print(f"\n2. depth kind {cost['depth_kind']!r} with the {cost['region_kind']!r} region over the plain step "
          f"(limit {cost['limit']:.2f}x): tiny model {cost['tiny_median_ratio']:.2f}x median, "
          f"{cost['tiny_paired_ratio']:.2f}x paired"
          + ("" if cost["tiny_over_region_only"] is None else
             f" ({cost['tiny_over_region_only']:.3f}x the step with the region alone)"))
    for r in cost["real_width"]:
        print(f"  D = {r['width']}, {r['px']} px: {r['layers'][0]} + {r['layers'][1]} blocks {r['blocks_s']:.1f} s, "
              f"region + depth {r['signal_ms']:.2f} ms -> {r['ratio']:.5f}x")
    print(f"  within the limit: {'yes' if cost['within_limit'] else 'NO'}")


def run(quick: bool, out: str, threads: int = 1, block_threads: int = 2) -> dict:
    """All four parts; returns (and writes to ``out``) the JSON. The tiny model's steps run on ``threads``
    threads (one: the small matrices gain little from more, and noise from other processes hits one thread
    least), the real-width blocks on ``block_threads``."""
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        resolution, seq_len, repeats = (64, 64, 2) if quick else (128, 512, 15)
        steps = time_steps(build_steps(resolution, seq_len), repeats)
    finally:
        torch.set_num_threads(before)
    rss_jobs = {v: rss_args(v, resolution, seq_len, threads) for v in (("project",) if quick else VARIANTS)}
    blocks_job = {"blocks": blocks_args([32] if quick else [256, 512, 1024], block_threads,
                                        () if quick else (1024,), quick)}
    if quick:  # a code test: everything at once
        measured = measure_in_processes({**rss_jobs, **blocks_job}, together=True)
    else:  # RSS does not mind company, the block timings do
        measured = {**measure_in_processes(rss_jobs, together=True), **measure_in_processes(blocks_job, False)}
    blocks = measured.pop("blocks")
    info = {**machine(threads), "block_threads": block_threads}
    calibration = calibration_record(blocks, info)
    result = {"machine": info, "quick": quick,
              "steps_setup": {"resolution": resolution, "max_sequence_length": seq_len, "repeats": repeats,
                              "reference": "reference"},
              "steps": steps, "rss": measured, "blocks": blocks, "presets": preset_peaks(calibration),
              "depth_cost": depth_cost(steps, real_width_signal_cost(blocks, block_threads, repeats=2 if quick else 5)),
              "bucket_cost": bucket_cost(steps, resolution)}
    if not quick:
        with open(kh.config.BLOCK_CALIBRATION_FILE, "w", encoding="utf-8") as fh:
            json.dump({**calibration, "presets": result["presets"]}, fh, indent=1)
            fh.write("\n")
    result["bench_seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    return result


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a code test: 64 px, T5 length 64, 2 rounds, one RSS run, blocks at D = 256")
    parser.add_argument("--out", default=None, help="default outputs/bench/bench.json (bench-quick.json with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="threads of the tiny model's steps")
    parser.add_argument("--block-threads", type=int, default=2, help="threads of the real-width blocks")
    parser.add_argument("--presets-only", action="store_true",
                        help="recompute the preset peaks from the committed block figures (no measuring)")
    parser.add_argument("--rss-of", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant's RSS, in this process
    parser.add_argument("--resolution", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--max-sequence-length", type=int, default=512, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.presets_only:
        print_presets(refresh_presets())
        return
    if args.rss_of:
        torch.set_num_threads(args.threads)
        print(json.dumps(rss_of_variant(args.rss_of, args.resolution, args.max_sequence_length)))
        return
    out = args.out or os.path.join(REPO, "outputs", "bench", "bench-quick.json" if args.quick else "bench.json")
    result = run(args.quick, out, args.threads, args.block_threads)
    print_table(result)
    print(f"\nwritten: {os.path.relpath(out, REPO)}" + ("" if args.quick else
          f" and {os.path.relpath(kh.config.BLOCK_CALIBRATION_FILE, REPO)}") + f" ({result['bench_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
