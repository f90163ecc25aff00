"""The region signal of a kontext_helpers adapter in plain torch: read the file, pool the mask, build the tokens.

Only torch and safetensors are imported here (no ComfyUI, no kontext_helpers), so tests can load this file on its
own. The maths mirrors ``kontext_helpers.conditioning`` (``mask_to_token_grid``, the four region kinds and
``apply_region``) on packed context tokens ``[B, N, 4C]``; :class:`RegionPatch` applies it inside ComfyUI's Flux
model as a ``post_input`` patch, where the tokens have already gone through ``img_in``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

REGION_WEIGHT_FILE = "region_token.safetensors"  # the file name kh.save_adapter writes into an adapter folder
# Column 0 of an image id: target 0, Kontext reference (context) 1 (ComfyUI's default "offset" method), region 2.
TARGET_ID, CONTEXT_ID, REGION_ID = 0.0, 1.0, 2.0
TENSOR_NAMES = {"marked": {"embedding"}, "marked_context": {"embedding"}, "linear": {"proj.weight", "proj.bias"},
                "cells": {"on", "off"}}
MARKING_KINDS = ("marked", "marked_context")  # an embedding added to tokens, nothing appended


@dataclass
class RegionWeights:
    """A region module as ``kh.save_adapter`` stores it: its kind, build grid, token width and tensors (float32)."""

    kind: str
    h_tok: int
    w_tok: int
    c_in: int
    tensors: dict
    cell: int = 2  # RegionCellTokens' cell size (the only one kontext_helpers builds)

    @property
    def appends(self) -> bool:
        """Whether the signal is new tokens after the context (``False``: it is added to the context tokens)."""
        return self.kind not in MARKING_KINDS

    @property
    def marks_target(self) -> bool:
        """Whether the embedding is also added to the masked target (noisy) tokens (``"marked"``)."""
        return self.kind == "marked"


def read_module_file(path: str, weight_file: str, hint: str = "") -> tuple[str, dict, dict]:
    """``(file, metadata, float32 tensors)`` of a module file ``kh.save_adapter`` wrote: ``path`` is the file or the
    adapter folder holding ``weight_file``; ``hint`` ends the message of a missing file. The nodes' one reader: a
    damaged file (cut short, empty, not safetensors) is a ``ValueError`` naming it and what to do, as the package's
    ``read_safetensors`` says it (this folder does not import kontext_helpers)."""
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        path = os.path.join(path, weight_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: pass a {weight_file} file or an adapter folder written by "
                                f"kh.save_adapter{hint}")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k).float() for k in fh.keys()}
    except (SafetensorError, OSError) as err:  # safetensors' header and length checks; a storage read failing
        raise ValueError(f"{path} is damaged: it is not a complete safetensors file ({os.path.getsize(path)} bytes; "
                         f"safetensors says: {err}). A copy cut short, a full disk or an unfinished sync leaves such a "
                         "file. Copy the adapter folder again from where it was saved (or download it again), or "
                         "save it again with kh.save_adapter from the training run.") from err
    return path, meta, tensors


def read_region(path: str) -> RegionWeights:
    """Read ``region_token.safetensors`` (or the adapter folder holding it) written by ``kh.save_adapter``."""
    path, meta, tensors = read_module_file(path, REGION_WEIGHT_FILE)
    missing = [k for k in ("h_tok", "w_tok", "c_in") if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks the metadata {missing}: it was not written by kh.save_adapter")
    kind = meta.get("kind", "linear")  # files written before the region kinds hold the linear token
    if kind not in TENSOR_NAMES:
        raise ValueError(f"{path} holds a region module of kind {kind!r}; this node knows {sorted(TENSOR_NAMES)}")
    if set(tensors) != TENSOR_NAMES[kind]:
        raise ValueError(f"{path}: a {kind!r} region holds {sorted(TENSOR_NAMES[kind])}, found {sorted(tensors)}")
    return RegionWeights(kind, int(meta["h_tok"]), int(meta["w_tok"]), int(meta["c_in"]), tensors,
                         int(meta.get("cell", 2)))


def mask_to_grid(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A pixel mask ``[H, W]``, ``[B, H, W]`` (ComfyUI's MASK) or ``[B, 1, H, W]`` on the ``h x w`` token grid
    ``[B, 1, h, w]``: a token is editable when any of its pixels is (adaptive max pooling, as
    ``kh.mask_to_token_grid``)."""
    m = torch.as_tensor(mask).float()
    if m.ndim == 2:
        m = m[None, None]  # [H, W] -> [1, 1, H, W]
    elif m.ndim == 3:
        m = m[:, None]  # [B, H, W] -> [B, 1, H, W]
    if m.ndim != 4 or m.shape[1] != 1:
        raise ValueError(f"the mask must be [H, W], [B, H, W] or [B, 1, H, W], got shape {tuple(m.shape)}")
    return F.adaptive_max_pool2d(m, (h, w))


def _cells(region: RegionWeights, h: int, w: int) -> tuple[int, int]:
    """The coarse grid of the ``"cells"`` kind on an ``h x w`` token grid: ``ceil(h / cell) x ceil(w / cell)``."""
    return -(-h // region.cell), -(-w // region.cell)


def region_signal(region: RegionWeights, m_small: torch.Tensor) -> torch.Tensor:
    """The module's output for a grid mask ``[B, 1, h, w]``, in float32 on the mask's device.

    ``"marked"`` / ``"marked_context"``: ``m * e`` per token ``[B, h*w, c_in]``; ``"linear"``: one token
    ``proj(flatten(avgpool(m to h_tok x w_tok)))`` ``[B, 1, c_in]``; ``"cells"``: ``a * on + (1 - a) * off`` per
    cell, ``a`` the cell's masked fraction, ``[B, K, c_in]``.
    """
    t = {k: v.to(m_small.device) for k, v in region.tensors.items()}
    m = m_small.float()
    if region.kind in MARKING_KINDS:
        m = m.flatten(2).transpose(1, 2)  # [B, 1, h, w] -> [B, h*w, 1], the packing's row-major order
        return m * t["embedding"]  # [B, N, 1] * [c_in] -> [B, N, c_in]
    if region.kind == "linear":
        if m.shape[-2:] != (region.h_tok, region.w_tok):
            m = F.adaptive_avg_pool2d(m, (region.h_tok, region.w_tok))  # -> [B, 1, h_tok, w_tok]
        flat = m.flatten(1)  # [B, 1, h_tok, w_tok] -> [B, h_tok*w_tok]
        return F.linear(flat, t["proj.weight"], t["proj.bias"])[:, None, :]  # [B, c_in] -> [B, 1, c_in]
    a = F.adaptive_avg_pool2d(m, _cells(region, *m.shape[-2:]))  # -> [B, 1, h_c, w_c]
    a = a.flatten(2).transpose(1, 2)  # [B, 1, h_c, w_c] -> [B, K, 1]
    return a * t["on"] + (1.0 - a) * t["off"]  # -> [B, K, c_in]


def region_ids(region: RegionWeights, h: int, w: int, *, device=None, dtype=torch.float32) -> torch.Tensor | None:
    """Ids ``(2, row, col)`` of the appended tokens on an ``h x w`` grid ``[K, 3]`` (``None`` for
    the marking kinds): ``(2, 0, 0)`` for ``"linear"``, each cell's centre in token units for ``"cells"``."""
    if region.kind in MARKING_KINDS:
        return None
    if region.kind == "linear":
        return torch.tensor([[REGION_ID, 0.0, 0.0]], device=device, dtype=dtype)
    h_c, w_c = _cells(region, h, w)
    rows = ((torch.arange(h_c) + 0.5) * h / h_c - 0.5)[:, None].expand(h_c, w_c)  # [h_c, w_c]
    cols = ((torch.arange(w_c) + 0.5) * w / w_c - 0.5)[None, :].expand(h_c, w_c)  # [h_c, w_c]
    ids = torch.stack([torch.full_like(rows, REGION_ID), rows, cols], dim=-1)  # -> [h_c, w_c, 3]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)  # [h_c, w_c, 3] -> [K, 3]


def apply_region(region: RegionWeights, ctx: torch.Tensor, m_small: torch.Tensor):
    """Packed context tokens ``[B, N, c_in]`` with the signal: ``(ctx + m * e, None)`` for the marking kinds,
    ``([ctx | tokens] [B, N + K, c_in], ids [K, 3])`` otherwise (what ``kh.apply_region`` returns; ``"marked"``
    adds the same ``m * e`` to the target tokens as well)."""
    signal = region_signal(region, m_small).to(device=ctx.device, dtype=ctx.dtype)
    if not region.appends:
        return ctx + signal, None  # [B, N, c_in]
    ids = region_ids(region, *m_small.shape[-2:], device=ctx.device, dtype=ctx.dtype)  # [K, 3]
    return torch.cat([ctx, signal], dim=1), ids  # -> [B, N + K, c_in]


def find_context(ids: torch.Tensor, ref_counts=None) -> tuple[int, int, int] | None:
    """``(start, h, w)`` of the first reference image's tokens in one sample's image ids ``[S, 3]``, or ``None``
    when there is none. Reference tokens have type ``1``; ``ref_counts`` (ComfyUI's
    ``reference_image_num_tokens``, when given) separates several references."""
    where = torch.nonzero(ids[:, 0] == CONTEXT_ID).flatten()
    if where.numel() == 0:
        return None
    start = int(where[0])
    n = int(ref_counts[0]) if ref_counts else int(where.numel())
    if n > where.numel() or int(where[n - 1]) != start + n - 1:
        raise ValueError("the reference image's tokens are not one contiguous run after the target")
    rows, cols = ids[start:start + n, 1], ids[start:start + n, 2]
    w = int((rows == rows[0]).long().cumprod(0).sum())  # the tokens of the first row
    h = n // w
    grid_rows, grid_cols = rows[: h * w].reshape(h, w), cols[: h * w].reshape(h, w)  # [S_c] -> [h, w]
    if h * w != n or not bool((grid_rows == grid_rows[:, :1]).all() and (grid_cols == grid_cols[:1]).all()):
        raise ValueError(f"the {n} reference tokens (type 1) do not form one grid: KontextRegionApply supports one "
                         "reference image (the context), placed by ComfyUI's default 'offset' method")
    return start, h, w


def batch_mask(m_small: torch.Tensor, batch: int) -> torch.Tensor:
    """The grid mask ``[B_m, 1, h, w]`` for a model batch of ``batch``: one mask for all, one per sample, or
    repeated over ComfyUI's stacked cond / uncond halves."""
    if m_small.shape[0] == batch:
        return m_small
    if m_small.shape[0] == 1:
        return m_small.expand(batch, -1, -1, -1)  # [1, 1, h, w] -> [B, 1, h, w]
    if batch % m_small.shape[0] == 0:
        return m_small.repeat(batch // m_small.shape[0], 1, 1, 1)  # [B_m, 1, h, w] -> [B, 1, h, w]
    raise ValueError(f"the mask has a batch of {m_small.shape[0]} but the model runs {batch} samples")


def _id_axes(ids: torch.Tensor, start: int, h: int, w: int) -> tuple[float, float, float, float]:
    """``(row0, row_step, col0, col_step)`` of the reference ids: token grid units to ComfyUI's id values (the
    identity unless rope options scale or shift them)."""
    row0, col0 = float(ids[start, 1]), float(ids[start, 2])
    row_step = float(ids[start + w, 1]) - row0 if h > 1 else 1.0
    col_step = float(ids[start + 1, 2]) - col0 if w > 1 else 1.0
    return row0, row_step, col0, col_step


class RegionPatch:
    """ComfyUI's Flux ``post_input`` patch: the region signal on the reference (context) tokens.

    ``post_input`` runs after ``img_in``, so the context tokens arrive as ``img_in(x) = W x + b``. kontext_helpers
    trained on ``img_in(x + m e) = (W x + b) + m (W e)``: for the marking kinds this adds ``m * W e`` (to the context
    tokens, and for ``"marked"`` to the target tokens too, which must lie on the context's grid), with
    ``W e = img_in(e) - img_in(0)`` (the bias cancels; calling the layer keeps ComfyUI's weight casting and any
    LoRA on it). Appended tokens ``t`` become ``img_in(t)``, their ids go after the image ids; ComfyUI's Flux keeps
    only the target tokens of the output. A batch without reference tokens passes unchanged.
    """

    def __init__(self, region: RegionWeights, mask: torch.Tensor, img_in):
        self.region, self.mask, self.img_in = region, torch.as_tensor(mask).float(), img_in

    def __call__(self, args: dict) -> dict:
        img, ids = args["img"], args["img_ids"]  # [B, S, D] after img_in, [B, S, 3]
        options = args.get("transformer_options") or {}
        found = find_context(ids[0], options.get("reference_image_num_tokens"))
        if found is None:
            return args
        start, h, w = found
        m_small = batch_mask(mask_to_grid(self.mask, h, w), img.shape[0]).to(img.device)  # [B, 1, h, w]
        out = dict(args)
        if not self.region.appends:
            e = torch.stack([self.region.tensors["embedding"], torch.zeros(self.region.c_in)])  # [2, c_in]
            we = self.img_in(e.to(device=img.device, dtype=img.dtype))  # [2, D]: W e + b and b
            m = m_small.flatten(2).transpose(1, 2).to(img.dtype)  # [B, 1, h, w] -> [B, N, 1]
            mark = m * (we[0] - we[1])  # [B, N, 1] * [D] -> [B, N, D]
            n = h * w
            target = img[:, :start]  # [B, N_t, D], the noisy target tokens before the reference
            if self.region.marks_target:
                if start != n:
                    raise ValueError(f"a 'marked' region needs the output on the reference image's token grid "
                                     f"({n} tokens), got {start} target tokens: give the latent the context's size")
                target = target + mark
            out["img"] = torch.cat([target, img[:, start:start + n] + mark, img[:, start + n:]], dim=1)
            return out
        signal = region_signal(self.region, m_small).to(img.dtype)  # [B, K, c_in]
        row0, row_step, col0, col_step = _id_axes(ids[0], start, h, w)
        extra = region_ids(self.region, h, w, device=ids.device, dtype=ids.dtype)  # [K, 3]
        extra[:, 1] = row0 + extra[:, 1] * row_step
        extra[:, 2] = col0 + extra[:, 2] * col_step
        out["img"] = torch.cat([img, self.img_in(signal)], dim=1)  # [B, S + K, D]
        out["img_ids"] = torch.cat([ids, extra[None].expand(ids.shape[0], -1, -1)], dim=1)  # -> [B, S + K, 3]
        return out
