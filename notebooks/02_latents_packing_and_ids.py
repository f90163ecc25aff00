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
# # 02 · Latents, 2x2 packing and position ids
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/kontext-region-lora/blob/main/notebooks/02_latents_packing_and_ids.ipynb)
#
# **What you will learn**
# - how an image becomes Flux latents: `[B, 3, H, W] -> [B, C, H/8, W/8]`, and why the VAE's **shift** matters;
# - how 2x2 latent patches become tokens `[B, N, 4C]`, in exactly the order the pipeline uses, and back;
# - why image sides must be multiples of 16 pixels;
# - the position ids `(type, row, col)` of the sequence `[noisy target | context]` (and of the original design's
#   extra region token), and how they sit next to the text tokens;
# - how latents decode back to an image.
#
# Runs in seconds on a laptop CPU with the tiny model, or on a Colab GPU with FLUX.1 Kontext [dev].
#
# **The code behind it:** [`kontext_helpers/latents.py`](../kontext_helpers/latents.py): latents, packing and ids, each
# function beside the `FluxKontextPipeline` method it mirrors.

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
RESOLUTION = 128 if TINY else PRESET.resolution  # image side, a multiple of 16: 128 px -> 16x16 latents -> 8x8 tokens
OUTPUT_DIR = os.environ.get("KONTEXT_OUTPUT_DIR", os.path.join(ROOT, "outputs"))  # results (Colab: a Drive folder)
SEED = 0  # every random draw of this notebook
PAIR = 3  # the sample pair used throughout (3 = "turn the red box into a sphere")
MAX_SEQUENCE_LENGTH = 64 if TINY else PRESET.max_sequence_length  # text tokens T per prompt (Kontext: 512)
SHOW_CHANNELS = 4  # how many of the C latent channels section 1 draws

torch.manual_seed(SEED)
os.makedirs(OUTPUT_DIR, exist_ok=True)

# %% [markdown]
# We load the pipeline once. On the tiny path this builds a complete, small `FluxKontextPipeline` offline in about a
# second, with the weights shipped in the package (`docs/tiny_model.md` says how they were trained); on a GPU it is
# FLUX.1 Kontext [dev] from the Hub. This notebook only needs its VAE and a few of its (static) helper functions, but
# they are the pipeline's own, so everything we compute can be checked against it. On the real model `vae_only=True`
# loads the VAE and the scheduler alone (about 170 MB), not the 12B transformer and T5-XXL: the notebook runs on any
# GPU.

# %%
pipe = kh.load_pipeline(MODEL, vae_only=not TINY)  # the real model: VAE and scheduler only
vae = pipe.vae
print(type(pipe).__name__, "| VAE on", vae.device, vae.dtype)
print("latent channels C:", vae.config.latent_channels, "| VAE downsampling:", pipe.vae_scale_factor,
      "| channels of a packed token (4C):", 4 * vae.config.latent_channels)
print("scaling_factor:", vae.config.scaling_factor, "| shift_factor:", vae.config.shift_factor)

# %% [markdown]
# ## 1. From pixels to latents
#
# The dataset gives images in `[0, 1]`; the VAE wants `[-1, 1]` (`kh.normalize_01_to_m11`). Its encoder shrinks
# each side 8 times and turns 3 colour channels into `C = 16` latent channels. `kh.to_latents` then applies
# Flux's normalisation, `z = (vae_output - shift_factor) * scaling_factor`, exactly as
# `FluxKontextPipeline._encode_vae_image` does.

# %%
data = kh.KontextPairs(DATA_ROOT, resolution=RESOLUTION)
item = data[PAIR]
x01 = item["context"][None]  # [3, H, W] -> [B, 3, H, W] with B = 1, values in [0, 1]
x = kh.normalize_01_to_m11(x01)  # [B, 3, H, W] in [-1, 1]
print("image  ", tuple(x.shape), f"range [{x.min().item():.2f}, {x.max().item():.2f}]")  # [B, 3, H, W]

with torch.no_grad():
    lat = kh.to_latents(x, vae)  # [B, 3, H, W] -> [B, C, H_l, W_l], H_l = H / 8
print("latents", tuple(lat.shape), lat.dtype)  # [B, C, H_l, W_l]

# %% [markdown]
# **Why a shift and a scale?** Flux is trained and samples by *flow matching* (notebook 03 teaches it): the clean
# latent `x_0` is mixed with Gaussian noise `e` at a noise level `s` in `(0, 1]`, giving the noisy latent
# `x_t = (1 - s) x_0 + s e`, and sampling starts from pure `e ~ N(0, 1)` at `s = 1`. That only works well when the
# clean latents live on the same scale as the noise: mean near 0, spread near 1. The raw VAE output does not
# (FLUX.1's VAE config gives its mean as `shift_factor = 0.1159` and its spread as `1 / scaling_factor`,
# `scaling_factor = 0.3611`), so `to_latents` subtracts the one and multiplies by the other. The tiny model's VAE
# has its own two numbers, set from its latents' mean and spread when it was trained (`docs/tiny_model.md`,
# step 2). The next cell prints where they bring this image.

# %%
with torch.no_grad():
    raw = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode().float()  # [B, C, H_l, W_l], before Flux's step
print(f"raw VAE output: mean {raw.mean():+.3f}, std {raw.std():.3f}   after shift and scale: mean "
      f"{lat.float().mean():+.3f}, std {lat.float().std():.3f}   (noise: mean 0, std 1)")

# %% [markdown]
# Leave the shift out (scale only, `vae.encode(x).latent_dist.mode() * scaling_factor`) and every latent value is
# off by the same constant, `shift x scale`: the context tokens a LoRA (the small trained update this course adds
# to the transformer; notebook 03 defines it) is trained on are then not the ones the pipeline feeds it when you
# edit, and decoding a prediction adds the shift back on top. Below: scale-only latents, ours, and the pipeline's
# own encoder.
#
# > The original design scaled only: [design note 1](../docs/design.md#1-latent-shift).

# %%
with torch.no_grad():
    # the original design: scale only, no shift
    design_lat = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
    pipe_lat = pipe._encode_vae_image(x.to(vae.device, vae.dtype), generator=None)  # the pipeline's own encoder
offset = (lat - design_lat).float()
expected = -vae.config.shift_factor * vae.config.scaling_factor
print("ours == pipe._encode_vae_image (bit for bit):", torch.equal(lat, pipe_lat))
print("original design == pipe._encode_vae_image:   ", torch.equal(design_lat, pipe_lat))
print(f"ours - original design: mean {offset.mean().item():+.5f}, spread {(offset.max() - offset.min()).item():.1e} "
      f"(-shift x scale = {expected:+.5f}: the same constant on every value)")

# %%
import numpy as np

lat_np, design_np = lat[0].float().cpu().numpy(), design_lat[0].float().cpu().numpy()  # [C, H_l, W_l]
fig, axes = plt.subplots(1, SHOW_CHANNELS + 2, figsize=(3.1 * (SHOW_CHANNELS + 2), 3.8), layout="constrained")
axes[0].imshow(x01[0].permute(1, 2, 0).numpy())
axes[0].set_title(f"image {RESOLUTION}x{RESOLUTION}")
vmax = float(np.abs(lat_np[:SHOW_CHANNELS]).max())  # one symmetric colour scale: red > 0 > blue
for c in range(SHOW_CHANNELS):
    axes[c + 1].imshow(lat_np[c], cmap="coolwarm", vmin=-vmax, vmax=vmax)
    axes[c + 1].set_title(f"latent channel {c} ({lat_np.shape[1]}x{lat_np.shape[2]})")
for ax in axes[: SHOW_CHANNELS + 1]:
    ax.set_axis_off()
bins = torch.linspace(float(min(lat_np.min(), design_np.min())), float(max(lat_np.max(), design_np.max())), 60).numpy()
axes[-1].hist(design_np.ravel(), bins=bins, alpha=0.6, label="original design (scale only)")
axes[-1].hist(lat_np.ravel(), bins=bins, alpha=0.6, label="ours = pipeline")
axes[-1].set_title(f"all latent values: offset {offset.mean().item():+.3f}")
axes[-1].legend(fontsize="small")
fig.suptitle(f"Latents: {lat_np.shape[0]} channels at 1/8 of the image side; the original design's values all sit "
             f"{-offset.mean().item():.3f} higher than the pipeline's"
             + (f" (tiny model, {RESOLUTION} px)" if TINY else ""))
plt.show()

# %% [markdown]
# The channels look like blurred, recoloured versions of the image (on the tiny model too: its small VAE was
# trained on scenes like these; section 4 measures how well it gives the image back). The lesson is the shape
# `[B, C, H/8, W/8]` and that our latents are the pipeline's, bit for bit.
#
# ## 2. Packing: 2x2 latent patches become tokens
#
# The Flux transformer does not see a latent image; it sees a **sequence of tokens**. Each token is one 2x2
# patch of the latent grid, all `C` channels of its 4 cells: `4C = 64` features. So one token covers 2x2 latent
# cells = 16x16 image pixels, and a `H x W` image gives `N = (H/16) x (W/16)` tokens.

# %%
tokens, (h_tok, w_tok) = kh.pack_like_pipeline(lat)  # [B, C, H_l, W_l] -> [B, N, 4C]
print("latents", tuple(lat.shape), "-> tokens", tuple(tokens.shape), f"on a {h_tok}x{w_tok} token grid")
b, c, h_l, w_l = lat.shape
print("== pipe._pack_latents (bit for bit):", torch.equal(tokens, pipe._pack_latents(lat, b, c, h_l, w_l)))

# %% [markdown]
# **Why 2x2 patches?** Attention costs grow with the square of the sequence length. Packing 2x2 cells into one
# token makes the sequence 4 times shorter (16 times less attention work) at no loss: the 4 cells' channels are
# all kept, side by side. The transformer's first layer, `x_embedder`, is then a single `Linear(4C -> D)` that
# lifts each 64-feature token to the model width `D` (3072 on FLUX.1), the same idea as a ViT's patch embedding.

# %%
x_embedder = pipe.transformer.x_embedder if pipe.transformer is not None else None  # None: VAE-only load
print("x_embedder:", x_embedder if x_embedder is not None else "Linear(in_features=64, out_features=3072) on FLUX.1",
      f"| sequence: {h_l * w_l} latent cells -> {h_tok * w_tok} tokens")

# %%
step = RESOLUTION // h_tok  # pixels per token side: 16
fig, ax = plt.subplots(figsize=(6.5, 6.5))
ax.imshow(x01[0].permute(1, 2, 0).numpy())
for k in range(h_tok + 1):
    ax.axhline(k * step - 0.5, color="white", lw=0.6)
    ax.axvline(k * step - 0.5, color="white", lw=0.6)
label_every = max(1, h_tok // 8)  # on a big grid, number only some tokens
for r in range(0, h_tok, label_every):
    for col in range(0, w_tok, label_every):
        ax.text(col * step + step / 2, r * step + step / 2, str(r * w_tok + col), ha="center", va="center",
                fontsize=8, color="black", bbox=dict(boxstyle="round,pad=0.1", fc="white", alpha=0.6, lw=0))
ax.set_axis_off()
ax.set_title(f"One token = one {step}x{step}-pixel square: {h_tok}x{w_tok} = {h_tok * w_tok} tokens,\n"
             "numbered in row-major order (the sequence order)")
plt.show()

# %% [markdown]
# Which number goes where inside a token? We pack two small labelled latents (`C = 3`, a 6x8 grid) with the
# same function and look at the result:
#
# - one whose every cell holds the **number of its 2x2 patch**: after packing, row *n* of the token matrix
#   is all *n*. Token *n* is the *n*-th patch in row-major order: left-to-right neighbours are consecutive in
#   the sequence, the token below is `w_tok` positions later;
# - one whose cell holds `4c + 2*dy + dx` (channel `c`, position `(dy, dx)` inside the patch): after packing,
#   every row reads `0, 1, ..., 4C-1`. The features of a token are **channel-major**: channel 0's four
#   cells (top-left, top-right, bottom-left, bottom-right), then channel 1's, and so on.

# %%
toy_c, toy_h, toy_w = 3, 6, 8  # a small labelled latent: C = 3, H_l x W_l = 6 x 8 -> 3 x 4 tokens
rows, cols = torch.meshgrid(torch.arange(toy_h), torch.arange(toy_w), indexing="ij")  # [H_l, W_l] each
patch_id = ((rows // 2) * (toy_w // 2) + cols // 2).float()  # [H_l, W_l]: the number of each cell's 2x2 patch
toy_patch = patch_id.expand(1, toy_c, toy_h, toy_w)  # [B, C, H_l, W_l]: same label in every channel
toy_feature = (torch.arange(toy_c)[:, None, None] * 4 + (rows % 2) * 2 + cols % 2).float()[None]  # [B, C, H_l, W_l]
packed_patch, (th, tw) = kh.pack_like_pipeline(toy_patch)  # [B, N, 4C] = [1, 12, 12]
packed_feature, _ = kh.pack_like_pipeline(toy_feature)
print("toy latents", tuple(toy_patch.shape), "-> tokens", tuple(packed_patch.shape))
print("row n of the patch-labelled tokens is all n:",
      torch.equal(packed_patch[0], torch.arange(th * tw).float()[:, None].expand(-1, 4 * toy_c)))
print("every token's features read 0..4C-1:",
      torch.equal(packed_feature[0], torch.arange(4 * toy_c).float().expand(th * tw, -1)))
print("== pipe._pack_latents:", torch.equal(packed_feature, pipe._pack_latents(toy_feature, 1, toy_c, toy_h, toy_w)))

# %%
fig = kh.packing_figure(patch_id, packed_patch, packed_feature)  # kontext_helpers/figures.py
fig.suptitle("Packing: each token is one 2x2 latent patch (x C channels), numbered row by row; neighbours in the "
             "grid are neighbours in the sequence", fontsize="x-large")
plt.show()

# %% [markdown]
# `kh.unpack_like_pipeline(tokens, h_tok, w_tok)` is the exact inverse, the same maths as the pipeline's
# `_unpack_latents` (which the pipeline runs on its prediction before decoding).

# %%
back = kh.unpack_like_pipeline(tokens, h_tok, w_tok)  # [B, N, 4C] -> [B, C, H_l, W_l]
print("unpack", tuple(tokens.shape), "->", tuple(back.shape))
print("unpack(pack(lat)) == lat:", torch.equal(back, lat))
print("== pipe._unpack_latents:", torch.equal(back, pipe._unpack_latents(tokens, RESOLUTION, RESOLUTION,
                                                                         pipe.vae_scale_factor)))

# %% [markdown]
# ### Why sides must be multiples of 16
#
# 8 (the VAE's downsampling) x 2 (the packing) = 16 pixels per token side. An image 8 px larger than a
# multiple of 16 (136 px on the tiny path, 520 px at 512) encodes to an odd latent grid (17x17, 65x65), and an
# odd number of cells cannot be cut into 2x2 patches:

# %%
import torch.nn.functional as F

ODD = RESOLUTION + 8  # 8 px more than a multiple of 16: an odd number of latent cells
x_odd = F.interpolate(x, size=(ODD, ODD), mode="bilinear", align_corners=False)  # [B, 3, ODD, ODD]
with torch.no_grad():
    lat_odd = kh.to_latents(x_odd, vae)  # [B, C, ODD/8, ODD/8]: odd
print(ODD, "px ->", tuple(lat_odd.shape))
try:
    kh.pack_like_pipeline(lat_odd)
except ValueError as err:
    print("ValueError:", err)
try:
    kh.KontextPairs(DATA_ROOT, resolution=ODD)
except ValueError as err:
    print("\nValueError:", str(err).splitlines()[1])

# %% [markdown]
# The pipeline itself, at inference, does two things to the size you ask for (`FluxKontextPipeline.__call__`):
# it first rescales width and height to keep their aspect ratio at an area of `max_area` (default `1024**2`
# pixels), then rounds both *down* to a multiple of 16, and logs a warning when the result differs from what
# you asked. So `pipe(image, height=512, width=512)` renders at 1024 x 1024 unless you also pass
# `max_area=512 * 512`, as this course does wherever it compares with the pipeline. For training we rather
# refuse a wrong size when the dataset opens (notebook 01) than crop pixels you did not expect.
#
# ## 3. Position ids: `(type, row, col)` for every token
#
# Attention itself has no notion of place. Flux adds it with rotary position embeddings (RoPE) computed from
# an id per token: three numbers, `(type, row, col)`. Each number rotates its own slice of every attention
# head's query and key vectors, at a range of frequencies (`axes_dims_rope = (16, 56, 56)` on FLUX.1: 16
# dimensions for the type, 56 for the row, 56 for the column, 128 in all), so the dot product of two tokens
# depends on the *difference* of their ids. `row` and `col` are the token's place on the grid.
# `type` is Kontext's trick for having two images in one sequence: the noisy target has type 0, the clean
# context image type 1. Both share the same `(row, col)`, so a context token and the target token at the same
# place are "aligned", while the type keeps them apart. That alignment is what the default region signal relies on:
# it adds one learned vector to the *marked tokens*, the target and context tokens that the edit mask covers
# (notebook 03, section 2), so they keep exactly these ids.
#
# The original design instead appends one **region token** with the id `(2, 0, 0)`: a third type (we keep it as
# `region_kind="linear"`, and draw it below so you can see where it sits). Its row and column, `(0, 0)`, are the
# top-left token's; RoPE only looks at *differences* of ids, and each of the three numbers turns its own slice of
# every attention head's dimensions (16, 56 and 56 of 128 on FLUX.1). So only the 16 type dimensions tell the
# region token from a top-left token: for attention it sits in the top-left corner "one image further on", and
# nothing in its id says where the mask is. The experiment at the end moves it.
#
# `kh.img_ids_grid(h_tok, w_tok, mark)` builds the ids of one grid `[N, 3]`; `kh.kontext_img_ids(h_tok, w_tok)`
# the whole image sequence with the original design's token, `[2N+1, 3]` (`with_region=False`: the `[2N, 3]` of
# the pipeline and of the default region signal).

# %%
ids_target = kh.img_ids_grid(h_tok, w_tok, 0)  # [N, 3]
ids = kh.kontext_img_ids(h_tok, w_tok)  # [2N+1, 3]: target (N) | context (N) | region (1)
n = h_tok * w_tok
print("one grid", tuple(ids_target.shape), "| whole sequence", tuple(ids.shape), f"(N = {n})")
print(f"{'target tokens 0..2:':28}", ids[:3].tolist())
print(f"{f'context tokens {n}..{n + 2}:':28}", ids[n : n + 3].tolist())
print(f"{f'region token {2 * n}:':28}", ids[-1].tolist())

ref_target = pipe._prepare_latent_image_ids(1, h_tok, w_tok, "cpu", torch.float32)  # the pipeline's target ids
ref_context = pipe._prepare_latent_image_ids(1, h_tok, w_tok, "cpu", torch.float32)
ref_context[:, 0] = 1  # what FluxKontextPipeline does for its context image
print("img_ids_grid(mark=0) == pipe ids:", torch.equal(ids_target, ref_target))
print("img_ids_grid(mark=1) == pipe ids with column 0 set to 1:", torch.equal(kh.img_ids_grid(h_tok, w_tok, 1),
                                                                            ref_context))
print("kontext_img_ids(with_region=False) == the pipeline's [target | context] ids:",
      torch.equal(kh.kontext_img_ids(h_tok, w_tok, with_region=False), torch.cat([ref_target, ref_context])))

# %%
parts = {"target": ids[:n].reshape(h_tok, w_tok, 3), "context": ids[n : 2 * n].reshape(h_tok, w_tok, 3),
         "region": ids[2 * n :].reshape(1, 1, 3)}  # [N, 3] -> [H', W', 3] (region: one token)
columns = [("type", 0, 2), ("row", 1, h_tok - 1), ("col", 2, w_tok - 1)]
fig, axes = plt.subplots(3, 3, figsize=(12, 11.5), gridspec_kw={"width_ratios": [1, 1, 0.3]}, layout="constrained")
for i, (label, k, top) in enumerate(columns):
    for j, (part, grid) in enumerate(parts.items()):
        ax = axes[i, j]
        shown = ax.imshow(grid[..., k].numpy(), cmap="viridis", vmin=0, vmax=max(top, 1))
        if grid.shape[0] <= 8:
            for r in range(grid.shape[0]):
                for q in range(grid.shape[1]):
                    value = int(grid[r, q, k])
                    ax.text(q, r, str(value), ha="center", va="center", fontsize=9,
                            color="white" if value < max(top, 1) / 2 else "black")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{part}: {label}" + (f" ({grid.shape[0]}x{grid.shape[1]} grid)" if part != "region" else ""))
    fig.colorbar(shown, ax=axes[i, :], shrink=0.8, label=f"id column {k}: {label}")
fig.suptitle("Position ids as images: target and context share row and col; only the type (0, 1) tells them "
             "apart; the original design's region token would be (2, 0, 0)", fontsize="x-large")
plt.show()

# %% [markdown]
# ### The whole sequence, text included
#
# The transformer attends over text and image tokens together. The **T5** encoder's `T` token embeddings
# (`prompt_embeds [B, T, 4096]`) become these text tokens: they go through `context_embedder` to the model
# width and take part in every attention. **CLIP**'s *pooled* vector (`pooled_prompt_embeds [B, 768]`) is not a
# token at all: `time_text_embed` adds it to the timestep (and guidance) embedding, one vector `temb [B, D]`
# per sample, which scales and shifts every block's normalisations (AdaLN). Its id sequence is
# `cat(txt_ids, img_ids)`: first the `T` text tokens, whose ids are all `(0, 0, 0)` (text has no position on
# the image; the pipeline's `encode_prompt` returns `txt_ids = zeros(T, 3)`), then the `2N` image tokens (here
# `2N+1`: the figure keeps the original design's region token at the end).

# %%
txt_ids = torch.zeros(MAX_SEQUENCE_LENGTH, 3)  # [T, 3], what pipe.encode_prompt returns as text_ids
if TINY:  # cheap on the tiny model: check it against the pipeline's own text encoding
    t5_embeds, pooled, pipe_txt_ids = kh.encode_prompts(pipe, item["prompt"], max_sequence_length=MAX_SEQUENCE_LENGTH)
    print("txt_ids == pipe.encode_prompt's text_ids:", torch.equal(txt_ids, pipe_txt_ids.cpu().float()))
    print("T5 tokens", tuple(t5_embeds.shape), "-> context_embedder:", pipe.transformer.context_embedder,
          "\npooled CLIP", tuple(pooled.shape), "-> time_text_embed's text part:",
          pipe.transformer.time_text_embed.text_embedder.linear_1)
all_ids = torch.cat([txt_ids, ids])  # [T + 2N + 1, 3]
t_len = txt_ids.shape[0]
print("text", tuple(txt_ids.shape), "+ image", tuple(ids.shape), "->", tuple(all_ids.shape), " # [T + 2N + 1, 3]")

# %%
spans = [("text (T)", 0, t_len, "0.85"), ("noisy target (N)", t_len, t_len + n, "tab:blue"),
         ("context (N)", t_len + n, t_len + 2 * n, "tab:orange"),
         ("region (1)", t_len + 2 * n, t_len + 2 * n + 1, "tab:red")]
positions = np.arange(all_ids.shape[0])
fig, axes = plt.subplots(3, 1, figsize=(15, 7.5), sharex=True, layout="constrained")
for ax, (label, k, _) in zip(axes, columns):
    for _, start, stop, colour in spans:
        ax.axvspan(start - 0.5, stop - 0.5, color=colour, alpha=0.25, lw=0)
    ax.step(positions, all_ids[:, k].numpy(), where="mid", color="black", lw=1)
    ax.set_ylabel(f"id: {label}")
for name, start, stop, colour in spans:
    axes[0].text((start + stop) / 2, 2.35, name, ha="center", va="bottom", color=colour if colour != "0.85" else "0.3",
                 fontsize=11, weight="bold")
region_pos = t_len + 2 * n
axes[0].annotate("region token (2, 0, 0)", xy=(region_pos, 2), xytext=(region_pos - 0.22 * len(positions), 1.5),
                 arrowprops=dict(arrowstyle="->", color="tab:red"), color="tab:red")
axes[0].set_ylim(-0.2, 2.9)
axes[-1].set_xlabel(f"position in the sequence (T = {t_len}, N = {n}, total {len(positions)})")
fig.suptitle("The sequence the transformer attends over: [text | noisy target | context], here with the original "
             "design's region token appended; row and col repeat for target and context, the type column separates "
             "them", fontsize="large")
plt.show()

# %% [markdown]
# Ids are 2D, without a batch dimension: given 3D `img_ids` or `txt_ids`, `FluxTransformer2DModel.forward` logs
# *"Passing `img_ids` 3d torch.Tensor is deprecated. Please remove the batch dimension and pass it as a 2d torch
# Tensor"* and then uses only the first batch entry, so per-sample ids are not possible. Positions are the same for
# every sample of a batch, so they are built once: `[2N(+1), 3]` and `[T, 3]`.
#
# > The original design built `[B, N, 3]` ids: [design note 6](../docs/design.md#6-two-dimensional-ids).

# %%
batch = 4
design_style = ids[None].expand(batch, -1, -1)  # the original design's [B, 2N+1, 3]
print("original design:", tuple(design_style.shape), " ours:", tuple(ids.shape),
      " (the transformer would take design_style[0] == ours:", torch.equal(design_style[0], ids), ")")

# %% [markdown]
# ## 4. Back to pixels: the decode round trip
#
# To see a result, the pipeline runs the steps of section 1 and 2 backwards: unpack the tokens, undo the
# normalisation (`z / scaling_factor + shift_factor`), decode with the VAE, map `[-1, 1]` back to `[0, 1]`.
# We decode our latents, and the original design's latents as the pipeline would (it adds the shift back, which the
# original design never took out).

# %%
def decode(tok):
    """Tokens [B, N, 4C] -> image [B, 3, H, W] in [0, 1], the pipeline's own steps."""
    z = kh.unpack_like_pipeline(tok, h_tok, w_tok)  # [B, N, 4C] -> [B, C, H_l, W_l]
    z = z / vae.config.scaling_factor + vae.config.shift_factor  # undo the normalisation
    with torch.no_grad():
        img = vae.decode(z.to(vae.device, vae.dtype), return_dict=False)[0]  # -> [B, 3, H, W] in about [-1, 1]
    return ((img.float().cpu() + 1) / 2).clamp(0, 1)


ours_img = decode(tokens)
design_img = decode(kh.pack_like_pipeline(design_lat)[0])
print("decoded", tuple(ours_img.shape), " # [B, 3, H, W]")


def psnr(a, b):
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


psnr_ours, psnr_design = psnr(ours_img, x01), psnr(design_img, x01)
print(f"PSNR to the original: ours {psnr_ours:.1f} dB, the original design's latents {psnr_design:.1f} dB")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 5), layout="constrained")
for ax, (image, title) in zip(axes, [(x01, "original"), (ours_img, f"decode(our latents): {psnr_ours:.1f} dB"),
                                     (design_img, f"decode(original design's latents): {psnr_design:.1f} dB")]):
    ax.imshow(image[0].permute(1, 2, 0).numpy())
    ax.set_title(title)
    ax.set_axis_off()
fig.suptitle((f"Round trip (tiny model, {RESOLUTION} px): " if TINY else "Round trip: ")
             + f"our latents decode back at {psnr_ours:.1f} dB; scale-only latents, decoded as the pipeline does, "
             f"at {psnr_design:.1f} dB ({psnr_design - psnr_ours:+.1f} dB: the forgotten shift)")
plt.show()

# %% [markdown]
# ## Exercises
#
# First an experiment to run and think about, then three exercises that each ask for one function. Write it in its
# cell in place of the `raise NotImplementedError(...)` line and run the cell: the check below your function calls
# it on inputs of its own, compares the result with diffusers' own function, and names the first shape or value
# that differs (and where). Until you fill a cell in, its check stops with a message, so "Run all" stops at the
# first exercise you have not done yet. Stuck? `kh.exercises.show_solution("pack")` prints one solution (any
# exercise's name works).
#
# ### Experiment: where does RoPE put the region token?
#
# Compute the rotary embeddings of the ids with diffusers' own `FluxPosEmbed` (FLUX.1's axes, 16/56/56) and compare
# the region token `(2, 0, 0)` with the top-left target token `(0, 0, 0)`. Then move the region id to the mask's
# centroid: what changes? Predict first, then run the cell.

# %%
# RoPE of the ids: the region token against the top-left target token, then moved to the mask's centroid
from diffusers.models.transformers.transformer_flux import FluxPosEmbed  # the transformer's own (diffusers 0.35+)

rope = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])  # FLUX.1's transformer: axes_dims_rope (16, 56, 56)
h_t, w_t = RESOLUTION // 16, RESOLUTION // 16
token_mask = kh.mask_to_token_grid(item["mask"][None], h_t, w_t)[0, 0]  # [H', W']
rows, cols = torch.nonzero(token_mask, as_tuple=True)
centroid = (float(rows.float().mean().round()), float(cols.float().mean().round()))
ids_ex = kh.kontext_img_ids(h_t, w_t).double()  # [2N + 1, 3], the region last
ids_moved = ids_ex.clone()
ids_moved[-1, 1:] = torch.tensor(centroid, dtype=ids_ex.dtype)  # (2, row, col) at the mask's centroid
cos_ex, _ = rope(ids_ex)  # [2N + 1, 128]: one cosine per dimension of an attention head
cos_moved, _ = rope(ids_moved)
centroid_token = int(centroid[0] * w_t + centroid[1])
differs = lambda a, b: int((a - b).abs().gt(1e-9).sum())  # noqa: E731
print("region (2, 0, 0) vs top-left target token: dimensions that differ", differs(cos_ex[-1], cos_ex[0]),
      "of 128 (all in the first 16: the type axis)")
print(f"region at the centroid {centroid} vs the target token there:",
      differs(cos_moved[-1], cos_moved[centroid_token]), "dimensions differ; vs the top-left token:",
      differs(cos_moved[-1], cos_moved[0]))
assert differs(cos_ex[-1][16:], cos_ex[0][16:]) == 0, "row and column dimensions equal the top-left token's"

# %% [markdown]
# ### Exercise 2.1: pack the latents
#
# Write `pack(latents)` for latents `[B, C, H_l, W_l]` with one `view`, one `permute` and one `reshape`, giving
# `[B, N, 4C]` tokens in the pipeline's order (section 2): each 2x2 patch one token, the tokens row by row. The
# check compares your tokens with diffusers' own `FluxKontextPipeline._pack_latents`, bit for bit, on latents that
# are not square.

# %%
def pack(latents):
    # latents [B, C, H_l, W_l] -> tokens [B, N, 4C]
    raise NotImplementedError("your code here")


kh.exercises.check_pack(pack)

# %% [markdown]
# ### Exercise 2.2: unpack the tokens
#
# Decoding needs the way back (section 4). Write `unpack(tokens, h_tok, w_tok)`: `[B, N, 4C]` tokens on an
# `h_tok x w_tok` grid -> latents `[B, C, 2 h_tok, 2 w_tok]`. The check compares it with diffusers'
# `FluxKontextPipeline._unpack_latents`, bit for bit.

# %%
def unpack(tokens, h_tok, w_tok):
    # tokens [B, N, 4C] -> latents [B, C, H_l, W_l]
    raise NotImplementedError("your code here")


kh.exercises.check_unpack(unpack)

# %% [markdown]
# ### Exercise 2.3: the position ids of target and context
#
# Write `image_ids(h_tok, w_tok)`: the ids `[2N, 3]` of the sequence `[target | context]`, one row `(type, row,
# col)` per token, in the tokens' row-major order (section 3): the target's `N` rows first, then the context's.
# The check compares them with the ids `FluxKontextPipeline.prepare_latents` builds (`_prepare_latent_image_ids`
# twice, the context's first column set to 1), on a grid that is not square.

# %%
def image_ids(h_tok, w_tok):
    # -> ids [2N, 3]: (type, row, col) of every target token, then of every context token
    raise NotImplementedError("your code here")


kh.exercises.check_image_ids(image_ids)

# %% [markdown]
# ## Recap
#
# - `kh.normalize_01_to_m11` then `kh.to_latents(x, pipe.vae)`: `[B, 3, H, W] -> [B, C, H/8, W/8]`, with
#   `(z - shift_factor) * scaling_factor`, bit for bit `pipe._encode_vae_image`. The original design forgot the shift,
#   so
#   its latents are all off by `shift x scale`.
# - `kh.pack_like_pipeline`: each 2x2 latent patch becomes one token of `4C` features (channel-major),
#   tokens in row-major order, `[B, N, 4C]`, bit for bit `pipe._pack_latents`; `kh.unpack_like_pipeline`
#   inverts it.
# - One token = 16x16 pixels, so image sides must be multiples of 16; a wrong size is a clear error.
# - Ids `(type, row, col)`: target 0, context 1, the same `(row, col)` for both; the original design's region
#   token `(2, 0, 0)` has no place of its own. `kh.kontext_img_ids` gives `[2N(+1), 3]`, 2D as diffusers wants,
#   and the text's ids are zeros in front of them.
# - Decoding runs the same steps backwards.
#
# ## Next
#
# [03_region_token_and_depth_ip_adapter.ipynb](03_region_token_and_depth_ip_adapter.ipynb): the edit mask
# goes down to the token grid and becomes the learned **region signal**, and the depth map reaches the tokens: a
# depth patch per token (the default), or the CLIP image encoder and the **IP-Adapter**.
