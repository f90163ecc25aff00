"""Image, mask and depth conversion: one function per conversion, used by every notebook.

Every function that takes a PIL image applies its EXIF orientation first (as a file is read), so a mask
computed from in-memory images lines up with the same images written to disk and read back. Bit depth is
kept until the last step: 16-bit (``I;16*``, ``I``) is scaled by 65535, 8-bit by 255, float (``F``) is
clipped to ``[0, 1]``. Alpha means "composite on white" for colour images and "transparent = preserve"
for masks.

Names say input and output: ``pil_to_*`` takes a PIL image; ``image_to_*`` / ``mask_to_*`` /
``depth_to_*`` take what a user may pass (a PIL image, a tensor or a numpy array).
"""

from __future__ import annotations

import numpy as np
import torch

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL modes read as 0..65535
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_EXIF_ORIENTATION = 0x0112


def _is_pil(value) -> bool:
    from PIL import Image

    return isinstance(value, Image.Image)


def pil_upright(img):
    """Apply the EXIF orientation of a PIL image (``ImageOps.exif_transpose``); an upright image is returned as is."""
    from PIL import ImageOps

    if img.getexif().get(_EXIF_ORIENTATION, 1) == 1:
        return img
    return ImageOps.exif_transpose(img)


def open_image(path):
    """Decode an image file completely and apply its EXIF orientation. Returns a loaded PIL image."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decode every byte now: a truncated file fails here, not at training step 500
        return pil_upright(img.copy())


def pil_to_gray_array(img) -> tuple[np.ndarray, float | None]:
    """One channel of any PIL image as float64 without precision loss -> ``([H, W], type_max)``.

    ``type_max`` is the full-scale value of the mode: 1 (``"1"``), 255 (8-bit), 65535 (``I;16*`` and ``I``,
    which is how some Pillow versions open 16-bit PNGs), ``None`` for float ``F`` (values kept as they are).
    Colour modes give the mean of R, G, B (a grey depth map has R = G = B); alpha is ignored here.
    """
    img = pil_upright(img)
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:
        return np.asarray(img).astype(np.float64), 65535.0
    if mode == "F":
        return np.asarray(img).astype(np.float64), None
    if mode in ("1", "L"):
        return np.asarray(img).astype(np.float64), 1.0 if mode == "1" else 255.0
    if mode in ("LA", "La"):
        return np.asarray(img.getchannel("L")).astype(np.float64), 255.0
    if mode not in ("RGB", "RGBA", "RGBX", "RGBa"):
        img = img.convert("RGB")  # P, CMYK, YCbCr, ...
    return np.asarray(img)[..., :3].astype(np.float64).mean(axis=-1), 255.0  # [H, W, 3] -> [H, W]


def pil_to_unit_array(img) -> np.ndarray:
    """One channel of a PIL image in ``[0, 1]``: divided by the mode's full scale (float ``F`` is clipped)."""
    values, type_max = pil_to_gray_array(img)
    return np.clip(values / type_max if type_max else values, 0.0, 1.0)


def pil_to_rgb(img):
    """Any PIL image -> 8-bit ``RGB``: transparent pixels on white, 16-bit and float grey by their full range."""
    from PIL import Image

    img = pil_upright(img)
    if img.mode == "RGB":
        return img
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "F":
        levels = np.round(pil_to_unit_array(img) * 255.0).astype(np.uint8)  # [H, W]
        return Image.fromarray(levels).convert("RGB")
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def pil_to_rgb_tensor(img) -> torch.Tensor:
    """Any PIL image -> ``[3, H, W]`` float32 in ``[0, 1]`` (through :func:`pil_to_rgb`)."""
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(pil_to_rgb(img)).float() / 255.0  # uint8 [3, H, W] -> float [3, H, W]


def image_to_rgb_tensor(image, what: str = "image") -> torch.Tensor:
    """A PIL image or a ``[3, H, W]`` / ``[1, 3, H, W]`` tensor -> ``[3, H, W]`` float32 on the CPU.

    Float tensors are taken as ``[0, 1]``; uint8 tensors are divided by 255.
    """
    if _is_pil(image):
        return pil_to_rgb_tensor(image)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]  # [1, 3, H, W] -> [3, H, W]
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"{what}: expected a [3, H, W] tensor, got shape {tuple(image.shape)}")
        return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    raise TypeError(f"{what}: expected a PIL image or a [3, H, W] torch tensor, got {type(image).__name__} "
                    "(for a numpy array [H, W, 3] use PIL.Image.fromarray(array))")


def rgb_tensor_to_pil(rgb: torch.Tensor):
    """``[3, H, W]`` in ``[0, 1]`` -> 8-bit ``RGB`` PIL image (rounded, not truncated)."""
    from torchvision.transforms.functional import to_pil_image

    return to_pil_image((rgb.detach().cpu().float().clamp(0, 1) * 255.0).round().to(torch.uint8))


def image_to_pil_rgb(image, what: str = "image"):
    """A PIL image or a ``[3, H, W]`` / ``[1, 3, H, W]`` tensor in ``[0, 1]`` -> 8-bit ``RGB`` PIL image."""
    if _is_pil(image):
        return pil_to_rgb(image)
    return rgb_tensor_to_pil(image_to_rgb_tensor(image, what))


def image_to_hwc_array(image, what: str = "image") -> np.ndarray:
    """A PIL image or tensor -> numpy ``[H, W, 3]`` float32 in ``[0, 1]``, what ``imshow`` takes."""
    return image_to_rgb_tensor(image, what).permute(1, 2, 0).numpy()  # [3, H, W] -> [H, W, 3]


def values_to_hw_array(values, what: str) -> np.ndarray:
    """A ``[H, W]`` / ``[1, H, W]`` / ``[1, 1, H, W]`` / ``[H, W, 1]`` tensor or numpy array -> float64 ``[H, W]``.

    Bool arrays become 0/1; integer arrays are scaled to ``[0, 1]`` (uint8 / 255, other integers / 65535).
    """
    if isinstance(values, torch.Tensor):
        t = values.detach().cpu()
        values = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    if not isinstance(values, np.ndarray):
        raise TypeError(f"{what}: expected a PIL image, a torch tensor or a numpy array [H, W] or [1, H, W], "
                        f"got {type(values).__name__}")
    arr = values
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]  # [1, (1,) H, W] -> [H, W]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]  # [H, W, 1] -> [H, W]
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected one channel [H, W] or [1, H, W], got shape {values.shape}")
    if arr.dtype == np.bool_:
        return arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float64) / (255.0 if arr.dtype == np.uint8 else 65535.0)
    return arr.astype(np.float64)


def pil_to_mask_array(img) -> np.ndarray:
    """A mask image as float64 ``[H, W]`` in ``[0, 1]`` (white = editable); transparent pixels count as black."""
    from PIL import Image

    img = pil_upright(img)
    if img.mode in SIXTEEN_BIT_MODES or img.mode in ("F", "1", "L"):
        return pil_to_unit_array(img)
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, img.convert("RGBA"))
    return np.asarray(img.convert("L")).astype(np.float64) / 255.0


def pil_to_binary_mask(img, threshold: float = 0.5):
    """Binarise a mask image at ``threshold`` of its full range -> ``L`` image with values {0, 255}."""
    from PIL import Image

    return Image.fromarray(np.where(pil_to_mask_array(img) >= threshold, 255, 0).astype(np.uint8))


def mask_to_tensor(mask, what: str = "mask") -> torch.Tensor:
    """An edit mask -> ``[1, 1, H, W]`` float32 in ``[0, 1]`` (1 = editable).

    A PIL image is binarised at half its full range (any bit depth, EXIF and alpha handled); a tensor or
    numpy array ``[H, W]`` / ``[1, H, W]`` / ``[1, 1, H, W]`` keeps its values, which must lie in ``[0, 1]``.
    """
    if _is_pil(mask):
        binary = pil_to_mask_array(mask) >= 0.5  # [H, W]
        return torch.from_numpy(binary).float()[None, None]  # [H, W] -> [1, 1, H, W]
    if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[:2] != (1, 1):
        raise ValueError(f"{what}: expected one mask, [H, W], [1, H, W] or [1, 1, H, W], got shape {tuple(mask.shape)}")
    m = torch.from_numpy(values_to_hw_array(mask, what)).float()[None, None]  # [H, W] -> [1, 1, H, W]
    if m.numel() and (m.min() < 0 or m.max() > 1):
        raise ValueError(f"{what}: values must lie in [0, 1] (1 = editable), got [{m.min():.3g}, {m.max():.3g}]")
    return m


def mask_to_pil(mask, what: str = "mask"):
    """Any mask :func:`mask_to_tensor` accepts -> PIL ``L`` with white (255) = editable, black (0) = preserve."""
    from PIL import Image

    m = mask_to_tensor(mask, what)[0, 0]  # [H, W]
    return Image.fromarray(((m >= 0.5).to(torch.uint8) * 255).numpy(), mode="L")


def pil_to_depth_array(img, normalize: str = "none", invert: bool = False) -> np.ndarray:
    """A depth image -> float64 ``[H, W]`` in ``[0, 1]``, near = 1.

    ``normalize="none"`` divides by the mode's full range (255, 65535; float clipped); ``"minmax"`` maps the
    map's own range to ``[0, 1]`` (a constant map gives zeros). ``invert`` flips far / near.
    """
    if normalize == "none":
        unit = pil_to_unit_array(img)
        return 1.0 - unit if invert else unit
    if normalize != "minmax":
        raise ValueError(f"normalize must be 'minmax' or 'none', got {normalize!r}")
    values, _ = pil_to_gray_array(img)
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:  # constant (or NaN) map: no depth information
        return np.zeros_like(values)
    return ((hi - values) if invert else (values - lo)) / (hi - lo)


def depth_to_array(depth, what: str = "depth") -> np.ndarray:
    """A depth map -> float64 ``[H, W]`` in ``[0, 1]`` (near = 1).

    A PIL image of any bit depth is divided by its full range (:func:`pil_to_depth_array`); a tensor or
    numpy array (``[H, W]``, ``[1, H, W]``, ``[1, 1, H, W]``) is taken as ``[0, 1]`` floats and clipped.
    """
    if _is_pil(depth):
        arr = pil_to_depth_array(depth)
    else:
        arr = values_to_hw_array(depth, what)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or inf values")
    return np.clip(arr, 0.0, 1.0)


def depth_to_pil(depth, what: str = "depth"):
    """A depth map -> 8-bit grey ``RGB`` PIL image (R = G = B), what the IP-Adapter's ``CLIPImageProcessor`` takes.

    The same map as a 16-bit PNG, an 8-bit PNG or floats in ``[0, 1]`` gives the same picture.
    """
    from PIL import Image

    grey = np.round(depth_to_array(depth, what) * 255.0).astype(np.uint8)  # [H, W]
    return Image.fromarray(grey).convert("RGB")
