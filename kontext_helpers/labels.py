"""Notebook 01, your own images: the two labels a before / after photo pair lacks.

:func:`mask_from_difference` marks where the pair differs (the edit mask); :func:`estimate_depth` runs a
monocular depth model (near = bright). Both return tensors that :func:`kontext_helpers.write_pair_folder`
saves as a dataset folder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from .images import image_to_pil_rgb, image_to_rgb_tensor


def mask_from_difference(context, target, threshold: float = 0.04, dilate: int = 4) -> torch.Tensor:
    """An edit mask from a before / after pair: where the two images differ, grown by ``dilate`` pixels.

    A pixel is editable when its largest channel difference exceeds ``threshold`` (0.04 ~ 10/255, above
    JPEG noise); max-pooling then grows the region by ``dilate`` pixels in every direction (a square
    neighbourhood), so the mask covers every pixel that changed by more than ``threshold``, with a margin.
    Fainter changes (soft shadow edges) can fall outside it: for lossless pairs use ``threshold=0``, which
    covers every changed pixel; keep the default for JPEGs, whose noise would otherwise fill the mask.

    Args:
        context, target: PIL images (any mode; EXIF orientation applied) or ``[3, H, W]`` tensors in
            ``[0, 1]`` (uint8 tensors are divided by 255), of the same size.
        threshold: in ``[0, 1]``; differences ``> threshold`` count as edited.
        dilate: margin in pixels (0 = none).
    Returns:
        ``[1, H, W]`` float32 in {0, 1}; 1 = editable. Save it with ``write_pair_folder`` or
        ``PIL.Image.fromarray((m[0].numpy() * 255).astype("uint8"))``.
    """
    a, b = image_to_rgb_tensor(context, "context"), image_to_rgb_tensor(target, "target")
    if a.shape != b.shape:
        raise ValueError(f"context is {a.shape[2]}x{a.shape[1]} but target is {b.shape[2]}x{b.shape[1]} "
                         "(W x H): resize or crop them to the same frame first")
    if dilate < 0:
        raise ValueError(f"dilate must be >= 0 pixels, got {dilate}")
    changed = (a - b).abs().amax(dim=0) > threshold  # [3, H, W] -> [H, W] bool
    mask = changed.float()[None, None]  # -> [1, 1, H, W]
    if dilate:
        mask = F.max_pool2d(mask, kernel_size=2 * dilate + 1, stride=1, padding=dilate)  # same size, grown
    return mask[0]  # [1, H, W]


def _estimate_in_same_size_batches(estimator, images: list, batch_size: int) -> list[dict]:
    """Run a transformers depth pipeline on batches of one image size each (it stacks a batch, so images of
    other aspect ratios cannot share one); results come back in the input order."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(img.size, []).append(i)
    outputs: list = [None] * len(images)
    for indices in by_size.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            results = estimator([images[i] for i in chunk], batch_size=len(chunk))
            for i, result in zip(chunk, results if isinstance(results, list) else [results]):
                outputs[i] = result
    return outputs


def estimate_depth(
    images,
    model: str = "depth-anything/Depth-Anything-V2-Small-hf",
    device=None,
    *,
    invert: bool = False,
    batch_size: int = 4,
) -> list[torch.Tensor]:
    """Optional: depth maps for your own images with a monocular depth model (transformers pipeline).

    The default model (about 100 MB) comes from the Hugging Face Hub once; a local folder works too. Depth
    Anything predicts relative inverse depth, so after the per-image min-max near = 1, :class:`KontextPairs`'
    convention; pass ``invert=True`` for a metric model (far = large). Images of different sizes are batched
    separately.

    Args:
        images: a PIL image or a list of them, or ``[3, H, W]`` tensors in ``[0, 1]``.
        model: Hub id or local folder of a depth-estimation model; device: default CUDA when available.
    Returns:
        one ``[1, H, W]`` float32 tensor in ``[0, 1]`` (near = 1) per image, at its own size (save them with
        :func:`write_pair_folder`, view them with ``depth_to_pil``).
    Raises:
        RuntimeError: the model cannot be loaded (no network, wrong id), with what to do.
    """
    from transformers import pipeline

    batch = [images] if isinstance(images, Image.Image | torch.Tensor) else list(images)
    pil_images = [image_to_pil_rgb(image, f"images[{i}]") for i, image in enumerate(batch)]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        estimator = pipeline("depth-estimation", model=model, device=device)
    except OSError as err:
        raise RuntimeError(
            f"cannot load the depth model {model!r}: {err}\nIt is downloaded from the Hugging Face Hub on "
            "first use: run this with internet access once, or download the model elsewhere and pass model= "
            "its local folder. Or skip this step and put your own depth maps (any bit depth) in depth/."
        ) from err
    outputs = _estimate_in_same_size_batches(estimator, pil_images, batch_size)
    depths = []
    for img, out in zip(pil_images, outputs):
        pred = torch.as_tensor(out["predicted_depth"]).detach().float().cpu().squeeze()  # -> [h, w]
        if pred.shape != (img.height, img.width):  # older transformers return the model's own grid
            pred = F.interpolate(pred[None, None], size=(img.height, img.width), mode="bilinear",
                                 align_corners=False)[0, 0]  # [1, 1, h, w] -> [H, W]
        lo, hi = pred.min(), pred.max()
        unit = (pred - lo) / (hi - lo) if hi > lo else torch.zeros_like(pred)
        depths.append((1.0 - unit if invert else unit)[None])  # [1, H, W]
    return depths
