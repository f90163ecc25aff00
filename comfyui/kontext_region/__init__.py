"""ComfyUI custom node: the region signal of a kontext_helpers adapter as a patch on a FLUX.1 Kontext MODEL.

Copy or symlink this folder into ``ComfyUI/custom_nodes/``. The node reads ``region_token.safetensors`` (written by
``kh.save_adapter``) and registers :class:`region_math.RegionPatch` as the model's ``post_input`` patch on a clone
of the MODEL (``ModelPatcher.set_model_post_input_patch``). The LoRA of the same adapter goes through ComfyUI's own
LoRA loader after ``kh.export_comfyui``. kontext_helpers itself is not needed here.
"""

import os

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


def resolve_region_path(region_file: str) -> str:
    """A region file from what the user typed: a ``.safetensors`` path, an adapter folder, or a file name in
    ``models/kontext_region``."""
    name = region_file.strip().strip('"')
    if not name:
        raise ValueError("region_file is empty: give a region_token.safetensors path, an adapter folder written by "
                         "kh.save_adapter, or a file name in ComfyUI/models/kontext_region")
    if os.path.isdir(name):
        return os.path.join(name, REGION_WEIGHT_FILE)
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
        raise TypeError(f"KontextRegionApply needs a Flux model; this MODEL is {type(diffusion_model).__name__}")
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
        img_in = _img_in(model)
        width = getattr(img_in, "in_features", None)
        if width != region.c_in:
            raise ValueError(f"the region file was trained for {region.c_in}-channel tokens but this model's img_in "
                             f"takes {width}: it belongs to another model (FLUX.1 Kontext takes 64)")
        patched = model.clone()
        patch = RegionPatch(region, mask, img_in)
        if hasattr(patched, "set_model_post_input_patch"):
            patched.set_model_post_input_patch(patch)
        else:
            patched.set_model_patch(patch, "post_input")
        return (patched,)


_register_folder()

NODE_CLASS_MAPPINGS = {"KontextRegionApply": KontextRegionApply}
NODE_DISPLAY_NAME_MAPPINGS = {"KontextRegionApply": "Apply Kontext Region (mask)"}
