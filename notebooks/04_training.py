# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Training the LoRA, the region module and the depth module
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/kontext-region-lora/blob/main/notebooks/04_training.ipynb)
#
# **What you will learn**
# - what every `TrainConfig` setting does, and which GPU preset fits your card
# - why we encode every sample **once** before training, and why that cache is indexed by sample, never by step
# - how training sigmas are drawn, and how a fixed evaluation loss tells you whether training helped
# - how to run a real training, watch its loss, and see which weights actually moved
# - how checkpoints survive a crash or a Colab disconnect, and how a run resumes
# - how the trained LoRA and region module are saved for notebook 05 (and for diffusers or ComfyUI)
#
# Runs in about a minute and a half on a laptop CPU with the tiny model, or on a Colab GPU with FLUX.1 Kontext
# [dev].
#
# On a CPU the tiny model (pretrained in the package, `docs/tiny_model.md`) learns one pair's edit in about a
# minute with the `cpu` preset; the same cells train a real editing LoRA on a GPU.
#
# **The code behind it:** [`kontext_helpers/training.py`](../kontext_helpers/training.py) (the loop, in named steps),
# [`config.py`](../kontext_helpers/config.py) (settings and GPU presets) and
# [`checkpoints.py`](../kontext_helpers/checkpoints.py) (atomic checkpoints, resume checks).

# %%
# Setup, in Colab and locally. In Colab: set REPO_URL once (or upload the project folder), then run it.
# Locally `make demo` (or `pip install -e .`) has installed the package already, and nothing is installed here.
import os
import subprocess
import sys

REPO_URL = "https://github.com/OWNER/kontext-region-lora"  # the project's GitHub address: the one place to set it
USE_DRIVE = True  # Colab: outputs and the Hub cache (~35 GB for the real model) on Google Drive; False: runtime disk
IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    PROJECT = os.environ.get("KONTEXT_PROJECT", "/content/kontext-region-lora")  # where the project is cloned
    if not os.path.isdir(PROJECT):
        if "/OWNER/" in REPO_URL:
            raise RuntimeError("Set REPO_URL in this cell to the project's GitHub address "
                               "(https://github.com/<owner>/kontext-region-lora), or upload the project folder "
                               f"to {PROJECT} with the Files panel; then run this cell again.")
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, PROJECT], check=True)
    os.chdir(PROJECT)
    # the package's runtime dependencies only: Colab keeps its own torch and ipykernel (both already satisfy it)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "."], check=True)
ROOT = next(p for p in (os.getcwd(), os.path.dirname(os.getcwd())) if os.path.isdir(os.path.join(p, "data_samples")))

import matplotlib.pyplot as plt
import torch

import kontext_helpers as kh

kh.colab_session(use_drive=USE_DRIVE)  # Colab only: Drive, Hub login (the HF_TOKEN secret), bitsandbytes if needed

# %%
# CONFIG: every setting of this notebook, in one place. Change them here, nowhere else.
import importlib.util  # REPORT_TO below asks whether TensorBoard is installed

MODEL = kh.default_model()  # the model: $KONTEXT_MODEL, else FLUX.1 Kontext [dev] on a GPU, else "tiny"
kh.describe_environment(MODEL)  # library versions, device and model
TINY = MODEL == "tiny"  # the tiny pretrained model: seconds on a CPU; the real model needs a GPU
PRESET_NAME = os.environ.get("KONTEXT_PRESET", "auto")  # GPU preset (section 1): "auto" detects the GPU; or "t4", ...
QUICK = os.environ.get("KONTEXT_QUICK") == "1"  # a smoke run of the GPU path (the tests set it): few steps, 64 px
DATA_ROOT = os.path.join(ROOT, "data_samples")  # the sample pairs; point this at your own folder (notebook 01)
SEED = 0  # every random draw of the run (LoRA init, sample order, noise, sigmas) derives from it
# results: checkpoints and the adapter for notebook 05 (in Colab on Drive, set by the setup cell's USE_DRIVE)
OUTPUT_DIR = os.environ.get("KONTEXT_OUTPUT_DIR", os.path.join(ROOT, "outputs"))
RUN_DIR = os.path.join(OUTPUT_DIR, "run")  # this run's checkpoints/
RESUME = False  # True after a disconnect: continue from the newest checkpoint in RUN_DIR instead of starting over
RESUME_EXTRA_STEPS = 1 if QUICK else 30  # section 6 resumes the finished run for this many more steps
HELD_OUT_PAIRS = 4  # drawn scenes no training sees (kh.DrawnPairs, stream 7): section 5's held-out yardstick
BUCKET_STEPS = 12  # section 5b: updates of a short run on photos of four shapes (the tiny model, whatever MODEL is)
# the experiment tracker (section 5): TensorBoard when installed (Colab has it), else none; "wandb" needs `pip install
# wandb` and a login
REPORT_TO = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
if TINY:
    cfg = kh.TrainConfig.for_gpu(
        "cpu",  # the tiny model's preset: 128 px, 800 updates, rank 8, lr 3e-3 (attention + feed-forward), 32 tokens
        output_dir=RUN_DIR,  # where checkpoints go
        resume=RESUME,  # continue from RUN_DIR's newest checkpoint
        seed=SEED,  # reproducible and exactly resumable
        preview_every=200,  # a preview of a held-out pair every 200 updates (section 5)
        report_to=REPORT_TO,  # losses, lr and previews to the tracker
    )
else:
    cfg = kh.TrainConfig.for_gpu(
        PRESET_NAME,  # this GPU's preset (section 1): precision, quantisation, optimizer, resolution, rank
        steps=1000,  # optimizer updates: about 1-3 hours on a Colab GPU at the preset's resolution
        checkpoint_every=250,  # a checkpoint every 250 updates (and at the end)
        output_dir=RUN_DIR,  # where checkpoints go (on Drive in Colab: they survive a disconnect)
        resume=RESUME,  # continue from RUN_DIR's newest checkpoint
        seed=SEED,  # reproducible and exactly resumable
        preview_every=250,  # a preview of a held-out pair every 250 updates (section 5)
        report_to=REPORT_TO,  # losses, lr and previews to the tracker
    )
    if QUICK:
        cfg = kh.quick_config(cfg)  # 3 updates at 64 px; without a GPU, NF4 and fp16 give way (printed)
    if cfg.load_in_stages:
        cfg.preview_every = 0  # T4 / L4: the text encoders leave after caching, and a preview encodes its prompt

# %%
os.makedirs(OUTPUT_DIR, exist_ok=True)
print("outputs go to", OUTPUT_DIR)
MODEL_LABEL = f"{'tiny model' if TINY else 'FLUX.1 Kontext'}, {cfg.resolution} px"  # in the result figures' titles

# %% [markdown]
# ## 1. The configuration and the GPU presets
#
# `kh.TrainConfig` holds every setting of `kh.train`, each with a default (the source,
# [`kontext_helpers/config.py`](../kontext_helpers/config.py), says why in a comment on each line):
#
# | group | setting | default | what it does |
# |---|---|---|---|
# | data, schedule | `resolution` | `512` | side in pixels, a multiple of 16 (VAE 8x, 2x2 packing); = the dataset's |
# |  | `steps` | `1000` | optimizer updates (each of batch_size * gradient_accumulation_steps samples per process) |
# |  | `batch_size` | `1` | samples per forward pass per process; 1 fits every Colab GPU at 512 px |
# |  | `gradient_accumulation_steps` | `1` | micro-batches per update: a larger effective batch, same memory |
# |  | `max_sequence_length` | `512` | T5 tokens; 512 is Kontext's default, shorter prompts are padded to it |
# | optimisation | `learning_rate` | `1e-4` | LoRA learning rate, the value diffusers' Kontext script uses |
# |  | `region_learning_rate` | `1e-3` | region module: a few fresh weights, they can move faster than the LoRA |
# |  | `optimizer` | `"adamw"` | "adamw" (torch) or "adamw8bit" (bitsandbytes, saves optimizer memory on GPUs) |
# |  | `weight_decay` | `0.0` | AdamW decay of every group; the L2 settings below add the LoRA's and the region's |
# |  | `lr_scheduler` | `"constant"` | any diffusers.optimization.get_scheduler name ("cosine", "linear", ...) |
# |  | `lr_warmup_steps` | `0` | warm-up updates for the scheduler |
# |  | `max_grad_norm` | `1.0` | gradient clipping of LoRA + region parameters (0 disables) |
# | LoRA | `rank` | `16` | LoRA rank: 16 is a common editing-LoRA size; 4-8 for tiny datasets |
# |  | `alpha` | `None` | LoRA alpha; None means alpha = rank (scale 1) |
# |  | `lora_targets` | `"attn"` | "attn" (attention only) or "attn_ff" (+ feed-forward, `proj_mlp`, `proj_out`) |
# |  | `lora_ip_adapter` | `False` | also adapt the IP-Adapter's to_k_ip / to_v_ip (lets the LoRA re-learn depth use) |
# | loss | `w_in` | `1.0` | weight of the in-mask velocity term (learn the edit) |
# |  | `w_out` | `1.0` | weight of the out-of-mask term (keep the rest of the image) |
# |  | `l2_region_lambda` | `1e-4` | L2 on the region module, the original design's stabiliser |
# |  | `l2_lora_lambda` | `1.0` | L2 on the LoRA weights (`"decoupled"`: each update shrinks them by `lr * lambda`) |
# |  | `l2_form` | `"decoupled"` | AdamW's weight decay; `"sum"` (the design's) or `"mean_square"`: a loss term |
# |  | `preservation` | `"identity"` | outside the mask: flow to the context; `"prior"`: the base model's output |
# | noise, conditioning | `timestep_sampling` | `"uniform"` | the 1000 training sigmas (never 0); `"logit_normal"` |
# |  | `logit_mean` | `0.0` | logit-normal location (SD3 / diffusers' default) |
# |  | `logit_std` | `1.0` | logit-normal scale |
# |  | `guidance` | `1.0` | distilled guidance fed while training (SimpleTuner: 1.0; diffusers' Kontext script: 3.5) |
# |  | `use_depth` | `True` | feed a depth map at all (`False`: no depth module, no IP-Adapter embeddings) |
# |  | `depth_kind` | `"tokens"` | each token's 16x16 depth patch (notebook 03), or `"ip_adapter"`, or `"none"` |
# |  | `depth_source` | `"context"` | whose depth: the context's (`depth/`) or the desired result's (`target_depth/`) |
# |  | `depth_dropout` | `0.1` | share of samples trained without depth, so the adapter also works without a map |
# |  | `depth_learning_rate` | `1e-3` | the depth module's projection (zero at the start) |
# |  | `region_kind` | `"marked"` | how the mask reaches the model (`kh.REGION_KINDS`, notebook 03; or "none") |
# | hardware | `mixed_precision` | `"no"` | "no", "fp16" (T4) or "bf16" (L4, A100, H100) |
# |  | `gradient_checkpointing` | `False` | trade compute for activation memory on big models |
# |  | `quantize_base` | `None` | "nf4": load the transformer 4-bit (bitsandbytes) via load_pipeline |
# |  | `offload_encoders` | `True` | on a GPU, each encoder visits the GPU only while it caches, then goes to the CPU |
# |  | `load_in_stages` | `False` | text encoders first, for the cache, freed before the transformer (T4/L4 RAM) |
# | bookkeeping | `seed` | `0` | every random draw of a step derives from (seed, step): reproducible, resumable |
# |  | `output_dir` | `"outputs/kontext-lora"` | checkpoints/, previews/ and the final adapter go here (Drive works) |
# |  | `checkpoint_every` | `250` | updates between checkpoints (0: only the final one) |
# |  | `keep_checkpoints` | `3` | newest complete checkpoints kept on disk |
# |  | `resume` | `False` | continue from the newest complete checkpoint under output_dir/checkpoints |
# |  | `preview_every` | `0` | updates between previews of context, mask, depth, target and result (0: none) |
# |  | `preview_steps` | `8` | denoising steps of a preview |
# |  | `log_every` | `1` | updates between progress-bar / callback / tracker updates |
# |  | `report_to` | `"none"` | tracker via accelerate: "tensorboard" (files in output_dir/logs), "wandb" or "none" |
# |  | `tracker_project` | `"kontext-lora"` | the wandb project, or the TensorBoard run folder under output_dir/logs |
# |  | `expected_peak_memory_gb` | `None` | set by presets, informative only |
# |  | `peak_memory_source` | `""` | where the preset's peak comes from (`kh.estimate_peak`), set by presets |
#
# The next cell prints this run's values, marking with `*` those that differ from the default.

# %%
import dataclasses

defaults = kh.TrainConfig()
for f in dataclasses.fields(kh.TrainConfig):
    value = getattr(cfg, f.name)
    mark = "*" if value != getattr(defaults, f.name) else " "
    print(f"  {mark} {f.name:<27} = {value!r}")

# %% [markdown]
# **GPU presets.** `kh.TrainConfig.for_gpu(name)` starts from a preset tuned for one kind of card, and any
# keyword overrides a field. The smaller the card, the more memory tricks: fp16/bf16 autocast, an NF4
# (4-bit) base transformer, 8-bit AdamW, gradient checkpointing, a lower resolution and rank. The peak-memory
# column is `kh.estimate_peak`'s: one double and one single block measured at real width on a CPU (`make bench`),
# scaled to the 19 + 38 blocks, plus weights and optimizer states. It leaves out the CUDA context (about 0.5-1
# GB) and has not been checked on these GPUs yet: trust it only as far as the source column says.

# %%
print(f"{'preset':<8} {'card':<18} {'precision':<9} {'base':<6} {'optimizer':<10} {'res':>5} {'rank':>4} "
      f"{'ckpt':<5} {'peak GB':>7}  source")
for key, p in kh.GPU_PRESETS.items():
    peak = "-" if p["expected_peak_memory_gb"] is None else f"{p['expected_peak_memory_gb']:.0f}"
    print(f"{key:<8} {p['label']:<18} {p['mixed_precision']:<9} {str(p['quantize_base'] or 'full'):<6} "
          f"{p['optimizer']:<10} {p['resolution']:>5} {p['rank']:>4} {str(p['gradient_checkpointing']):<5} "
          f"{peak:>7}  {p['peak_memory_source'][:60]}")
print("\nthis machine's preset: kh.detect_gpu_preset() =", repr(kh.detect_gpu_preset()))

# %%
import re

gpu = {k: p for k, p in kh.GPU_PRESETS.items() if p["expected_peak_memory_gb"] is not None}
card_gb = [float(re.search(r"(\d+) GB", p["label"]).group(1)) for p in gpu.values()]
fig, ax = plt.subplots(figsize=(7.5, 3.4))
x = range(len(gpu))
ax.bar([i - 0.2 for i in x], card_gb, width=0.4, color="lightgrey", label="memory of the card")
hatches = ["//" if p["peak_memory_source"].startswith("estimated") else "" for p in gpu.values()]
bars = ax.bar([i + 0.2 for i in x], [p["expected_peak_memory_gb"] for p in gpu.values()], width=0.4,
              color="tab:orange", hatch=hatches, label="expected training peak (hatched: estimated)")
ax.set_xticks(list(x), [f"{k}\n{p['mixed_precision']}, {p['quantize_base'] or 'full'}, {p['resolution']} px"
                        for k, p in gpu.items()], fontsize=8)
ax.set_ylabel("GB")
ax.set_title("Each preset is sized to fit its card with some headroom\n"
             "(peaks estimated from blocks measured at real width on a CPU, not measured on the GPU)")
ax.legend(fontsize=8, loc="upper left")
plt.show()

# %% [markdown]
# **What stays in memory, counted before any download.** `kh.memory_plan(config)` builds every component of
# FLUX.1 Kontext [dev] from its configuration on PyTorch's `meta` device (shapes, no memory), counts the
# parameters, and multiplies by the bytes the preset stores them in (16-bit, or NF4's 4 bits plus a scale per
# 64 weights). It counts weights and optimizer states only, not activations: its totals are lower bounds, not
# the peaks above. On the tiny model it plans the T4 preset, as an example. Note the system-RAM line: a free
# Colab T4 runtime has about 12.7 GB of RAM, and T5-XXL alone is about 9.5 GB in 16 bits.

# %%
plan = kh.memory_plan(kh.TrainConfig.for_gpu("t4") if TINY else cfg)

# %% [markdown]
# Now the pipeline. On a card whose preset says `quantize_base == "nf4"` (T4, L4) the 12B transformer is
# loaded in 4 bits (`kh.nf4_quantization_config()`); otherwise at the preset's precision. NF4 and 8-bit
# AdamW need `bitsandbytes` (CUDA only): in Colab the setup cell's `kh.colab_session()` installed it when this
# GPU's preset asks for it.
#
# **Loading in stages (T4, L4: `cfg.load_in_stages`).** The memory plan's system-RAM line is the trap: T5-XXL
# is 9.5 GB in 16 bits and a free T4 runtime has 12.7 GB of RAM. So on those cards we load everything *but*
# the transformer now (`load_pipeline(..., encoders_only=True)`), cache every sample in section 2, free the text
# encoders (`kh.free_text_encoders`), and only then bring in the transformer (`kh.add_transformer`). The
# cache holds every prompt encoding, so training never needs T5 again.

# %%
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NF4 = kh.nf4_quantization_config() if not TINY and cfg.quantize_base == "nf4" else None  # bitsandbytes' 4 bits
STAGED = not TINY and cfg.load_in_stages  # T4, L4: the transformer comes after the cache (section 2)


def load_model():
    """A fresh pipeline for this notebook's model; in stages, everything but the transformer."""
    if STAGED:
        return kh.load_pipeline(MODEL, encoders_only=True)
    if NF4 is not None:  # the 4-bit transformer is placed on the GPU as it loads
        return kh.load_pipeline(MODEL, quantization_config=NF4)
    return kh.load_pipeline(MODEL).to(DEVICE)


def add_transformer_after_caching(pipe):
    """In stages: the prompts are cached, so T5 and CLIP-L leave before the transformer comes in."""
    if STAGED:
        kh.free_text_encoders(pipe)
        kh.add_transformer(pipe, MODEL, quantization_config=NF4)


pipe = load_model()
dataset = kh.KontextPairs(DATA_ROOT, resolution=cfg.resolution)  # must match cfg.resolution (train checks it)
print(dataset)
print("loaded:", ", ".join(name for name, module in pipe.components.items() if module is not None))

# %% [markdown]
# ## 2. Cache first: constant work once per sample
#
# In one training step the transformer is the only part that learns. The prompt encodings (T5 + CLIP), the
# latents of context and target (VAE), the mask on the token grid and the depth features (each token's 16x16 depth
# patch, notebook 03; or the CLIP embedding with `depth_kind="ip_adapter"`) are the same every time a sample comes
# round. So `kh.build_train_cache` computes them once per
# sample, and on a GPU each encoder leaves the GPU as soon as its stage is done (T5-XXL alone is about 9.5 GB in
# 16 bits, the memory plan's `t5` line). What that saves per step, `make bench` measures (the README's Performance
# section).
#
# > The original design encoded prompt and depth at every step:
# > [design note 2](../docs/design.md#2-constant-work-every-step).

# %%
cache = kh.build_train_cache(pipe, dataset, max_sequence_length=cfg.max_sequence_length, device=DEVICE,
                             offload=cfg.offload_encoders and DEVICE.type == "cuda", progress=True)
first = cache.samples[0]
print(f"{len(cache.samples)} samples cached; token grid H' x W' = {cache.h_tok} x {cache.w_tok}; "
      f"txt_ids {tuple(cache.txt_ids.shape)}  # [T, 3], shared by every sample")
print(f"sample 0 = {first.name!r}:")
for f in dataclasses.fields(first):
    value = getattr(first, f.name)
    if torch.is_tensor(value):
        print(f"  {f.name:<22} {str(tuple(value.shape)):<16} {value.dtype}")
# prompt_embeds [1, T, D_t5], pooled_prompt_embeds [1, D_clip], ctx_tok / tgt_tok [1, N, 4C],
# mask_small [1, 1, H', W'], depth_feat [1, N, 256] (each token's depth patch; ip_embeds [1, 1, E] instead with
# depth_kind="ip_adapter")
total = sum(v.numel() * v.element_size() for s in cache.samples for v in vars(s).values() if torch.is_tensor(v))
print(f"the whole cache: {total / 2**20:.2f} MiB")

# %% [markdown]
# A LoRA trained on ten pairs can simply memorise them. To see whether it learned *edits*, we also cache
# `HELD_OUT_PAIRS` pairs it never trains on: drawn scenes with the same kinds of edit (`kh.DrawnPairs`: recolour,
# remove, add, reshape, material; their masks from the pixel difference), from a stream of scenes that neither
# the tiny model's pretraining (stream 0) nor this run uses. Section 5 measures them before and after training.

# %%
held_out = kh.DrawnPairs(7, HELD_OUT_PAIRS, cfg.resolution)
held_cache = kh.build_train_cache(pipe, held_out, max_sequence_length=cfg.max_sequence_length, device=DEVICE,
                                  offload=cfg.offload_encoders and DEVICE.type == "cuda", progress=False)
for it in held_out:
    print(f"held out: {it['name']!r}: {it['prompt']!r}")

# %%
add_transformer_after_caching(pipe)  # in stages (T4, L4); otherwise the transformer is already there
n_params = sum(p.numel() for p in pipe.transformer.parameters())
print(f"transformer: {n_params / 1e6:.2f} M parameters, dtype {pipe.transformer.dtype}, on {DEVICE}")
print("text encoders still loaded:", pipe.text_encoder_2 is not None)

# %% [markdown]
# **Indexed by sample, never by step.** `kh.train` draws the samples of step `k` from an endless stream of
# epochs, each a fresh permutation (`kh.sample_indices`), and looks them up in the cache *by sample index*.
# A common shortcut keeps the cache as a list in the order of a first pass through a shuffled dataloader and
# reads it back by step (`latents_cache[step]`): diffusers' DreamBooth LoRA scripts did this (diffusers issues
# #14430, PR #13712). As soon as the loader reshuffles, a cached latent or caption meets another image: no
# error, just silently wrong pairs. The figure counts how often that happens with our 10 pairs.

# %%
n = len(cache.samples)
epochs = 4
drawn = kh.sample_indices(n, cfg.seed, 0, epochs * n)  # the sample index of steps 0 .. 4n-1 (batch size 1)
by_step = [drawn[k % n] for k in range(epochs * n)]  # a cache read by step holds the first epoch's order
wrong = [k for k in range(epochs * n) if drawn[k] != by_step[k]]
print("steps 0-9  :", drawn[:n])
print("steps 10-19:", drawn[n:2 * n], " <- epoch 2 is a new permutation")
print(f"a cache indexed by step would pair the wrong cached tensors in {len(wrong)} of {len(drawn)} steps")

fig, ax = plt.subplots(figsize=(9, 3.2))
ax.plot(range(len(drawn)), drawn, "o-", color="tab:blue", ms=4, lw=0.8, label="sample drawn (cache index we read)")
ax.plot(wrong, [by_step[k] for k in wrong], "x", color="tab:red", ms=6, label="what a by-step cache would hand back")
for e in range(1, epochs):
    ax.axvline(e * n - 0.5, color="grey", lw=0.8, ls="--")
ax.set_xlabel("training step")
ax.set_ylabel("sample index")
ax.set_ylim(-0.7, n + 2.2)
ax.set_yticks(range(n))
ax.set_title(f"Every epoch reshuffles: after epoch 1 a cache read by step is wrong in {len(wrong)} of "
             f"{len(drawn)} steps (red x)")
ax.legend(fontsize=8, loc="upper center", ncol=2, framealpha=0.95)
plt.show()

# %% [markdown]
# ## 3. Sigmas and a fixed yardstick
#
# Each step picks a noise level `sigma`, mixes `x_t = (1 - sigma) x_0 + sigma * noise` and asks the transformer
# for the velocity `noise - x_0`. `kh.sample_sigmas` draws `sigma` from the scheduler's 1000 training levels
# `k / 1000`, `k = 1 .. 1000`: uniformly (`timestep_sampling="uniform"`, the original design's choice and what
# diffusers' Flux training scripts do by default, `--weighting_scheme none`) or concentrated in the middle
# (`"logit_normal"`, the SD3 paper's choice, offered by
# `diffusers.training_utils.compute_density_for_timestep_sampling`).
#
# After `set_timesteps` the scheduler's `sigmas` table ends with the terminal `sigma = 0`, where `x_t` *is* the
# clean image and there is nothing to learn: `kh.sample_sigmas` never draws 0, and the transformer gets
# `timestep = sigma` in `[0, 1]`, shape `[B]` (the pipeline passes `t / 1000`), not a value in `[0, 1000]`.
#
# > The original design sampled from `scheduler.sigmas`: [design note 5](../docs/design.md#5-timesteps).

# %%
scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)  # a copy: leave the pipeline's alone
scheduler.set_timesteps(8, mu=0.5)  # mu: the resolution-dependent shift the pipeline computes; any value shows it
print("scheduler.sigmas after set_timesteps(8):", [round(float(s), 3) for s in scheduler.sigmas], " <- ends at 0")
g = torch.Generator().manual_seed(0)
draws = {kind: kh.sample_sigmas(20000, dataclasses.replace(cfg, timestep_sampling=kind), g)
         for kind in ("uniform", "logit_normal")}
for kind, s in draws.items():
    print(f"{kind:<13} min {s.min():.3f}  max {s.max():.3f}  mean {s.mean():.3f}  shape {tuple(s.shape)}  # [B]")

fig, ax = plt.subplots(figsize=(7, 3))
for kind, s in draws.items():
    ax.hist(s.numpy(), bins=50, range=(0, 1), histtype="step", lw=1.5, label=kind)
ax.axvline(0, color="tab:red", lw=2, label="sigma = 0: never drawn")
ax.set_xlabel("sigma (0 = clean image, 1 = pure noise)")
ax.set_ylabel("draws")
ax.set_title("Training sigmas: uniform covers (0, 1]; logit-normal favours mid noise; neither hits 0")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The training loss jumps around: every step has another sample, another sigma, another noise. To tell
# whether training helped, `kh.evaluation_loss` measures one pair with **fixed** noise at **fixed** sigmas
# (0.2, 0.4, 0.6, 0.8), split into `err_in` (velocity error inside the mask, against the target) and
# `err_out` (outside, against the context). We measure it now, with the untrained region module built exactly
# as `train()` builds it (`cfg.region_kind`, the same seed, so the same start).

# %%
c_in = pipe.transformer.config.in_channels  # 4C = 64 channels of one packed token
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(cfg.seed)
    untrained_region = kh.make_region_module(cfg.region_kind, cache.h_tok, cache.w_tok, c_in).to(DEVICE)
untrained_depth = kh.make_depth_module(cfg.depth_kind, c_in)  # zero at the start: adds nothing yet
untrained_depth = untrained_depth.to(DEVICE) if untrained_depth is not None else None
before = kh.evaluation_loss(pipe, untrained_region, cache, depth_module=untrained_depth)
held_before = [kh.evaluation_loss(pipe, untrained_region, held_cache, index=i, depth_module=untrained_depth)
               for i in range(len(held_out))]
print(untrained_region, " parameters", {n: tuple(p.shape) for n, p in untrained_region.named_parameters()})
print("evaluation loss before training:", {k: round(v, 4) for k, v in before.items()})

# %% [markdown]
# ## 4. One training step by hand
#
# **LoRA in three numbers.** A LoRA of rank `r` replaces a frozen `W [d_out, d_in]` by `W + (alpha / r) B A`
# with `A [r, d_in]` and `B [d_out, r]` trainable: `r (d_in + d_out)` numbers instead of `d_out d_in`.
# `alpha / r` scales the update (here `alpha = r`, scale 1, PEFT's `lora_alpha`). PEFT starts `A` random and
# `B` at zero, so the product is zero and the model starts as it was; only `B` gets a gradient from the loss at
# first. **Guidance while training.** FLUX.1 Kontext [dev] is guidance-*distilled*: instead of two passes per
# step (with and without the prompt), it takes the guidance value as an input, embedded with the timestep into
# `temb`, which modulates every block (AdaLN). Trainers differ in what they feed while training: SimpleTuner
# defaults to 1.0 (`flux_guidance_value`), diffusers' Kontext script to 3.5 (`--guidance_scale`); we feed 1.0
# (`TrainConfig.guidance`). The pipeline samples at 2.5-3.5 (the experiment at the end measures the difference).
#
# `kh.train` repeats one step thousands of times. Here it is written out once, from the cache to the optimizer,
# with nothing hidden: a fresh LoRA (`kh.add_lora`, PEFT's gaussian initialisation as `kh.train` uses it, `B = 0`)
# and a fresh region module, one cached sample, one noise draw, one noise level. Then the same inputs go through
# the module's `kh.training_loss`, and a cell checks that the loss and every gradient are the same.

# %%
N_TOK = cache.h_tok * cache.w_tok  # N target tokens
hand_lora = kh.add_lora(pipe.transformer, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.lora_targets,
                        adapter_name="by_hand")  # [(name, parameter)]: A drawn with std 1/r, B starts at 0
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(cfg.seed)
    hand_region = kh.MaskedTokenEmbedding(cache.h_tok, cache.w_tok, pipe.transformer.config.in_channels).to(DEVICE)
hand_depth = kh.DepthTokenEmbedding(pipe.transformer.config.in_channels).to(DEVICE)  # proj starts at zero
trainable = [p for _, p in hand_lora] + list(hand_region.parameters()) + list(hand_depth.parameters())
for p in trainable:  # train() keeps them in fp32 over a 16-bit base (diffusers' cast_training_params)
    p.data = p.data.float()

sample = cache.batch([0], device=DEVICE)  # cached: prompt_embeds [1, T, D_t5], ctx_tok / tgt_tok [1, N, 4C], ...
noise = torch.randn(sample["tgt_tok"].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)  # e [1, N, 4C]
sigma = torch.tensor([0.6], device=DEVICE)  # [B]: the noise level of this step
dtype = pipe.transformer.dtype

# 1. the noisy target on the straight line from the clean target (sigma 0) to the noise (sigma 1)
s = sigma[:, None, None]  # [B] -> [B, 1, 1]
x_t = (1 - s) * sample["tgt_tok"] + s * noise  # [1, N, 4C]
# 2. the region signal from the mask on the token grid ("marked": m * e on every masked token, notebook 03)
mark = hand_region(sample["mask_small"])  # [1, 1, H', W'] -> [1, N, 4C]; zero where the mask is 0
# 3. the depth signal: each token's 16x16 depth patch through a projection (notebook 03), on both parts
depth_off = hand_depth(sample["depth_feat"])  # [1, N, 256] -> [1, N, 4C]; zero until the projection learns
# 4. the sequence [noisy target | clean context], the masked tokens of both marked, and one id per token
hidden = torch.cat([x_t + mark + depth_off, sample["ctx_tok"] + mark + depth_off], dim=1).to(dtype)  # [1, 2N, 4C]
img_ids = kh.kontext_img_ids(cache.h_tok, cache.w_tok, with_region=False, device=DEVICE, dtype=dtype)  # [2N, 3]
# 5. the forward pass: the transformer's own call, as FluxKontextPipeline.__call__ makes it
guidance = torch.full([1], cfg.guidance, device=DEVICE) if pipe.transformer.config.guidance_embeds else None
print("timestep, guidance and pooled CLIP become one temb [B, D] in", type(pipe.transformer.time_text_embed).__name__,
      "with", [name for name, _ in pipe.transformer.time_text_embed.named_children()])
ip = {"ip_hidden_states": []}  # the IP-Adapter gets no image: it adds exactly zero (depth came as depth_off)
out = pipe.transformer(hidden_states=hidden, timestep=sigma.to(dtype), guidance=guidance,
                       pooled_projections=sample["pooled_prompt_embeds"].to(dtype),
                       encoder_hidden_states=sample["prompt_embeds"].to(dtype), txt_ids=cache.txt_ids.to(DEVICE, dtype),
                       img_ids=img_ids, joint_attention_kwargs=ip, return_dict=False)[0]  # [1, 2N, 4C]
pred_v = out[:, :N_TOK].float()  # the target part: [1, N, 4C]
# 6. the two loss terms: the velocity to the target inside the mask, the context kept outside
m = sample["mask_small"].reshape(1, N_TOK, 1)  # [1, 1, H', W'] -> [1, N, 1], in packing order
c4 = pred_v.shape[-1]  # 4C
loss_in = ((pred_v - (noise - sample["tgt_tok"])) ** 2 * m).sum() / (m.sum() * c4 + 1e-6)
loss_out = (((noise - pred_v) - sample["ctx_tok"]) ** 2 * (1 - m)).sum() / ((1 - m).sum() * c4 + 1e-6)


def l2_in_loss(params, lam):
    """The L2 term cfg.l2_form puts in the loss; the default "decoupled" puts none (AdamW decays instead)."""
    total = sum(p.float().pow(2).sum() for p in params)
    return {"sum": lam * total, "mean_square": lam * total / sum(p.numel() for p in params),
            "decoupled": 0.0}[cfg.l2_form]


l2 = (l2_in_loss([p for _, p in hand_lora], cfg.l2_lora_lambda)
      + l2_in_loss(list(hand_region.parameters()), cfg.l2_region_lambda))
loss = cfg.w_in * loss_in + cfg.w_out * loss_out + l2
# 7. backward: gradients for the LoRA, the region and the depth module only (everything else is frozen)
loss.backward()
hand_grads = [p.grad.clone() for p in trainable]
print(f"by hand: loss {loss.item():.5f} = {cfg.w_in} x in {loss_in.item():.5f} + {cfg.w_out} x out "
      f"{loss_out.item():.5f} + L2 {float(l2):.2e} (l2_form={cfg.l2_form!r})")
grad_a = max(float(g.abs().max()) for (n, _), g in zip(hand_lora, hand_grads) if "lora_A" in n)
grad_b = max(float(g.abs().max()) for (n, _), g in zip(hand_lora, hand_grads) if "lora_B" in n)
print(f"largest gradient: lora_B {grad_b:.1e}, lora_A {grad_a:.1e} (while B is 0, only an L2 term in the loss "
      "reaches A)")

# %%
for p in trainable:
    p.grad = None
module_loss, parts = kh.training_loss(pipe.transformer, hand_region, sample, cache.txt_ids.to(DEVICE), cache.h_tok,
                                      cache.w_tok, noise, sigma, cfg, lora_named_params=hand_lora,
                                      depth_module=hand_depth)
module_loss.backward()
torch.testing.assert_close(loss, module_loss, msg="the hand-written loss must equal kh.training_loss")
named = hand_lora + list(hand_region.named_parameters()) + [(f"depth.{n}", p) for n, p in hand_depth.named_parameters()]
for (name, _), mine, p in zip(named, hand_grads, trainable):
    torch.testing.assert_close(mine, p.grad, msg=f"gradient of {name}")
print("hand-written step == kh.training_loss: same loss and same gradients for", len(trainable), "tensors")

# 8. the optimizer step, then the LoRA goes away again: section 5 trains its own
optimizer = torch.optim.AdamW([{"params": [p for _, p in hand_lora], "lr": cfg.learning_rate},
                               {"params": list(hand_region.parameters()), "lr": cfg.region_learning_rate},
                               {"params": list(hand_depth.parameters()), "lr": cfg.depth_learning_rate}])
b_before = next(p for n, p in hand_lora if "lora_B" in n).detach().clone()
optimizer.step()
b_after = next(p for n, p in hand_lora if "lora_B" in n)
print(f"after one AdamW step the first lora_B moved by {float((b_after.detach() - b_before).abs().max()):.1e} "
      "(from 0): Adam's first step is about the learning rate, whatever the gradient's size")
pipe.transformer.delete_adapters("by_hand")
del hand_lora, hand_region, hand_depth, trainable, optimizer, hand_grads

# %% [markdown]
# ### The whole loop by hand
#
# `kh.train` is that step repeated, plus bookkeeping (checkpoints, previews, trackers, several processes). Here is
# the whole loop over the cache, written with the package's public pieces only, for `N_LOOP` updates. Every random
# draw comes from where `kh.train` takes it:
#
# - **which samples**: `kh.batch_indices(cache.groups(), seed, k, batch_size)`, batch `k` of an endless stream of
#   epochs, each batch from one aspect-ratio bucket (with one bucket, as here: `kh.sample_indices`, each epoch a
#   fresh permutation); the cache is read by sample index (section 2), at that bucket's token grid;
# - **noise, then sigma, then depth dropout** of update `k`: one generator, `kh.step_generator(seed, 2, k,
#   micro_batch, process)`, so that update `k` draws the same numbers whether or not the run was resumed;
# - **the LoRA's random `A` and the region module's start**: each from `torch.manual_seed(seed)`.
#
# The loop writes out the notebook's settings (region `"marked"`, depth `"tokens"`, `preservation="identity"`, no
# accumulation; `kh.training_loss` covers the others) in full precision with torch's AdamW. Then `kh.train` runs
# the same config for the same updates, and the next cell compares the two.

# %%
from diffusers.optimization import get_scheduler

N_LOOP = 3  # updates
loop_cfg = dataclasses.replace(cfg, steps=N_LOOP, mixed_precision="no", optimizer="adamw", resume=False,
                               checkpoint_every=0, preview_every=0, report_to="none",
                               output_dir=os.path.join(OUTPUT_DIR, "hand_loop"))
assert (loop_cfg.region_kind, loop_cfg.depth_kind, loop_cfg.preservation, loop_cfg.gradient_accumulation_steps) == (
    "marked", "tokens", "identity", 1), "this loop writes out the default kinds; kh.training_loss covers the others"
tf = pipe.transformer
with torch.random.fork_rng(devices=[]):  # what train() builds first, each from the seed alone
    torch.manual_seed(loop_cfg.seed)
    loop_lora = kh.add_lora(tf, rank=loop_cfg.rank, alpha=loop_cfg.alpha, targets=loop_cfg.lora_targets,
                            include_ip_adapter=loop_cfg.lora_ip_adapter)
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(loop_cfg.seed)
    side = loop_cfg.resolution // 16  # built on the square bucket's grid; it serves every bucket
    loop_region = kh.make_region_module(loop_cfg.region_kind, side, side, c_in).to(DEVICE)
loop_depth = kh.make_depth_module(loop_cfg.depth_kind, c_in).to(DEVICE)  # its projection starts at zero
for _, p in loop_lora:
    p.data = p.data.float()  # trainable weights in fp32 over a 16-bit base
if loop_cfg.gradient_checkpointing:
    tf.enable_gradient_checkpointing()  # memory only: the same numbers
tf.train()
groups = [[p for _, p in loop_lora], list(loop_region.parameters()), list(loop_depth.parameters())]
lrs = [loop_cfg.learning_rate, loop_cfg.region_learning_rate, loop_cfg.depth_learning_rate]
optimizer = torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd}  # decay: section "The L2 term" below
                               for ps, lr, wd in zip(groups, lrs, loop_cfg.weight_decays())])
schedule = get_scheduler(loop_cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=loop_cfg.lr_warmup_steps,
                         num_training_steps=N_LOOP)

loop_losses, b = [], loop_cfg.batch_size
for step in range(N_LOOP):
    idx = kh.batch_indices(cache.groups(), loop_cfg.seed, step, b)  # one bucket's samples
    batch, (h_tok, w_tok) = cache.batch(idx, device=DEVICE), cache.grid_of(idx[0])  # by sample index, its grid
    g = kh.step_generator(loop_cfg.seed, 2, step, 0, 0)  # this update's draws (micro-batch 0, process 0)
    noise = torch.randn(batch["tgt_tok"].shape, generator=g).to(DEVICE, batch["tgt_tok"].dtype)  # [B, N, 4C]
    sigma = kh.sample_sigmas(b, loop_cfg, g).to(DEVICE)  # [B]
    keep = (torch.rand(b, generator=g) >= loop_cfg.depth_dropout).float().to(DEVICE)  # [B]: 0 drops the depth
    s = sigma[:, None, None]  # [B] -> [B, 1, 1]
    x_t = (1 - s) * batch["tgt_tok"] + s * noise  # [B, N, 4C]
    marked = kh.region_inputs(loop_region, batch["ctx_tok"], batch["mask_small"], h_tok, w_tok)
    d_tgt, d_ctx = (o.to(batch["ctx_tok"]) for o in kh.depth_inputs(loop_depth, batch["depth_feat"], keep=keep))
    pred_v = kh.kontext_forward(tf, x_t + (marked.target_offset + d_tgt), marked.context + d_ctx, None,
                                sigma=sigma, prompt_embeds=batch["prompt_embeds"],
                                pooled_prompt_embeds=batch["pooled_prompt_embeds"], txt_ids=cache.txt_ids.to(DEVICE),
                                h_tok=h_tok, w_tok=w_tok, guidance=loop_cfg.guidance)  # [B, N, 4C]
    loss = kh.fm_masked_dual_loss_with_l2(
        pred_v, batch["tgt_tok"], batch["ctx_tok"], noise, batch["mask_small"], h_tok, w_tok,
        w_in=loop_cfg.w_in, w_out=loop_cfg.w_out, l2_region_lambda=loop_cfg.l2_region_lambda,
        l2_lora_lambda=loop_cfg.l2_lora_lambda, region_token_module=loop_region, lora_named_params=loop_lora,
        l2_form=loop_cfg.l2_form)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for ps in groups for p in ps], loop_cfg.max_grad_norm)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    loop_losses.append(float(loss.detach()))
loop_after = {name: p.detach().clone() for name, p in loop_lora}
tf.delete_adapters("default")  # kh.train attaches its own, from the same seed
print("by hand:", [round(v, 6) for v in loop_losses])

# %% [markdown]
# Now `kh.train` with the same config. On the CPU both runs do the same operations in the same order in fp32
# (`accelerate` with `mixed_precision="no"` and one process adds no autocast, loss scaling or reduction), so the
# check demands equality bit for bit. On a GPU it allows a relative 1e-3 in the losses and 1e-5 in the weights:
# some CUDA kernels (attention's backward among them) may add in a different order from one call to the next.
# `tests/test_hand_loop.py` runs the same loop on the CPU, bit for bit.

# %%
loop_result = kh.train(pipe, dataset, loop_cfg, cache=cache, progress=False)
train_losses = [r["loss"] for r in loop_result.history]
train_after = dict(kh.collect_lora_named_params(pipe.transformer))
tolerance = dict(rtol=0, atol=0) if DEVICE.type == "cpu" else dict(rtol=1e-3, atol=1e-5)
print(f"{'update':>6} {'by hand':>12} {'kh.train':>12}")
for k, (mine, theirs) in enumerate(zip(loop_losses, train_losses), 1):
    print(f"{k:>6} {mine:>12.8f} {theirs:>12.8f}")
torch.testing.assert_close(torch.tensor(loop_losses), torch.tensor(train_losses), **tolerance,
                           msg="the hand loop's losses must equal kh.train's")
for name, p in loop_after.items():
    torch.testing.assert_close(p, train_after[name].detach(), **tolerance, msg=f"{name} after {N_LOOP} updates")
largest = max(float((p - train_after[name].detach()).abs().max()) for name, p in loop_after.items())
print(f"the {len(loop_after)} LoRA tensors after {N_LOOP} updates: largest difference {largest:.1e}")
pipe.transformer.delete_adapters("default")  # section 5 trains its own LoRA
del loop_lora, loop_region, loop_depth, groups, optimizer, schedule, loop_result, train_after

# %% [markdown]
# ### The L2 term: which form acts
#
# The original design's loss ends with an L2 term on the LoRA and the region module, meant to keep them small.
# How it is written decides whether it does anything (`cfg.l2_form`, `kh.L2_FORMS`). For one weight `p` of `n`:
#
# | `l2_form` | in the loss | what one update does to `p` |
# |---|---|---|
# | `"mean_square"` | `lambda * mean(p^2)` | a gradient `2 lambda p / n`: shrinks with the model's size |
# | `"sum"` (the original design) | `lambda * sum(p^2)` | a gradient `2 lambda p`, whatever `n` |
# | `"decoupled"` | nothing | AdamW's weight decay: `p <- p (1 - lr * lambda)` before its step |
#
# Adam divides each gradient by its running size plus `eps = 1e-8`, so a gradient far below `eps` moves nothing.
# `scripts/l2_forms.py` trained the cpu preset's LoRA on this notebook's pairs with each form and measured what
# it did to the LoRA's size and to held-out pairs (docs/design.md, note 9); the next cell reads its
# `docs/l2_forms.json` and works out each form's gradient at FLUX.1 Kontext [dev]'s size.

# %%
import json

with open(os.path.join(ROOT, "docs", "l2_forms.json")) as fh:
    l2_report = json.load(fh)
print(f"{l2_report['steps']} updates of the cpu preset ({l2_report['lora_params']:,} LoRA weights), seeds "
      f"{l2_report['seeds']}, {l2_report['held_out_pairs']} held-out pairs; means over the seeds:")
print(f"{'variant':<16} {'LoRA norm':>9} {'B A norm':>9} {'held-out eval loss':>19} {'PSNR in':>8} {'PSNR out':>9}")
for name, row in l2_report["summary"].items():
    print(f"{name:<16} {row['param_norm']:>9.1f} {row['delta_norm']:>9.1f} {row['held_out_eval_loss']:>19.4f} "
          f"{row['held_out_psnr_in']:>8.2f} {row['held_out_psnr_out']:>9.2f}")
best = l2_report["best"]
print(f"lowest held-out evaluation loss: {best['variant']!r} -> the default l2_form={kh.TrainConfig().l2_form!r}, "
      f"l2_lora_lambda={kh.TrainConfig().l2_lora_lambda:g}")

real = kh.TrainConfig()  # FLUX.1 Kontext [dev]'s defaults: rank 16 on the attention layers, lr 1e-4, 1000 updates
n_real = kh.memory_plan(real, verbose=False)["parameters"]["lora"]
a0, lam = 1 / real.rank, 1e-4  # a fresh lora_A entry's size (PEFT's gaussian init: std 1/r); the design's lambda
print(f"\nFLUX.1 Kontext [dev], rank {real.rank}: n = {n_real:,} LoRA weights. A lora_A entry of size 1/r = {a0:.4f} "
      f"at lambda {lam:g} gets the gradient")
print(f"  mean_square: 2 lambda p / n = {2 * lam * a0 / n_real:.1e}, far below Adam's eps of 1e-8: it moves nothing")
print(f"  sum:         2 lambda p     = {2 * lam * a0:.1e}, whatever n")
shrink = real.learning_rate * real.l2_lora_lambda
print(f"  decoupled (the default, lambda {real.l2_lora_lambda:g}): no gradient; every update multiplies each of the "
      f"{n_real:,} weights by 1 - lr * lambda = {1 - shrink:.4f},\n    so a weight the loss does not hold keeps "
      f"{(1 - shrink) ** real.steps:.2f} of itself over {real.steps} updates (this notebook's run, lr "
      f"{cfg.learning_rate:g}: {(1 - cfg.learning_rate * cfg.l2_lora_lambda) ** cfg.steps:.2f} over {cfg.steps})")

# %% [markdown]
# ## 5. Train
#
# `kh.train` attaches the LoRA (its `B` matrices start at zero, so at step 0 the LoRA adds nothing), builds
# the region module of `cfg.region_kind` (the default `"marked"` starts at zero too, so the model at step 0 is the
# base model; the original design's `"linear"` token starts random, one random token more), builds the depth module
# of `cfg.depth_kind` (`"tokens"`: its projection starts at zero too), and runs `cfg.steps` updates of LoRA, region
# and depth through `accelerate`, writing a checkpoint every `cfg.checkpoint_every` updates.
# `kh.LiveLossPlot` redraws the three loss curves every 25 steps while it runs. Old checkpoints of an earlier run
# of this notebook are removed first, unless you are resuming (`RESUME = True`).
#
# Two windows into a long run, both off by default in `TrainConfig`:
# * **Previews** (`preview_every`): every N updates the current LoRA and region edit one pair at the fixed seed
#   `cfg.seed`, saved as `RUN_DIR/previews/step-NNNNNN.png` (context | mask | depth | target | result | change,
#   with the edit metrics). `preview_pair=` names the pair: here a held-out one from section 2, so the previews
#   show what carries over to a scene training never sees, not how well a training pair is memorised.
# * **A tracker** (`report_to`): `accelerate`'s TensorBoard or Weights & Biases tracker receives the loss and its
#   parts (`loss/total`, `loss/in_mask`, `loss/outside`, `loss/l2_lora`, `loss/l2_region`), the learning rate
#   every `log_every` updates, and every preview as an image. TensorBoard writes event files to
#   `RUN_DIR/logs/kontext-lora/` (on Drive in Colab, so a disconnect loses nothing).

# %%
import shutil
import time

from IPython.display import clear_output

if not cfg.resume and os.path.isdir(RUN_DIR):
    shutil.rmtree(RUN_DIR)  # a fresh run: an earlier run's checkpoints must not mix into the resume demo
plot = kh.LiveLossPlot(every=25)
t0 = time.perf_counter()
result = kh.train(pipe, dataset, cfg, callback=plot, cache=cache, preview_pair=held_out[0])
seconds = time.perf_counter() - t0
clear_output()  # the live plot ends here; the final figure follows below
print(f"{len(result.history)} steps in {seconds:.1f} s; loss {result.history[0]['loss']:.3f} -> "
      f"{result.history[-1]['loss']:.3f}")
if DEVICE.type == "cuda":  # how close did the preset's estimate come?
    print(f"measured peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; "
          f"the preset expected {cfg.expected_peak_memory_gb or '-'} GB ({cfg.peak_memory_source or 'no preset'})")

# %%
fig = plot.figure()
tenth = max(1, len(result.history) // 10)  # compare the mean of the first and the last tenth of the run
ends = {key: [sum(r[key] for r in part) / len(part) for part in (result.history[:tenth], result.history[-tenth:])]
        for key in ("loss_in", "loss_out")}
trend = {key: f"{'falls' if b < a else 'rises'} {a:.3f} -> {b:.3f}" for key, (a, b) in ends.items()}
fig.axes[0].set_title(f"Training loss ({MODEL_LABEL}), moving mean of 10 steps. Mean of the first and last {tenth} "
                      f"steps:\nin-mask (learning the edit) {trend['loss_in']}, out-of-mask (keeping the context) "
                      f"{trend['loss_out']}", fontsize=10)
plt.show()

# %% [markdown]
# How to read it on a real run: the single-step loss is noisy (every step has another sample, sigma and noise),
# so judge the moving mean. The in-mask curve should keep falling; the out-of-mask curve should fall early (the
# model learns to copy the context) and then stay low. An out-of-mask curve that climbs while in-mask falls means
# the LoRA is changing the whole image: lower the learning rate, raise `w_out`, or try `preservation="prior"`.
# On the tiny model the base model already copies the context, so the out-of-mask part starts low; the title gives
# each part's mean over the first and the last tenth of the run.

# %% [markdown]
# The last preview: the held-out pair edited by the LoRA and region as they were at that update. Its metrics are
# the ones notebook 05 explains (PSNR of the edit against the target inside the mask, and of the rest against the
# context outside it): they say whether the edit landed inside the mask and left the rest alone. The held-out
# yardstick further down measures the same thing on four held-out pairs.

# %%
preview_dir = os.path.join(RUN_DIR, "previews")
previews = sorted(os.listdir(preview_dir)) if os.path.isdir(preview_dir) else []  # step-NNNNNN.png
print(f"{len(previews)} previews in {preview_dir}: {previews}")
if previews:
    fig, ax = plt.subplots(figsize=(14, 3.2))
    ax.imshow(plt.imread(os.path.join(preview_dir, previews[-1])))
    ax.set_axis_off()
    ax.set_title(f"Training preview {previews[-1]} of held-out pair {held_out[0]['name']}: "
                 "notice whether the edit lands inside the mask", fontsize=10)
    plt.show()

# %% [markdown]
# What the tracker received, read back from TensorBoard's event files with TensorBoard's own reader: one point
# per update and tag, the same numbers as the history below, and the previews as images. In Colab the cell also
# opens TensorBoard itself under the cell (`%tensorboard`).

# %%
if REPORT_TO == "tensorboard":
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = os.path.join(RUN_DIR, "logs", cfg.tracker_project)
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0}).Reload()
    for tag in sorted(events.Tags()["scalars"]):
        points = events.Scalars(tag)
        print(f"{tag:<16} {len(points):>4} points, last at step {points[-1].step}: {points[-1].value:.4g}")
    print("preview images at steps", [e.step for e in events.Images("preview")] if events.Tags()["images"] else [])
    print(f"history's last loss: {result.history[-1]['loss']:.4g}")
    if IN_COLAB:  # TensorBoard's own page under this cell: the %load_ext tensorboard and %tensorboard magics
        from IPython import get_ipython

        get_ipython().run_line_magic("load_ext", "tensorboard")
        get_ipython().run_line_magic("tensorboard", f"--logdir {os.path.join(RUN_DIR, 'logs')}")
else:
    print("report_to='none': nothing was sent to a tracker (install tensorboard and run the CONFIG cell again)")

# %% [markdown]
# The history has one record per update: the loss and its two parts, the learning rate and the seconds since
# the start.

# %%
rows = result.history[:3] + result.history[-3:]
print(f"{'step':>5} {'loss':>8} {'loss_in':>8} {'loss_out':>8} {'lr':>8} {'seconds':>8}")
for i, r in enumerate(rows):
    if i == 3:
        print(f"{'...':>5}")
    print(f"{r['step']:>5} {r['loss']:>8.4f} {r['loss_in']:>8.4f} {r['loss_out']:>8.4f} {r['lr']:>8.1e} "
          f"{r['seconds']:>8.2f}")

# %% [markdown]
# Now the yardstick again: the same pair, the same noise and sigmas, this time with the trained LoRA and region
# module.

# %%
after = kh.evaluation_loss(pipe, result.region, cache, depth_module=result.depth)
for key in before:
    print(f"{key:<8} before {before[key]:.4f}  after {after[key]:.4f}  ({after[key] / before[key] - 1:+.0%})")

fig, ax = plt.subplots(figsize=(6, 3.2))
keys = list(before)
ax.bar([i - 0.2 for i in range(3)], [before[k] for k in keys], width=0.4, color="lightgrey", label="before training")
ax.bar([i + 0.2 for i in range(3)], [after[k] for k in keys], width=0.4, color="tab:green", label="after training")
ax.set_xticks(range(3), ["loss (in + out)", "err_in (edit vs target)", "err_out (rest vs context)"], fontsize=8)
ax.set_ylabel("velocity MSE")
ax.set_title(f"Fixed evaluation loss of pair 0 ({MODEL_LABEL}): {before['loss']:.2f} -> {after['loss']:.2f} "
             f"({after['loss'] / before['loss'] - 1:+.0%})")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# **Learned, or memorised?** The same yardstick on all ten training pairs and on the held-out pairs. A LoRA that
# learned the edits lowers the held-out in-mask error too; one that memorised its ten pairs lowers only theirs (and
# may raise the held-out error). The training pairs' "before" is the start of training: the LoRA switched off
# (`kh.lora_off`; its `B` was zero) and the untrained region and depth modules of section 3.

# %%
held_after = [kh.evaluation_loss(pipe, result.region, held_cache, index=i, depth_module=result.depth)
              for i in range(len(held_out))]
with kh.lora_off(pipe.transformer):  # the model at step 0
    trained_before = [kh.evaluation_loss(pipe, untrained_region, cache, index=i, depth_module=untrained_depth)
                      for i in range(len(cache.samples))]
trained_after = [kh.evaluation_loss(pipe, result.region, cache, index=i, depth_module=result.depth)
                 for i in range(len(cache.samples))]
for it, b0, b1 in zip(held_out, held_before, held_after):
    print(f"{it['name']:<26} err_in {b0['err_in']:.4f} -> {b1['err_in']:.4f}   err_out {b0['err_out']:.4f} -> "
          f"{b1['err_out']:.4f}")
change = {group: [b1["err_in"] / b0["err_in"] - 1 for b0, b1 in zip(*rows)]
          for group, rows in (("trained", (trained_before, trained_after)), ("held out", (held_before, held_after)))}
for group, values in change.items():
    print(f"{group:<9}: err_in falls on {sum(v < 0 for v in values)} of {len(values)} pairs, mean change "
          f"{sum(values) / len(values):+.0%}")

fig, ax = plt.subplots(figsize=(8, 3.4))
names = [f"{len(cache.samples)} trained pairs\n(mean)"] + [it["name"].split("_", 3)[-1] + f" {i}"
                                                           for i, it in enumerate(held_out)]
befores = [sum(r["err_in"] for r in trained_before) / len(trained_before)] + [r["err_in"] for r in held_before]
afters = [sum(r["err_in"] for r in trained_after) / len(trained_after)] + [r["err_in"] for r in held_after]
ax.bar([i - 0.2 for i in range(len(names))], befores, width=0.4, color="lightgrey", label="before training")
ax.bar([i + 0.2 for i in range(len(names))], afters, width=0.4, color="tab:green", label="after training")
ax.set_xticks(range(len(names)), names, fontsize=8)
ax.set_ylabel("err_in (velocity MSE in the mask)")
ax.set_title(f"In-mask error on the trained pairs and on {len(held_out)} held-out drawn pairs ({MODEL_LABEL}): "
             "what carries over to pairs the LoRA never saw", fontsize=9)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Read the two groups apart (the printout above says which way each went in this run). When the trained pairs'
# error falls and the held-out pairs' rises, the LoRA memorised its ten pairs: it learned *these* edits of *these*
# scenes, and pushes other scenes towards them. Ten pairs are a lesson in the mechanics, not a dataset; a LoRA that
# generalises needs many varied pairs of its edit (notebook 05's twin scenes train on 48 samples and edit scenes
# they never saw).

# %% [markdown]
# **What moved?** Only the LoRA, the region module and the depth module were trained; the 12B (here: tiny) base
# stayed frozen. Every LoRA layer adds `B @ A` to a frozen weight, and `B` starts at zero, so the norm of `B` says
# how far each layer moved away from the base model. Compare the text-stream layers (`add_q_proj`, `add_k_proj`,
# `add_v_proj`, `to_add_out`, `ff_context`) with the image-stream ones (the cell prints both means): the loss is
# measured on image tokens only, so the text stream gets its gradient only through attention; but AdamW's step is
# about the learning rate whatever the gradient's size (section 4), so a small gradient need not mean a small move.

# %%
lora = kh.collect_lora_named_params(pipe.transformer)
b_norms = {n.removesuffix(".lora_B.default.weight"): float(p.detach().norm()) for n, p in lora if ".lora_B." in n}
print(f"{len(lora)} LoRA tensors (A and B) in {len(b_norms)} layers, "
      f"{sum(p.numel() for _, p in lora) / 1e3:.0f} k trainable parameters")
text_stream = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context")  # the double blocks' text side
by_stream = {"text": [v for n, v in b_norms.items() if any(t in n for t in text_stream)],
             "image": [v for n, v in b_norms.items() if not any(t in n for t in text_stream)]}
print("mean ||lora_B||: " + ", ".join(f"{k} stream {sum(v) / len(v):.3f} ({len(v)} layers)"
                                      for k, v in by_stream.items() if v))
short = [n.replace("single_transformer_blocks.", "s").replace("transformer_blocks.", "d") for n in b_norms]
colors = ["tab:blue" if n.startswith("d") else "tab:purple" if n.startswith("s") else "tab:grey" for n in short]

fig, ax = plt.subplots(figsize=(14, 4.6))
ax.bar(range(len(b_norms)), list(b_norms.values()), color=colors)
ax.set_xticks(range(len(b_norms)), short, rotation=90, fontsize=7)
ax.set_xlim(-0.7, len(b_norms) - 0.3)
ax.set_ylabel("||lora_B||")
ax.set_title("LoRA B norms per layer (blue: double blocks dN, purple: single blocks sN, grey: final projection).\n"
             "B starts at zero, so every bar is movement away from the base model")
plt.show()

# %% [markdown]
# The default region module (`cfg.region_kind = "marked"`, notebook 03) is one learned vector `e` of `4C`
# numbers, added to every masked token of the noisy target and of the context. It starts at zero, so at step 0
# the model is exactly the base model plus the LoRA's zero update. Through the transformer's first linear layer
# (`x_embedder`) `e` becomes a direction in the model's width that says "this place is in the mask". It is the same
# vector at every place, so a mask where no training mask lay gets the same mark (the original design's token has
# one weight column per grid cell, learned only where training masks lay); whether the trained model then edits
# there is what notebook 05's held-out twin scenes measure. Below: the learned `e` per channel, beside the typical
# size of a context token's channel.

# %%
e = result.region.embedding.detach().float().cpu()  # [4C]
typical = cache.samples[0].ctx_tok.float().abs().mean().item()  # mean |channel| of a context token
print(f"learned mark e: {tuple(e.shape)}, norm {e.norm():.3f}; mean |e| {e.abs().mean():.3f} against a context "
      f"token's mean |channel| {typical:.3f}")
fig, ax = plt.subplots(figsize=(10, 3))
ax.bar(range(len(e)), e.numpy(), color=["tab:red" if v >= 0 else "tab:blue" for v in e.numpy()])
ax.axhline(typical, color="grey", ls="--", lw=0.8, label="a context token's mean |channel|")
ax.axhline(-typical, color="grey", ls="--", lw=0.8)
ax.set_xlabel("channel of a packed token (4C)")
ax.set_ylabel("e")
ax.legend(fontsize=8)
ax.set_title(f"The learned mark e after training ({MODEL_LABEL}): it started at zero; the dashed lines show the\n"
             "typical size of a context token's channel, for scale", fontsize=10)
plt.show()

# %% [markdown]
# > The original design's single region token (`region_kind="linear"`, notebook 03) is not the default: how often
# > each kind lets the mask decide on held-out twin scenes is in
# > [docs/design.md](../docs/design.md#does-the-mask-decide-where-the-edit-happens).

# %% [markdown]
# ### 5b. Photos of other shapes: one run, several buckets
#
# Your own folder will mix 4:3 photos, 3:4 portraits and 16:9 screenshots. `KontextPairs` reads each pair at its
# aspect-ratio bucket (notebook 01, section 6), so the cache holds samples on different token grids
# (`cache.grid_of(i)`), and `kh.train` draws every batch from one bucket (`kh.batch_indices`: each epoch permutes
# every bucket, cuts it into batches and shuffles the batches), because a batch is one `[B, N, 4C]` tensor. The
# region module is built on the square grid and serves every bucket (the `"marked"` mark is one vector per token,
# the other kinds pool the mask onto their own grid), and so does the depth module (one 16x16 patch per token).
#
# A short run shows the mechanics: the sample pairs cut to four shapes, `BUCKET_STEPS` updates of two samples
# each, on a fresh tiny pipeline (seconds, whatever `MODEL` is; the LoRA trained above stays as it is).

# %%
import tempfile

ASPECTS = ((4, 3), (3, 4), (16, 9), (1, 1))  # (width, height) of each cut, in turn
square_pairs = kh.KontextPairs(os.path.join(ROOT, "data_samples"), 128, resize="square")
cut = [kh.crop_to_aspect(square_pairs[i], ASPECTS[i % len(ASPECTS)]) for i in range(len(square_pairs))]
bucket_root = tempfile.mkdtemp(prefix="kontext_04_buckets_")
mixed = kh.write_pair_folder(os.path.join(bucket_root, "pairs"), *[[c[k] for c in cut] for k in (
    "context", "target", "mask", "depth", "prompt")], names=[c["name"] for c in cut], resolution=128)
print(mixed)
bucket_cfg = kh.TrainConfig.for_gpu("cpu", steps=BUCKET_STEPS, batch_size=2, seed=SEED, checkpoint_every=0,
                                    output_dir=os.path.join(bucket_root, "run"))
bucket_pipe = kh.load_pipeline("tiny", seed=SEED)
bucket_cache = kh.build_train_cache(bucket_pipe, mixed, max_sequence_length=bucket_cfg.max_sequence_length,
                                    progress=False)
groups = bucket_cache.groups()  # the sample indices of each bucket
drawn = [kh.batch_indices(groups, bucket_cfg.seed, step, bucket_cfg.batch_size) for step in range(BUCKET_STEPS)]
bucket_result = kh.train(bucket_pipe, mixed, bucket_cfg, cache=bucket_cache, progress=False)
for step, (idx, record) in enumerate(zip(drawn, bucket_result.history)):
    h_tok, w_tok = bucket_cache.grid_of(idx[0])
    print(f"update {step + 1:2d}: samples {idx} -> bucket {16 * w_tok}x{16 * h_tok} px ({h_tok}x{w_tok} tokens), "
          f"loss {record['loss']:.3f}")

# %%
wide = next(i for i in range(len(mixed)) if mixed.bucket_of(i)[0] > 1.5 * mixed.bucket_of(i)[1])  # a 16:9 pair
w_px, h_px = mixed.bucket_of(wide)
item = mixed[wide]
edited = kh.sample_edit(bucket_pipe, item["context"], item["prompt"], mask=item["mask"], region=bucket_result.region,
                        depth=item["depth"], depth_module=bucket_result.depth, height=h_px, width=w_px,
                        num_inference_steps=8, generator=torch.Generator().manual_seed(SEED))
labels = [f"{mixed.bucket_of(idx[0])[0]}x{mixed.bucket_of(idx[0])[1]}" for idx in drawn]
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), gridspec_kw={"width_ratios": [1.6, 1, 1]})
order = sorted(set(labels), key=lambda t: int(t.split("x")[0]) / int(t.split("x")[1]))
axes[0].scatter(range(1, BUCKET_STEPS + 1), [order.index(t) for t in labels], c="tab:blue")
axes[0].set_yticks(range(len(order)), order)
axes[0].set_xlabel("update")
axes[0].set_title("the bucket of each update's batch (W x H px)", fontsize=10)
axes[1].imshow(item["context"].permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
axes[1].contour(item["mask"][0].numpy(), levels=[0.5], colors="red", linewidths=1)
axes[1].set_title(f"{mixed.names[wide]}: context at its bucket, {w_px}x{h_px}", fontsize=10)
axes[2].imshow(edited)
axes[2].set_title(f"edited at its own shape, {edited.size[0]}x{edited.size[1]} ({BUCKET_STEPS} updates)", fontsize=10)
for ax in axes[1:]:
    ax.set_axis_off()
fig.suptitle(f"One run over {len(groups)} buckets: every batch comes from one of them, and the edit keeps the "
             "photo's shape", fontsize=11)
plt.show()

# %% [markdown]
# ## 6. Nothing lost: checkpoints and resume
#
# Every `checkpoint_every` updates `kh.train` writes `RUN_DIR/checkpoints/step-NNNNNN/` with the LoRA (in PEFT's
# key format, the same as a saved adapter), the region module, the optimizer and scheduler state, the loss
# history and the run's config; the newest `keep_checkpoints` (3) are kept.

# %%
found = kh.list_checkpoints(RUN_DIR)
print("kh.list_checkpoints(RUN_DIR):")
for step, path in found:
    print(f"  step {step:>5}: {os.path.relpath(path, OUTPUT_DIR)}")
newest = found[-1][1]
print(f"\nfiles in {os.path.basename(newest)}:")
for name in sorted(os.listdir(newest)):
    print(f"  {name:<24} {os.path.getsize(os.path.join(newest, name)) / 1024:>9.1f} KiB")

# %% [markdown]
# **Atomic writes.** A checkpoint is first written into a hidden temporary folder
# (`checkpoints/.tmp-step-NNNNNN-<pid>/`), flushed to disk, and only then renamed to `step-NNNNNN/`; a rename
# is one atomic operation. `state.json` is written last, and `kh.list_checkpoints` ignores any folder without
# it. So a run killed at any instant (a Colab disconnect, an out-of-memory kill, a full Drive) leaves either
# the complete checkpoint or none, never a half-written one that would crash the resume.
#
# **Resume.** Everything random in step `k` (the batch, the noise, the sigmas) derives from `(seed, k)`, so
# there is no random-number state to save: with the optimizer and the scheduler from the checkpoint, a run
# killed and resumed ends with *exactly* the weights of an uninterrupted one (`tests/test_checkpoints.py`
# checks this bit for bit). Settings that do not shape the weights may change on resume (here `steps`; the
# run prints what changed). Here we pretend Colab disconnected:
# the trained pipeline is dropped, a fresh one is loaded, and `train` is asked for 30 more steps with
# `resume=True`.

# %%
import gc

pipe = lora = None  # a disconnect loses everything in memory; on a GPU this frees room for the fresh pipeline
gc.collect()
if DEVICE.type == "cuda":
    torch.cuda.empty_cache()
pipe = load_model()  # fresh base weights, no LoRA
add_transformer_after_caching(pipe)
cfg_more = dataclasses.replace(cfg, steps=cfg.steps + RESUME_EXTRA_STEPS, resume=True)
# the cache does not depend on the LoRA, so we reuse it; after a real disconnect leave cache= out: train rebuilds it
resumed = kh.train(pipe, dataset, cfg_more, cache=cache, progress=False)
print("resumed_from:", resumed.resumed_from)
print(f"history: {len(resumed.history)} records = {resumed.resumed_from} from the checkpoint + "
      f"{len(resumed.history) - resumed.resumed_from} new")
same = all(a["loss"] == b["loss"] for a, b in zip(result.history, resumed.history))
print("the first", cfg.steps, "records equal the original run's:", same)
print("checkpoints now:", [s for s, _ in kh.list_checkpoints(RUN_DIR)])

# %%
fig, ax = plt.subplots(figsize=(8, 3.2))
steps = [r["step"] for r in resumed.history]
ax.plot(steps[:cfg.steps], [r["loss"] for r in resumed.history[:cfg.steps]], color="tab:blue", lw=0.8,
        label="first run (history from the checkpoint)")
ax.plot(steps[cfg.steps - 1:], [r["loss"] for r in resumed.history[cfg.steps - 1:]], color="tab:red", lw=0.8,
        label="resumed in a fresh pipeline")
ax.axvline(resumed.resumed_from, color="grey", ls="--", lw=1)
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.set_title(f"Resumed at step {resumed.resumed_from} from the checkpoint: the curve carries on, "
             "it does not restart")
ax.legend(fontsize=8)
plt.show()
result = resumed  # from here on the run is the resumed one, and `pipe` holds its LoRA

# %% [markdown]
# **A resume that cannot work fails at once.** A checkpoint of rank 16 cannot continue as rank 32: the saved
# LoRA has other shapes. `kh.train` compares the checkpoint's saved config with yours *before* it caches or
# touches the model, and names every setting that shapes the weights (`kh.RESUME_MUST_MATCH`). The same check
# alone is `kh.checkpoint_to_resume(config)`, which reads only the checkpoint's `state.json`:

# %%
try:
    kh.checkpoint_to_resume(dataclasses.replace(cfg_more, rank=cfg.rank * 2, resolution=cfg.resolution * 2))
except ValueError as err:
    print(err)

# %% [markdown]
# > **Two ways to keep the rest of the image.** Outside the mask the default `preservation="identity"` asks
# > the model to flow to the *context* (the original design's identity term). That is right when your targets really
# > equal the context outside the mask. `preservation="prior"` (ai-toolkit's `inverted_mask_prior`) instead matches the
# > base model's own prediction with the LoRA off: better when the targets' outside differs slightly from the
# > context (re-rendered, re-compressed), or when the LoRA must not change the model's behaviour elsewhere. It
# > costs a second, gradient-free forward pass per step. Set it with `dataclasses.replace(cfg,
# > preservation="prior")` or in the CONFIG cell.

# %% [markdown]
# **The same training without a notebook, and on several GPUs.** `kontext_helpers` is also a command line;
# every `TrainConfig` field is a flag (`--learning-rate`, `--rank`, `--checkpoint-every`, `--resume`, ...).
# Under `accelerate launch` the same loop runs data-parallel on several GPUs; the adapter lands in
# `--out/adapter`.
#
# ```bash
# python -m kontext_helpers train --data my_pairs --out runs/edit \
#     --model black-forest-labs/FLUX.1-Kontext-dev --preset l4 --steps 1000
#
# accelerate launch --num_processes 2 -m kontext_helpers train --data my_pairs --out runs/edit \
#     --model black-forest-labs/FLUX.1-Kontext-dev --preset a100-80 --steps 2000
#
# python -m kontext_helpers train --config run.yaml --steps 500   # the file's settings, with --steps on top
# ```
#
# `run.yaml` holds any `TrainConfig` field and `data`, `out`, `model`, `preset`, `resize`; an unknown key is one
# error naming the file (the README shows an example).

# %% [markdown]
# ## 7. Save the adapter
#
# `kh.save_adapter` writes one folder that notebook 05 loads, and that plain diffusers can load too:
# the LoRA in diffusers' own format, the region module, the depth module, and a JSON record of how it was made.

# %%
import json

ADAPTER_DIR = kh.save_adapter(pipe, result.region, os.path.join(OUTPUT_DIR, "adapter"), config=cfg_more,
                              depth_module=result.depth)
for name in sorted(os.listdir(ADAPTER_DIR)):
    print(f"{name:<36} {os.path.getsize(os.path.join(ADAPTER_DIR, name)) / 1024:>8.1f} KiB")
with open(os.path.join(ADAPTER_DIR, "adapter_config.json")) as f:
    info = json.load(f)
train_config = info.pop("train_config")
print(json.dumps(info, indent=2))
print("train_config (abridged):", {k: train_config[k] for k in ("resolution", "steps", "rank", "lora_targets",
                                                                 "learning_rate", "preservation", "seed")})

# %% [markdown]
# ## Exercises
#
# First an experiment to run and think about, then three exercises that each ask for one function. Write it in its
# cell in place of the `raise NotImplementedError(...)` line and run the cell: the check below your function calls
# it on inputs of its own, compares the result with diffusers', PEFT's or the package's own function, and names the
# first shape or value that differs (and where). Until you fill a cell in, its check stops with a message, so "Run
# all" stops at the first exercise you have not done yet. Stuck? `kh.exercises.show_solution("training_sigmas")`
# prints one solution (any exercise's name works).
#
# ### Experiment: guidance while training
#
# Training feeds Kontext's distilled guidance at 1.0 (`cfg.guidance`). Measure the trained model's evaluation loss
# with guidance 1.0 and 3.5. Which one does the model fit, and why would you train at 1.0 but sample at 2.5-3.5?
# Predict first, then run the cell.

# %%
# The evaluation loss of the trained model at the guidance it was trained with, and at the pipeline's 3.5
for g in (1.0, 3.5):
    ev = kh.evaluation_loss(pipe, result.region, cache, guidance=g, depth_module=result.depth)
    print(f"guidance {g}: evaluation loss {ev['loss']:.4f} (in {ev['err_in']:.4f}, out {ev['err_out']:.4f})")

# %% [markdown]
# ### Exercise 4.1: training sigmas on the scheduler's table
#
# `kh.sample_sigmas` draws `u` in `[0, 1)` (uniformly, or logit-normal with `timestep_sampling="logit_normal"`) and
# puts it on the scheduler's 1000 training sigmas `k / 1000`, `k = 1..1000` (section 3). Write
# `training_sigmas(u)`: cut `[0, 1)` into 1000 bins of equal width; the first bin (`u = 0`) gets sigma 1.0, the last
# 0.001. `u` is `[B]`, so is the result. The check feeds your function the very draws behind `kh.sample_sigmas`,
# for both modes, and compares. Why must the result never be 0?

# %%
def training_sigmas(u):
    # u [B] in [0, 1) -> sigma [B], each one of k / 1000, k = 1..1000
    raise NotImplementedError("your code here")


kh.exercises.check_training_sigmas(training_sigmas)

# %% [markdown]
# ### Exercise 4.2: the clean estimate behind a velocity
#
# At `sigma` the transformer predicts a velocity `v` (`[B, N, 4C]`). One Euler step from `sigma` straight down to
# 0 follows it to the clean latents the model aims at: its best guess of the edited image after a single call.
# Write `clean_estimate(x_t, v, sigma)` with `sigma` of shape `[B]`. The check compares it with diffusers'
# `FlowMatchEulerDiscreteScheduler.step` from each sample's sigma to 0. How far off is this guess when `v` is off
# by `dv`, at `sigma = 0.9` and at `sigma = 0.1`?

# %%
def clean_estimate(x_t, v, sigma):
    # x_t, v [B, N, 4C], sigma [B] -> the clean estimate [B, N, 4C]
    raise NotImplementedError("your code here")


kh.exercises.check_clean_estimate(clean_estimate)

# %% [markdown]
# ### Exercise 4.3: a fresh LoRA's mean square, predicted
#
# `kh.add_lora` (and so `kh.train`) asks PEFT for its gaussian initialisation: `lora_A` `[r, d_in]` drawn with
# std `1/r`, `lora_B` `[d_out, r]` at zero (`LoraLayer.reset_lora_parameters`). Write `lora_mean_square(d_in,
# d_out, rank)`: the mean of `p**2` over every entry of both matrices (`kh.mean_square`) that this initialisation
# gives on average, as a formula. The check measures it on three freshly initialised layers and accepts 5 %
# (the sampling noise). Then try FLUX.1's 3072-wide attention layers at rank 16.

# %%
def lora_mean_square(d_in, d_out, rank):
    # -> one float: the expected mean of p**2 over lora_A [rank, d_in] and lora_B [d_out, rank]
    raise NotImplementedError("your code here")


kh.exercises.check_lora_mean_square(lora_mean_square)

# %% [markdown]
# ## Recap
#
# - `TrainConfig` holds every setting; `TrainConfig.for_gpu("auto")` picks precision, quantisation, optimizer,
#   resolution and rank for your card (its memory figures are estimates).
# - Prompts, latents, token-grid masks and depth features are encoded **once per sample** and read back by
#   sample index, so reshuffled epochs can never pair an image with another image's cache.
# - Sigmas come from the scheduler's training levels and never hit 0; a fixed evaluation loss (fixed pair, noise,
#   sigmas) is the honest before/after yardstick, split into in-mask and out-of-mask error.
# - Only the LoRA `A`/`B` matrices, the region module and the depth module move; the default region module is one
#   learned mark `e` on the masked tokens, the same at every place; the default depth module maps each token's 16x16
#   depth patch to an offset, from zero, and a share `depth_dropout` of the samples trains without depth.
# - Previews (`preview_every`, `preview_pair=`) show a held-out pair's edit during the run; `report_to` sends the
#   loss parts, the learning rate and the previews to TensorBoard or wandb.
# - Checkpoints are written atomically and a resumed run continues exactly; in Colab, put `OUTPUT_DIR` on Drive.
# - `save_adapter` writes `pytorch_lora_weights.safetensors`, `region_token.safetensors`,
#   `depth_module.safetensors` and `adapter_config.json` to `OUTPUT_DIR/adapter`.
#
# ## Next
#
# [05_inference_previews.ipynb](05_inference_previews.ipynb) loads this adapter, samples edits with the region
# signal and the depth map, compares the variants (base, LoRA, LoRA + region, + depth, inpainting) with metrics,
# and exports the LoRA for diffusers and ComfyUI.
