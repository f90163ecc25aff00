"""Notebook 03: depth as a position-aware signal on the image tokens (the ``"tokens"`` depth kind).

Each 16 x 16 pixel patch of the depth map, the patch one image token covers, becomes 256 numbers; a learned
linear layer that starts at zero maps them to a ``[4C]`` offset added to the noisy target tokens at every step
and to the context tokens. Through the transformer's linear ``x_embedder`` this is BFL's zero-padded channel
concatenation of FLUX.1 Depth (and of diffusers' ``examples/flux-control``) written as an addition, so training
starts exactly at the base model. The IP-Adapter path (``"ip_adapter"``, a CLIP embedding of the whole depth map)
stays available in :mod:`kontext_helpers.conditioning`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .images import depth_to_array

PATCH = 16  # pixels per token side: VAE 8x and 2x2 packing


def _depth_batch(depth) -> torch.Tensor:
    """Any depth map (PIL of any bit depth, ``[H, W]`` / ``[1, H, W]`` / ``[B, 1, H, W]`` tensor or array) ->
    ``[B, 1, H, W]`` float32 in ``[0, 1]`` on the CPU, through :func:`kontext_helpers.images.depth_to_array` (so the
    same map as an 8-bit PNG, a 16-bit PNG or floats gives the same values)."""
    if isinstance(depth, torch.Tensor) and depth.ndim == 4:
        if depth.shape[1] != 1:
            raise ValueError(f"depth must be [B, 1, H, W], [1, H, W] or [H, W], got shape {tuple(depth.shape)}")
        maps = [depth_to_array(d, f"depth[{i}]") for i, d in enumerate(depth)]  # B x [H, W] float64
    else:
        maps = [depth_to_array(depth)]  # [H, W] float64
    return torch.stack([torch.from_numpy(m) for m in maps]).float()[:, None]  # [B, H, W] -> [B, 1, H, W]


def _check_aspect(h: int, w: int, h_tok: int, w_tok: int) -> None:
    """Refuse a depth map whose aspect ratio is off the token grid's by more than one token's rounding."""
    rows_at_grid_width = h * w_tok / w  # the depth map's height in tokens when its width spans w_tok tokens
    cols_at_grid_height = w * h_tok / h
    if abs(rows_at_grid_width - h_tok) > 1 or abs(cols_at_grid_height - w_tok) > 1:
        raise ValueError(
            f"the depth map is {w}x{h} px (W x H) but the token grid is {w_tok}x{h_tok} tokens "
            f"({PATCH * w_tok}x{PATCH * h_tok} px): their aspect ratios differ by more than one token. Give the depth "
            "map of the context image itself (same framing), or crop / resize it to the context's aspect ratio")


def depth_token_features(depth, h_tok: int, w_tok: int) -> torch.Tensor:
    """Depth patches per image token: ``[B, 1, H, W]`` (or ``[1, H, W]``, or a PIL image) -> ``[B, N, 256]``.

    The map (float in ``[0, 1]``, near = 1; 8/16-bit images through ``depth_to_array``) is resized with
    antialiased bilinear interpolation (as PIL resizes) to ``16 h_tok x 16 w_tok`` px when its size differs, mapped
    to ``[-1, 1]``, and each 16 x 16 patch is flattened (``F.pixel_unshuffle``). Tokens are row-major over the grid,
    the order of :func:`kontext_helpers.latents.pack_like_pipeline`; channel ``16 y + x`` is pixel ``(y, x)`` of
    the patch. Computed in float32 on the CPU; returned on the input tensor's device.

    Raises:
        ValueError: the map's aspect ratio differs from the grid's by more than one token.
    """
    device = depth.device if isinstance(depth, torch.Tensor) else torch.device("cpu")
    d = _depth_batch(depth)  # [B, 1, H, W] in [0, 1]
    h, w = d.shape[-2:]
    _check_aspect(h, w, h_tok, w_tok)
    size = (PATCH * h_tok, PATCH * w_tok)
    if (h, w) != size:
        d = F.interpolate(d, size=size, mode="bilinear", align_corners=False, antialias=True)  # -> [B, 1, 16H', 16W']
    d = d.clamp(0.0, 1.0) * 2.0 - 1.0  # [0, 1] -> [-1, 1], as images enter the VAE
    patches = F.pixel_unshuffle(d, PATCH)  # [B, 1, 16H', 16W'] -> [B, 256, H', W']
    return patches.flatten(2).transpose(1, 2).contiguous().to(device)  # [B, 256, H', W'] -> [B, N, 256]


class DepthTokenEmbedding(nn.Module):
    """A learned offset per image token from its depth patch (``"tokens"``): ``[B, N, 256] -> [B, N, c_in]``.

    ``proj = Linear(patch * patch, c_in)`` with weight and bias at zero, so an untrained module adds exactly
    nothing. The offset goes onto the noisy target tokens at every step and, with ``on_context``, onto the
    context tokens. Works on any grid (the features carry the position); the target must be on the context's grid.
    """

    kind = "tokens"

    def __init__(self, c_in: int, patch: int = PATCH, on_context: bool = True):
        super().__init__()
        self.c_in, self.patch, self.on_context = int(c_in), int(patch), bool(on_context)
        self.proj = nn.Linear(self.patch * self.patch, self.c_in)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 3 or features.shape[-1] != self.patch * self.patch:
            raise ValueError(f"DepthTokenEmbedding expects depth features [B, N, {self.patch * self.patch}] "
                             f"(kh.depth_token_features), got shape {tuple(features.shape)}")
        return self.proj(features.to(self.proj.weight.dtype))  # [B, N, 256] -> [B, N, c_in]

    def extra_repr(self) -> str:
        return f"c_in={self.c_in}, patch={self.patch}, on_context={self.on_context}"


DEPTH_KINDS = ("tokens", "ip_adapter")  # TrainConfig.depth_kind also accepts "none"
DEFAULT_DEPTH_KIND = "tokens"  # the only kind that placed anything on the held-out depth scenes (docs/design.md)


def make_depth_module(kind: str, c_in: int) -> nn.Module | None:
    """A fresh depth module of ``kind``: a :class:`DepthTokenEmbedding` for ``"tokens"``, ``None`` for
    ``"ip_adapter"`` (depth through the pipeline's IP-Adapter) and ``"none"``."""
    if kind == "tokens":
        return DepthTokenEmbedding(c_in)
    if kind in DEPTH_KINDS or kind == "none":
        return None
    raise ValueError(f"depth kind {kind!r} is unknown: choose one of {[*DEPTH_KINDS, 'none']}")


def depth_inputs(depth_module: nn.Module | None, features: torch.Tensor | None, *,
                 keep: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The depth offsets ``(target_offset [B, N, 4C], context_offset [B, N, 4C] or None)``; ``(None, None)``
    without a module or without features.

    The module runs once (through any DistributedDataParallel wrapper). ``keep``: ``[B]`` in ``{0, 1}``, the
    samples depth dropout keeps; a dropped sample gets no offset at all (zero, not the projection's bias), exactly
    what a call without depth gets.
    """
    if depth_module is None or features is None:
        return None, None
    base = getattr(depth_module, "module", depth_module)  # unwrap DistributedDataParallel for its attributes
    offset = depth_module(features)  # [B, N, 4C]
    if keep is not None:
        offset = offset * keep.to(offset)[:, None, None]  # [B] -> [B, 1, 1]
    return offset, offset if base.on_context else None


def check_depth_module(depth_module, c_in: int) -> None:
    """Refuse anything but a depth module of :data:`DEPTH_KINDS` built for ``c_in``-channel tokens."""
    if getattr(depth_module, "kind", None) not in DEPTH_KINDS or not hasattr(depth_module, "proj"):
        raise TypeError(f"depth_module must be a kh.DepthTokenEmbedding (kind 'tokens'), got "
                        f"{type(depth_module).__name__}")
    if depth_module.c_in != c_in:
        raise ValueError(f"the depth module was built for c_in={depth_module.c_in} but this transformer takes "
                         f"{c_in}-channel tokens (transformer.config.in_channels): it was trained for another model")


def add_offsets(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a + b`` where both exist, else the one that does (or ``None``): the region and depth target offsets."""
    if a is None:
        return b
    return a if b is None else a + b
