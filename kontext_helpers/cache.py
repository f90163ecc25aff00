"""Notebook 04: constant work once per sample (docs/design.md, correction 2).

The prompt embeddings (T5 + CLIP), the context and target latents, the mask on the token grid and the
depth signal (per-token depth patches for the ``"tokens"`` kind, a CLIP embedding for ``"ip_adapter"``) do not
change from step to step: :func:`build_train_cache` computes them once, with each
encoder visiting the GPU only for its own stage, and training reads them back by sample index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .conditioning import encode_depth_for_ip_adapter, encode_prompts, mask_to_token_grid
from .depth import depth_token_features
from .labels import estimate_depth
from .latents import normalize_01_to_m11, pack_like_pipeline, to_latents
from .models import has_ip_adapter, modules_visiting, move_modules


@dataclass
class CachedSample:
    """Everything constant about one training sample, computed once (all tensors detached, on ``device``)."""

    name: str
    prompt_embeds: torch.Tensor  # [1, T, D_t5]
    pooled_prompt_embeds: torch.Tensor  # [1, D_clip]
    ctx_tok: torch.Tensor  # [1, N, 4C]
    tgt_tok: torch.Tensor  # [1, N, 4C]
    mask_small: torch.Tensor  # [1, 1, H', W']
    ip_embeds: torch.Tensor | None  # [1, 1, E] for depth_kind "ip_adapter" (with an IP-Adapter), else None
    depth_feat: torch.Tensor | None = None  # [1, N, 256] depth patches per token for depth_kind "tokens", else None
    grid: tuple[int, int] | None = None  # (H', W') of this sample's bucket; None: the cache's h_tok x w_tok


@dataclass
class TrainCache:
    """Per-sample cache, indexed by sample (never by step), plus what every sample shares."""

    samples: list[CachedSample]
    txt_ids: torch.Tensor  # [T, 3]
    h_tok: int  # the first sample's token grid; with aspect-ratio buckets each sample has its own (grid_of)
    w_tok: int

    def grid_of(self, index: int) -> tuple[int, int]:
        """The token grid ``(H', W')`` of sample ``index`` (its bucket's)."""
        return self.samples[index].grid or (self.h_tok, self.w_tok)

    def groups(self) -> list[list[int]]:
        """The sample indices of each token grid (bucket), in order of first appearance."""
        by_grid: dict[tuple[int, int], list[int]] = {}
        for i in range(len(self.samples)):
            by_grid.setdefault(self.grid_of(i), []).append(i)
        return list(by_grid.values())

    def batch(self, indices: list[int], device=None) -> dict[str, torch.Tensor | None]:
        """Stack the cached tensors of ``indices`` into a batch (``[B, ...]``); they must share one token grid."""
        picked = [self.samples[i] for i in indices]
        grids = sorted({self.grid_of(i) for i in indices})
        if len(grids) > 1:
            raise ValueError(f"samples {indices} have the token grids {grids}: a batch must come from one bucket "
                             "(train() draws each batch from one)")

        def cat(attr):
            values = [getattr(s, attr) for s in picked]
            return None if values[0] is None else torch.cat(values, dim=0).to(device)

        return {k: cat(k) for k in ("prompt_embeds", "pooled_prompt_embeds", "ctx_tok", "tgt_tok", "mask_small",
                                    "ip_embeds", "depth_feat")}


def build_train_cache(pipe, dataset, *, max_sequence_length: int = 512, use_depth: bool = True,
                      depth_kind: str = "tokens", depth_source: str = "context", device=None, offload: bool = False,
                      progress: bool = True) -> TrainCache:
    """Encode every sample once: prompts (T5 + CLIP), context/target latents, token-grid masks, and depth.

    Three stages, each with only its own encoders on ``device``: text encoders, then the VAE, then the
    image encoder. With ``offload=True`` the encoders live on the CPU and visit ``device`` only for their
    stage, so the GPU never holds more than the transformer plus one encoder (the way to fit T5-XXL beside
    an NF4 transformer). The transformer is not used. All cached tensors are detached and live on ``device``.

    Depth (``use_depth``): ``depth_kind="tokens"`` caches :func:`depth_token_features` ``[1, N, 256]`` on the
    latents' token grid; ``"ip_adapter"`` the IP-Adapter's CLIP embedding (when the pipeline has one); ``"none"``
    nothing. ``depth_source="context"`` reads ``item["depth"]``; ``"target"`` reads ``item["target_depth"]`` and,
    for an item without one, falls back to ``estimate_depth(item["target"])`` (a monocular model from the Hub:
    its ``RuntimeError`` says what to do when it cannot be loaded).
    """
    from tqdm.auto import tqdm

    if depth_kind not in ("tokens", "ip_adapter", "none") or depth_source not in ("context", "target"):
        raise ValueError(f"depth_kind={depth_kind!r} / depth_source={depth_source!r}: choose 'tokens', "
                         "'ip_adapter' or 'none' / 'context' or 'target'")
    device = torch.device(device) if device is not None else pipe._execution_device
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.vae, getattr(pipe, "image_encoder", None)]
    move_modules(encoders, "cpu" if offload else device)
    items = [dataset[i] for i in range(len(dataset))]
    show = dict(disable=not progress, leave=False)
    with modules_visiting(device, [pipe.text_encoder, pipe.text_encoder_2]):
        texts = [encode_prompts(pipe, it["prompt"], device=device, max_sequence_length=max_sequence_length)
                 for it in tqdm(items, desc="caching prompts", **show)]  # [(1, T, D_t5), (1, D_clip), (T, 3)]
    with modules_visiting(device, [pipe.vae]), torch.no_grad():
        latents = [_cache_latents(pipe.vae, it, device) for it in tqdm(items, desc="caching latents", **show)]
    grid = latents[0][2]
    wanted = use_depth and (depth_kind == "tokens" or (depth_kind == "ip_adapter" and _has_ip_path(pipe)))
    maps = [depth_map_of(it, depth_source) for it in items] if wanted else None
    ips, feats = [None] * len(items), [None] * len(items)
    if maps is not None and depth_kind == "tokens":
        feats = [depth_token_features(d, *lat[2]).to(device) for d, lat in zip(maps, latents)]  # [1, N, 256]
    elif maps is not None:
        with modules_visiting(device, [pipe.image_encoder]):
            ips = [encode_depth_for_ip_adapter(pipe, d, device=device)[0]  # [1, 1, E]
                   for d in tqdm(maps, desc="caching depth", **show)]
    samples = [
        CachedSample(name=it.get("name", str(i)), prompt_embeds=text[0], pooled_prompt_embeds=text[1],
                     ctx_tok=tok[:1], tgt_tok=tok[1:], mask_small=m, ip_embeds=ip, depth_feat=feat, grid=tuple(g))
        for i, (it, text, (tok, m, g), ip, feat) in enumerate(zip(items, texts, latents, ips, feats))
    ]
    return TrainCache(samples=samples, txt_ids=texts[0][2], h_tok=grid[0], w_tok=grid[1])


def _has_ip_path(pipe) -> bool:
    """The pipeline has an image encoder and (once loaded) a transformer with an IP-Adapter."""
    transformer = getattr(pipe, "transformer", None)  # None while loading in stages: the adapter comes with it
    return getattr(pipe, "image_encoder", None) is not None and (transformer is None or has_ip_adapter(transformer))


def depth_map_of(item: dict, source: str = "context"):
    """The depth map a training item contributes: ``item["depth"]`` (``source="context"``) or
    ``item["target_depth"]`` (``"target"``), which falls back to ``estimate_depth(item["target"])`` (a Hub model)
    when the item has none."""
    if source == "context":
        return item["depth"]
    if item.get("target_depth") is not None:
        return item["target_depth"]
    return estimate_depth(item["target"])[0]  # [1, H, W]; RuntimeError naming the fix when the model is unreachable


def _cache_latents(vae, item: dict, device):
    """Context and target tokens ``[2, N, 4C]``, the mask on the token grid ``[1, 1, H', W']``, and ``(H', W')``."""
    pair = torch.stack([item["context"], item["target"]])  # [2, 3, H, W]
    tok, grid = pack_like_pipeline(to_latents(normalize_01_to_m11(pair.to(device)), vae))  # [2, N, 4C]
    mask = mask_to_token_grid(item["mask"][None].to(device), *grid)  # [1, 1, H, W] -> [1, 1, H', W']
    return tok, mask, grid
