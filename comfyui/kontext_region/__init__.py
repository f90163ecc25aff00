"""ComfyUI custom nodes: the region signal and the depth signal of a kontext_helpers adapter as patches on a
FLUX.1 Kontext MODEL.

Copy or symlink this folder into ``ComfyUI/custom_nodes/``. ``KontextRegionApply`` reads ``region_token.safetensors``
(written by ``kh.save_adapter``) and registers :class:`region_math.RegionPatch` as the model's ``post_input`` patch
on a clone of the MODEL (``ModelPatcher.set_model_post_input_patch``); ``KontextDepthApply`` does the same with
``depth_module.safetensors`` and a depth IMAGE (:class:`depth_math.DepthPatch`). Both patches go on one MODEL.
The LoRA of the same adapter goes through ComfyUI's own LoRA loader after ``kh.export_comfyui``.
kontext_helpers itself is not needed here.
"""

import os

from .depth_math import DEPTH_WEIGHT_FILE, DepthPatch, read_depth
from .region_math import REGION_WEIGHT_FILE, RegionPatch, read_region

REGION_FOLDER = "kontext_region"  # ComfyUI/models/kontext_region: region files chosen by name


def _folder_paths():
    """ComfyUI's ``folder_paths`` module, or ``None`` outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def _register_folder() -> None:
    """Add ``models/kontext_region`` to ComfyUI's model folders (unless extra_model_paths.yaml already did)."""
    fp = _folder_paths()
    if fp is None or REGION_FOLDER in fp.folder_names_and_paths:
        return
    fp.folder_names_and_paths[REGION_FOLDER] = ([os.path.join(fp.models_dir, REGION_FOLDER)], {".safetensors"})


def resolve_region_path(region_file: str, weight_file: str = REGION_WEIGHT_FILE) -> str:
    """A region (or depth) file from what the user typed: a ``.safetensors`` path, an adapter folder, or a file name
    in ``models/kontext_region``."""
    name = region_file.strip().strip('"')
    if not name:
        raise ValueError(f"the file name is empty: give a {weight_file} path, an adapter folder written by "
                         "kh.save_adapter, or a file name in ComfyUI/models/kontext_region")
    if os.path.isdir(name):
        return os.path.join(name, weight_file)
    if os.path.isfile(name):
        return name
    fp = _folder_paths()
    found = fp.get_full_path(REGION_FOLDER, name) if fp is not None else None
    if found is None:
        known = fp.get_filename_list(REGION_FOLDER) if fp is not None else []
        raise FileNotFoundError(f"no region file {name!r}: not a path, and models/{REGION_FOLDER} holds {known}")
    return found


def _img_in(model):
    """The Flux ``img_in`` layer of a ComfyUI MODEL (a ModelPatcher)."""
    if hasattr(model, "get_model_object"):
        diffusion_model = model.get_model_object("diffusion_model")
    else:
        diffusion_model = model.model.diffusion_model
    img_in = getattr(diffusion_model, "img_in", None)
    if img_in is None:
        raise TypeError(f"the Kontext region and depth nodes need a Flux model; this MODEL is "
                        f"{type(diffusion_model).__name__}")
    return img_in


def _img_in_for(model, c_in: int, what: str):
    """The MODEL's ``img_in``, refusing a ``what`` file trained for tokens of another width."""
    img_in = _img_in(model)
    width = getattr(img_in, "in_features", None)
    if width != c_in:
        raise ValueError(f"the {what} file was trained for {c_in}-channel tokens but this model's img_in takes "
                         f"{width}: it belongs to another model (FLUX.1 Kontext takes 64)")
    return img_in


class KontextRegionApply:
    """Apply a trained region file (mask guidance) to a FLUX.1 Kontext MODEL."""

    CATEGORY = "advanced/model_patches"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    DESCRIPTION = ("Adds the region signal of a kontext_helpers adapter (region_token.safetensors) to the Kontext "
                   "reference image's tokens. Use with the adapter's LoRA and a ReferenceLatent of the same image.")

    @classmethod
    def INPUT_TYPES(cls):  # ComfyUI's name
        return {"required": {
            "model": ("MODEL", {"tooltip": "FLUX.1 Kontext, with the adapter's LoRA loaded"}),
            "mask": ("MASK", {"tooltip": "where the edit may happen (1 = editable), over the reference image"}),
            "region_file": ("STRING", {"default": "", "tooltip": "region_token.safetensors, the adapter folder, or "
                                       f"a file name in models/{REGION_FOLDER}"}),
        }}

    def apply(self, model, mask, region_file):
        region = read_region(resolve_region_path(region_file))
        img_in = _img_in_for(model, region.c_in, "region")
        return (_with_post_input_patch(model, RegionPatch(region, mask, img_in)),)


def _with_post_input_patch(model, patch):
    """A clone of the MODEL with ``patch`` added to its ``post_input`` patches (the input MODEL stays as it was)."""
    patched = model.clone()
    if hasattr(patched, "set_model_post_input_patch"):
        patched.set_model_post_input_patch(patch)
    else:
        patched.set_model_patch(patch, "post_input")
    return patched


class KontextDepthApply:
    """Apply a trained depth module (position-aware depth) to a FLUX.1 Kontext MODEL."""

    CATEGORY = "advanced/model_patches"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    DESCRIPTION = ("Adds the depth signal of a kontext_helpers adapter (depth_module.safetensors) to the target and "
                   "reference tokens: one 16x16 patch of the depth map per token. Use with the adapter's LoRA, a "
                   "ReferenceLatent of the context image and an output latent of the context's size.")

    @classmethod
    def INPUT_TYPES(cls):  # ComfyUI's name
        return {"required": {
            "model": ("MODEL", {"tooltip": "FLUX.1 Kontext, with the adapter's LoRA loaded"}),
            "depth": ("IMAGE", {"tooltip": "the depth map (near = bright) the adapter was trained with: the "
                                "context's, or the desired result's (see the adapter's depth source)"}),
            "depth_file": ("STRING", {"default": "", "tooltip": "depth_module.safetensors, the adapter folder, or "
                                      f"a file name in models/{REGION_FOLDER}"}),
        }}

    def apply(self, model, depth, depth_file):
        weights = read_depth(resolve_region_path(depth_file, DEPTH_WEIGHT_FILE))
        img_in = _img_in_for(model, weights.c_in, "depth")
        return (_with_post_input_patch(model, DepthPatch(weights, depth, img_in)),)


_register_folder()

NODE_CLASS_MAPPINGS = {"KontextRegionApply": KontextRegionApply, "KontextDepthApply": KontextDepthApply}
NODE_DISPLAY_NAME_MAPPINGS = {"KontextRegionApply": "Apply Kontext Region (mask)",
                              "KontextDepthApply": "Apply Kontext Depth (depth map)"}
