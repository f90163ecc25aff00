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
# # 03 · The region signal, and depth through the IP-Adapter and per token
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/kontext-region-lora/blob/main/notebooks/03_region_token_and_depth_ip_adapter.ipynb)
#
# **What you will learn**
# - how a pixel mask becomes a mask on the token grid, and why the loss uses max pooling;
# - how the default region signal marks the masked tokens in place (`MaskedTokenEmbedding`), and why place
#   matters;
# - how the original design's `MaskRegionToken` turns that mask into one extra token `[B, 1, 4C]`, and how one
#   module serves every resolution;
# - where each signal sits in the sequence `[noisy target | context (| region)]`, and where it changes the
#   prediction;
# - how a depth map reaches the transformer through the IP-Adapter: CLIP image encoder, image projection,
#   `to_k_ip` / `to_v_ip` in each double block, and the adapter's scale;
# - why one global depth embedding cannot say *where* anything is, and how a depth patch per token (a zero-started
#   projection added to the target and context tokens, BFL's depth channels written as an addition) can;
# - what the loss measures inside and outside the mask, and which timesteps we train on.
#
# Runs in seconds on a laptop CPU with the tiny model, or on a Colab GPU with FLUX.1 Kontext [dev].
#
# **The code behind it:** [`kontext_helpers/conditioning.py`](../kontext_helpers/conditioning.py): the region signal,
# depth through the IP-Adapter, the transformer call and the loss;
# [`kontext_helpers/depth.py`](../kontext_helpers/depth.py): depth per token.

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
RESOLUTION = 128 if TINY else PRESET.resolution  # training side in pixels, a multiple of 16 (tiny: an 8x8 token grid)
PAIR_INDEX = 0  # which pair of the dataset to look at (0: "make the red sphere blue")
MAX_SEQUENCE_LENGTH = 64 if TINY else PRESET.max_sequence_length  # T5 tokens of the prompt (Kontext: 512)
SIGMA = 0.5  # the flow-matching time of the single forward passes in sections 4, 7 and 8, in (0, 1]
SQUARE_TOKENS = 3 if TINY or QUICK else 8  # side, in tokens, of the square mask the slider in section 3 moves
NUM_INFERENCE_STEPS = 4 if TINY else 2 if QUICK else 28  # denoising steps of the IP-Adapter comparison (section 6)
IP_SCALES = (0.0, 0.5, 1.0)  # IP-Adapter strengths compared in section 6
TIMING_REPEATS = 5  # timed runs per measurement in section 5 (the median is reported)
SIGMA_DRAWS = 20_000  # training sigmas drawn for the histograms of section 8
OUTPUT_DIR = os.environ.get("KONTEXT_OUTPUT_DIR", os.path.join(ROOT, "outputs"))  # the series' results folder;
#   this notebook only reads: notebook 04 writes the trained adapter there
SEED = 0  # every random draw of this notebook

# %% [markdown]
# We load the pipeline and one training pair. On the real model the 12B transformer and T5-XXL alone are
# about 33 GB of bf16 weights: on a GPU whose preset says `quantize_base == "nf4"` (T4, L4) the transformer
# is loaded in 4 bits and every model visits the GPU only while it runs (`enable_model_cpu_offload`, which
# `load_pipeline` switches on with a quantization config); on an A100 or H100 the whole pipeline sits on the
# GPU. The tiny model is small and was pretrained briefly on scenes like these (`docs/tiny_model.md`): its
# pictures are soft, but real.

# %%
import numpy as np

torch.manual_seed(SEED)
NF4 = not TINY and PRESET.quantize_base == "nf4"  # bitsandbytes: installed by the setup cell in Colab
pipe = kh.load_pipeline(MODEL, quantization_config=kh.nf4_quantization_config() if NF4 else None)
DEVICE = pipe._execution_device  # where the pipeline's modules live (cuda on a GPU, cpu for tiny)
C_IN = pipe.transformer.config.in_channels  # 4C: channels of one packed token (64 for Flux)

dataset = kh.KontextPairs(DATA_ROOT, resolution=RESOLUTION)
item = dataset[PAIR_INDEX]
print(dataset)
print(f"pair '{item['name']}': prompt {item['prompt']!r}")
print("context", tuple(item["context"].shape))  # [3, H, W] in [0, 1]
print("mask   ", tuple(item["mask"].shape))  # [1, H, W] in {0, 1}, 1 = editable
print("depth  ", tuple(item["depth"].shape))  # [1, H, W] in [0, 1], near = 1

# %% [markdown]
# **Three terms this notebook uses.**
#
# - **Flow matching: `x_t` and the velocity.** Training picks a time `sigma` in `(0, 1]` and mixes the clean target
#   latents `x_0` with Gaussian noise `e` on a straight line, `x_t = (1 - sigma) x_0 + sigma e`. The transformer is
#   trained to predict the **velocity** of that line, `v = d x_t / d sigma = e - x_0`. Sampling starts from pure noise
#   at `sigma = 1` and follows `-v` back to `sigma = 0` in Euler steps (section 6).
# - **LoRA.** Instead of changing a frozen weight `W [d_out, d_in]`, train a low-rank update: `W + (alpha / r) B A`
#   with `A [r, d_in]`, `B [d_out, r]` and a small rank `r`. `B` starts at zero, so the model starts unchanged (PEFT
#   does this; notebook 04 attaches it with `kh.add_lora` and trains it).
# - **NF4 and QLoRA.** On a T4 or L4 the frozen 12B transformer is stored in 4-bit NormalFloat (bitsandbytes,
#   `kh.nf4_quantization_config()`) and dequantised layer by layer as it runs; the LoRA on top trains in 16 or 32
#   bits. A LoRA over a 4-bit base is called QLoRA. The tiny model is not quantised.

# %% [markdown]
# ## 1. The mask on the token grid
#
# The transformer does not see pixels. The VAE shrinks the image 8x, then 2x2 packing makes one token of
# every 16x16 pixel patch (notebook 02). So a `RESOLUTION` x `RESOLUTION` image is an `H' x W'` grid of
# tokens, and the edit mask has to be brought onto that grid too.
#
# `kh.mask_to_token_grid(mask, h_tok, w_tok, mode=...)` does it in one of two ways:
#
# - `mode="max"`: a token is editable (1) as soon as **any** of its pixels is editable;
# - `mode="area"`: the token gets the editable **fraction** of its 16x16 pixels, a value in `[0, 1]`.

# %%
h_tok, w_tok = RESOLUTION // 16, RESOLUTION // 16  # H', W': VAE 8x, then 2x2 packing
mask = item["mask"][None]  # [1, H, W] -> [B, 1, H, W]
m_max = kh.mask_to_token_grid(mask, h_tok, w_tok, mode="max")  # [B, 1, H', W'] in {0, 1}
m_area = kh.mask_to_token_grid(mask, h_tok, w_tok, mode="area")  # [B, 1, H', W'] in [0, 1]
print("pixel mask ", tuple(mask.shape))  # [B, 1, H, W]
print("max grid   ", tuple(m_max.shape))  # [B, 1, H', W']
print("area grid  ", tuple(m_area.shape))  # [B, 1, H', W']
print(f"editable share: pixels {mask.mean():.1%}, max grid {m_max.mean():.1%}, area grid {m_area.mean():.1%}")
boundary = ((m_area > 0) & (m_area < 1)).sum().item()
print(f"{boundary} of {h_tok * w_tok} tokens are partly editable (0 < area < 1): the boundary tokens")


# %%
import functools

# kontext_helpers/figures.py: a token-grid map over the pixel frame, and the grid lines alone
show_grid = functools.partial(kh.show_token_grid, size=RESOLUTION)
token_grid_lines = functools.partial(kh.token_grid_lines, size=RESOLUTION)

fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), layout="constrained")
axes[0].imshow(item["context"].permute(1, 2, 0))  # [3, H, W] -> [H, W, 3]
axes[0].contour(mask[0, 0], levels=[0.5], colors="red", linewidths=1)
token_grid_lines(axes[0])
axes[0].set_title("context, mask outline in red", fontsize=9)
axes[1].imshow(mask[0, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
token_grid_lines(axes[1], color="tab:orange")
axes[1].set_title(f"pixel mask {RESOLUTION}x{RESOLUTION}: {mask.mean():.1%} editable", fontsize=9)
show_grid(axes[2], m_max[0, 0], f'mode="max" on {h_tok}x{w_tok} tokens: {m_max.mean():.1%}\n'
          "any editable pixel makes the token editable")
im = show_grid(axes[3], m_area[0, 0], f'mode="area": {m_area.mean():.1%}\nthe editable fraction of each token')
fig.colorbar(im, ax=axes[3], shrink=0.8)
fig.suptitle("The mask on the token grid: max pooling grows the edit to whole tokens, area pooling keeps "
             "the share but blurs the boundary")
plt.show()

# %% [markdown]
# **Why "max" for the loss.** The loss asks every token with mask 0 to stay exactly like the context
# (section 8). With area pooling a boundary token that is 30% edit would get weight 0.7 on "stay like the
# context": the loss would partly ask edited pixels not to change, and the model would learn a ragged,
# half-done edge. Max pooling is conservative: a token touching the edit is editable, so the loss never asks
# an edited pixel to stay unchanged. The price is a slightly larger editable area (a margin of at most one
# token, 16 px), which shrinks in relative terms as the resolution grows. The region signals of sections 2 and
# 3 are fed the same max-pooled grid.

# %% [markdown]
# ## 2. The region signal: marking the masked tokens
#
# How should the mask reach the transformer? The model must learn *where* to edit, at every place, also where
# no training mask lay. The default (`TrainConfig.region_kind = "marked"`, `kh.MaskedTokenEmbedding`) is the
# simplest signal that carries place: **one learned vector `e` of `4C` numbers, added to every masked token**,
# of the noisy target and of the context, `x + m * e` with `m` the max-pooled grid mask. The tokens keep their
# own ids `(type, row, col)`, so the mark sits exactly where the edit goes. Through the transformer's first
# linear layer (`x_embedder`, weight `W`) it is `W x + b + m (W e)`: a learned mask channel. FLUX.1 Fill feeds
# its inpainting mask the same way, as extra input channels concatenated to the noisy latents before that layer
# (diffusers' `FluxFillPipeline.__call__` concatenates `latents` and `masked_image_latents` on the channel axis).
# `e` starts at zero, so training starts from the base model exactly.

# %%
marked = kh.MaskedTokenEmbedding(h_tok, w_tok, C_IN).to(DEVICE)
print(marked, " parameters", {n: tuple(p.shape) for n, p in marked.named_parameters()})  # e: [4C]
mark = marked(m_max.to(DEVICE))  # [B, 1, H', W'] -> [B, N, 4C]: m * e per token, in packing order
print("mark per token", tuple(mark.shape), f" all zero at the start: {bool((mark == 0).all())}")
demo_tokens = torch.randn(1, h_tok * w_tok, C_IN, device=DEVICE)  # stand-in context tokens [B, N, 4C]
parts = kh.region_inputs(marked, demo_tokens, m_max.to(DEVICE), h_tok, w_tok)
print("region_inputs: context", tuple(parts.context.shape), " ids of appended tokens", parts.ids,
      " target offset", tuple(parts.target_offset.shape))  # [B, N, 4C], None, [B, N, 4C]
with torch.no_grad():
    marked.embedding.copy_(torch.randn(C_IN, generator=torch.Generator().manual_seed(SEED)))  # a demo e, not trained
mark = marked(m_max.to(DEVICE)).detach()  # [B, N, 4C]

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
show_grid(axes[0], m_max[0, 0], "the mask on the token grid (max)")
mark_norm = mark[0].norm(dim=-1).reshape(h_tok, w_tok).cpu()  # [N] -> [H', W']
im = show_grid(axes[1], mark_norm, "|m * e| per token (demo e)", cmap="magma", vmin=0, vmax=mark_norm.max().item())
fig.colorbar(im, ax=axes[1], shrink=0.8)
axes[2].bar(range(C_IN), marked.embedding.detach().float().cpu().numpy(), color="tab:red")
axes[2].set_title(f"e: one vector of {C_IN} channels, the same at every masked place", fontsize=9)
fig.suptitle("The default region signal marks each masked token in place; unmasked tokens are untouched")
plt.show()

# %% [markdown]
# `kh.REGION_KINDS` holds three other signals, all trained and measured the same way: `"marked_context"` (the mark
# on the context tokens only), `"cells"` (one extra token per 2x2 cell of the grid, at that cell's own position
# `(2, row, col)`), and `"linear"`, the original design's single token (next section). Which one makes the mask
# decide the edit was measured, not assumed: `scripts/region_heldout.py` trains each on scenes with two identical
# objects and one prompt that fits both, where only the mask can say which object to change, and edits held-out
# scenes with the mask on each object in turn (docs/design.md has the table and the figure; notebook 05 shows it).

# %% [markdown]
# ## 3. The original design's region token: `MaskRegionToken`
#
# The original design's region signal (`region_kind="linear"`): `kh.MaskRegionToken(h_tok, w_tok, c_in)` is one
# linear layer from the flattened token-grid mask to **one** token with the width of an image token:
# `[B, 1, H', W'] -> [B, H'*W'] -> [B, 1, 4C]`, appended after the context with the id `(2, 0, 0)`. Its weights
# are trained together with the LoRA (notebook 04); here it is freshly initialised. Where the mask lies is in the
# learned weights only (one weight column per grid cell), not in any position the model sees. How often that lets
# the mask decide the edit on held-out twin scenes, against the marked tokens, the cell reads from
# `docs/region_heldout.json` (`scripts/region_heldout.py`, tiny model).

# %%
region = kh.MaskRegionToken(h_tok, w_tok, C_IN).to(DEVICE)
print(region)
m_small = m_max.to(DEVICE)  # [B, 1, H', W'], the max-pooled mask
region_tok = region(m_small)  # [B, 1, H', W'] -> [B, 1, 4C]
print("mask on the grid", tuple(m_small.shape))  # [B, 1, H', W']
print("region token    ", tuple(region_tok.shape))  # [B, 1, 4C]
n_params = sum(p.numel() for p in region.parameters())
print(f"parameters: {h_tok * w_tok} x {C_IN} weights + {C_IN} biases = {n_params:,}")

# channel k of the token is (mask * weight map k).sum() + bias k: check it by hand
W, b = region.proj.weight, region.proj.bias  # [4C, H'*W'], [4C]
by_hand = m_small.flatten(1) @ W.T + b  # [B, H'*W'] @ [H'*W', 4C] -> [B, 4C]
print(f"max |region(m) - (m @ W.T + b)| = {(region_tok[:, 0] - by_hand).abs().max().item():.1e}")

import json

with open(os.path.join(ROOT, "docs", "region_heldout.json")) as f:
    twins = json.load(f)["variants"]  # held-out twin scenes, tiny model (scripts/region_heldout.py)
print(f"held-out twin scenes: the masked object alone changed in {twins['linear']['tight']['accuracy']:.0%} of the "
      f"cases with this token (\"linear\"), {twins['marked']['tight']['accuracy']:.0%} with the marked tokens")

# %% [markdown]
# A plain `nn.Linear(H'*W' -> 4C)` built for one grid has a fixed input size, so a mask from any other resolution
# (training at 512 px, sampling at 1024 px) cannot go in. `MaskRegionToken` area-pools a mask on any other grid to its
# own `(h_tok, w_tok)` first, so one module serves every resolution.
#
# > The original design's module took one grid only:
# > [design note 3](../docs/design.md#3-region-token-at-any-resolution).

# %%
from torch import nn

seed_region = nn.Linear(h_tok * w_tok, C_IN)  # the original design's module, built for the H' x W' grid
m_2x = kh.mask_to_token_grid(mask, 2 * h_tok, 2 * w_tok).to(DEVICE)  # the same mask at 2x the resolution
print("mask on the 2x grid", tuple(m_2x.shape))  # [B, 1, 2H', 2W']
try:
    seed_region.to(DEVICE)(m_2x.flatten(1))  # [B, 4*H'*W'] into Linear(H'*W' -> 4C)
except RuntimeError as err:
    print("the original design's Linear on the 2x grid fails:", str(err).splitlines()[0])

# ours: a mask aligned to the token grid (a square of whole tokens) gives the same token at 1x and 2x
square = torch.zeros(1, 1, RESOLUTION, RESOLUTION)  # [B, 1, H, W]
square[..., 16 * 1 : 16 * (1 + SQUARE_TOKENS), 16 * 2 : 16 * (2 + SQUARE_TOKENS)] = 1.0
tok_1x = region(kh.mask_to_token_grid(square, h_tok, w_tok).to(DEVICE))  # [B, 1, 4C]
tok_2x = region(kh.mask_to_token_grid(square, 2 * h_tok, 2 * w_tok).to(DEVICE))  # pooled inside -> [B, 1, 4C]
print(f"aligned square: max |token(1x) - token(2x)| = {(tok_1x - tok_2x).abs().max().item():.1e}")
full_1x = region(torch.ones(1, 1, h_tok, w_tok, device=DEVICE))
full_2x = region(torch.ones(1, 1, 2 * h_tok, 2 * w_tok, device=DEVICE))
print(f"uniform mask:   max |token(1x) - token(2x)| = {(full_1x - full_2x).abs().max().item():.1e}")
# the sample's round mask: the finer grid knows the boundary better, so the token is close, not equal
diff_sample = (region(m_small) - region(m_2x)).abs().max().item()
print(f"the sample's mask: max |token(1x) - token(2x)| = {diff_sample:.3f} (boundary tokens become fractions)")

# %% [markdown]
# What does the module look at? Row `k` of the weight matrix, reshaped to the grid, is a map: channel `k` of
# the region token is the sum of this map over the editable tokens, plus a bias. **This module is untrained,
# so the maps are random noise** (PyTorch's uniform initialisation). After training (notebook 04) they show
# which parts of the grid each channel has learned to report.

# %%
channels = list(range(6))  # a few output channels of the region token
weights = region.proj.weight.detach().float().cpu().reshape(C_IN, h_tok, w_tok)  # [4C, H'*W'] -> [4C, H', W']
lim = weights[channels].abs().max().item()
fig, axes = plt.subplots(1, len(channels), figsize=(2.2 * len(channels) + 1, 2.8), layout="constrained")
for ax, k in zip(axes, channels):
    im = show_grid(ax, weights[k], f"channel {k}", cmap="RdBu_r", vmin=-lim, vmax=lim)
fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
fig.suptitle("Projection weights on the token grid (untrained: random). Channel k of the region token = "
             "sum of its map over the editable tokens + bias")
plt.show()

# %% [markdown]
# Move a square mask around and watch the region token change. Every position gives another 64-number
# token (with random weights the pattern is arbitrary; what matters is that position and shape are encoded).
# In Colab drag the sliders; a headless run draws the default position once.

# %%
from ipywidgets import IntSlider


def square_mask(top, left, size=SQUARE_TOKENS):
    """A square of size x size whole tokens, as a pixel mask [B, 1, H, W]."""
    m = torch.zeros(1, 1, RESOLUTION, RESOLUTION)
    m[..., 16 * top : 16 * (top + size), 16 * left : 16 * (left + size)] = 1.0
    return m


positions = range(h_tok - SQUARE_TOKENS + 1)
with torch.no_grad():  # a fixed y-range for all positions, so the bars can be compared while sliding
    all_tokens = torch.cat([region(kh.mask_to_token_grid(square_mask(t, c), h_tok, w_tok).to(DEVICE))
                            for t in positions for c in positions])  # [P, 1, 4C]
y_lim = 1.05 * all_tokens.abs().max().item()


def plot_region_token(top=1, left=2):
    m_px = square_mask(top, left)
    with torch.no_grad():
        token = region(kh.mask_to_token_grid(m_px, h_tok, w_tok).to(DEVICE))[0, 0].float().cpu()  # [4C]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(12, 3.2), width_ratios=[1, 3.5], layout="constrained")
    show_grid(ax_m, kh.mask_to_token_grid(m_px, h_tok, w_tok)[0, 0], f"mask at row {top}, column {left}")
    ax_t.bar(range(C_IN), token.numpy(), color=np.where(token.numpy() >= 0, "tab:red", "tab:blue"))
    ax_t.set_ylim(-y_lim, y_lim)
    ax_t.set_xlabel("channel of the region token")
    ax_t.set_title(f"the region token [1, 1, {C_IN}]: every mask position gives another vector", fontsize=9)
    return fig


_ = kh.interactive_figure(plot_region_token, top=IntSlider(1, 0, h_tok - SQUARE_TOKENS, description="row"),
                          left=IntSlider(2, 0, w_tok - SQUARE_TOKENS, description="column"))

# %% [markdown]
# ## 4. Where the signal goes: `[noisy target | context (| region)]`
#
# Kontext already puts two images in one sequence: the noisy target tokens (what is being denoised) and
# the clean context tokens (the image to edit). The default marked tokens stay in that sequence, `[B, 2N, 4C]`;
# the original design's token is appended as a third part, so the transformer sees `[B, 2N+1, 4C]`. Each token also
# has a position id `(type, row, col)`: type 0 target, 1 context (as the pipeline marks it), 2 region. The region
# token's id is `(2, 0, 0)`: row 0 and column 0 are the top-left token's place, so under RoPE (16 type, 56 row and
# 56 column dimensions per head, relative) only the type dimensions set it apart from that token (notebook 02,
# section 3). `kh.kontext_img_ids` builds all `2N+1` rows.
#
# First the pieces of one training sample, as the training step builds them (`kh.training_loss`, notebook 04):
# latents of context and target, packed into tokens, the prompt embeddings, and a noisy target at time
# `SIGMA`: `x_t = (1 - sigma) x_0 + sigma * noise`.

# %%
with torch.no_grad():
    pair = torch.stack([item["context"], item["target"]])  # [2, 3, H, W] in [0, 1]
    lat = kh.to_latents(kh.normalize_01_to_m11(pair), pipe.vae)  # [2, C, H_l, W_l]
    tok, grid = kh.pack_like_pipeline(lat)  # [2, N, 4C]
assert grid == (h_tok, w_tok), "the token grid of the latents must match section 1"
ctx_tok, tgt_tok = tok[:1], tok[1:]  # [B, N, 4C] each
prompt_embeds, pooled, txt_ids = kh.encode_prompts(pipe, item["prompt"], max_sequence_length=MAX_SEQUENCE_LENGTH)
g = torch.Generator().manual_seed(SEED)
noise = torch.randn(tgt_tok.shape, generator=g).to(tgt_tok)  # [B, N, 4C]
sigma = torch.tensor([SIGMA])  # [B], the flow-matching time in (0, 1]
noisy = (1 - SIGMA) * tgt_tok + SIGMA * noise  # [B, N, 4C]
print("context tokens ", tuple(ctx_tok.shape))  # [B, N, 4C]
print("noisy target   ", tuple(noisy.shape))  # [B, N, 4C]
print("region token   ", tuple(region_tok.shape))  # [B, 1, 4C]
print(f"mean |value|: context tokens {ctx_tok.abs().mean():.3f}, region token {region_tok.abs().mean():.3f}")
print("prompt_embeds  ", tuple(prompt_embeds.shape), " pooled", tuple(pooled.shape),
      " txt_ids", tuple(txt_ids.shape))  # [B, T, D_t5], [B, D_clip], [T, 3]
sequence = torch.cat([noisy, ctx_tok, region_tok.to(noisy)], dim=1)  # what kontext_forward builds
print("sequence       ", tuple(sequence.shape))  # [B, 2N+1, 4C]

ids = kh.kontext_img_ids(h_tok, w_tok)  # [2N+1, 3], 2D (docs/design.md, correction 6)
N = h_tok * w_tok
print("img_ids        ", tuple(ids.shape))  # [2N+1, 3]
print("first target id ", ids[0].tolist(), "  last target id ", ids[N - 1].tolist())
print("first context id", ids[N].tolist(), "  last context id", ids[2 * N - 1].tolist())
print("region id       ", ids[-1].tolist())

# %% [markdown]
# Now one transformer call with and without the region token (`kh.kontext_forward` builds the sequence
# and the ids, calls the transformer and returns the velocity on the target tokens only, `[B, N, 4C]`).
# Depth comes in section 5, so here the IP-Adapter gets no image tokens: `{"ip_hidden_states": []}` makes
# it add exactly zero, as `kh.sample_edit` does without depth. (Without that, a transformer with an
# IP-Adapter loaded fails when no depth is given.) A third call with the region token of an **empty** mask
# separates "a token is there" from "what the mask says".

# %%
no_depth = {"ip_hidden_states": []}  # the IP-Adapter's attention adds exactly zero
fwd = dict(sigma=sigma, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, txt_ids=txt_ids,
           h_tok=h_tok, w_tok=w_tok, guidance=1.0)
with torch.no_grad():
    pred_region = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(m_small), **fwd,
                                     joint_attention_kwargs=no_depth)  # [B, N, 4C]
    pred_plain = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, None, **fwd,
                                    joint_attention_kwargs=no_depth)  # [B, N, 4C]
    empty = torch.zeros_like(m_small)  # [B, 1, H', W']: nothing editable
    pred_empty = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(empty), **fwd,
                                    joint_attention_kwargs=no_depth)  # [B, N, 4C]
print("prediction with region   ", tuple(pred_region.shape))  # [B, N, 4C]: only the target part comes back
print("prediction without region", tuple(pred_plain.shape))  # [B, N, 4C]
d_token = (pred_region - pred_plain).abs().float().mean(-1).reshape(h_tok, w_tok).cpu()  # [N] -> [H', W']
d_mask = (pred_region - pred_empty).abs().float().mean(-1).reshape(h_tok, w_tok).cpu()
print(f"mean |prediction| {pred_plain.abs().mean():.3f}; mean |difference|: with vs without the token "
      f"{d_token.mean():.4f}, this mask vs an empty mask {d_mask.mean():.4f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 4), layout="constrained")
for ax, d, what in ((axes[0], d_token, "with vs without the region token"),
                    (axes[1], d_mask, "the sample's mask vs an empty mask")):
    im = show_grid(ax, d, f"|prediction difference| per token:\n{what}", cmap="magma", vmin=0, vmax=d.max().item())
    ax.contour(np.arange(RESOLUTION), np.arange(RESOLUTION), mask[0, 0], levels=[0.5], colors="cyan",
               linewidths=1)
    fig.colorbar(im, ax=ax, shrink=0.8)
in_mask = m_max[0, 0].bool().cpu()  # [H', W'] the max-pooled mask
fig.suptitle(f"One extra token changes the velocity of {int((d_token > 0).sum())} of {h_tok * w_tok} target tokens "
             f"(attention is global); untrained, by {d_token[in_mask].mean():.4f} inside the mask (cyan) and "
             f"{d_token[~in_mask].mean():.4f} outside on average")
plt.show()

# %% [markdown]
# The region token reaches every target token, because every token attends to every other one; its id says
# nothing about *where* the mask is, so untrained its change is spread over the grid (the title compares inside
# and outside). The marked tokens of section 2 act at the place itself: the next cell gives the same call the demo
# mark `m * e` on the target and context tokens instead of the token, and measures where the change lands.

# %%
with torch.no_grad():
    pred_marked = kh.kontext_forward(pipe.transformer, noisy + mark.to(noisy), ctx_tok + mark.to(ctx_tok), None,
                                     **fwd, joint_attention_kwargs=no_depth)  # [B, N, 4C]
d_marked = (pred_marked - pred_plain).abs().float().mean(-1).reshape(h_tok, w_tok).cpu()  # [N] -> [H', W']
inside = m_max[0, 0].bool()
print(f"mean |difference| inside the mask {d_marked[inside].mean():.4f}, outside {d_marked[~inside].mean():.4f}")
fig, ax = plt.subplots(figsize=(4.6, 4), layout="constrained")
im = show_grid(ax, d_marked, "|prediction difference| per token:\nmarked tokens (demo e) vs none", cmap="magma",
               vmin=0, vmax=d_marked.max().item())
ax.contour(np.arange(RESOLUTION), np.arange(RESOLUTION), mask[0, 0], levels=[0.5], colors="cyan", linewidths=1)
fig.colorbar(im, ax=ax, shrink=0.8)
ax.set_title(f"The mark changes the prediction by {d_marked[inside].mean():.3f} inside the mask (cyan),\n"
             f"{d_marked[~inside].mean():.3f} outside (mean per token)", fontsize=9)
plt.show()

# %% [markdown]
# ## 5. Depth through the IP-Adapter
#
# The depth map reaches the transformer by a different road than the mask: through an **IP-Adapter**, an
# image prompt. The path, step by step:
#
# 1. `kh.depth_to_pil(item["depth"])`: the float depth `[1, H, W]` as an 8-bit grey RGB image;
# 2. `pipe.feature_extractor` (CLIP's image processor): resize, centre crop and normalise to the CLIP
#    input `[B, 3, 224, 224]` (64x64 on the tiny model); a non-square map loses its sides to the crop;
# 3. `pipe.image_encoder` (CLIP ViT-L/14 on the real model): one image embedding `[B, E]`;
# 4. `kh.encode_depth_for_ip_adapter(pipe, depth_pil)` does steps 2-3 and returns `[[B, 1, E]]`, the layout
#    `joint_attention_kwargs={"ip_adapter_image_embeds": ...}` expects (one list entry per IP-Adapter);
# 5. inside the transformer `encoder_hid_proj` maps `[B, 1, E]` to a few tokens of the **text** width;
# 6. every double block has `to_k_ip` / `to_v_ip`: the image tokens' queries attend to these depth tokens.
#    In `FluxIPAdapterAttnProcessor` the queries are taken *before* RoPE (`ip_query = query` after the
#    q-norm), so the depth tokens carry no position; and in `FluxTransformerBlock.forward` the result, times the
#    adapter's scale, is added to the image stream's residual *after* the feed-forward
#    (`hidden_states = hidden_states + ip_attn_output`), not to its attention output.

# %%
depth_pil = kh.depth_to_pil(item["depth"])  # PIL RGB, the grey depth map
print("depth as PIL:", depth_pil.mode, depth_pil.size)  # (W, H)
processed = pipe.feature_extractor(images=depth_pil, return_tensors="pt").pixel_values  # [B, 3, S, S]
print("CLIP input  ", tuple(processed.shape))  # [B, 3, S, S], S = 224 (64 tiny)
with torch.no_grad():
    image_embeds = pipe.image_encoder(processed.to(DEVICE, pipe.image_encoder.dtype)).image_embeds  # [B, E]
print("image embeds", tuple(image_embeds.shape))  # [B, E]
ip_embeds = kh.encode_depth_for_ip_adapter(pipe, depth_pil)  # [[B, 1, E]]
print("for the transformer:", [tuple(e.shape) for e in ip_embeds])  # [[B, 1, E]]
print(f"same embedding as by hand: max |diff| = {(ip_embeds[0][:, 0] - image_embeds).abs().max().item():.1e}")

# %%
mean = torch.tensor(pipe.feature_extractor.image_mean)[:, None, None]
std = torch.tensor(pipe.feature_extractor.image_std)[:, None, None]
clip_view = (processed[0] * std + mean).clamp(0, 1).permute(1, 2, 0)  # undo the normalisation, [S, S, 3]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), width_ratios=[1, 1, 2], layout="constrained")
axes[0].imshow(item["depth"][0], cmap="gray", vmin=0, vmax=1)
axes[0].set_title(f"depth map {RESOLUTION}x{RESOLUTION} (bright = near)", fontsize=9)
axes[1].imshow(clip_view, interpolation="nearest")
axes[1].set_title(f"what CLIP sees: {processed.shape[-1]}x{processed.shape[-1]}", fontsize=9)
for ax in axes[:2]:
    ax.set_axis_off()
axes[2].plot(image_embeds[0].float().cpu().numpy(), lw=1)
axes[2].set_xlabel("dimension")
axes[2].set_title(f"the image embedding [1, {image_embeds.shape[-1]}]: all the depth information the "
                  "IP-Adapter gets", fontsize=9)
fig.suptitle("Depth -> CLIP image processor -> CLIP image encoder: a whole depth map becomes one vector")
plt.show()

# %% [markdown]
# Inside the transformer: the image projection turns the embedding into a few tokens of the text width
# (`joint_attention_dim`, T5's width), and each double block has its own `to_k_ip` / `to_v_ip`. The single
# blocks have no IP-Adapter.

# %%
proj = pipe.transformer.encoder_hid_proj  # diffusers' MultiIPAdapterImageProjection
with torch.no_grad():
    ip_tokens = proj(ip_embeds)  # [[B, 1, E]] -> [[B, 1, K, D_t5]]
layer = proj.image_projection_layers[0]
n_ip_tokens = layer.num_image_text_embeds
print("image projection:", layer.image_embeds, "->", n_ip_tokens, "tokens of width", layer.norm.normalized_shape[0])
print("IP tokens", [tuple(t.shape) for t in ip_tokens])  # [[B, 1, K, D_t5]], K IP tokens per image
print(f"text width D_t5 = {pipe.transformer.config.joint_attention_dim}, "
      f"transformer width D = {pipe.transformer.inner_dim}")
for name, proc in pipe.transformer.attn_processors.items():
    if hasattr(proc, "to_k_ip"):
        k, v = proc.to_k_ip[0].weight, proc.to_v_ip[0].weight
        print(f"  {name}: to_k_ip.0 {tuple(k.shape)}, to_v_ip.0 {tuple(v.shape)}, scale {proc.scale}")  # [D, D_t5]

# %% [markdown]
# **Frozen encoders.** From an image encoder that takes part in autograd (parameters requiring gradients, no
# `torch.no_grad()`), IP-Adapter embeddings carry a graph through the whole CLIP model: computing them every step
# pays the encoder's activations and gradients, and caching them (below) breaks the second backward pass, because
# the first one freed that graph. `load_pipeline` freezes every encoder and `encode_depth_for_ip_adapter` runs under
# `torch.no_grad()`: the embeddings are plain tensors. The cell shows both.
#
# > The original design computed the embeddings inside every training step:
# > [design note 7](../docs/design.md#7-frozen-encoders).

# %%
trainable = sum(p.requires_grad for p in pipe.image_encoder.parameters())
print(f"image encoder parameters that require grad: {trainable}")
print(f"ip_embeds: requires_grad={ip_embeds[0].requires_grad}, grad_fn={ip_embeds[0].grad_fn}")

# the original design's situation, reproduced for a moment: an encoder that takes part in autograd
pipe.image_encoder.requires_grad_(True)
try:
    with torch.enable_grad():
        embeds_with_graph = pipe.image_encoder(processed.to(DEVICE, pipe.image_encoder.dtype)).image_embeds
    print(f"trainable encoder: requires_grad={embeds_with_graph.requires_grad}, grad_fn={embeds_with_graph.grad_fn}")
    embeds_with_graph.square().sum().backward()  # step 1 with the cached embedding: fine
    try:
        embeds_with_graph.square().sum().backward()  # step 2 reuses it: the graph behind it is gone
    except RuntimeError as err:
        print("second backward through the cached embedding:", str(err).split(".")[0])
finally:
    pipe.image_encoder.requires_grad_(False)  # back to frozen
    pipe.image_encoder.zero_grad(set_to_none=True)

# %% [markdown]
# **Constant work once.** The prompt (T5-XXL + CLIP) and the depth image (CLIP) are constant per sample: training
# encodes them **once per sample** and caches them (`kh.build_train_cache`, used by `kh.train` in notebook 04), then
# the encoders can leave the GPU. How much encoding them at every step would cost, on this machine:
#
# > The original design encoded them at every step:
# > [design note 2](../docs/design.md#2-constant-work-every-step).

# %%
import time


def median_seconds(fn, repeats=TIMING_REPEATS):
    """Median wall time of fn() (one warm-up call first; CUDA is synchronised around each call)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def transformer_forward():
    with torch.no_grad():
        kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(m_small), **fwd, ip_adapter_image_embeds=ip_embeds)


t_depth = median_seconds(lambda: kh.encode_depth_for_ip_adapter(pipe, depth_pil))
t_prompt = median_seconds(lambda: kh.encode_prompts(pipe, item["prompt"], max_sequence_length=MAX_SEQUENCE_LENGTH))
t_step = median_seconds(transformer_forward)
print(f"{'one depth encode (CLIP image)':<34}{'one prompt encode (CLIP + T5)':<34}{'one transformer forward':<26}")
print(f"{1e3 * t_depth:<34.1f}{1e3 * t_prompt:<34.1f}{1e3 * t_step:<26.1f} ms")
print(f"encoding every step adds {(t_depth + t_prompt) / t_step:.0%} of a forward pass to each step, "
      f"for results that never change; the cache holds {ip_embeds[0].numel()} numbers of depth per sample")

# %% [markdown]
# A training step also pays a backward pass, so the relative saving per step is smaller than the ratio
# above; on the real model the larger win is memory: T5-XXL (about 9.5 GB in bf16) and the CLIP encoder need
# not sit on the GPU while the transformer trains.

# %% [markdown]
# > **What depth through an IP-Adapter can and cannot do.** The whole depth map becomes *one* CLIP image
# > embedding, `[B, 768]` on the real model, projected to a few tokens that carry no position (their queries come
# > before RoPE): a global summary ("a near object on the left, a far wall"), not a per-pixel map, so it cannot
# > tell the model where exactly an edge is. XLabs' `flux-ip-adapter-v2` was trained on FLUX.1 [dev] with ordinary
# > RGB reference photos, not on Kontext and not on depth maps: to the adapter a depth map is an unusual grey
# > picture, and the LoRA (with `lora_ip_adapter=True`, its `to_k_ip` / `to_v_ip` too) has to learn what it
# > means. And the depth map describes the *context* scene, not the target: for "add a box" edits the box is not
# > in it. A signal per token is spatial: section 7 builds one (the project's default depth kind) beside the original
# > design's IP-Adapter, which stays available (`depth_kind="ip_adapter"`) and is measured beside it.

# %% [markdown]
# ## 6. The IP-Adapter scale
#
# The IP-Adapter's contribution is multiplied by a scale (`proc.scale` above; `pipe.set_ip_adapter_scale`).
# `kh.sample_edit(..., ip_adapter_scale=s)` sets it for one call. We sample the same edit with the same noise
# at several scales and measure how far the final latents move from the `s = 0` result.
#
# **Sampling, in one line.** `sample_edit` starts from pure noise at `sigma = 1` and walks the straight path
# back to `sigma = 0` in Euler steps: with the predicted velocity `v = model(x, sigma)`,
# `x <- x + (sigma_next - sigma) * v` (`FlowMatchEulerDiscreteScheduler.step`: `prev_sample = sample + dt *
# model_output`, `dt = sigma_next - sigma`, negative). Since `v` estimates `noise - x_0`, each step removes a little
# noise; notebook 05 writes the whole loop by hand and checks it against `sample_edit`.

# %%
sample_kw = dict(height=RESOLUTION, width=RESOLUTION, num_inference_steps=NUM_INFERENCE_STEPS,
                 max_sequence_length=MAX_SEQUENCE_LENGTH, output_type="latent")
latents = {}
for s in IP_SCALES:
    latents[s] = kh.sample_edit(pipe, item["context"], item["prompt"], depth=depth_pil, ip_adapter_scale=s,
                                generator=torch.Generator().manual_seed(SEED), **sample_kw)  # [B, N, 4C]
no_depth_latents = kh.sample_edit(pipe, item["context"], item["prompt"],
                                  generator=torch.Generator().manual_seed(SEED), **sample_kw)  # [B, N, 4C]
print("sampled latents", tuple(latents[IP_SCALES[0]].shape))  # [B, N, 4C]
ref = latents[0.0]
moves = {s: (latents[s] - ref).abs().float().mean().item() for s in IP_SCALES}
for s in IP_SCALES:
    print(f"scale {s:.1f}: mean |latents - latents(scale 0)| = {moves[s]:.4f}")
print(f"scale 0 vs no depth at all: max |diff| = {(ref - no_depth_latents).abs().max().item():.1e}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), width_ratios=[1.3, 1], layout="constrained")
axes[0].bar([f"s = {s:g}" for s in IP_SCALES], [moves[s] for s in IP_SCALES], color="tab:purple")
axes[0].set_ylabel("mean |latents - latents(s = 0)|")
axes[0].set_title("distance from the s = 0 result", fontsize=9)
top_scale = IP_SCALES[-1]
move_map = (latents[top_scale] - ref).abs().float().mean(-1).reshape(h_tok, w_tok).cpu()  # [N] -> [H', W']
im = show_grid(axes[1], move_map, f"per token, s = {top_scale:g} vs s = 0", cmap="magma", vmin=0,
               vmax=move_map.max().item())
fig.colorbar(im, ax=axes[1], shrink=0.8)
fig.suptitle("The scale multiplies the adapter's output: s = 0 is exactly 'no depth'; how far the result moves is "
             "measured, not promised")
plt.show()

# %% [markdown]
# `s = 0` gives bit for bit the result without depth: the adapter's output is multiplied by zero. How far the
# result moves depends on how much the model learned to use depth. `docs/tiny_model.md` measures it on the tiny
# model (`python scripts/tiny_editor_report.py` writes `docs/tiny_model_figures.json`; the next cell reads it), and
# section 5 says why an IP-Adapter can do little (one position-free embedding that repeats what the context shows).
# Read the figure above as the size of the adapter's push, not as proof that depth steers the edit.

# %%
with open(os.path.join(ROOT, "docs", "tiny_model_figures.json")) as f:
    tiny_figures = json.load(f)  # the tiny model's one-pair LoRAs, and its base from a blank context
on_off = {key: [r["lora"][key] - r["lora_no_depth"][key] for r in tiny_figures["lora"]]
          for key in ("psnr_in_vs_target", "psnr_out_vs_context")}
blank = [r["depth_db"] - r["no_depth_db"] for r in tiny_figures["depth_alone"]]
own_scene = sum(r["depth_nearest"] == r["pair"] for r in tiny_figures["depth_alone"])
print(f"tiny model, depth on vs off: {min(on_off['psnr_in_vs_target']):+.2f} to "
      f"{max(on_off['psnr_in_vs_target']):+.2f} dB inside the mask and {min(on_off['psnr_out_vs_context']):+.2f} to "
      f"{max(on_off['psnr_out_vs_context']):+.2f} dB outside ({len(tiny_figures['lora'])} one-pair LoRAs); from a "
      f"blank context {min(blank):+.2f} to {max(blank):+.2f} dB, and the output is nearest its own scene in "
      f"{own_scene} of {len(blank)} with depth")

# %% [markdown]
# ## 7. Depth that knows where: one depth patch per token
#
# Section 5's road ends in one vector per depth map, and the tokens it becomes carry no position. So a depth map
# can say *what kind of* scene this is, but not *where* a thing is. We test that directly: two depth maps that
# differ only in where a near box sits (left or right). For each, we measure how much every target token's
# prediction moves, once through the IP-Adapter and once through a signal that adds each token's own depth patch to
# that token (built below). Where does the change land?

# %%
def box_depth(col0: int) -> torch.Tensor:
    """A far floor (a ramp, near at the bottom) with one near box, a quarter of the image wide, from column col0."""
    d = torch.linspace(0.1, 0.5, RESOLUTION)[:, None].expand(RESOLUTION, RESOLUTION).clone()  # [H, W]
    q = RESOLUTION // 4
    d[q: 2 * q, col0: col0 + q] = 0.95  # near = bright
    return d[None]  # [H, W] -> [1, H, W]


depth_boxes = {"box left": box_depth(RESOLUTION // 8), "box right": box_depth(5 * RESOLUTION // 8)}
demo_depth = kh.DepthTokenEmbedding(C_IN).to(DEVICE)  # the position-aware module, zero at the start
with torch.no_grad():
    g = torch.Generator().manual_seed(SEED)  # demo weights: a random projection, so an untrained module shows an effect
    demo_depth.proj.weight.copy_(torch.randn(demo_depth.proj.weight.shape, generator=g) * 0.05)
    box_tokens = {}
    change = {"IP-Adapter": {}, "depth tokens": {}}
    for name, d in depth_boxes.items():
        box_tokens[name] = kh.mask_to_token_grid((d > 0.9).float()[None], h_tok, w_tok)[0, 0].bool()  # [H', W']
        ip = kh.encode_depth_for_ip_adapter(pipe, d)  # [[B, 1, E]]: one vector for the whole map
        with_ip = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, None, **fwd, ip_adapter_image_embeds=ip)
        feats = kh.depth_token_features(d, h_tok, w_tok).to(DEVICE)  # [B, N, 256]: each token's own patch
        offset, ctx_offset = kh.depth_inputs(demo_depth, feats)  # [B, N, 4C] each
        with_tokens = kh.kontext_forward(pipe.transformer, noisy + offset.to(noisy), ctx_tok + ctx_offset.to(ctx_tok),
                                         None, **fwd, joint_attention_kwargs=no_depth)
        for kind, pred in (("IP-Adapter", with_ip), ("depth tokens", with_tokens)):
            change[kind][name] = (pred - pred_plain).abs().float().mean(-1).reshape(h_tok, w_tok).cpu()  # [H', W']
follows = {}
for kind, maps in change.items():
    names = list(maps)  # "box left", "box right"
    own = [float(maps[n][box_tokens[n]].sum() / maps[n].sum()) for n in names]  # on the box this map holds
    other = [float(maps[n][box_tokens[o]].sum() / maps[n].sum()) for n, o in zip(names, names[::-1])]  # the other
    follows[kind] = all(a > b for a, b in zip(own, other))
    print(f"{kind:<13} share of the change on the box's own tokens: left map {own[0]:.0%} (on the right box's "
          f"{other[0]:.0%}), right map {own[1]:.0%} (on the left box's {other[1]:.0%}); each box covers "
          f"{box_tokens['box left'].float().mean():.0%} of the tokens")

# %%
fig, axes = plt.subplots(2, 3, figsize=(11, 7), layout="constrained")
for row, (kind, maps) in enumerate(change.items()):
    axes[row, 0].imshow(depth_boxes["box left" if row == 0 else "box right"][0], cmap="gray", vmin=0, vmax=1)
    axes[row, 0].set_title(f"a depth map ({'box left' if row == 0 else 'box right'})", fontsize=9)
    axes[row, 0].set_axis_off()
    vmax = max(m.max().item() for m in maps.values())
    for col, (name, m) in enumerate(maps.items(), start=1):
        im = show_grid(axes[row, col], m, f"{kind}, {name}:\n|prediction change| per token", cmap="magma", vmin=0,
                       vmax=vmax)
        axes[row, col].contour(np.arange(RESOLUTION), np.arange(RESOLUTION), depth_boxes[name][0] > 0.9,
                               levels=[0.5], colors="cyan", linewidths=1)
    fig.colorbar(im, ax=axes[row, 1:], shrink=0.8)
verdict = {kind: "moves with the box" if moved else "does not follow the box" for kind, moved in follows.items()}
fig.suptitle(f"Move the near box (cyan): through the IP-Adapter the change {verdict['IP-Adapter']}; through depth "
             f"tokens it {verdict['depth tokens']}")
plt.show()

# %% [markdown]
# The printed shares say whether each change map follows the box. The IP-Adapter's few depth tokens are the same
# for every image token (their keys carry no position, section 5), so whatever it changes, it can only follow the
# image, not the box; the per-token signal puts each token's own depth on that token. The held-out depth scenes
# (`scripts/depth_heldout.py`, notebook 05) measure the same difference after training, and chose the project's
# default depth signal: the one below.
#
# **The depth signal from first principles.** One image token covers a 16x16 pixel patch (VAE 8x, 2x2 packing).
# `kh.depth_token_features(depth, h_tok, w_tok)` resizes the map to `16 H' x 16 W'` pixels, maps `[0, 1]` to
# `[-1, 1]` (as images enter the VAE), and cuts it into patches with `F.pixel_unshuffle(d, 16)`: `[B, 1, 16H', 16W']
# -> [B, 256, H', W'] -> [B, N, 256]`, token `n` holding the 256 depth values of its own patch, in the packing's
# row-major order. `kh.DepthTokenEmbedding` maps each token's 256 values to a `[4C]` offset with one linear layer
# `proj` (weight and bias **zero** at the start), added to the noisy target token at every step and to the context
# token at the same place.
#
# Why zero, and why an addition: BFL's FLUX.1 Depth [dev] feeds its depth latents by **concatenating** them to the
# target tokens' channels (diffusers' `FluxControlPipeline.__call__`: `torch.cat([latents, control_image], dim=2)`)
# and widens `x_embedder` from 64 to 128 inputs; diffusers' `examples/flux-control` training script starts the new
# columns at zero, so training starts at the base model. `x_embedder([x | f]) = W_x x + W_f f + b`. Adding
# `o = P f + b_p` before `x_embedder` gives `W_x x + W_x (P f + b_p) + b`: the same form, with the frozen `W_x`
# and a learned `P` instead of a new `W_f`, and no change to the transformer's shape (so the LoRA, the adapter
# files and ComfyUI's Flux stay as they are). With `P = 0` it adds exactly nothing.

# %%
depth_map = item["depth"][None]  # [B, 1, H, W], this pair's depth
feats = kh.depth_token_features(depth_map, h_tok, w_tok)  # [B, N, 256]
print("depth map      ", tuple(depth_map.shape))  # [B, 1, H, W]
print("depth features ", tuple(feats.shape), f"({h_tok}x{w_tok} tokens x 16x16 px)")  # [B, N, 256]
token = int(feats[0].std(dim=-1).argmax())  # the token whose patch varies most: an object's edge
patch = feats[0, token].reshape(16, 16)  # [256] -> [16, 16]: back to its pixels
row, col = divmod(token, w_tok)
by_hand = depth_map[0, 0, 16 * row: 16 * row + 16, 16 * col: 16 * col + 16] * 2 - 1  # the same pixels, [-1, 1]
if RESOLUTION == 16 * h_tok:  # at the grid's own size no resizing happens: the patch is the pixels themselves
    torch.testing.assert_close(patch, by_hand, msg="token n's features are its own 16x16 depth pixels")
zero_module = kh.DepthTokenEmbedding(C_IN).to(DEVICE)  # weight and bias at zero, as training starts
with torch.no_grad():
    offset, ctx_offset = kh.depth_inputs(zero_module, feats.to(DEVICE))
    pred_zero = kh.kontext_forward(pipe.transformer, noisy + offset.to(noisy), ctx_tok + ctx_offset.to(ctx_tok), None,
                                   **fwd, joint_attention_kwargs=no_depth)
print(f"untrained depth module vs no depth: max |prediction difference| = "
      f"{(pred_zero - pred_plain).abs().max().item():.1e} (training starts at the base model)")

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), width_ratios=[1, 1, 2.2], layout="constrained")
axes[0].imshow(depth_map[0, 0], cmap="gray", vmin=0, vmax=1)
axes[0].add_patch(plt.Rectangle((16 * col - 0.5, 16 * row - 0.5), 16, 16, fill=False, color="orange", lw=2))
axes[0].set_title(f"depth map, token ({row}, {col}) in orange", fontsize=9)
axes[1].imshow(patch.cpu(), cmap="gray", vmin=-1, vmax=1)
axes[1].set_title("its 256 features, as 16x16", fontsize=9)
axes[2].imshow(feats[0].cpu().T, cmap="gray", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
axes[2].axvline(token, color="orange", lw=1)
axes[2].set_xlabel("token n (row-major, the packing's order)")
axes[2].set_ylabel("feature (pixel 16 y + x)")
axes[2].set_title(f"all depth features [N = {feats.shape[1]}, 256]", fontsize=9)
for ax in axes[:2]:
    ax.set_axis_off()
fig.suptitle("Each token gets the depth of its own 16x16 patch: the position is in which token it goes to")
plt.show()

# %% [markdown]
# Which depth map to give is a choice of the training data (`TrainConfig.depth_source`): the **context's** depth says
# how far each part of the scene is (good for appearance that depends on distance, such as fog or blur), the
# **desired result's** depth says what geometry the edit should produce ("add a box *here*, this big", "make it
# *this* shape"), which the prompt cannot say. Notebook 05 measures both on held-out scenes where only the depth map
# can tell.

# %% [markdown]
# ## 8. The loss in pictures
#
# With `x_t = (1 - sigma) x_0 + sigma * noise`, flow matching predicts the velocity `v = noise - x_0`.
# `kh.fm_masked_dual_loss_with_l2` splits the tokens by the max-pooled mask:
#
# - **inside** (mask 1): `(pred - (noise - target))^2`, the velocity that leads to the **target**: learn the
#   edit;
# - **outside** (mask 0): `((noise - pred) - context)^2 = (pred - (noise - context))^2`, the velocity error
#   against the flow to the **context**: keep the rest of the image;
# - plus small L2 terms on the region module and the LoRA weights.
#
# Here is one full training forward (the original design's region token and the IP-Adapter's depth) and its loss,
# token by token.

# %%
with torch.no_grad():
    pred = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(m_small), **fwd,
                              ip_adapter_image_embeds=ip_embeds)  # [B, N, 4C]
    loss, parts = kh.fm_masked_dual_loss_with_l2(pred, tgt_tok, ctx_tok, noise, m_small, h_tok, w_tok,
                                                 region_token_module=region, return_parts=True)
print("prediction", tuple(pred.shape))  # [B, N, 4C]
print(f"loss {loss.item():.4f} = in {parts['loss_in']:.4f} + out {parts['loss_out']:.4f} "
      f"+ 1e-4 x L2(region) {parts['l2_region']:.1f}")

# by hand, in float32 like the helper (the real model predicts in bf16)
p32, e32, tgt32, ctx32 = pred.float(), noise.float(), tgt_tok.float(), ctx_tok.float()  # [B, N, 4C] each
inside = m_small.reshape(N).bool().cpu()  # [B, 1, H', W'] -> [N], same order as the packed tokens
se_in = (p32 - (e32 - tgt32)).pow(2).mean(-1)[0].cpu()  # [N]: error to the target velocity
se_out = ((e32 - p32) - ctx32).pow(2).mean(-1)[0].cpu()  # [N]: error to the context
print(f"by hand: in {se_in[inside].mean():.4f}, out {se_out[~inside].mean():.4f} (the same means as the loss)")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
show_grid(axes[0], m_small[0, 0].cpu(), "mask on the token grid (max)\nwhite: in-mask term, black: out-of-mask")
vmax = max(se_in[inside].max().item(), se_out[~inside].max().item())
im = show_grid(axes[1], np.where(inside, se_in, np.nan).reshape(h_tok, w_tok),
               "inside: (pred - (noise - target))^2\nvelocity towards the target", cmap="viridis", vmin=0, vmax=vmax)
show_grid(axes[2], np.where(~inside, se_out, np.nan).reshape(h_tok, w_tok),
          "outside: ((noise - pred) - context)^2\nflow towards the context", cmap="viridis", vmin=0, vmax=vmax)
fig.colorbar(im, ax=axes[1:], shrink=0.8, label="squared error per token (mean over 4C)")
fig.suptitle("Every token is scored once: against the target inside the mask, against the context outside "
             "(untrained: large everywhere)")
plt.show()

# %% [markdown]
# **What the outside term is.** It is written `((noise - pred) - context)^2`, but `noise - pred` is not the model's
# clean estimate (that is `x_t - sigma * pred`, and the model never sees `noise` alone). Since `(noise - pred) -
# context = (noise - context) - pred`, the term is **exactly the velocity MSE against `noise - context`**: outside
# the mask the model is trained to flow to the context, the same kind of target as inside:
#
# > The original design called it an identity penalty on a reconstructed latent:
# > [design note 4](../docs/design.md#4-outside-mask-term).

# %%
out = (~inside).to(pred.device)  # [N] True outside the mask
identity_term = ((e32 - p32) - ctx32).pow(2)[0, out].mean().item()  # the original design's form
velocity_mse = (p32 - (e32 - ctx32)).pow(2)[0, out].mean().item()  # velocity towards the context
print(f"{'identity term (noise - pred) vs context':<44}{identity_term:.8f}")
print(f"{'velocity MSE against noise - context':<44}{velocity_mse:.8f}")
print(f"{'difference':<44}{identity_term - velocity_mse:.1e}  (floating-point rounding)")
print(f"{'loss_out from the helper':<44}{parts['loss_out']:.8f}")

# %% [markdown]
# > **What the two terms add up to.** When the target equals the context outside the mask (the usual edit
# > pair; in latents only nearly, see below), the outside target `noise - context` is `noise - target` there: both
# > terms ask for the same
# > flow-matching velocity, and the dual loss is plain flow matching with a weight per token. Each term is a mean
# > over its own tokens, so an in-mask token weighs `w_in / N_in` and an outside token `w_out / N_out`. The
# > smaller the mask, the heavier each of its tokens: for this pair,

# %%
n_in, n_out = int(inside.sum()), int((~inside).sum())
print(f"{n_in} tokens inside, {n_out} outside: one inside token weighs {(1 / n_in) / (1 / n_out):.1f}x an outside "
      f"token (w_in = w_out = 1); plain flow matching would weigh them equally, 1 / {n_in + n_out} each")

# %% [markdown]
# **Equal in pixels, not quite in latents.** The pair's target equals its context outside the mask *in pixels*
# (up to the few pixels that resizing to `RESOLUTION` blurs across the mask's edge).
# The VAE's encoder sees a neighbourhood around every latent position (its convolutions) and, through the
# self-attention of its middle block (`AutoencoderKL`'s `mid_block_add_attention`, on for Flux's VAE and the tiny
# one), the whole image. So a change inside the mask also moves the latents of tokens outside it: there the outside
# term asks for the context's latents while the target's differ a little. The figure shows `|target tokens - context
# tokens|` per token, with the mask; the cell prints the leak in the tokens next to the max-pooled mask and in those
# farther out.

# %%
leak = (tgt_tok - ctx_tok).abs().float().mean(-1)[0].reshape(h_tok, w_tok).cpu()  # [B, N, 4C] -> [H', W']
pixel_change = (item["target"] - item["context"]).abs().amax(0)  # [3, H, W] -> [H, W]
outside_tokens = m_max[0, 0] == 0  # [H', W'] tokens the loss keeps like the context
grown = torch.nn.functional.max_pool2d(m_max[0], 3, stride=1, padding=1)[0] > 0  # [1, H', W'] -> [H', W']: + 1 token
ring, farther = outside_tokens & grown, outside_tokens & ~grown  # outside tokens next to the mask, and the rest
pixels_out = int((pixel_change[item["mask"][0] < 0.5] > 0).sum())
print(f"pixels changed outside the mask: {pixels_out}; mean |target - context| per token: inside "
      f"{leak[~outside_tokens].mean():.4f}, outside next to the max-pooled mask {leak[ring].mean():.4f} "
      f"({int(ring.sum())} tokens), farther out {leak[farther].mean():.4f} ({int(farther.sum())} tokens)")
fig, axes = plt.subplots(1, 2, figsize=(9, 4), layout="constrained")
show_grid(axes[0], pixel_change.float(), "|target - context| in pixels", cmap="magma", vmin=0, vmax=1)
im = show_grid(axes[1], leak, "|target - context| per token (latents)", cmap="magma", vmin=0,
               vmax=leak.max().item())
for ax in axes:
    ax.contour(np.arange(RESOLUTION), np.arange(RESOLUTION), mask[0, 0], levels=[0.5], colors="cyan",
               linewidths=1)
fig.colorbar(im, ax=axes[1], shrink=0.8)
fig.suptitle(f"Outside the mask (cyan) the target differs from the context in {pixels_out} pixels; in latents "
             f"the tokens next to the max-pooled mask differ by {leak[ring].mean():.3f}, farther ones by "
             f"{leak[farther].mean():.3f}")
plt.show()

# %% [markdown]
# Max pooling (section 1) does not remove this leak: it makes a token editable when one of its *pixels* is, and the
# leaking tokens hold no edited pixel, so they stay outside, where the outside term asks for the context's latents.
# Compare the leak outside with the inside difference the printout gives: it is the size of target the outside term
# gets wrong. `preservation="prior"` (notebook 04's settings) asks for the base model's own prediction outside the
# mask instead of the context's latents.

# %% [markdown]
# **Which timesteps to train on.** The transformer takes `timestep = sigma` in `[0, 1]` with shape `[B]` (the
# pipeline passes `t / 1000`), not `t` in `[0, 1000]`. Once `set_timesteps` has run (any sampling runs it),
# `scheduler.sigmas` ends with the terminal `sigma = 0`. There `x_t` is the clean target and holds no trace of the
# noise, so the velocity `noise - x_0` cannot be predicted: such steps only add noise to the gradients.
# `kh.sample_sigmas` draws from the 1000 training sigmas `k / 1000`, `k = 1..1000`: never 0.
#
# > The original design sampled from `scheduler.sigmas`: [design note 5](../docs/design.md#5-timesteps).

# %%
from diffusers import FlowMatchEulerDiscreteScheduler

scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # a copy: the pipeline's stays
# 4 steps with the pipeline's sigmas; mu is Flux's resolution-dependent shift (any value shows the point)
scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=1.0)
print("the scheduler's sampling sigmas end with the terminal 0:", [round(s, 3) for s in scheduler.sigmas.tolist()])

draws = {}
for mode in ("uniform", "logit_normal"):
    config = kh.TrainConfig(timestep_sampling=mode)
    draws[mode] = kh.sample_sigmas(SIGMA_DRAWS, config, torch.Generator().manual_seed(SEED))  # [B]
    print(f"{mode:>12}: shape {tuple(draws[mode].shape)}, min {draws[mode].min():.3f}, "
          f"max {draws[mode].max():.3f}, draws of 0: {(draws[mode] == 0).sum().item()}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True, layout="constrained")
for ax, (mode, values) in zip(axes, draws.items()):
    ax.hist(values.numpy(), bins=50, range=(0, 1), color="tab:green")
    ax.axvline(0, color="red", lw=2)
    ax.set_xlabel("sigma (= the transformer's timestep)")
    ax.set_title(f'TrainConfig(timestep_sampling="{mode}")', fontsize=9)
axes[0].set_ylabel(f"count of {SIGMA_DRAWS:,} draws")
zeros = sum(int((values == 0).sum()) for values in draws.values())
fig.suptitle(f"Training sigmas: uniform covers (0, 1] evenly, logit-normal favours the middle; draws of the "
             f"terminal 0 (red) in {2 * SIGMA_DRAWS:,}: {zeros}")
plt.show()

# %% [markdown]
# ## Exercises
#
# Each exercise asks for one function. Write it in its cell in place of the `raise NotImplementedError(...)` line
# and run the cell: the check below your function calls it on inputs of its own, compares the result with
# diffusers' or the package's own function, and names the first shape or value that differs (and where). Until you
# fill a cell in, its check stops with a message, so "Run all" stops at the first exercise you have not done yet.
# Stuck? `kh.exercises.show_solution("token_grid")` prints one solution (any exercise's name works).
#
# ### Exercise 3.1: the mask on the token grid
#
# Write `token_grid(mask, h_tok, w_tok, mode)` for a `[B, 1, H, W]` mask whose sides are multiples of the grid, with
# one `reshape` and one reduction, no pooling function (section 1): `mode="area"` gives each token its editable
# fraction, `mode="max"` marks a token editable when any of its pixels is. The result is `[B, 1, H', W']`. The
# check compares both modes with `kh.mask_to_token_grid` on a mask that does not line up with the tokens.

# %%
def token_grid(mask, h_tok, w_tok, mode):
    # mask [B, 1, H, W] -> [B, 1, H', W']
    raise NotImplementedError("your code here")


kh.exercises.check_token_grid(token_grid)

# %% [markdown]
# ### Exercise 3.2: flow matching, `x_t` and the velocity
#
# Write `flow_matching(x0, noise, sigma)` for clean latents and noise `[B, N, 4C]` and one `sigma` per sample `[B]`:
# return `x_t`, the point at `sigma` on the straight line from `x0` (`sigma = 0`) to the noise (`sigma = 1`), and
# the velocity `v = d x_t / d sigma` the transformer learns to predict. The check compares `x_t` with diffusers'
# forward process, `FlowMatchEulerDiscreteScheduler.scale_noise`, and `v` with its derivative.

# %%
def flow_matching(x0, noise, sigma):
    # x0, noise [B, N, 4C], sigma [B] -> (x_t [B, N, 4C], v [B, N, 4C])
    raise NotImplementedError("your code here")


kh.exercises.check_flow_matching(flow_matching)

# %% [markdown]
# ### Exercise 3.3: the masked loss
#
# Write `masked_loss(pred_v, tgt, ctx, noise, mask_tok)` for the predicted velocity, the target's and the context's
# tokens and the noise, all `[B, N, 4C]`, and the mask on the token grid `[B, 1, H', W']` (0 and 1, or area
# fractions). Return `(loss_in, loss_out)` (section 8): inside, the squared error of `pred_v` to the target's
# velocity; outside, to the context's velocity `noise - ctx`; each the mean over its tokens (weighted by the mask, or
# by `1 - mask`) and all `4C` channels. The check compares them with the `loss_in` and `loss_out` of
# `kh.fm_masked_dual_loss_with_l2`.

# %%
def masked_loss(pred_v, tgt, ctx, noise, mask_tok):
    # pred_v, tgt, ctx, noise [B, N, 4C], mask_tok [B, 1, H', W'] -> (loss_in, loss_out)
    raise NotImplementedError("your code here")


kh.exercises.check_masked_loss(masked_loss)

# %% [markdown]
# ## Recap
#
# - The pixel mask goes onto the `H' x W'` token grid with **max pooling**: a token touching the edit is
#   editable, so the loss never asks an edited pixel to stay like the context.
# - The default region signal adds one learned vector `m * e` to every masked target and context token, in
#   place: a learned mask channel (as FLUX.1 Fill feeds its mask), zero at the start, any resolution.
# - The original design's `MaskRegionToken` is one linear layer, `[B, 1, H', W'] -> [B, 1, 4C]`, appended with
#   id `(2, 0, 0)`; unlike its fixed `Linear(H'*W' -> C)` it pools a mask from any resolution to its own grid,
#   and it changes every target token a little, not the masked ones in particular.
# - Depth travels depth map -> CLIP image processor -> CLIP image encoder `[B, E]` -> `[[B, 1, E]]` ->
#   image projection (a few text-width tokens) -> `to_k_ip` / `to_v_ip` in each double block, times a scale
#   (`0` = no depth). Encoders stay frozen, and the embeddings are computed once per sample and cached.
# - That embedding carries no position: its depth tokens are the same for every image token. The default depth
#   signal (`kh.DepthTokenEmbedding`) gives each token its own 16x16 depth patch (`kh.depth_token_features`,
#   `[B, N, 256]`) through a projection that starts at zero, so what it changes can follow the box (section 7
#   measures where each change lands).
# - The loss scores inside-mask tokens against the target velocity and outside-mask tokens against the
#   context; the outside term is a velocity MSE against `noise - context`, and training sigmas lie in `(0, 1]`.
#
# ## Next
#
# [04_training.ipynb](04_training.ipynb) puts all of this in a loop: `kh.train` caches prompts, latents, masks
# and depth features once, attaches the LoRA, trains it together with the region module while a live
# plot shows the in-mask and out-of-mask losses, and saves the adapter to `OUTPUT_DIR/adapter`.
