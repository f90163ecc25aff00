"""The position-aware depth signal of a kontext_helpers adapter in plain torch: read the file, cut the depth map
into one 16 x 16 patch per token, project it, and add it inside ComfyUI's Flux.

Only torch and safetensors are imported here (plus :mod:`region_math` of this folder). The maths mirrors
``kontext_helpers.depth`` (``depth_token_features`` and ``DepthTokenEmbedding``); :class:`DepthPatch` applies it as
a ``post_input`` patch, where the tokens have already gone through ``img_in``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # a package inside ComfyUI's custom_nodes
    from .region_math import batch_mask, find_context, read_module_file
except ImportError:  # this file loaded on its own, beside region_math.py
    from region_math import batch_mask, find_context, read_module_file

DEPTH_WEIGHT_FILE = "depth_module.safetensors"  # the file name kh.save_adapter writes into an adapter folder


@dataclass
class DepthWeights:
    """A ``"tokens"`` depth module as ``kh.save_adapter`` stores it (float32)."""

    c_in: int
    patch: int
    on_context: bool
    source: str  # "context" or "target": which image's depth the adapter was trained with
    weight: torch.Tensor  # [c_in, patch * patch]
    bias: torch.Tensor  # [c_in]


def read_depth(path: str) -> DepthWeights:
    """Read ``depth_module.safetensors`` (or the adapter folder holding it) written by ``kh.save_adapter``."""
    path, meta, tensors = read_module_file(path, DEPTH_WEIGHT_FILE, " with a 'tokens' depth module")
    if meta.get("kind") != "tokens" or "c_in" not in meta:
        raise ValueError(f"{path} holds no 'tokens' depth module written by kh.save_adapter (metadata {meta})")
    if set(tensors) != {"proj.weight", "proj.bias"}:
        raise ValueError(f"{path}: a depth module holds proj.weight and proj.bias, found {sorted(tensors)}")
    return DepthWeights(int(meta["c_in"]), int(meta.get("patch", 16)), meta.get("on_context", "True") == "True",
                        meta.get("source", "context"), tensors["proj.weight"], tensors["proj.bias"])


def _depth_batch(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI's IMAGE ``[B, H, W, C]`` (or a ``[B, 1, H, W]`` / ``[H, W]`` map) in ``[0, 1]`` -> ``[B, 1, H, W]``."""
    d = torch.as_tensor(image).float()
    if d.ndim == 2:
        return d[None, None]  # [H, W] -> [1, 1, H, W]
    if d.ndim == 4 and d.shape[1] == 1:
        return d
    if d.ndim == 4:
        return d[..., :3].mean(dim=-1)[:, None]  # [B, H, W, C] -> [B, 1, H, W]: a grey depth picture, R = G = B
    raise ValueError(f"the depth must be an IMAGE [B, H, W, C], a [B, 1, H, W] or an [H, W] map, got {tuple(d.shape)}")


def depth_features(image: torch.Tensor, h: int, w: int, patch: int = 16) -> torch.Tensor:
    """Depth patches per token ``[B, h*w, patch*patch]``: resized (antialiased bilinear) to ``patch h x patch w``
    px, ``[0, 1] -> [-1, 1]``, each patch flattened row-major (``kh.depth_token_features``)."""
    d = _depth_batch(image)  # [B, 1, H, W]
    rows, cols = d.shape[-2:]
    if abs(rows * w / cols - h) > 1 or abs(cols * h / rows - w) > 1:
        raise ValueError(f"the depth map is {cols}x{rows} px (W x H) but the reference image is {w}x{h} tokens: "
                         "their aspect ratios differ. Give the depth map of the reference image's framing")
    if (rows, cols) != (patch * h, patch * w):
        d = F.interpolate(d, size=(patch * h, patch * w), mode="bilinear", align_corners=False, antialias=True)
    d = d.clamp(0.0, 1.0) * 2.0 - 1.0
    patches = F.pixel_unshuffle(d, patch)  # [B, 1, patch h, patch w] -> [B, patch^2, h, w]
    return patches.flatten(2).transpose(1, 2)  # [B, patch^2, h, w] -> [B, h*w, patch^2]


class DepthPatch:
    """ComfyUI's Flux ``post_input`` patch: the depth offset on the target (and reference) tokens.

    kontext_helpers trained on ``img_in(x + o)`` with ``o = P f + b`` per token (``f`` the token's depth patch);
    after ``img_in`` that is ``img_in(x) + W o``, with ``W o = img_in(o) - img_in(0)`` (calling the layer keeps
    ComfyUI's weight casting and any LoRA on it). The target must lie on the reference image's token grid.
    """

    def __init__(self, depth: DepthWeights, image: torch.Tensor, img_in):
        self.depth, self.image, self.img_in = depth, torch.as_tensor(image).float(), img_in

    def __call__(self, args: dict) -> dict:
        img, ids = args["img"], args["img_ids"]  # [B, S, D] after img_in, [B, S, 3]
        options = args.get("transformer_options") or {}
        found = find_context(ids[0], options.get("reference_image_num_tokens"))
        if found is None:
            return args
        start, h, w = found
        n = h * w
        if start != n:
            raise ValueError(f"the depth signal needs the output on the reference image's token grid ({n} tokens), "
                             f"got {start} target tokens: give the latent the reference image's size")
        feats = depth_features(self.image, h, w, self.depth.patch)  # [B_d, N, 256]
        feats = batch_mask(feats[:, None], img.shape[0])[:, 0].to(device=img.device)  # -> [B, N, 256]
        o = F.linear(feats, self.depth.weight.to(feats.device), self.depth.bias.to(feats.device))  # [B, N, c_in]
        zero = torch.zeros(1, 1, self.depth.c_in, device=img.device, dtype=img.dtype)
        delta = self.img_in(o.to(img.dtype)) - self.img_in(zero)  # [B, N, D]: W o
        context = img[:, start:start + n] + delta if self.depth.on_context else img[:, start:start + n]
        out = dict(args)
        out["img"] = torch.cat([img[:, :start] + delta, context, img[:, start + n:]], dim=1)
        return out
