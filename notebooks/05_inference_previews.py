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
# # 05 · Sampling with the region signal, previews and metrics
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/kontext-region-lora/blob/main/notebooks/05_inference_previews.ipynb)
#
# **What you will learn**
# - why this project has its own sampling loop, and how we know it equals `FluxKontextPipeline` to the bit
# - how to edit an image with the LoRA, the region signal (the mask) and the depth map together
# - how to read a preview grid and the edit metrics: did it edit where asked, and only there?
# - how to watch the denoising steps through a callback
# - how to compare base, LoRA, LoRA + region, + depth and an inpainting baseline on the same noise
# - how the adapter travels to plain diffusers' `pipe(...)` (`kh.RegionHook`) and to ComfyUI (a custom node)
# - whether the mask decides *where* the edit happens: held-out twin scenes, and a widget that moves the mask
# - whether the depth map decides *what* the edit does: held-out depth scenes, and a widget that moves the box in
#   the depth map
#
# Runs in a few minutes on a laptop CPU with the tiny model (most of it training the twin-scene and depth-scene
# LoRAs of sections 7 and 8), or on a Colab GPU with FLUX.1 Kontext [dev].
#
# **On the tiny model the pictures are real but small.** Its weights were pretrained in the package on drawn
# scenes (`docs/tiny_model.md`): how well its VAE and its base model give a sample scene back caps every figure
# here (the first cell below prints both, from `docs/tiny_model_figures.json`). The LoRA from notebook 04 learned
# its ten pairs (notebook 04 measures how far, and whether it carries over); on a GPU the same cells show FLUX.1
# Kontext.
#
# **The code behind it:** [`kontext_helpers/inference.py`](../kontext_helpers/inference.py) (`sample_edit` in named
# steps, `compare_variants`) and [`kontext_helpers/adapters.py`](../kontext_helpers/adapters.py) (save, load, ComfyUI).

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
MODEL = kh.default_model()  # the model: $KONTEXT_MODEL, else FLUX.1 Kontext [dev] on a GPU, else "tiny"
kh.describe_environment(MODEL)  # library versions, device and model
TINY = MODEL == "tiny"  # the tiny pretrained model: seconds on a CPU; the real model needs a GPU
PRESET_NAME = os.environ.get("KONTEXT_PRESET", "auto")  # GPU preset (notebook 04): "auto" detects the GPU; or "t4", ...
QUICK = os.environ.get("KONTEXT_QUICK") == "1"  # a smoke run of the GPU path (the tests set it): few steps, 64 px
PRESET = kh.TrainConfig.for_gpu(PRESET_NAME)  # this GPU's preset: resolution, precision, NF4 or not
if QUICK:
    PRESET = kh.quick_config(PRESET)  # 3 updates at 64 px; without a GPU, NF4 and fp16 give way (printed)
DATA_ROOT = os.path.join(ROOT, "data_samples")  # the sample pairs; point this at your own folder
PAIR = 0  # which pair of DATA_ROOT to edit (0: "make the red sphere blue")
SEED = 0  # the starting noise of every sample in this notebook
# where notebook 04 saved the adapter; exports go here too (in Colab on Drive, set by the setup cell's USE_DRIVE)
OUTPUT_DIR = os.environ.get("KONTEXT_OUTPUT_DIR", os.path.join(ROOT, "outputs"))
ADAPTER_DIR = os.path.join(OUTPUT_DIR, "adapter")  # the adapter folder notebook 04 wrote
RESOLUTION = 128 if TINY else PRESET.resolution  # side in pixels; section "The adapter" switches to the adapter's own
NUM_STEPS = 8 if TINY else 2 if QUICK else 28  # denoising steps: 28 is Kontext's default
GUIDANCE = 2.5  # Kontext's distilled guidance (diffusers' docstring example; __call__ defaults to 3.5)
MAX_SEQUENCE_LENGTH = 32 if TINY else PRESET.max_sequence_length  # T5 tokens; "The adapter" takes the adapter's
RECORD_EVERY = 1 if TINY else 4  # section 3 keeps the latents of every RECORD_EVERY-th denoising step
QUICK_STEPS = 3 if QUICK else 40  # training steps of the stand-in adapter when notebook 04 has not been run

# %%
os.makedirs(OUTPUT_DIR, exist_ok=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # NF4 needs bitsandbytes: see the setup cell


def load_model():
    """A fresh pipeline for this notebook's model: NF4 base transformer when the GPU preset asks for it."""
    if TINY or PRESET.quantize_base != "nf4":
        return kh.load_pipeline(MODEL).to(DEVICE)
    # the 4-bit transformer loads first, onto the GPU; then each other model visits the GPU while it runs
    return kh.load_pipeline(MODEL, quantization_config=kh.nf4_quantization_config())


dataset = kh.KontextPairs(DATA_ROOT, resolution=RESOLUTION)
item = dataset[PAIR]
print(dataset)
print(f"pair {PAIR}: {item['name']!r}, prompt {item['prompt']!r}")
print("context", tuple(item["context"].shape), " mask", tuple(item["mask"].shape), " depth",
      tuple(item["depth"].shape), " # [3, H, W], [1, H, W], [1, H, W] in [0, 1]")
if TINY:  # what caps every figure below (python scripts/tiny_editor_report.py measured it)
    import json

    with open(os.path.join(ROOT, "docs", "tiny_model_figures.json")) as f:
        tiny_figures = json.load(f)
    vae_db = tiny_figures["vae_db"]
    base_db = [r["empty_prompt_db"] for r in tiny_figures["base_keep"]]
    print(f"the tiny model on the ten sample contexts: its VAE gives them back at {sum(vae_db) / len(vae_db):.1f} dB "
          f"on average ({min(vae_db):.1f} at worst); with an empty prompt the base model at {min(base_db):.1f} to "
          f"{max(base_db):.1f} dB, {(sum(vae_db) - sum(base_db)) / len(vae_db):.2f} dB under the VAE on average")

# %% [markdown]
# ## The adapter from notebook 04
#
# Notebook 04 saved its LoRA, region module and depth module to `OUTPUT_DIR/adapter`. Run it first (with the same
# `OUTPUT_DIR`) to use that adapter here. If the folder is missing, the next cell trains a quick stand-in
# (40 steps, like notebook 04 but shorter) and saves it there, so this notebook also runs on its own. On a GPU,
# run notebook 04 instead: 40 steps teach a real model nothing.

# %%
import dataclasses
import gc
import json

if os.path.isfile(os.path.join(ADAPTER_DIR, kh.LORA_WEIGHT_FILE)):
    print(f"using the adapter notebook 04 saved in {ADAPTER_DIR}")
else:
    print(f"no adapter in {ADAPTER_DIR}: run 04_training first; training a {QUICK_STEPS}-step stand-in now")
    if TINY:
        quick = kh.TrainConfig.for_gpu("cpu", steps=QUICK_STEPS, max_sequence_length=MAX_SEQUENCE_LENGTH,
                                       checkpoint_every=0, output_dir=os.path.join(OUTPUT_DIR, "quick_run"), seed=SEED)
    else:  # this GPU's preset, as notebook 04 trains (in stages on a T4 or L4)
        quick = dataclasses.replace(PRESET, steps=QUICK_STEPS, checkpoint_every=0,
                                    output_dir=os.path.join(OUTPUT_DIR, "quick_run"), seed=SEED)
    trainer, cache = kh.load_for_training(MODEL, dataset, quick, progress=False)
    quick_result = kh.train(trainer, dataset, quick, cache=cache, progress=False)
    kh.save_adapter(trainer, quick_result.region, ADAPTER_DIR, config=quick, depth_module=quick_result.depth)
    first, last = quick_result.history[0]["loss"], quick_result.history[-1]["loss"]
    print(f"loss {first:.3f} -> {last:.3f}; saved to {ADAPTER_DIR}")
    del trainer, cache, quick_result
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
print(sorted(os.listdir(ADAPTER_DIR)))
with open(os.path.join(ADAPTER_DIR, kh.ADAPTER_CONFIG_FILE)) as f:
    trained_with = json.load(f)["train_config"]  # the adapter records the run's TrainConfig
MAX_SEQUENCE_LENGTH = trained_with["max_sequence_length"]  # prompts padded as in training
trained_at = trained_with["resolution"]
if trained_at != RESOLUTION:  # sample at the adapter's training size: its region grid was built for it
    print(f"the adapter was trained at {trained_at} px: sampling at {trained_at} px instead of {RESOLUTION}")
    RESOLUTION = trained_at
    dataset = kh.KontextPairs(DATA_ROOT, resolution=RESOLUTION)
    item = dataset[PAIR]

# %% [markdown]
# ## 1. The oracle: our sampling loop equals the pipeline
#
# `kh.sample_edit` is `FluxKontextPipeline.__call__` step for step: the same prompt encoding, image
# preprocessing, `prepare_latents`, timesteps and `mu` shift, guidance and Euler steps. It exists because the
# pipeline has no input for what we add:
#
# 1. **The region signal.** The pipeline builds the sequence `[noisy target | context]` itself and has no input
#    for the mask. `sample_edit` adds the region module's signal: by default a learned vector on every masked
#    target and context token (notebook 03); the original design's `"linear"` kind appends one token with the id
#    `(2, 0, 0)`. (Section 6 shows how to bring the same signal into `pipe(...)` with a hook.)
# 2. **Depth on the tokens.** The depth module's offsets go onto the noisy target and the context tokens, where
#    the pipeline has no input either (section 6's hook brings them into `pipe(...)` too).
#
# An IP-Adapter without a depth map needs care in both loops. diffusers' `FluxIPAdapterAttnProcessor.__call__`
# loops `zip(ip_hidden_states, self.scale, ...)` over the image tokens it is given; a call without
# `ip_adapter_image` leaves them at their default `None`, and diffusers alone stops there with a `TypeError`.
# `sample_edit(depth=None)` hands it an empty list, so it adds exactly nothing, and `kh.load_pipeline` registers
# the same on the transformer (a forward pre-hook), so the plain `pipe(image=..., prompt=...)` of every pipeline it
# returns runs too. It gives, to the bit, what the same pipeline gives after `pipe.unload_ip_adapter()`
# (`tests/test_inference.py` on the tiny model, with and without `kh.RegionHook`; `tests/test_pipeline.py` on a
# local folder) and what the adapter gives at scale 0 (`tests/test_rehearsal.py`, real width).
#
# Before trusting our loop we compare it with the pipeline on a fresh pipeline without LoRA: same noise, same
# settings, `output_type="latent"` (the packed latents `[1, N, 4C]` before decoding), `max_area=h * w` (else
# `__call__` rescales the output size to an area of 1024x1024) and `_auto_resize=False` (else it resizes the
# context image to one of Kontext's preferred resolutions; `FluxKontextPipeline.__call__`).

# %%
from torchvision.transforms.functional import to_pil_image

pipe = load_model()  # fresh: no LoRA yet; the adapter is loaded in section 2
context = to_pil_image(item["context"])  # the pipeline takes PIL images
depth_image = kh.depth_to_pil(item["depth"])  # 8-bit RGB, what the IP-Adapter's CLIP image encoder takes
prompt = item["prompt"]
h = w = RESOLUTION
MODEL_LABEL = f"{'tiny model' if TINY else 'FLUX.1 Kontext'}, {h} px"  # in every picture's title: model and size
common = dict(height=h, width=w, num_inference_steps=NUM_STEPS, guidance_scale=GUIDANCE,
              max_sequence_length=MAX_SEQUENCE_LENGTH)


def noise():
    return torch.Generator().manual_seed(SEED)  # the same starting noise for every call


# the plain call, as a diffusers user would write it, on a pipeline with an IP-Adapter and no depth map;
# then a second comparison with the depth map, where the pipeline's own IP-Adapter path runs
ours = kh.sample_edit(pipe, context, prompt, generator=noise(), output_type="latent", **common)
theirs = pipe(image=context, prompt=prompt, max_area=h * w, generator=noise(), output_type="latent",
              _auto_resize=False, **common).images
print("no depth  : sample_edit", tuple(ours.shape), "vs pipe", tuple(theirs.shape), " # [1, N, 4C]",
      f" max |diff| = {(ours - theirs).abs().max().item():.3g}")

ours_d = kh.sample_edit(pipe, context, prompt, depth=depth_image, generator=noise(), output_type="latent", **common)
theirs_d = pipe(image=context, prompt=prompt, ip_adapter_image=depth_image, max_area=h * w, generator=noise(),
                output_type="latent", _auto_resize=False, **common).images
print(f"with depth: max |diff| = {(ours_d - theirs_d).abs().max().item():.3g}"
      f"   (and the depth map matters: |with - without| = {(ours_d - ours).abs().max().item():.3g})")

# %% [markdown]
# **The loop by hand.** Before adding anything, here is what both loops do, written out once with the pipeline's
# own pieces: encode the prompt, prepare the noise and the context latents (`prepare_latents`), compute the
# shifted sigmas (section 2 below plots them), then for every step call the transformer on
# `[noisy target | context]` and take one Euler step `x <- x + (sigma_next - sigma) * v`, the update of
# `FlowMatchEulerDiscreteScheduler.step`. The cell checks the result against `sample_edit`.

# %%
import numpy as np
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

with torch.no_grad():
    embeds, pooled, txt_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None,
                                                 max_sequence_length=MAX_SEQUENCE_LENGTH)  # [1, T, D_t5], [1, D_clip]
    ctx_pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(context, h, w), h, w)  # [1, 3, H, W]
    x, ctx_lat, x_ids, ctx_ids = pipe.prepare_latents(ctx_pixels, 1, pipe.transformer.config.in_channels // 4, h, w,
                                                      embeds.dtype, pipe._execution_device, noise(), None)
    ids = torch.cat([x_ids, ctx_ids])  # [N + N_c, 3]
    cfg_s = pipe.scheduler.config
    mu = calculate_shift(x.shape[1], cfg_s.get("base_image_seq_len", 256), cfg_s.get("max_image_seq_len", 4096),
                         cfg_s.get("base_shift", 0.5), cfg_s.get("max_shift", 1.15))
    plain_sigmas = np.linspace(1.0, 1 / NUM_STEPS, NUM_STEPS)  # the pipeline's sigmas before the shift
    pipe.scheduler.set_timesteps(sigmas=plain_sigmas, mu=mu)  # the shift; sigmas end with 0
    sigmas = pipe.scheduler.sigmas  # [NUM_STEPS + 1]
    guidance_t = torch.full([1], GUIDANCE, device=x.device) if pipe.transformer.config.guidance_embeds else None
    for i in range(NUM_STEPS):
        t = pipe.scheduler.timesteps[i].expand(1).to(x.dtype)  # [1]: t = 1000 sigma, cast as the pipeline does
        sigma_t = t / 1000  # the transformer takes sigma as its timestep
        v = pipe.transformer(hidden_states=torch.cat([x, ctx_lat], dim=1), timestep=sigma_t, guidance=guidance_t,
                             pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                             img_ids=ids, joint_attention_kwargs={"ip_hidden_states": []},
                             return_dict=False)[0][:, : x.shape[1]]  # velocity of the target part [1, N, 4C]
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(x.dtype)  # one Euler step, in fp32 as step()
by_hand = x
print(f"the loop by hand vs sample_edit: max |diff| = {(by_hand - ours).abs().max().item():.3g}")
torch.testing.assert_close(by_hand, ours, rtol=1e-4, atol=1e-4, msg="the hand-written loop equals sample_edit")

# %% [markdown]
# Both differences are zero on the tiny model: the same operations in the same order give the same bits.
# What `sample_edit` adds on top is the region signal. The picture shows the sequence the transformer sees.

# %%
n_tok = (h // 16) * (w // 16)  # N: tokens of one image (2x2 patches of the latent)
masked = int(kh.mask_to_token_grid(item["mask"], h // 16, w // 16).sum())  # masked tokens of the pair's mask
fig, ax = plt.subplots(figsize=(9.5, 3.2))
parts = [("noisy target", "tab:blue", "(0, row, col)"), ("context", "tab:green", "(1, row, col)")]
rows = ["pipe(...)", 'sample_edit(region="marked")', 'sample_edit(region="linear")']
for y, row in enumerate(rows):
    for k, (name, color, ids) in enumerate(parts):
        x = k * n_tok
        ax.barh(y, n_tok, left=x, color=color, edgecolor="white")
        if "marked" in row:  # the masked tokens of both parts carry + m * e
            ax.barh(y, masked, left=x + n_tok / 2 - masked / 2, color="tab:red", edgecolor="white", height=0.35)
        ax.text(x + n_tok / 2, y - 0.28, f"{name}: {n_tok} tokens, ids {ids}", ha="center", va="center",
                fontsize=7, color="white")
    if "linear" in row:
        ax.barh(y, 3, left=2 * n_tok, color="tab:red", edgecolor="white")  # 1 token, drawn 3 wide to be visible
        ax.text(2 * n_tok + 5, y, "+1 token\nid (2, 0, 0)", ha="left", va="center", fontsize=8, color="tab:red")
    if "marked" in row:
        ax.text(2 * n_tok + 5, y, f"{masked} masked tokens\nof each part + e", ha="left", va="center", fontsize=8,
                color="tab:red")
ax.set_xlim(0, 2 * n_tok + 40)
ax.set_yticks(range(len(rows)), rows)
ax.invert_yaxis()
ax.set_xticks([])
ax.set_frame_on(False)
ax.set_title("The pipeline's sequence has no input for the mask: the default marks the masked tokens in place, "
             "the original design appends one token", fontsize=9)
plt.show()

# %% [markdown]
# ## 2. Sampling with everything: LoRA, region signal and depth
#
# `kh.load_adapter` loads the LoRA with diffusers' own `load_lora_weights` and rebuilds the region module
# (diffusers may note that the file has no text-encoder LoRA: right, only the transformer was trained);
# `kh.load_depth_module` rebuilds the depth module (`None` for an adapter trained with the IP-Adapter kind). Then
# one call edits the context with the mask (through the region signal) and the depth map (each token's depth patch
# through the depth module; without a depth module, through the IP-Adapter).

# %%
region = kh.load_adapter(pipe, ADAPTER_DIR)
depth_module = kh.load_depth_module(ADAPTER_DIR, pipe)  # the "tokens" depth module, or None
print(region, " parameters", {n: tuple(p.shape) for n, p in region.named_parameters()})  # "marked": e [4C]
print(depth_module, " parameters", {n: tuple(p.shape) for n, p in depth_module.named_parameters()}
      if depth_module is not None else "")  # proj: [4C, 256] and [4C]
pred = kh.sample_edit(pipe, context, prompt, mask=item["mask"], depth=depth_image, region=region, generator=noise(),
                      depth_module=depth_module, **common)
print("prediction:", type(pred).__name__, pred.size, "(W, H)")

# %% [markdown]
# `kh.preview_grid` puts one sample on one row: the context, the mask (red may change), the depth map, the
# target, the prediction and the error map `|prediction - context|`. A good edit looks like the target inside
# the red region and leaves everything else as it was: its error map is bright only inside the cyan outline.

# %%
from IPython.display import display

fig = kh.preview_grid(item["context"], item["mask"], item["depth"], item["target"], pred, prompt=prompt,
                      label=MODEL_LABEL, figsize_per_panel=3.0)
display(fig)

# %% [markdown]
# `kh.edit_metrics` puts numbers on the same two questions: **did it edit where asked, and only there?**
#
# - `psnr_in_vs_target`: inside the mask, how close the prediction is to the target (dB, higher is closer);
# - `psnr_out_vs_context`: outside the mask, how close it is to the context (higher: the rest was kept; `inf`
#   when untouched);
# - `mse_*`: the mean squared errors behind them (images in `[0, 1]`);
# - `change_in_mask`: mean absolute change inside the mask (an edit that did nothing scores near 0);
# - `mask_fraction`: the share of editable pixels (a small mask makes the inside numbers noisier);
# - `lpips_vs_target`: a perceptual distance, only when the `lpips` package and its weights are on disk.
#
# A PSNR of 30 dB and more is close to invisible; 20 dB is a clearly visible difference; around 10 dB is
# unrelated images (the base model's in-mask figure on a recolour it does not know).

# %%
metrics = kh.edit_metrics(pred, item["context"], item["target"], item["mask"])
for key, value in metrics.items():
    print(f"{key:<22} {value:8.3f}")

# %% [markdown]
# **A pair the LoRA never saw.** Pair 0 is one of the pairs notebook 04 trained on, so the figures above measure
# memory as much as skill. The same preview and metrics on a drawn pair (`kh.DrawnPairs`, a scene stream neither
# the tiny model's pretraining nor notebook 04 used) show what carries over. Compare its `psnr_in_vs_target`
# with the trained pair's.

# %%
held = kh.DrawnPairs(7, 1, RESOLUTION)[0]  # one held-out pair, same item layout as the dataset's
held_pred = kh.sample_edit(pipe, held["context"], held["prompt"], mask=held["mask"], depth=held["depth"],
                           region=region, depth_module=depth_module, generator=noise(), **common)
held_metrics = kh.edit_metrics(held_pred, held["context"], held["target"], held["mask"], lpips=False)
print(f"held-out {held['name']!r} ({held['prompt']!r}): in-mask PSNR to the target "
      f"{held_metrics['psnr_in_vs_target']:.1f} dB (trained pair 0: {metrics['psnr_in_vs_target']:.1f} dB), "
      f"outside PSNR to the context {held_metrics['psnr_out_vs_context']:.1f} dB")
fig = kh.preview_grid(held["context"], held["mask"], held["depth"], held["target"], held_pred,
                      prompt=held["prompt"] + " (held out)", label=MODEL_LABEL, figsize_per_panel=3.0)
display(fig)

# %% [markdown]
# **The sigma shift at sampling.** Training draws sigmas from the plain 1000 levels (notebook 04). Sampling
# shifts them towards more noise, by an amount that grows with the image's token count: the pipeline computes
# `mu = calculate_shift(image_seq_len, ...)` (a line from 0.5 at 256 tokens to 1.15 at 4096) and the
# scheduler maps each sigma `s` to `e^mu / (e^mu + (1/s - 1))` (`FlowMatchEulerDiscreteScheduler`'s
# exponential time shift; the cell checks it against `set_timesteps`). Larger images spend more of their steps at
# high noise, where the layout is decided.
#
# **Why training is not shifted.** The shift decides where sampling spends its *few* steps; it does not change
# what the model must predict at any one noise level. Training has to cover every level a sampler may visit, at
# any resolution, so it draws from the whole plain table (`kh.sample_sigmas`: uniform over the 1000 levels, or
# logit-normal around the middle). The scheduler's own training table is unshifted too: with
# `use_dynamic_shifting=True`, as FLUX.1's scheduler config sets it, `FlowMatchEulerDiscreteScheduler.__init__`
# applies no shift and `set_timesteps(mu=...)` shifts at sampling time only.

# %%
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

sched_cfg = pipe.scheduler.config
fig, ax = plt.subplots(figsize=(7, 3.2))
for side in (RESOLUTION, 512, 1024):
    seq = (side // 16) ** 2  # target tokens; the pipeline shifts by the target's length
    mu = calculate_shift(seq, sched_cfg.get("base_image_seq_len", 256), sched_cfg.get("max_image_seq_len", 4096),
                         sched_cfg.get("base_shift", 0.5), sched_cfg.get("max_shift", 1.15))
    plain = torch.linspace(1.0, 1 / NUM_STEPS, NUM_STEPS)  # the pipeline's np.linspace(1, 1/steps, steps)
    shifted = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / plain - 1))
    ax.plot(range(NUM_STEPS), shifted, marker="o", ms=3, label=f"{side} px: {seq} tokens, mu {mu:.2f}")
    check = pipe.scheduler.__class__.from_config(sched_cfg)  # a copy: leave the pipeline's alone
    check.set_timesteps(sigmas=plain.numpy(), mu=mu)
    torch.testing.assert_close(check.sigmas[:-1].float(), shifted.float(), msg="the scheduler's own shift")
ax.plot(range(NUM_STEPS), plain, color="grey", ls="--", label="unshifted")
ax.set_xlabel("denoising step")
ax.set_ylabel("sigma")
ax.set_title("Sampling sigmas: the more tokens, the longer the schedule stays at high noise")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 3. Watching the denoising steps
#
# `sample_edit(..., callback=f)` calls `f(step, t, latents)` after every Euler step with the packed latents
# `[1, N, 4C]` (return a tensor to replace them, as diffusers' `callback_on_step_end` allows). Here the
# callback keeps a copy every `RECORD_EVERY` steps; we unpack and decode them afterwards.

# %%
recorded = []


def keep(step, t, latents):
    if step % RECORD_EVERY == 0 or step == NUM_STEPS - 1:
        recorded.append((step, float(t) / 1000, latents.detach().clone()))  # sigma = t / 1000


final = kh.sample_edit(pipe, context, prompt, mask=item["mask"], depth=depth_image, region=region, generator=noise(),
                       depth_module=depth_module, output_type="latent", callback=keep, **common)
print(f"{len(recorded)} snapshots, each", tuple(recorded[0][2].shape), " # [1, N, 4C]")


@torch.no_grad()
def decode(latents):
    """Packed latents [1, N, 4C] -> image [H, W, 3] in [0, 1], as the pipeline decodes them."""
    lat = kh.unpack_like_pipeline(latents, h // 16, w // 16)  # -> [1, C, H_l, W_l]
    lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor  # undo the latent normalisation
    image = pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]  # [1, 3, H, W] in [-1, 1]
    return ((image[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()  # -> [H, W, 3]


distance = [float((lat - final).norm() / final.norm()) for _, _, lat in recorded]
schedule = pipe.scheduler.sigmas  # the run's sigmas, ending at 0
fig = kh.denoising_figure([decode(lat) for _, _, lat in recorded],
                          [f"after step {step + 1}\nsigma {sigma:.2f} -> {float(schedule[step + 1]):.2f}"
                           for step, sigma, _ in recorded], [step + 1 for step, _, _ in recorded], distance)
fig.suptitle(f"Denoising, step by step ({MODEL_LABEL}): each Euler step "
             "moves the latents towards the final image", fontsize=10)
plt.show()

# %% [markdown]
# ## 4. Which part does what: the variants side by side
#
# `kh.compare_variants` runs the same inputs from the same noise through every variant it can build:
#
# | variant | what runs |
# |---|---|
# | `base` | the base model (LoRA switched off), no region, no depth: plain Kontext |
# | `LoRA` | the trained LoRA alone: what diffusers or ComfyUI users get |
# | `LoRA + region` | the LoRA plus the region signal from the mask |
# | `LoRA + region + depth` | everything: what the adapter was trained for |
# | `inpaint (base)` | diffusers' `FluxKontextInpaintPipeline`, base model: the mask-aware baseline to beat |
#
# Read the table column by column. `psnr_in_vs_target` should rise from `base` to the full variant (the LoRA
# learned the edit); `psnr_out_vs_context` should stay high for every variant that uses the mask (the rest of
# the image is kept). The inpainting baseline keeps the outside by construction (it puts the noised context
# latents back outside the mask at every step) but knows nothing of your edit; `sample_edit(..., blend=True)` does
# the same blending with the LoRA and the region signal. On the tiny model every figure is capped by its small
# VAE and base.

# %%
comparison = kh.compare_variants(pipe, context, prompt, item["mask"], region=region, depth=depth_image,
                                 depth_module=depth_module, target=item["target"], seed=SEED, label=MODEL_LABEL,
                                 **common)
display(comparison.figure)
print(kh.metrics_table(comparison.metrics))
with_all, no_region = comparison.metrics["LoRA + region + depth"], comparison.metrics["LoRA"]
gain_in = with_all["psnr_in_vs_target"] - no_region["psnr_in_vs_target"]
print(f"region signal and depth on vs off: in-mask {gain_in:+.2f}"
      f" dB, outside {with_all['psnr_out_vs_context'] - no_region['psnr_out_vs_context']:+.2f} dB")
lora_cost = no_region["psnr_out_vs_context"] - comparison.metrics["base"]["psnr_out_vs_context"]
print(f"the LoRA alone against the base model outside the mask: {lora_cost:+.2f} dB")

# %% [markdown]
# **Why the region signal and depth can change little on these pairs.** The numbers above come from a LoRA trained
# on ten pairs, and pair 0 is one of them: the prompt and the context already say which pair it is and what to
# change, so the mask adds little the LoRA needs to reproduce its training pairs, and the context's depth map
# repeats what the context already shows. Whether the mask or the depth can *decide* the edit shows only where
# nothing else can tell: section 7 trains on scenes with two identical objects and edits held-out ones with the
# mask on each in turn; section 8 does the same for depth, with scenes whose new geometry only the depth map
# holds. What the LoRA costs outside the mask the cell prints (`psnr_out_vs_context` of `LoRA` against `base`): a
# LoRA that changes more than the mask has found a cheap way to lower the in-mask loss; `w_out`,
# `preservation="prior"`, more pairs or `blend=True` keep the outside.

# %% [markdown]
# ## 5. The IP-Adapter kind: how much does a global depth embedding move the result?
#
# The original design's road for depth, kept as `depth_kind="ip_adapter"`: without a depth module, `sample_edit`
# gives the depth map to the pipeline's IP-Adapter. `ip_adapter_scale` scales its contribution for one call
# (0 = depth ignored, 1 = as trained);
# the pipeline's own scale is restored afterwards. Move the slider to see how much the result changes against
# scale 0: that is the size of depth's push, measured, not a promise that it places anything (notebook 03,
# section 5). (Headless, the figure is drawn once, at the slider's default.)

# %%
from ipywidgets import FloatSlider

no_depth = kh.sample_edit(pipe, context, prompt, mask=item["mask"], depth=depth_image, region=region,
                          ip_adapter_scale=0.0, generator=noise(), output_type="pt", **common)[0]  # [3, H, W]


def scale_figure(scale):
    """Depth map, result at one IP-Adapter scale, and its change against scale 0."""
    image = kh.sample_edit(pipe, context, prompt, mask=item["mask"], depth=depth_image, region=region,
                           ip_adapter_scale=scale, generator=noise(), output_type="pt", **common)[0]  # [3, H, W]
    change = (image - no_depth).abs().mean(0).cpu()  # [3, H, W] -> [H, W]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4), layout="constrained")
    axes[0].imshow(depth_image)
    axes[0].set_title("depth map (light = near)", fontsize=9)
    axes[1].imshow(image.permute(1, 2, 0).cpu().numpy())
    axes[1].set_title(f"result at ip_adapter_scale={scale:.2f}", fontsize=9)
    im = axes[2].imshow(change, cmap="magma", vmin=0, vmax=0.5)
    axes[2].set_title(f"|result - result at scale 0|, mean {change.mean():.3f}", fontsize=9)
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"IP-Adapter scale {scale:.2f} ({MODEL_LABEL}): 0 ignores depth; the right panel is how far this "
                 "scale moves the result", fontsize=10)
    return fig


_ = kh.interactive_figure(scale_figure, scale=FloatSlider(value=1.0, min=0.0, max=1.5, step=0.25,
                                                          continuous_update=False, description="scale"))

# %% [markdown]
# **What the depth map carries on its own.** A blank grey context and an empty prompt leave the model nothing
# to copy: any scene that appears must come from the depth embedding. Notebook 03 (section 5) says why little
# can: the depth tokens carry no position (`FluxIPAdapterAttnProcessor` takes its queries before RoPE;
# `tests/test_conditioning.py` checks it), so the adapter itself cannot say *where* the near sphere goes. A
# placement would have to come from what each image token learns of its own position in the RoPE attention,
# and on a uniform grey canvas under noise there is almost nothing there to anchor it to. The tiny model's
# image encoder does tell depth maps apart (it was pretrained for that; `docs/tiny_model.md` also measures that
# training the base on such blank-context samples did not help); look at whether the picture with depth
# follows the depth map at all.
# FLUX.1 Kontext's IP-Adapter was trained on RGB references, not depth maps, so on a GPU this cell shows what a
# general adapter makes of a depth map; read it as a probe, not as a feature.

# %%
grey = torch.full_like(item["context"], 0.5)  # [3, H, W], mid grey
everywhere = torch.zeros(1, *item["context"].shape[-2:])  # [1, H, W]: no mask, so "outside" is the whole image
with kh.lora_off(pipe.transformer):
    blank_runs = {name: kh.sample_edit(pipe, grey, "", depth=d, generator=noise(), output_type="pt", **common)[0]
                  for name, d in (("no depth", None), ("depth", depth_image))}  # [3, H, W] each
blank_psnr = {name: kh.edit_metrics(img.float().cpu(), item["context"], None, everywhere)["psnr_out_vs_context"]
              for name, img in blank_runs.items()}
fig, axes = plt.subplots(1, 4, figsize=(11, 3.2), layout="constrained")
panels = [(item["context"], "the context (never shown to the model here)"), (depth_image, "depth map given")]
panels += [(img, f"grey context, {name}: {blank_psnr[name]:.1f} dB to the context") for name, img in blank_runs.items()]
for ax, (img, title) in zip(axes, panels):
    ax.imshow(img if not torch.is_tensor(img) else img.permute(1, 2, 0).float().cpu().numpy())  # [3, H, W] -> [H, W, 3]
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()
change = float((blank_runs["depth"] - blank_runs["no depth"]).abs().mean())  # mean |difference| in [0, 1]
fig.suptitle(f"Base model from a blank context and an empty prompt ({MODEL_LABEL}): depth changes the picture "
             f"by {change:.3f} on average; does it follow the depth map?",
             fontsize=10)
plt.show()
print(f"from a blank context: PSNR to the real context {blank_psnr['no depth']:.1f} dB without depth, "
      f"{blank_psnr['depth']:.1f} dB with it; mean change {change:.3f}")

# %% [markdown]
# ## 6. Adapters that travel
#
# **On the Hub.** `kh.push_adapter(ADAPTER_DIR, "you/my-edit", prompts=[...], images=[...])` writes a model card
# into the folder (base model, each file and how to load it, the training settings, prompts and previews) and
# uploads it to a private repository with your Hub login (`huggingface_hub`; the token is never printed). The
# next cell writes the card only, so you can read it before pushing anything.
#
# **Plain diffusers.** `pytorch_lora_weights.safetensors` is diffusers' own LoRA format, so a diffusers user
# needs nothing from this project: `pipe.load_lora_weights(folder, weight_name=...)` and the usual `pipe(...)`.
# The cell after the card checks it: our loop with the adapter's LoRA (no region) against diffusers' loader and
# diffusers' call.

# %%
# base model: the one the adapter records (a Hub id), else FLUX.1 Kontext [dev], what you would push for; a
# tiny-model adapter is for learning, not for the Hub
card_path = kh.write_model_card(ADAPTER_DIR, "you/my-edit", prompts=[prompt])
print(open(card_path, encoding="utf-8").read()[:900])

# %%
ours_lora = kh.sample_edit(pipe, context, prompt, depth=depth_image, generator=noise(), output_type="latent",
                           **common)
pipe.unload_lora_weights()  # forget kh.load_adapter's LoRA ...
pipe.load_lora_weights(ADAPTER_DIR, weight_name="pytorch_lora_weights.safetensors")  # ... and load it the diffusers way
diffusers_lora = pipe(image=context, prompt=prompt, ip_adapter_image=depth_image, max_area=h * w, generator=noise(),
                      output_type="latent", _auto_resize=False, **common).images
print(f"diffusers' load_lora_weights + pipe(...) vs sample_edit with the LoRA: max |diff| = "
      f"{(ours_lora - diffusers_lora).abs().max().item():.3g}")

# %% [markdown]
# **ComfyUI.** ComfyUI names Flux layers the way Black Forest Labs' original code does, where the attention's
# `q`, `k` and `v` are one fused `qkv` weight (and the single blocks fuse `q`, `k`, `v` and the MLP into
# `linear1`). `kh.export_comfyui` writes the LoRA with those names and fuses the separate diffusers LoRAs
# exactly: their down matrices are stacked and their up matrices placed block-diagonally, so the fused LoRA has
# rank `3r` and the same weight update. Load the file with ComfyUI's ordinary LoRA loader on FLUX.1 Kontext [dev].

# %%
from safetensors import safe_open

comfy_file = kh.export_comfyui(ADAPTER_DIR, os.path.join(OUTPUT_DIR, "comfyui", "kontext_region_lora.safetensors"))
with safe_open(comfy_file, framework="pt") as f:
    keys = list(f.keys())
    print(f"{comfy_file}: {len(keys)} tensors; the first few:")
    for key in keys[:6]:
        print(f"  {key:<58} {tuple(f.get_tensor(key).shape)}")
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    up, down = f.get_tensor(f"{qkv}.lora_up.weight"), f.get_tensor(f"{qkv}.lora_down.weight")
print(f"{qkv}: lora_up {tuple(up.shape)} # [3D, 3r], lora_down {tuple(down.shape)} # [3r, D]")

order = [name.split("_")[-1] for name in sorted(["attn.to_q", "attn.to_k", "attn.to_v"])]  # parts in name order
fig, ax = plt.subplots(figsize=(4.6, 5))
ax.imshow(up.abs().float(), aspect="auto", cmap="viridis", interpolation="nearest")
r3, d3 = up.shape[1], up.shape[0]
for k in (1, 2):
    ax.axhline(k * d3 / 3 - 0.5, color="white", lw=0.8)
    ax.axvline(k * r3 / 3 - 0.5, color="white", lw=0.8)
ax.set_xticks([r3 / 6, r3 / 2, 5 * r3 / 6], [f"{p}'s r columns" for p in order], fontsize=8)
ax.set_yticks([d3 / 6, d3 / 2, 5 * d3 / 6], ["q rows", "k rows", "v rows"])
ax.set_title("|lora_up| of the fused qkv LoRA: each row block\n(q, k, v) uses only its own r columns, so the\n"
             "three updates stay exactly separate", fontsize=10)
plt.show()

# %% [markdown]
# **The region and depth signals in `pipe(...)`.** `FluxKontextPipeline.__call__` builds `[noisy target | context]`
# itself and has no input for the mask or a per-token depth. `kh.RegionHook(pipe, region, mask, depth=...,
# depth_module=...)` adds them: a forward pre-hook on the transformer that finds the context tokens by their ids
# (type 1), applies the region module to them (and, for `"marked"`, to the target tokens) and adds the depth
# module's offset to the target and context tokens, exactly as `sample_edit` does; the pipeline keeps only the
# target part of the output, as it always does. With `blend=True`, pass `callback_on_step_end=hook.callback` and
# the pipeline also blends like the inpaint pipeline. The cell checks `pipe(...)` with the hook against
# `sample_edit`. (An adapter of the IP-Adapter kind gives its depth map to `pipe(..., ip_adapter_image=...)`.)

# %%
ours_region = kh.sample_edit(pipe, context, prompt, mask=item["mask"], region=region, depth=depth_image,
                             depth_module=depth_module, generator=noise(), output_type="latent", **common)
ip_image = {} if depth_module is not None else {"ip_adapter_image": depth_image}  # the IP-Adapter kind's road
with kh.RegionHook(pipe, region, item["mask"], depth=depth_image if depth_module is not None else None,
                   depth_module=depth_module) as hook:
    pipe_region = pipe(image=context, prompt=prompt, max_area=h * w, generator=noise(), output_type="latent",
                       _auto_resize=False, callback_on_step_end=hook.callback, **ip_image, **common).images
print(f"pipe(...) with kh.RegionHook vs sample_edit with the region and depth: max |diff| = "
      f"{(pipe_region - ours_region).abs().max().item():.3g}")

# %% [markdown]
# **The region and depth signals in ComfyUI.** `comfyui/kontext_region/` in this repository holds two ComfyUI
# custom nodes, "Apply Kontext Region (mask)" and "Apply Kontext Depth (depth map)": copy or link the folder into
# `ComfyUI/custom_nodes/`, load the LoRA above with ComfyUI's LoRA loader, and give the nodes the adapter folder and
# the mask, and the depth map as an IMAGE. They patch the model with the same signals (`post_input` patches of
# ComfyUI's Flux model) and need nothing from this package; `tests/test_comfyui_node.py` checks them against
# `kh.kontext_forward` (the comparison with ComfyUI's own Flux code runs where a ComfyUI checkout is given in
# `COMFYUI_PATH`). LoRA layers on the IP-Adapter
# (`to_k_ip` / `to_v_ip`) are not in the ComfyUI file.

# %% [markdown]
# ## 7. Does the mask decide where the edit happens? Twin scenes
#
# The pairs above cannot answer this: their prompt and context already say what to change. **Twin scenes** can:
# two identical red objects, one prompt that fits both ("make the red box blue"), and the mask on one of them.
# Nothing but the mask says which object to change. We train a LoRA with the default region signal on
# `TWIN_TRAIN_SCENES` drawn scenes (each twice, the mask on either object), then edit a scene it never saw and
# let you move the mask. `scripts/region_heldout.py` does this for every region kind, with box masks and
# blending too, on more held-out scenes; its table and figure are in `docs/design.md`. On a GPU the section loads a
# second pipeline, so it runs there only with `TWIN_ON_GPU = True` (an 80 GB card).

# %%
TWIN_ON_GPU = False  # True: also train the twin LoRA on the real model (a second pipeline: an 80 GB GPU)
RUN_TWIN = TINY or QUICK or TWIN_ON_GPU  # the tiny model (seconds) and the rehearsal smoke test always run it
TWIN_TRAIN_SCENES = 24 if TINY else 4 if QUICK else 64  # drawn training scenes (two samples each)
TWIN_STEPS = 1500 if TINY else 3 if QUICK else 1500  # LoRA updates on them (scripts/region_heldout.py: 1500)
twin_scenes = [kh.render_twin_scene(1, i, RESOLUTION) for i in range(4)]  # seed 1: scenes training never sees
if RUN_TWIN:
    twin_train = kh.TwinPairs(0, range(TWIN_TRAIN_SCENES), RESOLUTION)  # seed 0: training scenes
    twin_cfg = dataclasses.replace(kh.TrainConfig.for_gpu("cpu") if TINY else PRESET, steps=TWIN_STEPS,
                                   resolution=RESOLUTION, checkpoint_every=0, seed=SEED,
                                   output_dir=os.path.join(OUTPUT_DIR, "twin_run"), max_sequence_length=32)
    trainer, twin_cache = kh.load_for_training(MODEL, twin_train, twin_cfg, progress=False)  # as notebook 04
    twin = kh.train(trainer, twin_train, twin_cfg, cache=twin_cache, progress=False)
    print(f"{len(twin_train)} twin samples, {TWIN_STEPS} updates, region kind {twin_cfg.region_kind!r}: "
          f"loss {twin.history[0]['loss']:.3f} -> {twin.history[-1]['loss']:.3f}")
    TWIN_DIR = kh.save_adapter(trainer, twin.region, os.path.join(OUTPUT_DIR, "twin_adapter"), config=twin_cfg)
    del trainer, twin_cache, twin  # the trainer may have freed its text encoders: sample with a fresh pipeline
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    twin_pipe = load_model()
    twin_region = kh.load_adapter(twin_pipe, TWIN_DIR)
else:
    print("twin scenes skipped on this GPU (set TWIN_ON_GPU = True on an 80 GB card); the figures of "
          "scripts/region_heldout.py on the tiny model are in docs/design.md")


def twin_edit(scene, mask, **kw):
    """One edit of a twin scene, ``[3, H, W]`` in ``[0, 1]``."""
    out = kh.sample_edit(twin_pipe, scene["context"], scene["prompt"], mask=mask, generator=noise(),
                         output_type="pt", num_inference_steps=NUM_STEPS, max_sequence_length=32, **kw)
    return out[0].float().cpu()


def changed(out, scene, k):
    """Object k changed when its mean colour lies nearer its blue target than the red context."""
    return kh.object_changed(out, scene["context"], scene["targets"][k], scene["objects"][k])


if RUN_TWIN:
    right = 0
    for scene in twin_scenes:
        for k in (0, 1):
            out = twin_edit(scene, scene["masks"][k], region=twin_region)
            right += changed(out, scene, k) and not changed(out, scene, 1 - k)
    print(f"held-out twin scenes: the masked object alone changed in {right} of {2 * len(twin_scenes)} cases")

# %% [markdown]
# Pick where the mask goes: on object a or b, tight (its outline) or a rough box, with the region signal, with
# blending only (`blend=True`, the inpaint pipeline's constraint), or with both. Headless, the figure is drawn
# once, for the default choice.

# %%
from ipywidgets import Dropdown

scene = twin_scenes[0]


def twin_figure(mask_on="object a, tight", use="region signal"):
    k = 0 if "object a" in mask_on else 1
    mask = (scene["masks"] if "tight" in mask_on else scene["boxes"])[k]  # [1, H, W]
    kw = {"region signal": dict(region=twin_region), "blending only": dict(blend=True),
          "region signal + blending": dict(region=twin_region, blend=True)}[use]
    out = twin_edit(scene, mask, **kw)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4), layout="constrained")
    axes[0].imshow(scene["context"].permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
    axes[0].contour(mask[0].numpy(), levels=[0.5], colors="white", linewidths=1.5)
    axes[0].set_title(f"context, mask on {mask_on}", fontsize=9)
    axes[1].imshow(out.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[1].set_title(f"edit with the {use}", fontsize=9)
    axes[2].imshow((out - scene["context"]).abs().mean(0).numpy(), cmap="magma", vmin=0, vmax=0.5)
    axes[2].set_title("|edit - context|", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"'{scene['prompt']}' on a held-out twin scene ({MODEL_LABEL}): the edit follows the mask",
                 fontsize=10)
    return fig


if RUN_TWIN:
    _ = kh.interactive_figure(twin_figure,
                              mask_on=Dropdown(options=["object a, tight", "object b, tight", "object a, box",
                                                        "object b, box"], description="mask"),
                              use=Dropdown(options=["region signal", "blending only", "region signal + blending"],
                                           description="use"))

# %% [markdown]
# ## 8. Does depth decide what the edit does? Held-out depth scenes
#
# The same question for depth. "add a red box", with the whole image as the mask: neither the prompt nor the mask
# says where the box goes, how big it is or how it is turned. Each **depth scene** has two targets of one context,
# the box at two places; only the desired result's depth map (`target_depth`) tells them apart. We train a LoRA
# with the default depth signal (`depth_kind="tokens"`, notebook 03) on the desired result's depth
# (`depth_source="target"`) on `DEPTH_TRAIN_SCENES` drawn scenes (both targets of each), then edit held-out scenes
# with their own depth map and with the other target's. An edit *follows* a depth map when its new red pixels
# overlap the box that depth map holds more than the other one (`kh.depth_followed`, by IoU). A LoRA that ignores
# the depth can follow at most one of the two maps of a scene. `scripts/depth_heldout.py` measures this for every
# depth kind (the IP-Adapter's too), for a shape family ("make the red object match the depth") and for fog driven
# by the context's depth; its table is in `docs/design.md`. On a GPU this section runs with `DEPTH_ON_GPU = True`.

# %%
DEPTH_ON_GPU = False  # True: also train the depth-scene LoRA on the real model (another pipeline: an 80 GB GPU)
RUN_DEPTH = TINY or QUICK or DEPTH_ON_GPU  # the tiny model (a minute) and the rehearsal smoke test always run it
DEPTH_TRAIN_SCENES = 12 if TINY else 2 if QUICK else 64  # drawn placement scenes (two targets each)
DEPTH_STEPS = 600 if TINY else 3 if QUICK else 1500  # LoRA updates (scripts/depth_heldout.py: 1500, three families)
DEPTH_LR = 3e-2 if TINY else PRESET.depth_learning_rate  # the depth module's rate: geometry from nothing needs a fast
#   one on the tiny model (scripts/depth_heldout.py uses 3e-2 too); the preset's 1e-3 suits pairs like notebook 04's
depth_scenes = [[kh.render_depth_scene("placement", 1, i, RESOLUTION, variant=v) for v in (0, 1)]
                for i in range(4)]  # seed 1: scenes training never sees; two targets each
if RUN_DEPTH:
    depth_train = kh.DepthPairs(0, range(DEPTH_TRAIN_SCENES), RESOLUTION, families=("placement",))  # seed 0
    depth_cfg = dataclasses.replace(kh.TrainConfig.for_gpu("cpu") if TINY else PRESET, steps=DEPTH_STEPS,
                                    resolution=RESOLUTION, checkpoint_every=0, seed=SEED, max_sequence_length=32,
                                    output_dir=os.path.join(OUTPUT_DIR, "depth_run"), depth_kind="tokens",
                                    depth_source="target", depth_learning_rate=DEPTH_LR)
    trainer, depth_cache = kh.load_for_training(MODEL, depth_train, depth_cfg, progress=False)
    depth_run = kh.train(trainer, depth_train, depth_cfg, cache=depth_cache, progress=False)
    print(f"{len(depth_train)} depth samples, {DEPTH_STEPS} updates, depth kind {depth_cfg.depth_kind!r} on the "
          f"{depth_cfg.depth_source}'s depth: loss {depth_run.history[0]['loss']:.3f} -> "
          f"{depth_run.history[-1]['loss']:.3f}")
    DEPTH_DIR = kh.save_adapter(trainer, depth_run.region, os.path.join(OUTPUT_DIR, "depth_adapter"),
                                config=depth_cfg, depth_module=depth_run.depth)
    del trainer, depth_cache, depth_run
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
    depth_pipe = load_model()
    depth_region = kh.load_adapter(depth_pipe, DEPTH_DIR)
    depth_mod = kh.load_depth_module(DEPTH_DIR, depth_pipe)
else:
    print("depth scenes skipped on this GPU (set DEPTH_ON_GPU = True on an 80 GB card); the figures of "
          "scripts/depth_heldout.py on the tiny model are in docs/design.md")


def depth_edit(scene, depth):
    """One edit of a depth scene with the given depth map (or None), ``[3, H, W]`` in ``[0, 1]``."""
    out = kh.sample_edit(depth_pipe, scene["context"], scene["prompt"], mask=scene["mask"], region=depth_region,
                         depth=depth, depth_module=depth_mod, generator=noise(), output_type="pt",
                         num_inference_steps=NUM_STEPS, max_sequence_length=32)
    return out[0].float().cpu()


if RUN_DEPTH:
    followed = 0
    for pair in depth_scenes:
        for v in (0, 1):  # each target's depth map in turn: the edit should follow whichever it is given
            out = depth_edit(pair[v], pair[v]["target_depth"])
            followed += kh.depth_followed(out, pair[v], pair[1 - v])["followed"]
    print(f"held-out depth scenes: the box followed the depth map it was given in {followed} of "
          f"{2 * len(depth_scenes)} cases")

# %% [markdown]
# Pick the depth map the edit gets: one target's, the other's, or none, and slide the box sideways in it (the box's
# depth pixels move; the rest of the map stays). The prompt, the mask and the noise stay the same. Headless, the
# figure is drawn once, for the default choice.

# %%
from ipywidgets import IntSlider

depth_pair = depth_scenes[0]


def moved_box_depth(scene, shift: int) -> torch.Tensor:
    """The scene's target depth with the added box moved ``shift`` px to the right: ``[1, H, W]``."""
    box = scene["target_depth"] != scene["depth"]  # [1, H, W]: where the box changed the depth
    moved = scene["depth"].clone()
    rolled_box = torch.roll(box, shift, dims=-1)
    moved[rolled_box] = torch.roll(scene["target_depth"], shift, dims=-1)[rolled_box]
    return moved


def depth_figure(depth_map="target a's depth", shift=0):
    given = None if depth_map == "no depth" else depth_pair[0 if "a's" in depth_map else 1]
    depth = None if given is None else moved_box_depth(given, shift)
    out = depth_edit(depth_pair[0], depth)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), layout="constrained")
    axes[0].imshow(depth_pair[0]["context"].permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
    axes[0].set_title(f"context: '{depth_pair[0]['prompt']}'", fontsize=9)
    if depth is not None:
        axes[1].imshow(depth[0].numpy(), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title(f"depth given: {depth_map}" + (f"\nbox moved {shift:+d} px" if depth is not None else ""),
                      fontsize=9)
    axes[2].imshow(out.permute(1, 2, 0).clamp(0, 1).numpy())
    if depth is not None:
        axes[2].contour((depth != depth_pair[0]["depth"])[0].numpy(), levels=[0.5], colors="white", linewidths=1)
    axes[2].set_title("edit\n(white: where the depth map puts the box)", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"A held-out depth scene ({MODEL_LABEL}): the prompt never says where; the depth map does",
                 fontsize=10)
    return fig


if RUN_DEPTH:
    _ = kh.interactive_figure(depth_figure,
                              depth_map=Dropdown(options=["target a's depth", "target b's depth", "no depth"],
                                                 description="depth"),
                              shift=IntSlider(value=0, min=-RESOLUTION // 2, max=RESOLUTION // 2,
                                              step=max(RESOLUTION // 16, 1), continuous_update=False,
                                              description="move box"))

# %% [markdown]
# ## Exercises
#
# First an experiment to run and think about, then four exercises that each ask for one function. Write it in its
# cell in place of the `raise NotImplementedError(...)` line and run the cell: the check below your function calls
# it on inputs of its own, compares the result with diffusers' or the package's own function, and names the first
# shape or value that differs (and where). The checks take this notebook's `pipe.scheduler` as the reference. Until
# you fill a cell in, its check stops with a message, so "Run all" stops at the first exercise you have not done
# yet. Stuck? `kh.exercises.show_solution("euler_sample")` prints one solution (any exercise's name works).
#
# ### Experiment: the guidance value at sampling
#
# Sample the same edit at guidance 1.0, 2.5 and 3.5 from the same noise and compare the metrics. (FLUX.1 Kontext
# [dev] was *distilled* to take guidance as an input. The tiny model was not distilled: it was pretrained with
# guidance values drawn from 1 to 4, so for it guidance is just another input in the range it has seen, and 2.5
# lies inside.)

# %%
# The same noise, three guidance values
for g in (1.0, 2.5, 3.5):
    out = kh.sample_edit(pipe, context, prompt, mask=item["mask"], depth=depth_image, region=region,
                         depth_module=depth_module, generator=noise(), **{**common, "guidance_scale": g})
    scores = kh.edit_metrics(out, item["context"], item["target"], item["mask"], lpips=False)
    print(f"guidance {g}: in-mask PSNR to the target {scores['psnr_in_vs_target']:.1f} dB, "
          f"outside PSNR to the context {scores['psnr_out_vs_context']:.1f} dB")

# %% [markdown]
# ### Exercise 5.1: the sampling schedule
#
# The pipeline samples at `linspace(1, 1/n, n)`, shifted towards the noise by `mu`, which grows with the image's
# token count (section 1, `calculate_shift`). Write `shifted_sigmas(num_steps, image_seq_len, config)` with
# `config = pipe.scheduler.config`: `mu` runs linearly from `config["base_shift"]` at
# `config["base_image_seq_len"]` tokens to `config["max_shift"]` at `config["max_image_seq_len"]`; each sigma
# becomes `exp(mu) / (exp(mu) + (1 / sigma - 1))`; the terminal 0 comes last, so `num_steps + 1` values. The check
# compares them with the scheduler's own sigmas after `set_timesteps`, called as the pipeline calls it.

# %%
def shifted_sigmas(num_steps, image_seq_len, config):
    # -> sigmas [num_steps + 1], from 1.0 down to the terminal 0
    raise NotImplementedError("your code here")


kh.exercises.check_shifted_sigmas(shifted_sigmas, scheduler=pipe.scheduler)

# %% [markdown]
# ### Exercise 5.2: the sampling loop
#
# Write `euler_sample(velocity, x, sigmas)`: start from the noise `x` (`[B, N, 4C]`) at `sigmas[0]` and walk down
# the schedule `sigmas` (`[n + 1]`, ending at 0): at each step call `velocity(x, sigma)` once (in the pipeline the
# transformer sits here) and take one Euler step to the next sigma. Return `x` at sigma 0. The check runs it with a
# stand-in velocity function and compares with diffusers' `FlowMatchEulerDiscreteScheduler.step` over the
# pipeline's schedule; it also counts the calls.

# %%
def euler_sample(velocity, x, sigmas):
    # velocity(x, sigma) -> v [B, N, 4C]; x [B, N, 4C] at sigmas[0]; sigmas [n + 1] -> x at sigma 0
    raise NotImplementedError("your code here")


kh.exercises.check_euler_sample(euler_sample, scheduler=pipe.scheduler)

# %% [markdown]
# ### Exercise 5.3: blending the edit into the context
#
# `sample_edit(..., blend=True)` applies `FluxKontextInpaintPipeline`'s hard constraint after every Euler step:
# inside the mask the latents stay as sampled, outside they are replaced by the context's latents noised to the
# *next* sigma (the clean context after the last step). Write `blend(latents, context_latents, noise, mask_tok,
# sigma_next)` for `[B, N, 4C]` tensors, `mask_tok` 1 inside the mask. The check compares it with `kh.blend_latents`
# after every step of a schedule.

# %%
def blend(latents, context_latents, noise, mask_tok, sigma_next):
    # latents, context_latents, noise, mask_tok [B, N, 4C]; sigma_next a number -> [B, N, 4C]
    raise NotImplementedError("your code here")


kh.exercises.check_blend(blend, scheduler=pipe.scheduler)

# %% [markdown]
# ### Exercise 5.4: PSNR inside the mask
#
# Write `psnr_in_mask(pred, target, mask)` for images `[3, H, W]` in `[0, 1]` and a mask `[1, H, W]` (1 =
# editable): the PSNR in dB, `10 log10(1 / mse)`, with the mean squared error taken over the mask's pixels only (all
# three channels). Return one number. The check compares it with `kh.edit_metrics`'s `psnr_in_vs_target`, on an
# edit that also changed pixels outside the mask.

# %%
def psnr_in_mask(pred, target, mask):
    # pred, target [3, H, W] in [0, 1], mask [1, H, W] -> PSNR in dB
    raise NotImplementedError("your code here")


kh.exercises.check_psnr_in_mask(psnr_in_mask)

# %% [markdown]
# ## Recap
#
# - `kh.sample_edit` is the Kontext sampling loop: without mask, region and depth module it equals `pipe(...)` to
#   the bit on the tiny model (with `depth`, `pipe(..., ip_adapter_image=depth)`; `tests/test_inference.py`); it
#   adds the region signal, the depth module's per-token depth (and blending on request). A pipeline from
#   `kh.load_pipeline` also runs `pipe(...)` without a depth map: its IP-Adapter then adds exactly zero.
#   `kh.RegionHook` brings the region and depth signals and the blend into `pipe(...)` itself.
# - `preview_grid` and `edit_metrics` answer one question: did it edit where asked (PSNR inside vs the target),
#   and only there (PSNR outside vs the context)?
# - A callback sees the latents after every step; unpack, un-normalise and decode them to watch the edit form.
# - `compare_variants` isolates each part (LoRA, region signal, depth) against the base model and an inpainting
#   baseline, on the same noise, in one figure and one table.
# - The LoRA travels: diffusers loads it as it is, `export_comfyui` writes ComfyUI's fused Flux layout, and the
#   custom nodes in `comfyui/kontext_region/` apply the region and depth signals there.
# - On twin scenes, where only the mask can say which of two identical objects to edit, section 7 counts how often
#   the trained region signal makes the edit follow the mask on scenes it never saw.
# - On depth scenes, where only the desired result's depth map says where the new box goes, section 8 counts how
#   often the default depth signal (each token's depth patch) makes the edit follow the depth map it is given; a
#   global IP-Adapter embedding placed the box no better than chance (`scripts/depth_heldout.py`, docs/design.md).
#
# ## Next
#
# Train on your own pairs: go back to [01_data_prep.ipynb](01_data_prep.ipynb) with `DATA_ROOT` pointing at your
# folder (`context/`, `target/`, `masks/`, `depth/`, `prompts.txt`), then run
# [04_training.ipynb](04_training.ipynb) on a GPU and this notebook again. For long runs and several GPUs, the
# README's "Training" section shows the command line (`python -m kontext_helpers train ...` and
# `accelerate launch`).
