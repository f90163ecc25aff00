"""Notebook 03: the region signal, depth through the IP-Adapter, the transformer call and the loss.

The region signal is one of :data:`REGION_KINDS`: the default ``"marked"`` adds one learned vector to every masked
token of the noisy target and the context, so the visual sequence stays ``[noisy target (N) | clean context (N)]``;
``"cells"`` and the original design's ``"linear"`` append tokens after the context (``[... | region (K)]``). The
loss asks for the target's velocity inside the mask and the context outside it (docs/design.md, correction 4).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .images import depth_to_pil
from .latents import REGION_ID, kontext_img_ids, region_token_id
from .models import has_ip_adapter


def mask_to_token_grid(mask: torch.Tensor, h_tok: int, w_tok: int, *, mode: str = "max") -> torch.Tensor:
    """Bring a pixel mask ``[B, 1, H, W]`` (or ``[1, H, W]``) to the token grid ``[B, 1, H', W']``.

    ``mode="max"``: a token is editable when any of its pixels is (conservative: the loss never asks an
    edited pixel to stay unchanged). ``mode="area"``: the editable fraction of the token, in ``[0, 1]``.
    """
    if mask.ndim == 3:
        mask = mask[None]  # [1, H, W] -> [1, 1, H, W]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B, 1, H, W] or [1, H, W], got shape {tuple(mask.shape)}")
    mask = mask.float()
    if mode == "max":
        return F.adaptive_max_pool2d(mask, (h_tok, w_tok))
    if mode == "area":
        return F.adaptive_avg_pool2d(mask, (h_tok, w_tok))
    raise ValueError(f"mode must be 'max' or 'area', got {mode!r}")


class MaskRegionToken(nn.Module):
    """Project a token-grid mask to one learned region token: ``[B, 1, H', W'] -> [B, 1, c_in]`` (``"linear"``).

    The original design's ``Linear(H'*W' -> c_in)`` only accepts the grid it was built for (docs/design.md,
    correction 3). Here a mask on any other grid is area-pooled to ``(h_tok, w_tok)`` first, so one module serves
    every resolution. The token's id is ``(2, 0, 0)``: where the mask lies is only in the learned weights.

    Args:
        h_tok, w_tok: the grid the projection is built for (e.g. 32x32 for 512 px images).
        c_in: channels of one packed token, ``transformer.config.in_channels`` (64 for Flux).
    """

    kind = "linear"
    appends = True  # forward's tokens go after the context tokens (False: they are added to them)
    marks_target = False  # forward's output is also added to the noisy target tokens (MaskedTokenEmbedding)

    def __init__(self, h_tok: int, w_tok: int, c_in: int):
        super().__init__()
        self.h_tok, self.w_tok, self.c_in = int(h_tok), int(w_tok), int(c_in)
        self.proj = nn.Linear(self.h_tok * self.w_tok, self.c_in)

    def forward(self, m_small: torch.Tensor) -> torch.Tensor:
        _check_grid_mask(m_small, type(self).__name__)
        if m_small.shape[-2:] != (self.h_tok, self.w_tok):
            m_small = F.adaptive_avg_pool2d(m_small.float(), (self.h_tok, self.w_tok))  # -> [B, 1, h_tok, w_tok]
        flat = m_small.flatten(1).to(self.proj.weight.dtype)  # [B, 1, H', W'] -> [B, H'*W']
        return self.proj(flat)[:, None, :]  # [B, c_in] -> [B, 1, c_in]

    def token_ids(self, h_tok: int, w_tok: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """The id of the appended token: ``(2, 0, 0)`` -> ``[1, 3]``."""
        return region_token_id(device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"grid={self.h_tok}x{self.w_tok}, c_in={self.c_in}"


class MaskedContextEmbedding(nn.Module):
    """A learned embedding added to the context tokens the mask covers (``"marked_context"``).

    ``[B, 1, H', W'] -> [B, H'W', c_in]``: ``m * e`` per context token, ``e`` a learned ``[c_in]`` vector that
    starts at zero (so training starts from the base model). The marked tokens keep their own ids ``(1, row,
    col)``, so RoPE lines each mark up with the target token at the same place. Works on any grid; ``h_tok`` and
    ``w_tok`` only record the grid it was trained on.
    """

    kind = "marked_context"
    appends = False
    marks_target = False

    def __init__(self, h_tok: int, w_tok: int, c_in: int):
        super().__init__()
        self.h_tok, self.w_tok, self.c_in = int(h_tok), int(w_tok), int(c_in)
        self.embedding = nn.Parameter(torch.zeros(self.c_in))

    def forward(self, m_small: torch.Tensor) -> torch.Tensor:
        _check_grid_mask(m_small, type(self).__name__)
        m = m_small.flatten(2).transpose(1, 2).to(self.embedding.dtype)  # [B, 1, H', W'] -> [B, N, 1]
        return m * self.embedding  # [B, N, 1] * [c_in] -> [B, N, c_in]

    def extra_repr(self) -> str:
        return f"trained grid={self.h_tok}x{self.w_tok}, c_in={self.c_in}"


class MaskedTokenEmbedding(MaskedContextEmbedding):
    """A learned embedding added to the masked **target and context** tokens (``"marked"``).

    ``[B, 1, H', W'] -> [B, N, c_in]``, ``m * e``, added to the context tokens and, at every step, to the noisy
    target tokens on the same grid: each target token is told directly whether it lies in the mask. Through the
    transformer's linear ``x_embedder`` this is a learned mask channel, the way FLUX.1 Fill feeds its mask.
    Needs the target and the context on the same token grid.
    """

    kind = "marked"
    marks_target = True


class RegionCellTokens(nn.Module):
    """One token per cell of a coarse grid over the mask, each at its cell's own place (``"cells"``).

    ``[B, 1, H', W'] -> [B, K, c_in]`` with ``K = ceil(H'/cell) * ceil(W'/cell)``: cell ``k`` gets
    ``a_k * e_on + (1 - a_k) * e_off`` (``a_k`` the cell's masked fraction) and the id ``(2, row, col)`` of its
    centre in target-token units, so RoPE aligns it with the target tokens it covers.
    """

    kind = "cells"
    appends = True
    marks_target = False

    def __init__(self, h_tok: int, w_tok: int, c_in: int, cell: int = 2):
        super().__init__()
        self.h_tok, self.w_tok, self.c_in, self.cell = int(h_tok), int(w_tok), int(c_in), int(cell)
        self.on = nn.Parameter(torch.randn(self.c_in) * 0.1)
        self.off = nn.Parameter(torch.randn(self.c_in) * 0.1)

    def _cells(self, h_tok: int, w_tok: int) -> tuple[int, int]:
        return -(-h_tok // self.cell), -(-w_tok // self.cell)

    def forward(self, m_small: torch.Tensor) -> torch.Tensor:
        _check_grid_mask(m_small, type(self).__name__)
        a = F.adaptive_avg_pool2d(m_small.float(), self._cells(*m_small.shape[-2:]))  # -> [B, 1, H'/cell, W'/cell]
        a = a.flatten(2).transpose(1, 2).to(self.on.dtype)  # [B, 1, h_c, w_c] -> [B, K, 1]
        return a * self.on + (1.0 - a) * self.off  # -> [B, K, c_in]

    def token_ids(self, h_tok: int, w_tok: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """``(2, row, col)`` of each cell's centre on the ``h_tok x w_tok`` token grid -> ``[K, 3]``."""
        h_c, w_c = self._cells(h_tok, w_tok)
        rows = ((torch.arange(h_c) + 0.5) * h_tok / h_c - 0.5)[:, None].expand(h_c, w_c)  # [h_c, w_c]
        cols = ((torch.arange(w_c) + 0.5) * w_tok / w_c - 0.5)[None, :].expand(h_c, w_c)  # [h_c, w_c]
        ids = torch.stack([torch.full_like(rows, REGION_ID), rows, cols], dim=-1)  # -> [h_c, w_c, 3]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)  # [h_c, w_c, 3] -> [K, 3]

    def extra_repr(self) -> str:
        return f"trained grid={self.h_tok}x{self.w_tok}, cell={self.cell}, c_in={self.c_in}"


REGION_KINDS = {"marked": MaskedTokenEmbedding, "marked_context": MaskedContextEmbedding, "cells": RegionCellTokens,
                "linear": MaskRegionToken}
DEFAULT_REGION_KIND = "marked"  # the best of REGION_KINDS on the held-out twin scenes (scripts/region_heldout.py)


def make_region_module(kind: str, h_tok: int, w_tok: int, c_in: int) -> nn.Module:
    """A fresh region module of ``kind`` (one of :data:`REGION_KINDS`) for a ``h_tok x w_tok`` grid."""
    if kind not in REGION_KINDS:
        raise ValueError(f"region kind {kind!r} is unknown: choose one of {sorted(REGION_KINDS)}")
    return REGION_KINDS[kind](h_tok, w_tok, c_in)


def _check_grid_mask(m_small: torch.Tensor, who: str) -> None:
    if m_small.ndim != 4 or m_small.shape[1] != 1:
        raise ValueError(f"{who} expects a mask [B, 1, H', W'], got shape {tuple(m_small.shape)}")


class RegionInputs(NamedTuple):
    """What a region module puts into the sequence (:func:`region_inputs`)."""

    context: torch.Tensor  # [B, N + K, 4C]: the context tokens, marked or followed by K appended tokens
    ids: torch.Tensor | None  # [K, 3] ids of the appended tokens, None when nothing is appended
    target_offset: torch.Tensor | None  # [B, N, 4C] added to the noisy target tokens at every step, or None


def region_inputs(region: nn.Module | None, ctx_tok: torch.Tensor, m_small: torch.Tensor | None, h_tok: int,
                  w_tok: int) -> RegionInputs:
    """The region signal in the sequence: the context tokens with it, the ids of any appended tokens, and the offset
    for the noisy target tokens (``"marked"`` only; the target must be on the context's grid).

    ``ctx_tok [B, N, 4C]`` and the mask on the same ``h_tok x w_tok`` grid ``[B, 1, H', W']``. The module runs once
    (through any DistributedDataParallel wrapper, so its gradients synchronise).
    """
    if region is None:
        return RegionInputs(ctx_tok, None, None)
    base = getattr(region, "module", region)  # unwrap DistributedDataParallel for its attributes
    signal = region(m_small).to(device=ctx_tok.device, dtype=ctx_tok.dtype)
    if not base.appends:
        return RegionInputs(ctx_tok + signal, None, signal if base.marks_target else None)  # [B, N, 4C]
    ids = base.token_ids(h_tok, w_tok, device=ctx_tok.device, dtype=ctx_tok.dtype)  # [K, 3]
    return RegionInputs(torch.cat([ctx_tok, signal], dim=1), ids, None)  # -> [B, N + K, 4C]


def apply_region(region: nn.Module | None, ctx_tok: torch.Tensor, m_small: torch.Tensor | None, h_tok: int,
                 w_tok: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The context part of the sequence with the region signal in it, and the ids of any appended tokens.

    ``ctx_tok [B, N, 4C]`` and the mask on the same ``h_tok x w_tok`` grid ``[B, 1, H', W']`` ->
    ``([B, N + K, 4C], [K, 3])`` for a module that appends ``K`` tokens, ``([B, N, 4C], None)`` for one that
    marks the context tokens (and for ``region=None``). A ``"marked"`` module also marks the noisy target
    tokens: :func:`region_inputs` returns that offset too.
    """
    parts = region_inputs(region, ctx_tok, m_small, h_tok, w_tok)
    return parts.context, parts.ids


def mean_square(params: list[torch.Tensor]) -> torch.Tensor:
    """The mean of ``p**2`` over every element of ``params`` (in fp32): the L2 terms' size-free measure."""
    return sum(p.float().pow(2).sum() for p in params) / sum(p.numel() for p in params)


# How an L2 lambda acts (TrainConfig.l2_form, docs/design.md note 9): "sum" adds lambda * sum(p^2) to the loss (the
# original design; a gradient of 2 lambda p per weight), "mean_square" lambda * mean(p^2) (2 lambda p / n: below
# AdamW's eps on a large model), "decoupled" nothing: AdamW's weight decay shrinks each weight by lr * lambda per step.
L2_FORMS = ("mean_square", "sum", "decoupled")


def _l2_term(params: list[torch.Tensor], lam: float, form: str) -> tuple[torch.Tensor, torch.Tensor | float]:
    """``(mean square of params, what the loss adds for them in l2_form form)``."""
    total = sum(p.float().pow(2).sum() for p in params)
    mean = total / sum(p.numel() for p in params)
    return mean, {"mean_square": lam * mean, "sum": lam * total, "decoupled": 0.0}[form]


def fm_masked_dual_loss_with_l2(
    pred_v: torch.Tensor,
    tgt_tok: torch.Tensor,
    ctx_tok: torch.Tensor,
    noise: torch.Tensor,
    mask_small: torch.Tensor,
    h_tok: int,
    w_tok: int,
    w_in: float = 1.0,
    w_out: float = 1.0,
    l2_region_lambda: float = 1e-4,
    l2_lora_lambda: float = 1e-4,
    region_token_module: nn.Module | None = None,
    lora_named_params: Iterable[tuple[str, nn.Parameter]] | None = None,
    eps: float = 1e-6,
    *,
    return_parts: bool = False,
    l2_form: str = "mean_square",
):
    """Flow-matching loss: target velocity inside the mask, context preserved outside, plus L2.

    With ``x_t = (1 - s) x_0 + s e`` the flow-matching velocity is ``v = e - x_0``.

    * inside (mask 1): ``mean_in (pred_v - (noise - tgt_tok))^2``
    * outside (mask 0): the original design's identity term ``mean_out ((noise - pred_v) - ctx_tok)^2``. Since
      ``(e - v_pred) - x_ctx = (e - x_ctx) - v_pred`` it **is the velocity error against ``noise - ctx_tok``**
      (docs/design.md, correction 4): outside the mask the model learns to flow to the context. (``e - v_pred`` is
      not the model's clean estimate; that is ``x_t - s * v_pred``.)
    * L2 (``l2_form``, :data:`L2_FORMS`): ``"mean_square"`` adds ``l2_region_lambda * mean(p^2)`` over the region
      module's weights and ``l2_lora_lambda * mean(p^2)`` over the LoRA's; ``"sum"`` (the original design) adds
      ``lambda * sum(p^2)``, whose gradient ``2 lambda p`` per weight does not shrink with the number of weights
      ``n`` as the mean's ``2 lambda p / n`` does; ``"decoupled"`` (``TrainConfig``'s default) adds nothing: the
      optimizer's weight decay (``TrainConfig.weight_decays``) shrinks the weights instead.

    Means are over the selected tokens and all channels; ``eps`` keeps an all-zero or all-one mask finite.

    Args:
        pred_v, tgt_tok, ctx_tok, noise: ``[B, N, 4C]`` (the target part of the model output).
        mask_small: ``[B, 1, H', W']`` in ``[0, 1]`` on the token grid.
        h_tok, w_tok: token grid size, ``N = h_tok * w_tok``.
        return_parts: also return ``{"loss_in", "loss_out", "l2_region", "l2_lora"}`` (detached floats; the L2
            parts are the mean squares, before their lambdas, in every form).
    Returns:
        scalar loss ``[]`` (and the parts dict with ``return_parts=True``).
    """
    b, n, c = pred_v.shape
    if l2_form not in L2_FORMS:
        raise ValueError(f"l2_form={l2_form!r}: choose one of {L2_FORMS}")
    if n != h_tok * w_tok:
        raise ValueError(f"pred_v has {n} tokens but the grid {h_tok}x{w_tok} has {h_tok * w_tok}")
    if mask_small.shape[-2:] != (h_tok, w_tok):
        raise ValueError(f"mask_small {tuple(mask_small.shape)} is not on the {h_tok}x{w_tok} token grid")
    pred = pred_v.float()
    m = mask_small.to(pred.dtype).reshape(b, n, 1)  # [B, 1, H', W'] -> [B, N, 1], same order as packing
    v_in = noise.float() - tgt_tok.float()  # flow-matching target velocity
    x_pred = noise.float() - pred  # the original design's form: noise - v (the error is the velocity's)
    se_in = (pred - v_in) ** 2 * m  # [B, N, 4C]
    se_out = (x_pred - ctx_tok.float()) ** 2 * (1.0 - m)  # [B, N, 4C]
    loss_in = se_in.sum() / (m.sum() * c + eps)
    loss_out = se_out.sum() / ((1.0 - m).sum() * c + eps)
    loss = w_in * loss_in + w_out * loss_out
    l2_region = pred.new_zeros(())
    if region_token_module is not None and l2_region_lambda:
        l2_region, term = _l2_term(list(region_token_module.parameters()), l2_region_lambda, l2_form)
        loss = loss + term
    l2_lora = pred.new_zeros(())
    if lora_named_params is not None and l2_lora_lambda:
        params = [p for _, p in lora_named_params]
        if params:
            l2_lora, term = _l2_term(params, l2_lora_lambda, l2_form)
            loss = loss + term
    if not return_parts:
        return loss
    parts = {
        "loss_in": float(loss_in.detach()),
        "loss_out": float(loss_out.detach()),
        "l2_region": float(l2_region.detach()),
        "l2_lora": float(l2_lora.detach()),
    }
    return loss, parts


@torch.no_grad()
def encode_prompts(
    pipe, prompts: str | list[str], *, device=None, max_sequence_length: int = 512
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text conditioning with the pipeline's own ``encode_prompt`` (frozen encoders, no graph).

    Returns:
        ``prompt_embeds [B, T, D_t5]`` (T5), ``pooled_prompt_embeds [B, D_clip]`` (CLIP), ``txt_ids [T, 3]``.
    """
    device = device if device is not None else pipe._execution_device
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    embeds, pooled, txt_ids = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
    )
    return embeds, pooled, txt_ids


@torch.no_grad()
def encode_depth_for_ip_adapter(pipe, depth_images, *, device=None) -> list[torch.Tensor]:
    """CLIP image embeddings of depth maps for the IP-Adapter, from the frozen image encoder, without a graph
    (docs/design.md, correction 7).

    Args:
        depth_images: one depth map or a list of B maps, one per sample, in any form :func:`depth_to_pil`
            takes (PIL of any bit depth, ``[1, H, W]`` tensors in ``[0, 1]``).
    Returns:
        ``[image_embeds [B, 1, E]]``: a list with one tensor per IP-Adapter, the layout
        ``joint_attention_kwargs={"ip_adapter_image_embeds": ...}`` expects (B samples, 1 image each).
    """
    if getattr(pipe, "image_encoder", None) is None:
        raise ValueError("this pipeline has no image encoder / IP-Adapter: load it with load_pipeline(...) "
                         "(ip_adapter=...) to use depth conditioning")
    device = device if device is not None else pipe._execution_device
    maps = depth_images if isinstance(depth_images, list | tuple) else [depth_images]
    embeds = pipe.encode_image([depth_to_pil(d) for d in maps], device, 1)  # [B, E]
    return [embeds[:, None, :]]  # [B, E] -> [B, 1, E]


def kontext_forward(
    transformer,
    noisy_tok: torch.Tensor,
    ctx_tok: torch.Tensor,
    region_tok: torch.Tensor | None,
    *,
    sigma: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    txt_ids: torch.Tensor,
    h_tok: int,
    w_tok: int,
    guidance: float | torch.Tensor | None = 1.0,
    ip_adapter_image_embeds: list[torch.Tensor] | None = None,
    joint_attention_kwargs: dict | None = None,
    region_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """One transformer call on ``[noisy target | clean context (| appended region tokens)]``; returns the target
    velocity.

    The same call ``FluxKontextPipeline.__call__`` makes (``timestep = sigma = t / 1000``, ids ``[S, 3]``),
    plus the appended region tokens with their own id rows.

    Args:
        noisy_tok, ctx_tok: ``[B, N, 4C]``; region_tok: appended tokens ``[B, K, 4C]`` or ``None``
            (:func:`apply_region` builds both; a marked context comes in as ``ctx_tok``).
        sigma: ``[B]`` in ``(0, 1]``, the flow-matching time (docs/design.md, correction 5).
        prompt_embeds ``[B, T, D_t5]``, pooled_prompt_embeds ``[B, D_clip]``, txt_ids ``[T, 3]``.
        guidance: the distilled guidance value (a float, or ``[B]``); ignored when the model has no
            guidance embedding.
        ip_adapter_image_embeds: ``[[B, 1, E]]`` from :func:`encode_depth_for_ip_adapter`.
        region_ids: ``[K, 3]`` ids of ``region_tok``; default ``(2, 0, 0)`` for one token.
    Returns:
        ``pred_v [B, N, 4C]``: the velocity predicted on the target tokens.
    """
    b, n, _ = noisy_tok.shape
    parts = [noisy_tok, ctx_tok] + ([region_tok] if region_tok is not None else [])
    base = getattr(transformer, "module", transformer)  # unwrap DistributedDataParallel for config/dtype
    dtype = base.dtype
    hidden = torch.cat([p.to(dtype) for p in parts], dim=1)  # -> [B, 2N(+K), 4C]
    img_ids = kontext_img_ids(h_tok, w_tok, with_region=False, device=hidden.device, dtype=dtype)  # [2N, 3]
    if region_tok is not None:
        extra = region_ids if region_ids is not None else region_token_id()  # [K, 3]
        if extra.shape[0] != region_tok.shape[1]:
            raise ValueError(f"{region_tok.shape[1]} region tokens but {extra.shape[0]} region id rows")
        img_ids = torch.cat([img_ids, extra.to(device=hidden.device, dtype=dtype)], dim=0)  # -> [2N + K, 3]
    sigma = sigma.to(device=hidden.device, dtype=dtype).reshape(b)  # [B]
    guidance_t = None
    if base.config.guidance_embeds and guidance is not None:
        guidance_t = torch.as_tensor(guidance, device=hidden.device, dtype=torch.float32).expand(b)  # [B]
    kwargs = dict(joint_attention_kwargs or {})  # the transformer pops keys out of this dict: copy it
    if ip_adapter_image_embeds is not None:
        kwargs["ip_adapter_image_embeds"] = [e.to(device=hidden.device, dtype=dtype) for e in ip_adapter_image_embeds]
    elif has_ip_adapter(base):
        kwargs.setdefault("ip_hidden_states", [])  # an IP-Adapter without image tokens adds exactly zero
    out = transformer(
        hidden_states=hidden,
        timestep=sigma,
        guidance=guidance_t,
        pooled_projections=pooled_prompt_embeds.to(dtype),
        encoder_hidden_states=prompt_embeds.to(dtype),
        txt_ids=txt_ids.to(dtype),
        img_ids=img_ids,
        joint_attention_kwargs=kwargs or None,
        return_dict=False,
    )[0]  # [B, 2N(+K), 4C]
    return out[:, :n]  # -> [B, N, 4C], the target part
