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
# # 01 · Data preparation: pairs, masks and exact depth
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/kontext-region-lora/blob/main/notebooks/01_data_prep.ipynb)
#
# **What you will learn**
# - the folder layout a training set needs (`context/ target/ masks/ depth/ prompts.txt`) and why pairs are
#   matched by file **stem**, never by position;
# - what one item of `kh.KontextPairs` holds: shapes, dtypes and value ranges;
# - why depth maps stay **16-bit** until the very last step, and what "near = bright" means;
# - which depth map to give: the context's (the scene as it is) or the desired result's (`target_depth/`, the
#   geometry the edit should produce);
# - how masks are binarised, how to derive one from a before / after pair, and how to check that it covers
#   every changed pixel;
# - aspect-ratio buckets (photos at their own shape, the default), the original `"square"` and `"crop"`, and how
#   to write your own pairs to disk.
#
# Runs in seconds on a laptop CPU with the tiny model, or on a Colab GPU with FLUX.1 Kontext [dev].
# This notebook does not need the model at all, except for the optional depth estimator at the end.
#
# **The code behind it:** [`kontext_helpers/data.py`](../kontext_helpers/data.py) (the dataset folder and your own
# pairs), [`kontext_helpers/labels.py`](../kontext_helpers/labels.py) (a mask and a depth map for your own photos)
# and [`kontext_helpers/images.py`](../kontext_helpers/images.py) (every pixel, mask and depth conversion).

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
RESOLUTION = 128 if TINY else PRESET.resolution  # training side in pixels, a multiple of 16 (the preset's)
OUTPUT_DIR = os.environ.get("KONTEXT_OUTPUT_DIR", os.path.join(ROOT, "outputs"))  # results (Colab: a Drive folder)
SEED = 0  # every random draw of this notebook (none in this one: everything here is deterministic)
PAIR = 3  # the pair used as the running example (3 = "turn the red box into a sphere")
DEPTH_PAIR = 0  # the pair whose depth map section 4 zooms into (0 has a large sphere)
MASK_THRESHOLD = 0.5  # a mask pixel is editable when its grey value >= this fraction of white (KontextPairs' default)
DIFF_THRESHOLD = 0.04  # mask_from_difference: a pixel counts as changed above this difference (0.04 ~ 10/255)
DIFF_DILATE = 4  # mask_from_difference: margin grown around the changed pixels, in pixels
DEPTH_MODEL = kh.depth_model_for(MODEL)  # Depth Anything V2 Small (Hub); a rehearsal folder carries a stand-in
MY_PAIRS = os.path.join(OUTPUT_DIR, "my_pairs")  # where section 7 writes a dataset folder of "your own" pairs

torch.manual_seed(SEED)
os.makedirs(OUTPUT_DIR, exist_ok=True)

# %% [markdown]
# ## 1. The folder layout: pairs matched by file stem
#
# A training set is one folder with four image folders and a prompt file:
#
# ```
# DATA_ROOT/
#   context/  source images        (png, jpg, webp, tif)
#   target/   edited images
#   masks/    white = editable, black = preserve
#   depth/    depth maps, any bit depth (8-bit, 16-bit, float TIFF); near = bright
#   target_depth/   optional: the targets' depth maps, same rules (section 4 says when to give them)
#   prompts.txt   one line per pair, in the order of the sorted stems
# ```
#
# The four images of one pair share a **file stem** (the name without its extension): `context/cat.png`,
# `target/cat.png`, `masks/cat.png`, `depth/cat.tif` form the pair `cat`. Extensions may differ between folders.
# Line *i* of `prompts.txt` is the prompt of the *i*-th stem in sorted order.
#
# The sample folder has 10 rendered pairs at 512 px (see `data_samples/README.md`). Let us list it.

# %%
from pathlib import Path

root = Path(DATA_ROOT)
for folder in ("context", "target", "masks", "depth"):
    names = sorted(p.name for p in (root / folder).iterdir() if not p.name.startswith("."))
    print(f"{folder + '/':9} {len(names):2d} files: {names[0]}, {names[1]}, ..., {names[-1]}")
prompt_lines = (root / "prompts.txt").read_text(encoding="utf-8").splitlines()
print(f"prompts.txt {len(prompt_lines)} lines: {prompt_lines[0]!r}, {prompt_lines[1]!r}, ...")

# %% [markdown]
# ### A broken copy, and the one error that lists every problem
#
# Real folders go wrong in boring ways: a mask that was never exported, a notes file dropped next to the
# images, a prompt line deleted but its newline kept. We copy five sample pairs to a temporary folder and make
# exactly those three mistakes.

# %%
import shutil
import tempfile

WORK = Path(tempfile.mkdtemp(prefix="kontext_01_"))  # scratch folders of this notebook, removed at the end
stems = sorted(p.stem for p in (root / "context").glob("*.png"))[:5]
broken = WORK / "broken"
for folder in ("context", "target", "masks", "depth"):
    (broken / folder).mkdir(parents=True)
    for stem in stems:
        shutil.copy(root / folder / f"{stem}.png", broken / folder / f"{stem}.png")
(broken / "masks" / f"{stems[1]}.png").unlink()  # 1. a mask was never exported
(broken / "context" / "notes.txt").write_text("shot on tuesday\n")  # 2. a stray file among the images
lines = prompt_lines[:5]
lines[1] = ""  # 3. a prompt deleted, its line kept
(broken / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

try:
    kh.KontextPairs(broken, resolution=RESOLUTION)
except ValueError as err:
    print(err)

# %% [markdown]
# One `ValueError`, raised when the folder is **opened** (not at training step 500), numbering every problem
# with the file it concerns, and one fix hint per kind of problem. Nothing is loaded until the folder is clean.
#
# Matching **by position** instead (item *i* = the *i*-th file of each sorted folder) turns the missing mask into
# silently wrong pairs: `masks[1]` becomes the *next* pair's mask, and so does every later one. The cell below pairs
# the broken folder that way.
#
# > The original design paired by position:
# > [design note 8](../docs/design.md#8-pairs-by-stem-depth-keeps-its-bit-depth).

# %%
import numpy as np
from PIL import Image


def seed_style_pairs(folder):
    """The original design's pairing: sorted file lists zipped by position (shown here only to see it fail)."""
    lists = [sorted((Path(folder) / sub).iterdir()) for sub in ("context", "masks")]
    return list(zip(*lists))  # zip silently stops at the shortest list


by_position = seed_style_pairs(broken)
fig, axes = plt.subplots(1, len(by_position), figsize=(3.2 * len(by_position), 3.6))
for ax, (ctx_path, mask_path) in zip(axes, by_position):
    ctx = np.asarray(Image.open(ctx_path).convert("RGB"), dtype=np.float32) / 255  # [H, W, 3]
    msk = np.asarray(Image.open(mask_path), dtype=np.float32)[..., None] / 255  # [H, W, 1]
    ax.imshow(ctx * (1 - 0.55 * msk) + 0.55 * msk * np.array([1.0, 0.0, 0.0]))
    ok = ctx_path.stem == mask_path.stem
    ax.set_title(f"context {ctx_path.stem[:4]} + mask {mask_path.stem[:4]}\n{'right' if ok else 'WRONG'} mask",
                 color="black" if ok else "red")
    ax.set_axis_off()
fig.suptitle(f"Pairing by sorted position: after one missing mask, every later context gets its neighbour's mask "
             f"({sum(c.stem != m.stem for c, m in by_position)} of {len(by_position)} pairs wrong, no error)")
plt.show()

# %% [markdown]
# ## 2. Open the dataset: `kh.KontextPairs`
#
# `kh.KontextPairs(root, resolution=...)` validates the folder, then reads one pair per `dataset[i]`. Every
# image comes out square at `resolution` (a multiple of 16: one Flux token covers 16x16 pixels, see notebook
# 02). Here `RESOLUTION` is 128 on the tiny model and 512 on a GPU.

# %%
data = kh.KontextPairs(DATA_ROOT, resolution=RESOLUTION)
print(data)
item = data[PAIR]
for key, value in item.items():
    if torch.is_tensor(value):
        print(f"{key:8} {str(tuple(value.shape)):16} {str(value.dtype):14} "
              f"min {value.min().item():.3f}  max {value.max().item():.3f}")
    else:
        print(f"{key:8} {type(value).__name__:16} {value!r}")
# context, target: [3, H, W] float32 in [0, 1]   mask: [1, H, W] float32, only the values 0 and 1
# depth: [1, H, W] float32 in [0, 1], 1 = nearest point of the scene   prompt, name: str (name = the file stem)
print("mask values:", item["mask"].unique().tolist())

# %% [markdown]
# `kh.show_pairs` draws one row per pair. The title of the target panel measures how much the target differs
# from the context *outside* the mask: the loss of notebook 04 asks the model to keep that part unchanged, so
# for a clean pair it is 0.

# %%
from IPython.display import display

shown = [0, 1, PAIR, 8]
fig = kh.show_pairs(data, indices=shown)
outside_change = max(float((data[i]["target"] - data[i]["context"]).abs()[:, data[i]["mask"][0] < 0.5].mean())
                     for i in shown)  # the panels' own measure: mean |target - context| outside the mask
fig.suptitle(f"Four sample pairs: outside the red mask the target differs from the context by {outside_change:.3f} "
             "at most (mean per pair); depth is bright where the scene is near", fontsize="x-large")
display(fig)  # show_pairs returns a Figure object (works headless too)

# %% [markdown]
# ## 3. Browse the pairs
#
# Move the sliders: `index` walks through the pairs, `alpha` sets how strongly the mask tints the context.
# (Headless, for example in CI, the cell draws its default view once.)

# %%
from ipywidgets import FloatSlider, IntSlider


def browse(index=PAIR, alpha=0.5):
    pair = data[index]
    context = pair["context"].permute(1, 2, 0).numpy()  # [3, H, W] -> [H, W, 3]
    mask = pair["mask"][0].numpy()  # [H, W]
    tint = alpha * mask[..., None]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    panels = [
        (context, "context", None),
        (pair["target"].permute(1, 2, 0).numpy(), "target", None),
        ((context * (1 - tint) + tint * np.array([1.0, 0.0, 0.0])).clip(0, 1),
         f"mask overlay: {100 * mask.mean():.1f}% editable", None),
        (pair["depth"][0].numpy(), "depth (bright = near)", "magma"),
    ]
    for ax, (image, title, cmap) in zip(axes, panels):
        ax.imshow(image, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_axis_off()
    if 0 < mask.sum() < mask.size:
        axes[2].contour(mask, levels=[0.5], colors="yellow", linewidths=1)  # the edge of the editable region
    fig.suptitle(f"{pair['name']}: \"{pair['prompt']}\"")
    return fig


_ = kh.interactive_figure(browse, index=IntSlider(value=PAIR, min=0, max=len(data) - 1, description="index"),
                          alpha=FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="alpha"))

# %% [markdown]
# ## 4. Depth: exact 16-bit values, near = bright
#
# The sample depth maps are 16-bit PNGs (PIL mode `I;16`, 65 536 possible levels). Each stores the inverse
# of the camera distance `z`, scaled so that **larger = nearer** (bright = near), the convention of MiDaS and
# Depth Anything: `v = 65535 * (1/z - 1/FAR) / (1/NEAR - 1/FAR)` with `NEAR = 4`, `FAR = 30` scene units, and
# `v = 0` for the sky. Let us count the distinct levels in one committed file, and in the same map saved as
# 8 bits.

# %%
depth_path = data.files(DEPTH_PAIR)["depth"]
depth_file = Image.open(depth_path)
v16 = np.asarray(depth_file).astype(np.int64)  # [H, W] values 0..65535
v8 = np.round(v16 / 257).astype(np.int64)  # the same map quantised to 8 bits: 0..255
print(f"{depth_path.name}: PIL mode {depth_file.mode}, size {depth_file.size}, values {v16.min()}..{v16.max()}")
print(f"distinct levels: 16-bit {len(np.unique(v16))}, the same map in 8 bits {len(np.unique(v8))}")

NEAR, FAR = 4.0, 30.0  # the renderer's depth range (data_samples/README.md)
z = 1 / (v16 / 65535 * (1 / NEAR - 1 / FAR) + 1 / FAR)  # decode: camera distance in scene units
scene = v16 > 0  # the sky is 0
print(f"brightest pixel: z = {z[scene].min():.2f} units (the nearest floor);  "
      f"darkest non-sky pixel: z = {z[scene].max():.2f} units (far away).  Bright = near.")

# %% [markdown]
# Why does it matter? Flat or gently curved surfaces span only a few hundred 16-bit levels, so 8 bits cut
# them into terraces. Zoom into the sphere, stretch the contrast to the zoomed window, and the 8-bit version
# shows bands that are not in the scene.

# %%
size = v16.shape[0]
window = (int(0.41 * size), int(0.17 * size), int(0.17 * size))  # (y0, x0, side): inside the sphere of pair 0
fig = kh.depth_precision_figure(v16, v8, window)  # kontext_helpers/figures.py
y0, x0, side = window
levels = [len(np.unique(v[y0: y0 + side, x0: x0 + side])) for v in (v16, v8)]  # distinct values in the zoom
fig.suptitle(f"Depth precision: the zoomed sphere holds {levels[0]} levels in 16 bits and {levels[1]} in 8 bits, "
             "so 8 bits cut its smooth surface into terraces", fontsize="x-large")
plt.show()

# %% [markdown]
# ### From the file to what the model sees
#
# `KontextPairs` reads depth at full precision as float, then **min-max normalises** each map to `[0, 1]`
# (`depth_normalize="minmax"`, the default; `"none"` divides by the type's maximum instead). The default depth
# signal (notebook 03, section 7) takes these floats as they are. The other road is the **IP-Adapter** (an *image
# prompt*: a small add-on that turns one picture into a CLIP embedding and lets the transformer's attention read
# it; notebook 03, section 5): its CLIP image processor takes an ordinary 8-bit RGB picture, so there the very last
# step is `kh.depth_to_pil(depth)`: grey 8-bit RGB, R = G = B. Quantising *last* means the 256 levels span the
# scene's actual range. Converting a 16-bit PNG straight to RGB, as the first panel below does, **clips** every
# value above 255 to white.
#
# > The original design converted depth files straight to RGB:
# > [design note 8](../docs/design.md#8-pairs-by-stem-depth-keeps-its-bit-depth).

# %%
full_depth = kh.KontextPairs(DATA_ROOT, resolution=size)[DEPTH_PAIR]["depth"]  # [1, H, W] float32 at the file's size
print("dataset depth:", tuple(full_depth.shape), full_depth.dtype,
      f"min {full_depth.min().item():.3f} max {full_depth.max().item():.3f},",
      f"{len(full_depth.unique())} distinct float values")
ours = kh.depth_to_pil(full_depth)  # 16-bit -> float min-max -> 8-bit RGB, the last step
print("kh.depth_to_pil:", ours.mode, ours.size)

seed_rgb = np.asarray(Image.open(depth_path).convert("RGB"))[..., 0]  # the original design: 16-bit file -> RGB directly
eight_first = (v8 - v8.min()) / (v8.max() - v8.min())  # a map saved as 8 bits, then normalised
eight_first = np.asarray(kh.depth_to_pil(torch.from_numpy(eight_first)))[..., 0]
routes = [
    (seed_rgb, f"original design: convert('RGB') on the 16-bit file\n{len(np.unique(seed_rgb))} levels, "
               f"{100 * (seed_rgb == 255).mean():.0f}% pure white"),
    (eight_first, f"8-bit file, then min-max, then 8-bit\n{len(np.unique(eight_first))} levels"),
    (np.asarray(ours)[..., 0], f"ours: 16-bit, min-max, then kh.depth_to_pil\n"
                               f"{len(np.unique(np.asarray(ours)[..., 0]))} levels"),
]
fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
for ax, (image, title) in zip(axes, routes):
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.set_title(title)
    ax.set_xticks([])  # keep the frame: the original design's image is mostly white
    ax.set_yticks([])
fig.suptitle(f"The 8-bit image the CLIP processor receives: the direct conversion keeps "
             f"{len(np.unique(seed_rgb))} levels; quantising last keeps {len(np.unique(np.asarray(ours)[..., 0]))}")
plt.show()

# %% [markdown]
# Your own depth maps may be 8-bit, 16-bit or float TIFF: all are read without rounding. If yours store
# distance (metres, far = bright) rather than inverse depth, open the dataset with `depth_invert=True`
# (`kh.estimate_depth` already returns near = bright; a metric model needs `invert=True` there). Relative inverse
# depth (MiDaS, Depth Anything) is near = bright already: use it as it is.
#
# ### Which depth to give: the context's or the desired result's
#
# `depth/` holds the depth of the **context**: the scene as it is. `target_depth/` (optional) holds the depth of the
# **target**: the geometry the edit should produce. They differ exactly where the edit changes the geometry, as the
# next cell shows for an "add" pair. Give the context's depth (`TrainConfig.depth_source="context"`, the default)
# for edits whose look depends on distance (fog, blur, relighting); give the target's (`depth_source="target"`) for
# geometry control, "add a box *here*, this big" or "make it *this* shape", which the prompt cannot say; at
# inference you then pass the depth map of the result you want. A pair folder without `target_depth/` can use
# `kh.estimate_depth(target)` (what `depth_source="target"` falls back to; it needs a depth model from the Hub once).

# %%
ADD_PAIR = next(i for i, name in enumerate(data.names) if "add" in name)  # a pair whose edit adds an object
add_item = data[ADD_PAIR]
print(f"pair {add_item['name']!r}: item keys {sorted(add_item)}")  # target_depth is there: data_samples has the folder
depth_change = (add_item["target_depth"] - add_item["depth"]).abs()[0]  # [H, W]
fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), layout="constrained")
for ax, (img, title) in zip(axes, ((add_item["context"].permute(1, 2, 0), "context"),
                                   (add_item["depth"][0], "depth/ (the context's)"),
                                   (add_item["target_depth"][0], "target_depth/ (the target's)"),
                                   (depth_change, "|target depth - context depth|"))):
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
fig.suptitle(f"'{add_item['prompt']}': only the target's depth holds the new object, its place and its size")
plt.show()

# %% [markdown]
#
# ## 5. Masks: binarisation, derived masks and full coverage
#
# A mask is white (editable) where the edit happens and black (preserve) elsewhere. Masks painted in an editor
# or saved as JPEG have soft, noisy edges, so `KontextPairs` binarises them: a pixel is editable when its grey
# value is at least `mask_threshold` (default 0.5, i.e. 128 of 255). Below, the committed mask of the example
# pair is blurred and saved as a JPEG, like a brushed mask; the slider sets the threshold.

# %%
from PIL import ImageFilter

mask_path = data.files(PAIR)["masks"]
soft_path = WORK / "soft_mask.jpg"
Image.open(mask_path).filter(ImageFilter.GaussianBlur(8)).save(soft_path, quality=70)
soft = np.asarray(Image.open(soft_path).convert("L"), dtype=np.float32) / 255  # [H, W] in [0, 1]
hard = np.asarray(Image.open(mask_path), dtype=np.float32) / 255  # the committed mask, {0, 1}
print(f"soft mask: {len(np.unique(soft))} distinct grey values; committed mask: {np.unique(hard).tolist()}")


def binarise(threshold=MASK_THRESHOLD):
    binary = soft >= threshold  # what KontextPairs(..., mask_threshold=threshold) does
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    axes[0].imshow(soft, cmap="gray", vmin=0, vmax=1)
    axes[0].set_title(f"soft mask (blurred JPEG)\n{len(np.unique(soft))} grey values")
    axes[1].imshow(binary, cmap="gray", vmin=0, vmax=1)
    axes[1].set_title(f"binary at threshold {threshold:.2f}\n{100 * binary.mean():.1f}% editable")
    compare = np.zeros((*hard.shape, 3))  # RGB
    compare[(hard > 0.5) & binary] = 0.45  # grey: in both
    compare[binary & (hard < 0.5)] = [1.0, 0.2, 0.2]  # red: added by this threshold
    compare[(hard > 0.5) & ~binary] = [0.3, 0.6, 1.0]  # blue: lost
    axes[2].imshow(compare)
    axes[2].set_title(f"vs the committed mask ({100 * hard.mean():.1f}%)\nred = added, blue = lost")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle("Binarisation: a low threshold grows the editable region, a high one shrinks it")
    return fig


_ = kh.interactive_figure(binarise, threshold=FloatSlider(value=MASK_THRESHOLD, min=0.05, max=0.95, step=0.05,
                                                          description="threshold"))

# %% [markdown]
# The dataset applies the same rule: a soft mask on disk still comes out of `KontextPairs` as exactly 0 and 1.

# %%
soft_folder = WORK / "soft"
for folder in ("context", "target", "masks", "depth"):
    (soft_folder / folder).mkdir(parents=True)
name = data.names[PAIR]
for folder in ("context", "target", "depth"):
    shutil.copy(data.files(PAIR)[folder], soft_folder / folder)
shutil.copy(soft_path, soft_folder / "masks" / f"{name}.jpg")  # another extension is fine: matched by stem
(soft_folder / "prompts.txt").write_text(data.prompts[PAIR] + "\n", encoding="utf-8")
soft_mask = kh.KontextPairs(soft_folder, resolution=RESOLUTION, mask_threshold=MASK_THRESHOLD)[0]["mask"]
print("mask from the soft JPEG:", tuple(soft_mask.shape), "values", soft_mask.unique().tolist())

# %% [markdown]
# ### No masks? Derive them from the pairs
#
# When context and target are pixel-aligned, the edit is wherever they differ.
# `kh.mask_from_difference(context, target, threshold, dilate)` marks pixels whose largest channel difference
# exceeds `threshold`, then grows the region by `dilate` pixels so soft edges are included. The rule that
# matters: **the mask must cover every changed pixel**. Outside the mask the loss pulls the model towards the
# context, so a changed pixel there (often part of a shadow or a reflection) is a piece of the edit the model is
# trained *not* to make. We check it at the files' own resolution, where nothing has been resampled.

# %%
full = kh.KontextPairs(DATA_ROOT, resolution=size)  # native size: the exact file pixels
print(f"{'pair':26} {'changed px':>10} {'outside committed':>18} {'outside derived':>16} {'derived, thr 0':>15}")
totals = np.zeros(3, dtype=np.int64)
for i in range(len(full)):
    pair = full[i]
    changed = (pair["target"] - pair["context"]).abs().amax(dim=0) > 0  # [H, W] bool: any change at all
    derived = kh.mask_from_difference(pair["context"], pair["target"], DIFF_THRESHOLD, DIFF_DILATE)  # [1, H, W]
    exact = kh.mask_from_difference(pair["context"], pair["target"], 0.0, DIFF_DILATE)
    missed = [int((changed & (m[0] < 0.5)).sum()) for m in (pair["mask"], derived, exact)]
    totals += missed
    print(f"{pair['name']:26} {int(changed.sum()):10d} {missed[0]:18d} {missed[1]:16d} {missed[2]:15d}")
print(f"{'total':26} {'':10} {totals[0]:18d} {totals[1]:16d} {totals[2]:15d}")
print(f"changed pixels left outside the mask: committed masks {totals[0]}, derived at threshold {DIFF_THRESHOLD} "
      f"{totals[1]}, derived at threshold 0 {totals[2]}")

# %% [markdown]
# A mask that covers every changed pixel leaves 0 outside. A threshold above 0 misses the faint changes, such as
# the edge of a moved shadow, that stay below it (0.04 is about 10/255). That threshold exists for JPEG pairs,
# whose compression noise would otherwise mark the whole image; for lossless PNG pairs like these, `threshold=0`
# marks every changed pixel. The figure shows the example pair.

# %%
pair = full[PAIR]
changed = (pair["target"] - pair["context"]).abs().amax(dim=0) > 0  # [H, W]
committed = pair["mask"][0].bool()  # [H, W]
derived = kh.mask_from_difference(pair["context"], pair["target"], DIFF_THRESHOLD, DIFF_DILATE)[0].bool()
disagree = np.zeros((*committed.shape, 3))  # RGB: where the two masks differ, and the changes left uncovered
disagree[(committed & ~derived).numpy()] = [1.0, 0.6, 0.0]  # orange: only in the committed mask
disagree[(derived & ~committed).numpy()] = [0.2, 0.5, 1.0]  # blue: only in the derived mask
disagree[(changed & ~derived).numpy()] = [1.0, 0.0, 0.0]  # red: changed, but outside the derived mask

fig, axes = plt.subplots(1, 4, figsize=(16, 4.4))
axes[0].imshow((pair["target"] - pair["context"]).abs().amax(dim=0).numpy() ** 0.5, cmap="inferno")
axes[0].set_title("|target - context|\n(square root: faint changes show)")
axes[1].imshow(committed.numpy(), cmap="gray")
axes[1].set_title(f"committed mask\n{100 * committed.float().mean():.1f}% editable")
axes[2].imshow(derived.numpy(), cmap="gray")
axes[2].set_title(f"derived: threshold {DIFF_THRESHOLD}, dilate {DIFF_DILATE}\n"
                  f"{100 * derived.float().mean():.1f}% editable")
axes[3].imshow(disagree)
axes[3].set_title(f"red: {int((changed & ~derived).sum())} changed pixels outside the derived mask\n"
                  "orange: committed only, blue: derived only", fontsize="medium")
for ax in axes:
    ax.set_axis_off()
overlap = float((committed & derived).sum() / (committed | derived).sum())  # intersection over union
fig.suptitle(f"{pair['name']}: the derived mask overlaps the committed one by {overlap:.0%} (IoU); "
             f"{int((changed & ~derived).sum())} changed pixels fall below its threshold (red)", fontsize="x-large")
plt.show()

# %% [markdown]
# ## 6. Photos of other shapes: aspect-ratio buckets
#
# Your photos are 4:3, 3:4 or 16:9, often mixed in one folder. FLUX.1 Kontext was trained at a set of
# **preferred resolutions** of about one megapixel, from 672x1568 to 1568x672 (`PREFERRED_KONTEXT_RESOLUTIONS`
# in diffusers' `pipeline_flux_kontext.py`; the pipeline picks the one nearest the input's aspect ratio when
# `_auto_resize=True`). `kh.bucket_shapes(resolution)` scales that list to the training area `resolution²`,
# each side a multiple of 16 (one token), and `kh.nearest_bucket` gives each pair the bucket nearest its
# aspect ratio with diffusers' own `training_utils.find_nearest_bucket`.
#
# `KontextPairs(..., resize=...)` applies one of three policies, the same box to all four images of a pair, so
# masks and depth stay aligned:
#
# - `"bucket"` (the default): the pair's bucket; only the sliver between the photo's and the bucket's aspect
#   ratio is cut (`kh.bucket_crop_box`, centred), nothing is stretched. Each batch is drawn from one bucket.
# - `"square"` (the original design's): resize the whole image to `resolution x resolution`. Nothing is cut
#   off, but a non-square picture is **stretched**.
# - `"crop"`: scale the short side to `resolution`, then take the **centre** square. Shapes stay true, the
#   borders of the long side are lost, and with them any edit there.
#
# We cut the sample pairs to four aspect ratios, write them as a folder and open it with buckets.

# %%
ASPECTS = ((4, 3), (3, 4), (16, 9), (1, 1))  # (width, height) of the cut: landscape, portrait, wide, square
cut = [kh.crop_to_aspect(data[i], ASPECTS[i % len(ASPECTS)]) for i in range(len(data))]
mixed = kh.write_pair_folder(WORK / "mixed", *[[c[k] for c in cut] for k in ("context", "target", "mask", "depth",
                             "prompt")], names=[c["name"] for c in cut], resolution=RESOLUTION)
print(mixed)  # the repr lists the buckets it made: width x height, and how many pairs each holds
shapes = kh.bucket_shapes(RESOLUTION)
print(f"{len(shapes)} buckets at {RESOLUTION} px:", ", ".join(f"{w}x{h}" for w, h in shapes))
for i in range(0, len(mixed), 3):
    print(f"  {mixed.names[i]}: file {cut[i]['context'].shape[2]}x{cut[i]['context'].shape[1]} -> bucket "
          f"{mixed.bucket_of(i)[0]}x{mixed.bucket_of(i)[1]}, item {tuple(mixed[i]['context'].shape)}")

# %%
from matplotlib.patches import Rectangle

fig, ax = plt.subplots(figsize=(12, 4.2))
x = 0
for w, h in shapes:
    held = mixed.buckets.get((w, h), 0)
    ax.add_patch(Rectangle((x, 0), w, h, fill=held > 0, alpha=0.35 if held else 1, color="tab:blue",
                           ec="tab:blue", lw=1.5))
    ax.text(x + w / 2, h + 6, f"{w}x{h}\n{held} pair{'s' if held != 1 else ''}", ha="center", va="bottom",
            fontsize=7, fontweight="bold" if held else "normal")
    x += w + 12
ax.set_xlim(-10, x)
ax.set_ylim(0, max(h for _, h in shapes) + 45)
ax.set_aspect("equal")
ax.set_axis_off()
filled = ", ".join(f"{w}x{h}: {n}" for (w, h), n in mixed.buckets.items())
ax.set_title(f"The {len(shapes)} buckets at {RESOLUTION} px, drawn to scale (one area, other shapes): "
             f"the mixed folder fills {len(mixed.buckets)} of them ({filled})")
plt.show()

# %% [markdown]
# What each policy makes of one landscape photo: a 512x384 pair (the top and bottom of a sample cut off).

# %%
wide = WORK / "wide"
box = (0, size // 8, size, size - size // 8)  # (left, top, right, bottom): 512x384 from 512x512
for folder in ("context", "target", "masks", "depth"):
    (wide / folder).mkdir(parents=True)
    Image.open(data.files(PAIR)[folder]).crop(box).save(wide / folder / f"{name}.png")
(wide / "prompts.txt").write_text(data.prompts[PAIR] + "\n", encoding="utf-8")
print("on disk:", Image.open(wide / "context" / f"{name}.png").size, "(W, H)")
variants = {policy: kh.KontextPairs(wide, resolution=RESOLUTION, resize=policy)[0] for policy in kh.RESIZE_POLICIES}
for policy, one in variants.items():
    print(f"resize={policy!r}: context {tuple(one['context'].shape)}, mask {tuple(one['mask'].shape)}")

# %%
original = np.asarray(Image.open(wide / "context" / f"{name}.png").convert("RGB"))
original_mask = np.asarray(Image.open(wide / "masks" / f"{name}.png")) > 127
fig, axes = plt.subplots(1, 4, figsize=(16, 4.4), gridspec_kw={"width_ratios": [4 / 3, 4 / 3, 1, 1]})
axes[0].imshow(original)
axes[0].contour(original_mask, levels=[0.5], colors="red", linewidths=1)
side_crop = original.shape[0]  # 'crop' keeps the centre square: short side x short side
left = (original.shape[1] - side_crop) // 2
axes[0].add_patch(Rectangle((left, 0), side_crop, side_crop - 1, fill=False, color="cyan", lw=2, ls="--"))
axes[0].set_title(f"the file: {original.shape[1]}x{original.shape[0]} (W x H)\ncyan: what 'crop' keeps")
bucket_wh = (variants["bucket"]["context"].shape[2], variants["bucket"]["context"].shape[1])  # (W, H)
x0, y0, x1, y1 = kh.bucket_crop_box((original.shape[1], original.shape[0]), bucket_wh)
sliver = 1 - (x1 - x0) * (y1 - y0) / (original.shape[0] * original.shape[1])  # the share of the frame the bucket cuts
verdicts = {"bucket": f"true shapes, {sliver:.0%} of the frame cut", "square": "whole frame, stretched taller",
            "crop": "true shapes, left and right cut off"}
for ax, (policy, one) in zip(axes[1:], variants.items()):
    ax.imshow(one["context"].permute(1, 2, 0).numpy())
    ax.contour(one["mask"][0].numpy(), levels=[0.5], colors="red", linewidths=1)
    ax.set_title(f"resize={policy!r}: {one['context'].shape[2]}x{one['context'].shape[1]}\n{verdicts[policy]}")
for ax in axes:
    ax.set_axis_off()
fig.suptitle(f"Resize policies for a landscape pair: 'bucket' keeps its shape ({sliver:.0%} cut), 'square' stretches, "
             "'crop' cuts the sides; the mask (red outline) stays aligned in all three")
plt.show()

# %% [markdown]
# ## 7. Your own data
#
# You will usually start from lists of images in memory: before / after photos, maybe no masks, maybe no
# depth. `kh.write_pair_folder(root, contexts, targets, masks, depths, prompts, names=...)` writes them in the
# layout above (masks as 0/255, depth as **16-bit** PNG) and returns the opened, validated dataset.
#
# **No depth maps?** `kh.estimate_depth(images)` runs Depth Anything V2 (a monocular depth model from the
# Hugging Face Hub, about 100 MB, downloaded once) and returns one `[1, H, W]` map in `[0, 1]` per image,
# near = 1, already our convention. It wants a GPU and the Hub, so the next cell runs only on the real-model
# path (`not TINY`); on the tiny path we reuse the rendered depth maps.

# %%
from PIL import ImageOps

picks = [0, PAIR]  # two sample pairs stand in for "your" photos
contexts = [ImageOps.exif_transpose(Image.open(data.files(i)["context"])).convert("RGB") for i in picks]
targets = [ImageOps.exif_transpose(Image.open(data.files(i)["target"])).convert("RGB") for i in picks]
my_prompts = [data.prompts[i] for i in picks]
masks = [kh.mask_from_difference(c, t, threshold=0.0, dilate=DIFF_DILATE)  # lossless PNGs: threshold 0 is exact
         for c, t in zip(contexts, targets)]
print("derived masks:", [tuple(m.shape) for m in masks])  # [1, H, W] each, float in {0, 1}

depths = [Image.open(data.files(i)["depth"]) for i in picks]  # the rendered 16-bit maps
if not TINY:  # GPU + Hub: estimate depth as you would for your own photos
    try:
        depths = kh.estimate_depth(contexts, model=DEPTH_MODEL)  # one [1, H, W] float in [0, 1] per image
        print("estimated depth:", [tuple(d.shape) for d in depths])
        fig, axes = plt.subplots(1, 2 * len(picks), figsize=(6 * len(picks), 3.4))
        for k, i in enumerate(picks):
            axes[2 * k].imshow(data[i]["depth"][0].numpy(), cmap="magma")
            axes[2 * k].set_title(f"{data.names[i]}: rendered (exact)")
            axes[2 * k + 1].imshow(depths[k][0].numpy(), cmap="magma")
            axes[2 * k + 1].set_title("Depth Anything V2 (estimated)")
        for ax in axes:
            ax.set_axis_off()
        fig.suptitle("Estimated vs exact depth: same convention (bright = near), softer edges")
        plt.show()
    except RuntimeError as err:  # no network or no access: keep the rendered maps
        print(err)

my_data = kh.write_pair_folder(MY_PAIRS, contexts, targets, masks, depths, my_prompts,
                               names=[data.names[i] for i in picks], overwrite=True, resolution=RESOLUTION)
print(my_data)
for folder in ("context", "target", "masks", "depth"):
    files = sorted(p.name for p in (Path(MY_PAIRS) / folder).iterdir())
    print(f"  {folder + '/':9} {files}  (PIL mode {Image.open(Path(MY_PAIRS) / folder / files[0]).mode})")

# %% [markdown]
# Depth maps written by `write_pair_folder` are 16-bit (`I;16`), so nothing is lost on the way to disk. Point
# `DATA_ROOT` at `MY_PAIRS` (or at your own folder) and rerun the notebook to inspect it.
#
# ### Pairs in a Hugging Face dataset
#
# Editing datasets on the Hub are tables: one row per pair, one column per part, with images that a
# `datasets.Image()` column decodes to PIL. `kh.KontextPairs.from_hf_dataset(ds, root, context=..., target=...,
# mask=..., depth=..., prompt=..., name=...)` names the columns, reads every row once and lists every missing
# column, empty cell, repeated name, target of another size than its context, and mask or depth map of another
# aspect ratio in **one** error before anything is written; then it writes the folder
# above and opens it with the same checks. Below, the folder we just wrote becomes such a table (with a Hub
# dataset's kind of column names) and comes back as a folder. A table without masks takes `mask=None`: each mask
# is then derived with `kh.mask_from_difference`, as above. `datasets` is preinstalled in Colab and part of the
# local development install (`pip install -e ".[dev]"`).

# %%
import datasets

table = datasets.Dataset.from_dict({  # PIL images: datasets infers Image() columns; 16-bit depth stays 16-bit
    "source": [Image.open(my_data.files(i)["context"]) for i in range(len(my_data))],
    "edited": [Image.open(my_data.files(i)["target"]) for i in range(len(my_data))],
    "edit_mask": [Image.open(my_data.files(i)["masks"]) for i in range(len(my_data))],
    "depth_map": [Image.open(my_data.files(i)["depth"]) for i in range(len(my_data))],
    "instruction": my_data.prompts,
    "id": my_data.names,
})
print(table)
from_table = kh.KontextPairs.from_hf_dataset(table, WORK / "from_hf", context="source", target="edited",
                                             mask="edit_mask", depth="depth_map", prompt="instruction", name="id",
                                             resolution=RESOLUTION)
same = all(torch.equal(from_table[i][key], my_data[i][key]) for i in range(len(my_data))
           for key in ("context", "target", "mask", "depth"))
print(f"{from_table.names} from the table; every tensor equal to the folder's: {same}")

# %%
shutil.rmtree(WORK)  # the temporary folders of sections 1, 5 and 6

# %% [markdown]
# ## Exercises
#
# Each exercise asks for one function. Write it in its cell in place of the `raise NotImplementedError(...)` line
# and run the cell: the check below your function calls it on inputs of its own, compares the result with the
# package's own function, and names the first shape or value that differs (and where). Until you fill a cell in,
# its check stops with a message, so "Run all" stops at the first exercise you have not done yet.
# Stuck? `kh.exercises.show_solution("binarize_mask")` prints one solution (any exercise's name works).
#
# ### Exercise 1.1: binarise a grey mask
#
# Mask files are often grey: anti-aliased edges, a soft brush, JPEG noise. `kh.KontextPairs(...,
# mask_threshold=0.5)` makes them 0 or 1 (section 5). Write `binarize_mask(grey, threshold)`: a `[H, W]` float
# tensor in `[0, 1]` -> a `[H, W]` float tensor of 0 and 1, where 1 (editable) means the value is at least the
# threshold. The check compares it with the package's mask reading at three thresholds, on pixels that lie exactly
# on them too.

# %%
def binarize_mask(grey, threshold):
    # grey [H, W] in [0, 1] -> [H, W] float, 1 = editable
    raise NotImplementedError("your code here")


kh.exercises.check_binarize_mask(binarize_mask)

# %% [markdown]
# ### Exercise 1.2: distances to a depth map with near = 1
#
# A metric depth estimator or a renderer gives distances: far = large. The model wants `[0, 1]` with **near = 1**
# (section 4). Write `depth_near_one(distance)`: a `[H, W]` distance map -> `[H, W]`, min-max normalised so that the
# nearest pixel is 1 and the farthest 0. What should a constant map (no depth information at all) give? The check
# compares it with `kh.pil_to_depth_array(image, normalize="minmax", invert=True)`, what `KontextPairs(...,
# depth_invert=True)` does with a far = bright file.

# %%
def depth_near_one(distance):
    # distance [H, W], far = large -> [H, W] in [0, 1], near = 1
    raise NotImplementedError("your code here")


kh.exercises.check_depth_near_one(depth_near_one)

# %% [markdown]
# ### Exercise 1.3: a mask from a before / after pair
#
# Write `mask_from_difference(context, target, threshold, dilate)` for two `[3, H, W]` images in `[0, 1]`: a pixel
# is editable when the **largest** of its three channel differences exceeds `threshold`; then the mask grows by
# `dilate` pixels in every direction (a square neighbourhood; `torch.nn.functional.max_pool2d` does it), so it covers
# the edit with a margin. Return `[1, H, W]` floats, 0 or 1. The check compares it with `kh.mask_from_difference`
# (section 5) on a pair with a change in the blue channel alone, one in a corner and one faint change. Why the
# largest channel difference and not the mean of the three?

# %%
def mask_from_difference(context, target, threshold, dilate):
    # context, target [3, H, W] in [0, 1] -> [1, H, W] float, 1 = editable
    raise NotImplementedError("your code here")


kh.exercises.check_mask_from_difference(mask_from_difference)

# %% [markdown]
# ## Recap
#
# - A dataset is `context/ target/ masks/ depth/ prompts.txt`; pairs are matched by **file stem**, and every
#   problem in the folder comes back as one `ValueError` that names its file. Matching by position (the original design)
#   silently gives most pairs the wrong mask after one missing file.
# - `kh.KontextPairs` items: `context`, `target` `[3, H, W]` in `[0, 1]`, `mask` `[1, H, W]` in `{0, 1}`,
#   `depth` `[1, H, W]` in `[0, 1]` with near = 1, plus `prompt` and `name`.
# - Depth stays 16-bit and float: the default per-token depth uses the floats, and only the IP-Adapter's road ends
#   in `kh.depth_to_pil`'s 8-bit RGB image for the CLIP processor; converting a 16-bit file straight to RGB clips it
#   to a few levels.
# - Masks are binarised at `mask_threshold`; a derived mask (`kh.mask_from_difference`) must cover every
#   changed pixel: check it with a count, and use `threshold=0` for lossless pairs.
# - `resize="bucket"` (the default) reads each pair at the Kontext resolution nearest its aspect ratio, scaled to
#   `resolution²` pixels; `"square"` stretches non-square images, `"crop"` keeps the centre; `kh.write_pair_folder`
#   writes your own pairs (and `kh.estimate_depth` supplies depth when you have none).
#
# ## Next
#
# [02_latents_packing_and_ids.ipynb](02_latents_packing_and_ids.ipynb): the images of one pair become Flux
# latents (the VAE, with its shift), are packed into 2x2-patch tokens, and get the position ids that tell the
# transformer which token belongs to the noisy target and which to the context, and where each one sits.
