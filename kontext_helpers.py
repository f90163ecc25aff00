"""kontext_helpers: LoRA training for FLUX.1 Kontext with a region token and depth through an IP-Adapter.

One module, imported by every notebook in ``notebooks/`` and by the tests. It has no import-time work
beyond imports, no global pipeline, and takes ``device`` / ``dtype`` as arguments.

Sections
    1. Core tensors: normalisation, VAE latents, 2x2 packing, position ids, region token, loss.
    2. Pipelines: ``load_pipeline("tiny")`` (offline, random, ~1 s on a CPU) or a real Hub id / local path.
    3. Data: ``KontextPairs`` and helpers for a user's own pairs.
    4. Training: ``TrainConfig``, the per-sample cache, ``train`` with atomic checkpoints and exact resume.
    5. Inference: ``sample_edit`` (the pipeline's loop plus the region token), adapters, previews, metrics.
    6. Command line: ``python -m kontext_helpers train --data DIR --out DIR`` (also under ``accelerate launch``).

Dimension legend (used in every shape comment)
    B        batch size
    C        VAE latent channels (16 for Flux)
    H, W     image height and width in pixels
    H_l, W_l latent height and width (H / 8, W / 8 for Flux's VAE)
    H', W'   token grid: latent grid after 2x2 packing (H_l / 2, W_l / 2); also written h_tok, w_tok
    N        number of image tokens of one image, H' * W'
    4C       channels of one packed token (64 for Flux: ``transformer.config.in_channels``), also c_in
    T        number of text tokens (T5 sequence length)
    D        transformer inner width (num_attention_heads * attention_head_dim)

The visual sequence the transformer sees during training and sampling is
``[noisy target tokens (N) | clean context tokens (N) | region token (1)]`` -> ``[B, 2N+1, 4C]`` with
position ids ``[2N+1, 3]`` whose first column says which part a token belongs to
(0 target, 1 context, 2 region), exactly as ``FluxKontextPipeline`` marks its context tokens with 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    # 1. Core tensors
    "REGION_ID",
    "MaskRegionToken",
    "collect_lora_named_params",
    "fm_masked_dual_loss_with_l2",
    "img_ids_grid",
    "kontext_img_ids",
    "mask_to_token_grid",
    "normalize_01_to_m11",
    "pack_like_pipeline",
    "region_token_id",
    "to_latents",
    "unpack_like_pipeline",
    # 2. Pipelines
    "build_tiny_pipeline",
    "default_dtype",
    "default_model",
    "describe_environment",
    "interactive_figure",
    "load_pipeline",
    # 3. Data
    "KontextPairs",
    "depth_to_pil",
    "estimate_depth",
    "mask_from_difference",
    "show_pairs",
    "write_pair_folder",
    # 4. Training
    "GPU_PRESETS",
    "LORA_TARGET_PRESETS",
    "LiveLossPlot",
    "TrainCache",
    "TrainConfig",
    "TrainResult",
    "add_lora",
    "build_train_cache",
    "detect_gpu_preset",
    "encode_depth_for_ip_adapter",
    "encode_prompts",
    "evaluation_loss",
    "kontext_forward",
    "list_checkpoints",
    "load_checkpoint",
    "nf4_quantization_config",
    "sample_sigmas",
    "save_checkpoint",
    "train",
    "training_loss",
    # 5. Inference
    "Comparison",
    "compare_variants",
    "edit_metrics",
    "export_comfyui",
    "load_adapter",
    "metrics_table",
    "preview_grid",
    "sample_edit",
    "save_adapter",
]

TARGET_ID, CONTEXT_ID, REGION_ID = 0.0, 1.0, 2.0


# ==================================================================================================
# 1. Core tensors
# ==================================================================================================


def normalize_01_to_m11(img: torch.Tensor) -> torch.Tensor:
    """Map pixel values from ``[0, 1]`` to ``[-1, 1]`` (the VAE's input range).

    Args:
        img: ``[B, 3, H, W]`` or ``[3, H, W]``, float in ``[0, 1]``.
    Returns:
        same shape and dtype, values in ``[-1, 1]``.
    """
    return img * 2.0 - 1.0


def to_latents(
    img_bchw: torch.Tensor,
    vae,
    *,
    sample_mode: str = "argmax",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Encode images to Flux latents exactly as ``FluxKontextPipeline._encode_vae_image`` does.

    ``z = (vae.encode(x) - shift_factor) * scaling_factor``. The seed forgot the shift (DESIGN §5.1);
    without it the latents are offset from what the pipeline samples.

    Args:
        img_bchw: ``[B, 3, H, W]`` in ``[-1, 1]`` (use :func:`normalize_01_to_m11` first). Moved to the
            VAE's device and dtype here.
        vae: a diffusers ``AutoencoderKL`` (``pipe.vae``).
        sample_mode: diffusers' own values: ``"argmax"`` (the distribution's mode, what the pipeline uses
            for its context image) or ``"sample"`` (a draw from the posterior, using ``generator``).
        generator: only used with ``sample_mode="sample"``.
    Returns:
        ``[B, C, H_l, W_l]`` latents in the VAE's dtype.
    """
    from diffusers.pipelines.flux.pipeline_flux_kontext import retrieve_latents

    if sample_mode not in ("argmax", "sample"):
        raise ValueError(f"sample_mode must be 'argmax' or 'sample' (diffusers' values), got {sample_mode!r}")
    if img_bchw.ndim != 4 or img_bchw.shape[1] != 3:
        raise ValueError(f"to_latents expects an image batch [B, 3, H, W], got shape {tuple(img_bchw.shape)}")
    img_bchw = img_bchw.to(device=vae.device, dtype=vae.dtype)
    z = retrieve_latents(vae.encode(img_bchw), generator=generator, sample_mode=sample_mode)
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def pack_like_pipeline(lat: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pack latents into 2x2-patch tokens, bit for bit as ``FluxKontextPipeline._pack_latents``.

    Args:
        lat: ``[B, C, H_l, W_l]`` with even ``H_l`` and ``W_l``.
    Returns:
        ``tokens [B, N, 4C]`` with ``N = H' * W'`` (row-major over the token grid) and ``(H', W')``.
    """
    if lat.ndim != 4:
        raise ValueError(f"pack_like_pipeline expects latents [B, C, H_l, W_l], got shape {tuple(lat.shape)}")
    b, c, h, w = lat.shape
    if h % 2 or w % 2:
        raise ValueError(
            f"latent size {h}x{w} is odd: 2x2 packing needs even latent sides, i.e. image sides that are "
            f"multiples of 16 pixels (got about {h * 8}x{w * 8} px). Resize or crop the image."
        )
    h_tok, w_tok = h // 2, w // 2
    x = lat.view(b, c, h_tok, 2, w_tok, 2)  # [B, C, H_l, W_l] -> [B, C, H', 2, W', 2]
    x = x.permute(0, 2, 4, 1, 3, 5)  # -> [B, H', W', C, 2, 2]
    tokens = x.reshape(b, h_tok * w_tok, c * 4)  # -> [B, N, 4C]
    return tokens, (h_tok, w_tok)


def unpack_like_pipeline(tokens: torch.Tensor, h_tok: int, w_tok: int) -> torch.Tensor:
    """Invert :func:`pack_like_pipeline` (the same maths as ``FluxKontextPipeline._unpack_latents``).

    Args:
        tokens: ``[B, N, 4C]`` with ``N = h_tok * w_tok``.
    Returns:
        ``[B, C, 2*h_tok, 2*w_tok]`` latents.
    """
    b, n, c4 = tokens.shape
    if n != h_tok * w_tok or c4 % 4:
        raise ValueError(
            f"cannot unpack {n} tokens of {c4} channels onto a {h_tok}x{w_tok} grid "
            f"(need N = h_tok * w_tok = {h_tok * w_tok} and channels divisible by 4)"
        )
    x = tokens.view(b, h_tok, w_tok, c4 // 4, 2, 2)  # [B, N, 4C] -> [B, H', W', C, 2, 2]
    x = x.permute(0, 3, 1, 4, 2, 5)  # -> [B, C, H', 2, W', 2]
    return x.reshape(b, c4 // 4, h_tok * 2, w_tok * 2)  # -> [B, C, H_l, W_l]


def img_ids_grid(
    h_tok: int,
    w_tok: int,
    mark: float = TARGET_ID,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Position ids ``(type, row, col)`` of one token grid, as ``FluxKontextPipeline._prepare_latent_image_ids``.

    The seed's version was 3D ``[B, N, 3]``; diffusers deprecates that and wants 2D ``[N, 3]`` (DESIGN §5.6).

    Args:
        h_tok, w_tok: token grid size ``H', W'``.
        mark: column 0: ``0`` target, ``1`` context, ``2`` region.
    Returns:
        ``[N, 3]`` with ``N = h_tok * w_tok``, row-major like the packed tokens.
    """
    ids = torch.zeros(h_tok, w_tok, 3)  # [H', W', 3]
    ids[..., 0] = mark
    ids[..., 1] = torch.arange(h_tok)[:, None]
    ids[..., 2] = torch.arange(w_tok)[None, :]
    return ids.reshape(h_tok * w_tok, 3).to(device=device, dtype=dtype)  # [H', W', 3] -> [N, 3]


def region_token_id(*, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The id row of the region token: ``(2, 0, 0)`` -> ``[1, 3]``.

    Type 2 keeps it apart from target (0) and context (1) tokens in the first RoPE axis; it has no pixel
    position of its own, so row and column are 0.
    """
    return torch.tensor([[REGION_ID, 0.0, 0.0]], device=device, dtype=dtype)


def kontext_img_ids(
    h_tok: int,
    w_tok: int,
    *,
    with_region: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """All image ids of the sequence ``[target | context | region]``.

    Returns:
        ``[2N+1, 3]`` (``[2N, 3]`` with ``with_region=False``, which is what the pipeline itself builds).
    """
    parts = [
        img_ids_grid(h_tok, w_tok, TARGET_ID, device=device, dtype=dtype),  # [N, 3]
        img_ids_grid(h_tok, w_tok, CONTEXT_ID, device=device, dtype=dtype),  # [N, 3]
    ]
    if with_region:
        parts.append(region_token_id(device=device, dtype=dtype))  # [1, 3]
    return torch.cat(parts, dim=0)  # -> [2N(+1), 3]


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
    """Project a token-grid mask to one learned region token: ``[B, 1, H', W'] -> [B, 1, c_in]``.

    The seed's ``Linear(H'*W' -> c_in)`` only accepts the grid it was built for (DESIGN §5.3). Here a mask
    on any other grid is area-pooled to ``(h_tok, w_tok)`` first, so one module serves every resolution.

    Args:
        h_tok, w_tok: the grid the projection is built for (e.g. 32x32 for 512 px images).
        c_in: channels of one packed token, ``transformer.config.in_channels`` (64 for Flux).
    """

    def __init__(self, h_tok: int, w_tok: int, c_in: int):
        super().__init__()
        self.h_tok, self.w_tok, self.c_in = int(h_tok), int(w_tok), int(c_in)
        self.proj = nn.Linear(self.h_tok * self.w_tok, self.c_in)

    def forward(self, m_small: torch.Tensor) -> torch.Tensor:
        if m_small.ndim != 4 or m_small.shape[1] != 1:
            raise ValueError(f"MaskRegionToken expects a mask [B, 1, H', W'], got shape {tuple(m_small.shape)}")
        if m_small.shape[-2:] != (self.h_tok, self.w_tok):
            m_small = F.adaptive_avg_pool2d(m_small.float(), (self.h_tok, self.w_tok))  # -> [B, 1, h_tok, w_tok]
        flat = m_small.flatten(1).to(self.proj.weight.dtype)  # [B, 1, H', W'] -> [B, H'*W']
        return self.proj(flat)[:, None, :]  # [B, c_in] -> [B, 1, c_in]

    def extra_repr(self) -> str:
        return f"grid={self.h_tok}x{self.w_tok}, c_in={self.c_in}"


def collect_lora_named_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable LoRA ``(name, parameter)`` pairs of a PEFT-wrapped module (names containing ``lora_``)."""
    return [(n, p) for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


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
):
    """Flow-matching loss: target velocity inside the mask, context preserved outside, plus L2.

    With ``x_t = (1 - s) x_0 + s e`` the flow-matching velocity is ``v = e - x_0``.

    * inside (mask 1): ``mean_in (pred_v - (noise - tgt_tok))^2``
    * outside (mask 0): the seed's identity term ``mean_out ((noise - pred_v) - ctx_tok)^2``, the
      reconstruction ``x_pred = e - v_pred`` against the context. Since
      ``(e - v_pred) - x_ctx = (e - x_ctx) - v_pred`` it **equals the velocity MSE against
      ``noise - ctx_tok``** (DESIGN §5.4): outside the mask the model learns to flow to the context.
    * L2: ``l2_region_lambda * sum(p^2)`` over the region module and ``l2_lora_lambda * sum(p^2)`` over the
      LoRA parameters.

    Means are over the selected tokens and all channels; ``eps`` keeps an all-zero or all-one mask finite.

    Args:
        pred_v, tgt_tok, ctx_tok, noise: ``[B, N, 4C]`` (the target part of the model output).
        mask_small: ``[B, 1, H', W']`` in ``[0, 1]`` on the token grid.
        h_tok, w_tok: token grid size, ``N = h_tok * w_tok``.
        return_parts: also return ``{"loss_in", "loss_out", "l2_region", "l2_lora"}`` (detached floats).
    Returns:
        scalar loss ``[]`` (and the parts dict with ``return_parts=True``).
    """
    b, n, c = pred_v.shape
    if n != h_tok * w_tok:
        raise ValueError(f"pred_v has {n} tokens but the grid {h_tok}x{w_tok} has {h_tok * w_tok}")
    if mask_small.shape[-2:] != (h_tok, w_tok):
        raise ValueError(f"mask_small {tuple(mask_small.shape)} is not on the {h_tok}x{w_tok} token grid")
    pred = pred_v.float()
    m = mask_small.to(pred.dtype).reshape(b, n, 1)  # [B, 1, H', W'] -> [B, N, 1], same order as packing
    v_in = noise.float() - tgt_tok.float()  # flow-matching target velocity
    x_pred = noise.float() - pred  # reconstructed clean latent
    se_in = (pred - v_in) ** 2 * m  # [B, N, 4C]
    se_out = (x_pred - ctx_tok.float()) ** 2 * (1.0 - m)  # [B, N, 4C]
    loss_in = se_in.sum() / (m.sum() * c + eps)
    loss_out = se_out.sum() / ((1.0 - m).sum() * c + eps)
    loss = w_in * loss_in + w_out * loss_out
    l2_region = pred.new_zeros(())
    if region_token_module is not None and l2_region_lambda:
        l2_region = sum(p.float().pow(2).sum() for p in region_token_module.parameters())
        loss = loss + l2_region_lambda * l2_region
    l2_lora = pred.new_zeros(())
    if lora_named_params is not None and l2_lora_lambda:
        params = [p for _, p in lora_named_params]
        if params:
            l2_lora = sum(p.float().pow(2).sum() for p in params)
            loss = loss + l2_lora_lambda * l2_lora
    if not return_parts:
        return loss
    parts = {
        "loss_in": float(loss_in.detach()),
        "loss_out": float(loss_out.detach()),
        "l2_region": float(l2_region.detach()),
        "l2_lora": float(l2_lora.detach()),
    }
    return loss, parts


# ==================================================================================================
# 2. Pipelines
# ==================================================================================================

# Words the tiny tokenizers know as whole tokens: the vocabulary of editing prompts. Unknown words still
# tokenize (byte-level BPE for CLIP, character fallback for T5), just into more pieces.
_TINY_WORDS = (
    "a an the of to in on at and or with without into onto from by for is are be make turn change "
    "replace remove add put move keep swap paint colour color recolour recolor it its this that "
    "red green blue yellow orange purple pink white black grey gray brown gold silver cyan magenta "
    "sphere ball box cube cylinder cone object objects thing floor wall sky light shadow background "
    "left right top bottom middle centre center front behind next near far small large big tall short "
    "shiny matte metal metallic glossy wooden glass plastic stone rough smooth bright dark "
    "photo picture image scene style cat dog person face hat car tree house flower sunset snow "
    "one two three new other same only edit region mask depth please now"
).split()


def _tiny_clip_tokenizer():
    """A CLIP-style byte-level BPE tokenizer (``CLIPTokenizerFast``) whose vocabulary is :data:`_TINY_WORDS`.

    Vocabulary and merges are written out, not trained (the BPE trainer breaks frequency ties differently
    in every process): every byte, every byte + ``</w>``, and for each word the left-to-right merges that
    build it, so each known word is one token and any other text still tokenizes byte by byte.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTokenizerFast

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {bos: 0, eos: 1}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(_TINY_WORDS):  # ordered, unique
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while True:  # apply the merges so far, as BPE will (lowest rank first)
            pairs = [(ranks[p], i) for i, p in enumerate(zip(pieces, pieces[1:])) if p in ranks]
            if not pairs:
                break
            _, i = min(pairs)
            pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
        while len(pieces) > 1:  # then join what is left, left to right, with new (higher-rank) merges
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces[0:2] = [pair[0] + pair[1]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=eos, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    # the same split pattern as CLIP's tokenizer.json
    split = Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=split, behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.post_processor = processors.RobertaProcessing((eos, 1), (bos, 0), add_prefix_space=False, trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    return CLIPTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=eos, pad_token=eos, model_max_length=77
    )


def _tiny_t5_tokenizer():
    """A T5-style Unigram tokenizer (``T5TokenizerFast``: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2).

    Pieces are written out, not trained: each word of :data:`_TINY_WORDS` as ``"▁word"``, then single
    characters (lower scores) so unknown words fall back to characters.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = list(dict.fromkeys(_TINY_WORDS))
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0, model_max_length=512
    )


# Sizes of the tiny world. The transformer is Flux's architecture at a small width: in_channels 64
# (16 latent channels x 2x2 packing), guidance embeddings, 3-axis RoPE whose axes sum to the head dim.
TINY_CONFIG = {
    "clip_text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "projection_dim": 32, "max_position_embeddings": 77},
    "t5": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu"},
    "vae": {"block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8,
            "latent_channels": 16, "shift_factor": 0.1159, "scaling_factor": 0.3611},
    "transformer": {"num_layers": 3, "num_single_layers": 4, "attention_head_dim": 32, "num_attention_heads": 4,
                    "axes_dims_rope": (8, 12, 12)},
    "clip_vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "image_size": 64, "patch_size": 16, "projection_dim": 32},
}


def _tiny_ip_adapter_state_dict(transformer, image_embed_dim: int, num_tokens: int = 4) -> dict[str, torch.Tensor]:
    """Random weights in the XLabs Flux IP-Adapter layout (the file format diffusers' loader converts).

    ``ip_adapter_proj_model.proj`` maps the CLIP image embedding ``[B, E]`` to ``num_tokens`` tokens of the
    text width; each double block ``i`` has ``double_blocks.i.processor.ip_adapter_double_stream_{k,v}_proj``.
    """
    text_dim = transformer.config.joint_attention_dim
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    sd = {
        "ip_adapter_proj_model.proj.weight": torch.randn(num_tokens * text_dim, image_embed_dim)
        * image_embed_dim**-0.5,
        "ip_adapter_proj_model.proj.bias": torch.zeros(num_tokens * text_dim),
        "ip_adapter_proj_model.norm.weight": torch.ones(text_dim),
        "ip_adapter_proj_model.norm.bias": torch.zeros(text_dim),
    }
    for i in range(transformer.config.num_layers):
        for kv in ("k", "v"):
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            sd[f"{prefix}.weight"] = torch.randn(inner, text_dim) * text_dim**-0.5
            sd[f"{prefix}.bias"] = torch.zeros(inner)
    return sd


def _attach_ip_adapter_from_state_dict(pipe, state_dict: dict[str, torch.Tensor], folder: str) -> None:
    """Write ``state_dict`` as ``folder/ip_adapter.safetensors`` and load it with ``pipe.load_ip_adapter``.

    Going through the file keeps the tiny model on diffusers' own XLabs loading and key conversion.
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "ip_adapter.safetensors")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    pipe.load_ip_adapter(folder, weight_name="ip_adapter.safetensors", image_encoder_pretrained_model_name_or_path=None)


def build_tiny_pipeline(
    seed: int = 0, *, with_ip_adapter: bool = True, device=None, dtype: torch.dtype = torch.float32
):
    """A complete, randomly initialised ``FluxKontextPipeline`` built offline (about a second on a CPU).

    Same seed, same weights, on every call; the global torch RNG is left untouched. Every component is
    in eval mode (as ``from_pretrained`` leaves it), so two identical ``pipe(...)`` calls give identical
    outputs. With ``with_ip_adapter`` a tiny CLIP image encoder, its ``CLIPImageProcessor`` and an
    XLabs-format IP-Adapter are attached through diffusers' ``load_ip_adapter``.
    """
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    cfg = TINY_CONFIG
    tokenizer = _tiny_clip_tokenizer()
    tokenizer_2 = _tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **cfg["clip_text"],
            )
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(vocab_size=len(tokenizer_2), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **cfg["t5"])
        )
        vae_cfg = dict(cfg["vae"])
        n_blocks = len(vae_cfg["block_out_channels"])
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_blocks,
            up_block_types=("UpDecoderBlock2D",) * n_blocks, use_quant_conv=False, use_post_quant_conv=False,
            **vae_cfg,
        )
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * vae_cfg["latent_channels"], guidance_embeds=True,
            joint_attention_dim=cfg["t5"]["d_model"], pooled_projection_dim=cfg["clip_text"]["hidden_size"],
            **cfg["transformer"],
        )
        image_encoder = feature_extractor = None
        if with_ip_adapter:
            vcfg = cfg["clip_vision"]
            image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vcfg))
            feature_extractor = CLIPImageProcessor(
                size={"shortest_edge": vcfg["image_size"]},
                crop_size={"height": vcfg["image_size"], "width": vcfg["image_size"]},
            )
            ip_sd = _tiny_ip_adapter_state_dict(transformer, vcfg["projection_dim"])
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxKontextPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer, image_encoder=image_encoder,
        feature_extractor=feature_extractor,
    )
    if with_ip_adapter:
        with tempfile.TemporaryDirectory(prefix="tiny_ip_adapter_") as folder:
            _attach_ip_adapter_from_state_dict(pipe, ip_sd, folder)
    for module in _pipeline_modules(pipe):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype) if (device is not None or dtype != torch.float32) else pipe


def _pipeline_modules(pipe) -> list[nn.Module]:
    names = ("text_encoder", "text_encoder_2", "vae", "transformer", "image_encoder")
    return [m for m in (getattr(pipe, n, None) for n in names) if isinstance(m, nn.Module)]


def describe_environment(model: str | None = None) -> None:
    """Print the versions and the device a notebook runs on: the first cell's sanity check."""
    import importlib.metadata as md
    import platform
    import sys

    info = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        bf16 = torch.cuda.is_bf16_supported()
        info["device"] = f"cuda: {props.name}, {props.total_memory / 2**30:.1f} GiB, bf16 {bf16}"
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores): use the tiny model here"
    info["colab"] = str("google.colab" in sys.modules)
    info["hub"] = "offline (HF_HUB_OFFLINE)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") else "online"
    if model is not None:
        info["model"] = model
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:>{width}}: {value}")


def interactive_figure(draw, **sliders):
    """Show ``draw(**slider values)`` (a matplotlib Figure) under ipywidgets sliders; redraw it when one moves.

    ``kh.interactive_figure(show_pair, index=IntSlider(0, 0, 9), alpha=FloatSlider(0.5, 0, 1))``. The figure is
    an ordinary display output updated in place (not ``interact``'s output widget), so a headless run (CI,
    ``make demo``) records the picture and never waits on a widget. Returns the display handle.
    """
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image, display
    from ipywidgets import HBox

    def render():
        fig = draw(**{name: slider.value for name, slider in sliders.items()})
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight")
        plt.close(fig)  # shown once, as the PNG below
        return Image(buffer.getvalue())

    display(HBox(list(sliders.values())))
    view = display(render(), display_id=True)  # None outside IPython

    def redraw(_change) -> None:
        image = render()
        if view is not None:
            view.update(image)

    for slider in sliders.values():
        slider.observe(redraw, names="value")
    return view


def default_model() -> str:
    """The model a notebook uses by default: ``$KONTEXT_MODEL`` if set, else the real model on a GPU, else tiny."""
    return os.environ.get("KONTEXT_MODEL") or (KONTEXT_DEV if torch.cuda.is_available() else "tiny")


# Defaults of the real world.
KONTEXT_DEV = "black-forest-labs/FLUX.1-Kontext-dev"
IP_ADAPTER_REPO = "XLabs-AI/flux-ip-adapter-v2"
IP_ADAPTER_WEIGHT = "ip_adapter.safetensors"
IMAGE_ENCODER_REPO = "openai/clip-vit-large-patch14"


def default_dtype(device=None) -> torch.dtype:
    """bf16 on a GPU that supports it, fp16 on older GPUs (T4), fp32 on a CPU."""
    device = torch.device(device) if device is not None else _default_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _hub_help(what: str, repo: str, err: Exception) -> RuntimeError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    first_line = str(err).splitlines()[0] if str(err) else ""
    lines = [f"Could not load {what} from '{repo}': {type(err).__name__}: {first_line}"]
    if offline:
        lines.append("HF_HUB_OFFLINE is set, so only the local cache is used. Unset it "
                     "(os.environ.pop('HF_HUB_OFFLINE')) to download, or use load_pipeline('tiny') to work offline.")
    lines += [
        f"If the model is gated: open https://huggingface.co/{repo}, accept the licence with your account,",
        "then log in: in Colab `from huggingface_hub import notebook_login; notebook_login()`, in a terminal "
        "`huggingface-cli login` (or set the HF_TOKEN secret in Colab's key icon).",
        "No network? Download once elsewhere with `huggingface-cli download <repo>` and pass the local folder.",
    ]
    return RuntimeError("\n".join(lines))


def load_pipeline(
    model: str = "tiny",
    *,
    seed: int = 0,
    device=None,
    dtype: torch.dtype | None = None,
    ip_adapter: str | None = IP_ADAPTER_REPO,
    ip_adapter_weight_name: str = IP_ADAPTER_WEIGHT,
    image_encoder: str = IMAGE_ENCODER_REPO,
    quantization_config=None,
):
    """A ready ``FluxKontextPipeline`` with image encoder and IP-Adapter attached.

    Args:
        model: ``"tiny"`` builds the offline random pipeline (:func:`build_tiny_pipeline`, CPU, tests);
            anything else is a Hub id (``"black-forest-labs/FLUX.1-Kontext-dev"``) or a local folder saved
            with ``save_pretrained``, loaded with ``FluxKontextPipeline.from_pretrained``.
        seed: weights of the tiny pipeline (ignored for a real model).
        device: where the pipeline goes; default CUDA when available, else CPU (tiny: CPU).
        dtype: default bf16 on a recent GPU, fp16 on a T4, fp32 on a CPU (tiny: fp32).
        ip_adapter: an XLabs Flux IP-Adapter repo or folder (``None`` skips it).
        image_encoder: the CLIP vision encoder the IP-Adapter was trained with (ViT-L/14).
        quantization_config: optional diffusers ``BitsAndBytesConfig`` for the transformer (NF4 on small GPUs).
    """
    if model == "tiny":
        return build_tiny_pipeline(seed, with_ip_adapter=ip_adapter is not None, device=device,
                                   dtype=dtype or torch.float32)
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    device = torch.device(device) if device is not None else _default_device()
    dtype = dtype or default_dtype(device)
    local = os.path.isdir(model)
    if not local and (model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]):
        raise FileNotFoundError(f"load_pipeline: local folder '{model}' does not exist. Pass 'tiny', a Hub id such "
                                f"as '{KONTEXT_DEV}', or a folder written by pipe.save_pretrained().")
    try:
        kwargs = {"torch_dtype": dtype}
        if quantization_config is not None:
            kwargs["transformer"] = FluxTransformer2DModel.from_pretrained(
                model, subfolder="transformer", quantization_config=quantization_config, torch_dtype=dtype
            )
        pipe = FluxKontextPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as err:  # huggingface_hub's errors derive from OSError
        raise _hub_help("FLUX.1 Kontext", model, err) from err
    if ip_adapter is not None:
        try:
            from transformers import CLIPVisionModelWithProjection

            pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(image_encoder, torch_dtype=dtype)
            pipe.register_modules(image_encoder=pipe.image_encoder)
            pipe.load_ip_adapter(ip_adapter, weight_name=ip_adapter_weight_name,
                                 image_encoder_pretrained_model_name_or_path=None)
        except (OSError, ValueError) as err:
            raise _hub_help("the IP-Adapter / CLIP image encoder", ip_adapter, err) from err
    for module in _pipeline_modules(pipe):
        module.eval().requires_grad_(False)
    if quantization_config is None:
        pipe.to(device)
    else:
        # a 4-bit transformer is placed on the GPU when loaded; the encoders (T5-XXL alone is 9.5 GB in
        # 16 bit) visit the GPU only while they run, diffusers' documented route for small GPUs
        pipe.enable_model_cpu_offload(device=device)
    return pipe


# ==================================================================================================
# 3. Data
# ==================================================================================================

# Data contract (DESIGN §3), one pair per file stem:
#   DATA_ROOT/context/<stem>.<ext>  source image        DATA_ROOT/target/<stem>.<ext>  edited image
#   DATA_ROOT/masks/<stem>.<ext>    white = editable    DATA_ROOT/depth/<stem>.<ext>   near = bright
#   DATA_ROOT/prompts.txt           one prompt per line, in the order of the sorted stems
# Every helper that takes a PIL image applies its EXIF orientation first, exactly as files are read, so
# a mask computed from in-memory images lines up with the same images written to and read from disk.

_PAIR_FOLDERS = ("context", "target", "masks", "depth")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")
_IGNORED_FILES = ("Thumbs.db", "desktop.ini")  # OS clutter; hidden files (".DS_Store", ...) are skipped too
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL modes read as 0..65535
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_DATA_FIX_HINTS = {
    "argument": "use resolution = a positive multiple of 16 (e.g. 512, 1024), resize='square' or 'crop', "
    "depth_normalize='minmax' or 'none', 0 < mask_threshold <= 1.",
    "root": "pass the folder that holds context/, target/, masks/, depth/ and prompts.txt.",
    "missing folder": "create the folder with one image per pair, named by the pair's stem "
    "(context/cat.png -> target/cat.png, masks/cat.png, depth/cat.png).",
    "missing image": "give every stem one image in each of context/, target/, masks/, depth/, or delete "
    "that stem from every folder (and its line from prompts.txt).",
    "stray file": "keep only images (.png .jpg .jpeg .webp .tif .tiff) directly in the four image "
    "folders; move other files next to prompts.txt.",
    "duplicate stem": "keep one image per stem in each folder (cat.png and cat.jpg are the same pair): "
    "delete or rename one of them.",
    "unreadable image": "re-export the file (open it and save it again, e.g. as PNG) or delete the pair "
    "from every folder and its prompt line.",
    "size mismatch": "the four images of a pair must show the same frame: a different size is fine "
    "(it is resized), a different aspect ratio means they do not line up; crop them identically.",
    "bad mask": "save masks as 8-bit images with white (255) = editable and black (0) = preserve.",
    "bad depth": "replace NaN / inf in the depth map (e.g. by the far value) and save it again.",
    "prompts": "write prompts.txt as UTF-8 text, one non-empty line per pair, in the order of the sorted "
    "stems (trailing empty lines are fine).",
    "empty dataset": "put at least one pair (context, target, mask, depth and a prompt line) in the folders.",
}


def _open_oriented(path):
    """Decode an image file completely and apply its EXIF orientation. Returns a loaded PIL image."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img.load()  # decode every byte now: a truncated file fails here, not at training step 500
        return ImageOps.exif_transpose(img)  # a new image (a copy when the orientation is already upright)


def _gray_array(img):
    """One channel of any PIL image as float64 without precision loss -> ``([H, W], type_max)``.

    ``type_max`` is the full-scale value of the mode: 1 (``"1"``), 255 (8-bit), 65535 (``I;16*`` and ``I``,
    which is how some Pillow versions open 16-bit PNGs), ``None`` for float ``F`` (values are kept as they
    are). RGB(A) and other colour modes give the mean of R, G, B (a grey depth map has R = G = B); alpha is
    ignored here.
    """
    import numpy as np

    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(img).astype(np.float64), 65535.0
    if mode == "F":
        return np.asarray(img).astype(np.float64), None
    if mode == "1":
        return np.asarray(img).astype(np.float64), 1.0
    if mode == "L":
        return np.asarray(img).astype(np.float64), 255.0
    if mode in ("LA", "La"):
        return np.asarray(img.getchannel("L")).astype(np.float64), 255.0
    if mode not in ("RGB", "RGBA", "RGBX", "RGBa"):
        img = img.convert("RGB")  # P, CMYK, YCbCr, ...
    return np.asarray(img)[..., :3].astype(np.float64).mean(axis=-1), 255.0


def _pil_to_rgb(img):
    """Any PIL image -> 8-bit ``RGB``. Transparent pixels are composited on white; 16-bit and float
    grey images are scaled by their full range (``I;16`` -> / 65535, ``F`` clipped to ``[0, 1]``)."""
    import numpy as np
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        values, type_max = _gray_array(img)
        unit = np.clip(values / type_max if type_max else values, 0.0, 1.0)
        return Image.fromarray(np.round(unit * 255.0).astype(np.uint8)).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def _mask_unit(img):
    """A mask image as float64 ``[H, W]`` in ``[0, 1]``: grey value after conversion to ``L`` (8-bit:
    / 255; 16-bit: / 65535; ``F``: clipped). Transparent pixels count as black (preserve)."""
    import numpy as np
    from PIL import Image

    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("F", "1", "L"):
        values, type_max = _gray_array(img)
        return np.clip(values / type_max if type_max else values, 0.0, 1.0)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, img.convert("RGBA"))
    return np.asarray(img.convert("L")).astype(np.float64) / 255.0


def _mask_to_binary_image(img, threshold: float):
    """Binarise a mask image at ``threshold`` of full range -> ``L`` image with values {0, 255}."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.where(_mask_unit(img) >= threshold, 255, 0).astype(np.uint8))


def _depth_unit(img, normalize: str, invert: bool):
    """A depth image -> float64 ``[H, W]`` in ``[0, 1]``, near = 1 (see :class:`KontextPairs`)."""
    import numpy as np

    values, type_max = _gray_array(img)
    if normalize == "minmax":
        lo, hi = float(values.min()), float(values.max())
        if not hi > lo:  # constant (or NaN) map: no depth information
            return np.zeros_like(values)
        return ((hi - values) if invert else (values - lo)) / (hi - lo)
    unit = np.clip(values / type_max if type_max else values, 0.0, 1.0)
    return 1.0 - unit if invert else unit


def _crop_box(size: tuple[int, int], resize: str) -> tuple[int, int, int, int]:
    """The region of an image of ``size = (W, H)`` that becomes the square training image."""
    w, h = size
    if resize == "square":
        return (0, 0, w, h)
    side = min(w, h)  # aspect-preserving: short side -> resolution, then the centre square
    left, top = (w - side) // 2, (h - side) // 2
    return (left, top, left + side, top + side)


def _scale_box(box, ref_size: tuple[int, int], size: tuple[int, int]) -> tuple[float, float, float, float]:
    """``box`` given in pixels of an image of ``ref_size``, expressed in pixels of one of ``size``."""
    sx, sy = size[0] / ref_size[0], size[1] / ref_size[1]
    return (box[0] * sx, box[1] * sy, min(box[2] * sx, size[0]), min(box[3] * sy, size[1]))


def _same_frame(ref_size: tuple[int, int], size: tuple[int, int]) -> bool:
    """Same aspect ratio, up to 2 % or the rounding of a resize."""
    (rw, rh), (w, h) = ref_size, size
    return abs(w * rh - h * rw) <= max(0.02 * h * rw, w + h + rw + rh)


def _check_image_file(folder: str, path, mask_threshold: float):
    """Decode and convert one file as ``__getitem__`` will. Returns ``(size or None, [(kind, text)])``."""
    import numpy as np

    rel = f"{folder}/{path.name}"
    try:
        img = _open_oriented(path)
        problems = []
        if folder in ("context", "target"):
            _pil_to_rgb(img)
        elif folder == "masks":
            top = float(_mask_unit(img).max())
            if 0.0 < top <= 1.5 / 255.0:
                problems.append(("bad mask", f"{rel} only holds the values 0 and 1 (of 255): it was saved as "
                                 "0/1, so at the threshold every pixel would be 'preserve'"))
        else:
            values, _ = _gray_array(img)
            if not np.isfinite(values).all():
                problems.append(("bad depth", f"{rel} contains NaN or inf values"))
        return img.size, problems
    except Exception as err:  # every decoder / conversion failure becomes one listed problem
        return None, [("unreadable image", f"{rel} cannot be read: {type(err).__name__}: {err}")]


def _scan_pair_folder(root, resolution, resize, mask_threshold, depth_normalize, prompts_file):
    """Validate a dataset folder. Returns ``(pairs, problems)``; ``pairs`` is a list of
    ``(stem, {folder: path}, prompt)`` in sorted stem order, ``problems`` a list of ``(kind, text)``."""
    import difflib
    import numbers
    from concurrent.futures import ThreadPoolExecutor

    problems: list[tuple[str, str]] = []

    def add(kind: str, text: str) -> None:
        problems.append((kind, text))

    is_int = isinstance(resolution, numbers.Integral) and not isinstance(resolution, bool)
    if not is_int or resolution <= 0 or resolution % 16:
        near = " (it must be an int, e.g. 512)" if not is_int else ""
        if is_int and resolution > 16:
            near = f" (nearest: {resolution // 16 * 16} or {resolution // 16 * 16 + 16})"
        add("argument", f"resolution={resolution!r} is not a positive multiple of 16{near}: Flux turns "
            "16x16 pixels into one token (8x VAE downsampling, then 2x2 packing)")
    if resize not in ("square", "crop"):
        add("argument", f"resize={resize!r}: use 'square' (plain resize, may stretch) or 'crop' (keep the "
            "aspect ratio, centre crop)")
    if depth_normalize not in ("minmax", "none"):
        add("argument", f"depth_normalize={depth_normalize!r}: use 'minmax' or 'none'")
    if not isinstance(mask_threshold, numbers.Real) or not 0.0 < mask_threshold <= 1.0:
        add("argument", f"mask_threshold={mask_threshold!r} must be a number in (0, 1]")

    if not root.is_dir():
        add("root", f"{root} {'is a file, not a folder' if root.exists() else 'does not exist'}")
        return [], problems
    try:
        root_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as err:
        add("root", f"{root} cannot be listed: {err}")
        return [], problems
    files: dict[str, dict] = {}
    for folder in _PAIR_FOLDERS:
        if not (root / folder).is_dir():
            close = difflib.get_close_matches(folder, [d for d in root_dirs if d not in _PAIR_FOLDERS], n=1)
            hint = f" (there is a folder {close[0]}/: rename it to {folder}/)" if close else ""
            add("missing folder", f"{folder}/ is missing: expected {root / folder}{hint}")
            continue
        files[folder] = found = {}
        for entry in sorted((root / folder).iterdir(), key=lambda p: p.name):
            name, rel = entry.name, f"{folder}/{entry.name}"
            if name.startswith(".") or name in _IGNORED_FILES:
                continue
            if entry.is_dir():
                add("stray file", f"{rel}/ is a folder; images in sub-folders are not read")
            elif entry.suffix.lower() not in _IMAGE_SUFFIXES:
                add("stray file", f"{rel} is not an image file (allowed: {' '.join(_IMAGE_SUFFIXES)})")
            elif entry.stem in found:
                add("duplicate stem", f"{folder}/{found[entry.stem].name} and {rel} have the same stem "
                    f"{entry.stem!r}: one image per stem and folder")
            else:
                found[entry.stem] = entry
    if not files:
        nested = [d for d in root_dirs if all((root / d / f).is_dir() for f in _PAIR_FOLDERS)]
        if nested:
            add("root", f"none of context/, target/, masks/, depth/ is in {root}, but they are in "
                f"{root / nested[0]}: did you mean that folder?")

    stems = sorted(set().union(*(found.keys() for found in files.values())))
    for stem in stems:
        have = ", ".join(f"{folder}/{found[stem].name}" for folder, found in files.items() if stem in found)
        for folder, found in files.items():
            if stem not in found:
                add("missing image", f"{folder}/{stem}.* does not exist: stem {stem!r} has {have} but no "
                    f"image in {folder}/")

    jobs = [(folder, stem, found[stem]) for stem in stems for folder, found in files.items() if stem in found]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        checked = list(pool.map(lambda job: _check_image_file(job[0], job[2], mask_threshold), jobs))
    sizes = {}
    for (folder, stem, _), (size, file_problems) in zip(jobs, checked):
        problems.extend(file_problems)
        sizes[folder, stem] = size
    complete = [s for s in stems if all(s in found for found in files.values())]
    for stem in complete:
        ref = sizes.get(("context", stem))
        for folder in ("target", "masks", "depth"):
            size = sizes.get((folder, stem))
            if ref and size and not _same_frame(ref, size):
                add("size mismatch", f"{folder}/{files[folder][stem].name} is {size[0]}x{size[1]} but "
                    f"context/{files['context'][stem].name} is {ref[0]}x{ref[1]} (another aspect ratio)")
    if files and not stems:
        add("empty dataset", f"no images found in {', '.join(f + '/' for f in files)} under {root}")

    prompts = None
    prompts_path = root / prompts_file
    if not prompts_path.is_file():
        others = ", ".join(sorted(p.name for p in root.glob("*.txt")))
        found_txt = f" (found {others}: rename the prompt file to {prompts_file})" if others else ""
        add("prompts", f"{prompts_file} is missing: expected {prompts_path}{found_txt}")
    else:
        try:
            text = prompts_path.read_bytes().decode("utf-8-sig")  # a UTF-8 byte-order mark is dropped
        except UnicodeDecodeError as err:
            add("prompts", f"{prompts_file} is not UTF-8 text ({err.reason} at byte {err.start})")
        except OSError as err:
            add("prompts", f"{prompts_file} cannot be read: {err}")
        else:
            lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
            while lines and not lines[-1]:
                lines.pop()  # trailing newlines / empty lines at the end
            for number, line in enumerate(lines, start=1):
                if not line:
                    add("prompts", f"{prompts_file} line {number} is empty: every pair needs a prompt (only "
                        "empty lines at the very end are ignored)")
            prompts = lines
    if prompts is not None and stems and len(prompts) not in (len(complete), len(stems)):
        order = ", ".join(complete[:8]) + (", ..." if len(complete) > 8 else "")
        extra = f" ({len(stems)} stems counting incomplete pairs)" if len(stems) != len(complete) else ""
        add("prompts", f"{prompts_file} has {len(prompts)} prompt lines but there are {len(complete)} "
            f"pairs{extra}; line i is the prompt of the i-th sorted stem: {order}")

    if problems:
        return [], problems
    return [(stem, {f: files[f][stem] for f in _PAIR_FOLDERS}, p) for stem, p in zip(complete, prompts)], []


def _format_data_problems(root, problems) -> str:
    """One message listing every problem (numbered, each naming its file) and one fix hint per kind."""
    lines = [f"KontextPairs cannot open {str(root)!r}: {len(problems)} problem(s), nothing was loaded. "
             "Paths are relative to that folder."]
    lines += [f"  {n}. [{kind}] {text}" for n, (kind, text) in enumerate(problems, start=1)]
    lines.append("How to fix:")
    for kind in dict.fromkeys(kind for kind, _ in problems):
        lines.append(f"  - {kind}: {_DATA_FIX_HINTS[kind]}")
    return "\n".join(lines)


class KontextPairs(torch.utils.data.Dataset):
    """Aligned editing pairs from a folder (DESIGN §3), validated when opened.

    ::

        root/context/<stem>.png   source image           root/target/<stem>.png  edited image
        root/masks/<stem>.png     white = editable       root/depth/<stem>.png   depth map, near = bright
        root/prompts.txt          one prompt per line, in the order of the sorted stems

    Pairs are matched by **file stem** (never by position). Extensions: ``.png .jpg .jpeg .webp .tif
    .tiff`` in any letter case. Hidden files (``.DS_Store``, ``.ipynb_checkpoints``) are ignored; files next
    to ``prompts.txt`` (a README, a script) too.

    Opening checks everything and raises **one** ``ValueError`` that lists every problem with the file it
    concerns and a fix hint per kind: a bad ``resolution``, a missing folder, a stem missing from a folder, a
    stray non-image file, two images with one stem, an image that does not decode completely (truncated,
    corrupt, not an image), images of a pair with different aspect ratios, a mask saved as 0/1 instead of
    0/255, NaN/inf in a depth map, a missing / non-UTF-8 ``prompts.txt``, an empty prompt line (with its line
    number), a prompt count that differs from the pair count, an empty dataset. Every image is decoded once
    for this; ``__getitem__`` then reads the files again (nothing is cached in memory).

    What is read, and how:
        * EXIF orientation is applied to all four images (``ImageOps.exif_transpose``).
        * context / target: any mode -> RGB. Transparent pixels are composited on **white**; CMYK, palette
          and grey images are converted; 16-bit grey is scaled by / 65535.
        * mask: converted to grey (``L``; 16-bit / 65535; transparent = black) and binarised at
          ``value >= mask_threshold`` of full range (default 0.5, i.e. 8-bit values >= 128), so JPEG noise,
          RGB, 1-bit and anti-aliased masks all become exactly {0, 1}. White (1) = editable, black (0) =
          preserve.
        * depth: any bit depth (8-bit ``L``/``RGB``, 16-bit ``I;16``/``I;16B``/``I``, float ``F`` TIFF) is
          read as float64 without rounding to 8 bits, then ``depth_normalize="minmax"`` maps each map to
          ``[0, 1]`` (a constant map gives zeros) or ``"none"`` divides by the full range (255, 65535; float
          maps are clipped to ``[0, 1]``). Convention: **near = 1 (bright), far = 0** (the relative
          inverse depth of Depth Anything / MiDaS). For metric depth maps where far = bright pass
          ``depth_invert=True``.
        * sizes: a mask, target or depth of another size than the context (same aspect ratio) is mapped
          onto the context's frame. ``resize="square"`` (the seed's behaviour) resizes the whole image to
          ``resolution x resolution`` (may stretch); ``resize="crop"`` keeps the aspect ratio (short side ->
          ``resolution``) and takes the centre square, with the same crop box for all four images.
          Filters: bicubic for images, nearest for masks (they stay binary), bilinear on float for depth
          (a 16-bit map keeps its levels).

    Args:
        root: the dataset folder.
        resolution: output side in pixels, a multiple of 16 (16 px = one Flux token).
        resize: ``"square"`` or ``"crop"`` (see above).
        mask_threshold: binarisation threshold in ``(0, 1]`` of the mask's full range.
        depth_normalize: ``"minmax"`` (per image) or ``"none"`` (divide by the type's maximum).
        depth_invert: ``True`` when the depth files store far = bright (metric depth).
        prompts_file: name of the prompt file inside ``root``.

    Items (``dataset[i]``), with ``H = W = resolution``:
        ``context`` ``[3, H, W]`` float32 in ``[0, 1]``; ``target`` ``[3, H, W]`` float32 in ``[0, 1]``;
        ``mask`` ``[1, H, W]`` float32 in {0, 1}; ``depth`` ``[1, H, W]`` float32 in ``[0, 1]`` (near = 1);
        ``prompt`` str; ``name`` str (the file stem). A ``DataLoader`` stacks them to ``[B, ...]``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int = 512,
        *,
        resize: str = "square",
        mask_threshold: float = 0.5,
        depth_normalize: str = "minmax",
        depth_invert: bool = False,
        prompts_file: str = "prompts.txt",
    ):
        from pathlib import Path

        self.root = Path(root).expanduser()
        self.resolution = resolution
        self.resize = resize
        self.mask_threshold = mask_threshold
        self.depth_normalize = depth_normalize
        self.depth_invert = bool(depth_invert)
        pairs, problems = _scan_pair_folder(
            self.root, resolution, resize, mask_threshold, depth_normalize, prompts_file
        )
        if problems:
            raise ValueError(_format_data_problems(self.root, problems))
        self._names = [stem for stem, _, _ in pairs]
        self._files = [files for _, files, _ in pairs]
        self._prompts = [prompt for _, _, prompt in pairs]

    @property
    def names(self) -> list[str]:
        """The pair names (file stems), in dataset order (sorted)."""
        return list(self._names)

    @property
    def prompts(self) -> list[str]:
        """The prompts, in dataset order, without reading any image (e.g. to encode them all once)."""
        return list(self._prompts)

    def files(self, index: int) -> dict:
        """The four file paths of pair ``index``: ``{"context", "target", "masks", "depth"} -> Path``."""
        return dict(self._files[index])

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return (f"KontextPairs({len(self)} pairs, root={str(self.root)!r}, resolution={self.resolution}, "
                f"resize={self.resize!r}, depth_normalize={self.depth_normalize!r})")

    def __getitem__(self, index: int) -> dict:
        import numpy as np
        from PIL import Image

        name, files, prompt = self._names[index], self._files[index], self._prompts[index]
        size = (self.resolution, self.resolution)
        context = _pil_to_rgb(_open_oriented(files["context"]))
        target = _pil_to_rgb(_open_oriented(files["target"]))
        mask = _mask_to_binary_image(_open_oriented(files["masks"]), self.mask_threshold)  # L, {0, 255}
        depth = _depth_unit(_open_oriented(files["depth"]), self.depth_normalize, self.depth_invert)
        depth = Image.fromarray(depth.astype(np.float32))  # mode F: resizing keeps every level

        ref_size = context.size
        box = _crop_box(ref_size, self.resize)  # in context pixels; mapped onto each image's own size

        def fit(img, resample):
            return img.resize(size, resample, box=_scale_box(box, ref_size, img.size))

        rs = Image.Resampling
        context, target = fit(context, rs.BICUBIC), fit(target, rs.BICUBIC)
        mask, depth = fit(mask, rs.NEAREST), fit(depth, rs.BILINEAR)

        def rgb_tensor(img):  # [H, W, 3] uint8 -> [3, H, W] float32 in [0, 1]
            pixels = torch.from_numpy(np.array(img, dtype=np.uint8))
            return pixels.permute(2, 0, 1).contiguous().float() / 255.0  # [H, W, 3] -> [3, H, W]

        depth_values = np.clip(np.array(depth, dtype=np.float32), 0.0, 1.0)  # [H, W]
        return {
            "context": rgb_tensor(context),
            "target": rgb_tensor(target),
            "mask": torch.from_numpy(np.array(mask) >= 128).float()[None],  # [1, H, W] in {0, 1}
            "depth": torch.from_numpy(depth_values)[None],  # [1, H, W] in [0, 1], near = 1
            "prompt": prompt,
            "name": name,
        }


def _as_rgb_tensor(image, what: str) -> torch.Tensor:
    """PIL image (any mode; EXIF orientation applied) or ``[3, H, W]`` tensor -> ``[3, H, W]`` float32."""
    import numpy as np
    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        rgb = _pil_to_rgb(ImageOps.exif_transpose(image))
        return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"{what}: expected a [3, H, W] tensor, got shape {tuple(image.shape)}")
        t = image.detach().cpu()
        return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    raise TypeError(f"{what}: expected a PIL image or a [3, H, W] torch tensor, got {type(image).__name__} "
                    "(for a numpy array [H, W, 3] use PIL.Image.fromarray(array))")


def _as_2d_array(values, what: str):
    """``[H, W]`` / ``[1, H, W]`` / ``[H, W, 1]`` tensor or numpy array -> float64 numpy ``[H, W]``.
    Integer arrays are scaled to ``[0, 1]``: uint8 / 255, other integers / 65535."""
    import numpy as np

    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = values.numpy() if values.dtype != torch.bfloat16 else values.float().numpy()
    if not isinstance(values, np.ndarray):
        raise TypeError(f"{what}: expected a torch tensor or numpy array [H, W] or [1, H, W], "
                        f"got {type(values).__name__}")
    arr = values
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr[0] if arr.shape[0] == 1 else arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected one channel [H, W] or [1, H, W], got shape {values.shape}")
    if arr.dtype == np.bool_:
        return arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float64) / (255.0 if arr.dtype == np.uint8 else 65535.0)
    return arr.astype(np.float64)


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
    a, b = _as_rgb_tensor(context, "context"), _as_rgb_tensor(target, "target")
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


def depth_to_pil(depth):
    """A depth map in ``[0, 1]`` -> 8-bit ``RGB`` PIL image (grey, R = G = B), what the IP-Adapter's
    ``CLIPImageProcessor`` takes.

    Args:
        depth: ``[1, H, W]`` or ``[H, W]`` tensor / numpy array, float in ``[0, 1]`` (near = 1; values
            outside are clipped), e.g. ``dataset[i]["depth"]``; a PIL image is converted to RGB.
    Returns:
        PIL image, mode ``RGB``, size ``(W, H)``.
    """
    import numpy as np
    from PIL import Image

    if isinstance(depth, Image.Image):
        return _pil_to_rgb(depth)
    arr = _as_2d_array(depth, "depth")
    if not np.isfinite(arr).all():
        raise ValueError("depth contains NaN or inf values")
    grey = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def write_pair_folder(
    root: str | os.PathLike,
    contexts,
    targets,
    masks,
    depths,
    prompts,
    *,
    names=None,
    overwrite: bool = False,
    resolution: int = 512,
    **dataset_kwargs,
) -> KontextPairs:
    """Write your own pairs as a dataset folder (the layout of :class:`KontextPairs`), then open it.

    Files: ``context/<name>.png`` and ``target/<name>.png`` (8-bit RGB), ``masks/<name>.png`` (8-bit, 0 /
    255), ``depth/<name>.png`` (16-bit grey, near = bright), ``prompts.txt`` (UTF-8, in sorted-name order).

    Args:
        root: the folder to write; created if needed.
        contexts, targets: lists of PIL images (EXIF orientation applied) or ``[3, H, W]`` tensors in
            ``[0, 1]``.
        masks: PIL images (binarised at 0.5 of full range) or ``[1, H, W]`` / ``[H, W]`` tensors (values
            ``>= 0.5`` are editable), e.g. from :func:`mask_from_difference`.
        depths: PIL images (8/16-bit or float in ``[0, 1]``) or ``[1, H, W]`` / ``[H, W]`` tensors / numpy
            arrays in ``[0, 1]`` with near = 1, e.g. from :func:`estimate_depth`.
        prompts: one non-empty single-line string per pair.
        names: file stems (default ``0000``, ``0001``, ...). Pairs are matched by these names.
        overwrite: allow a non-empty ``root``; its ``context/ target/ masks/ depth/`` folders and
            ``prompts.txt`` are deleted first (other files are kept).
        resolution, dataset_kwargs: passed to :class:`KontextPairs`.
    Returns:
        the opened (validated) :class:`KontextPairs`.
    """
    import shutil
    from pathlib import Path

    import numpy as np
    from PIL import Image, ImageOps

    lists = {"contexts": contexts, "targets": targets, "masks": masks, "depths": depths, "prompts": prompts}
    if names is not None:
        lists["names"] = names
    lists = {key: list(value) for key, value in lists.items()}
    lengths = {key: len(value) for key, value in lists.items()}
    if len(set(lengths.values())) != 1:
        listed = ", ".join(f"{key}={n}" for key, n in lengths.items())
        raise ValueError(f"write_pair_folder needs one item per pair in every list; got {listed}")
    count = lengths["contexts"]
    if count == 0:
        raise ValueError("write_pair_folder got no pairs (all lists are empty)")
    width = max(4, len(str(count - 1)))
    names = lists.get("names") or [f"{i:0{width}d}" for i in range(count)]
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name or name.startswith(".") or Path(name).name != name:
            raise ValueError(f"names[{i}]={name!r} is not a usable file stem (no '/', not empty or hidden)")
    if len(set(names)) != count:
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"names must be unique, got duplicates: {repeated}")
    for i, prompt in enumerate(lists["prompts"]):
        if not isinstance(prompt, str) or not prompt.strip() or "\n" in prompt or "\r" in prompt:
            raise ValueError(f"prompts[{i}]={prompt!r}: every prompt must be a non-empty single-line string")

    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file, not a folder")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            present = ", ".join(sorted(p.name for p in root.iterdir())[:8])
            raise FileExistsError(f"{root} is not empty ({present}); pass overwrite=True to replace its "
                                  "context/ target/ masks/ depth/ and prompts.txt, or choose a new folder")
        for folder in _PAIR_FOLDERS:
            if (root / folder).is_dir():
                shutil.rmtree(root / folder)
        (root / "prompts.txt").unlink(missing_ok=True)
    for folder in _PAIR_FOLDERS:
        (root / folder).mkdir(parents=True, exist_ok=True)

    for i, name in enumerate(names):
        for folder, key in (("context", "contexts"), ("target", "targets")):
            rgb = _as_rgb_tensor(lists[key][i], f"{key}[{i}]")
            lo, hi = float(rgb.min()), float(rgb.max())
            if lo < -1e-3 or hi > 1.0 + 1e-3:
                raise ValueError(f"{key}[{i}] has values in [{lo:.3g}, {hi:.3g}]; expected [0, 1] "
                                 "(for [-1, 1] images use (x + 1) / 2)")
            pixels = (rgb.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()  # [H, W, 3]
            Image.fromarray(pixels).save(root / folder / f"{name}.png")
        mask = lists["masks"][i]
        if isinstance(mask, Image.Image):
            binary = _mask_unit(ImageOps.exif_transpose(mask)) >= 0.5
        else:
            binary = _as_2d_array(mask, f"masks[{i}]") >= 0.5
        Image.fromarray(np.where(binary, 255, 0).astype(np.uint8)).save(root / "masks" / f"{name}.png")
        depth = lists["depths"][i]
        if isinstance(depth, Image.Image):
            values, type_max = _gray_array(ImageOps.exif_transpose(depth))
            unit = values / type_max if type_max else values
        else:
            unit = _as_2d_array(depth, f"depths[{i}]")
        if not np.isfinite(unit).all() or unit.min() < -1e-6 or unit.max() > 1.0 + 1e-6:
            raise ValueError(f"depths[{i}] has values in [{unit.min():.4g}, {unit.max():.4g}]; expected "
                             "[0, 1] with near = 1 (normalise first: (d - d.min()) / (d.max() - d.min()))")
        levels = np.round(np.clip(unit, 0.0, 1.0) * 65535.0).astype(np.uint16)
        Image.fromarray(levels).save(root / "depth" / f"{name}.png")  # uint16 [H, W] -> 16-bit grey PNG
    by_name = dict(zip(names, lists["prompts"]))
    text = "".join(by_name[name].strip() + "\n" for name in sorted(names))  # the order KontextPairs reads
    (root / "prompts.txt").write_text(text, encoding="utf-8")
    return KontextPairs(root, resolution, **dataset_kwargs)


def estimate_depth(
    images,
    model: str = "depth-anything/Depth-Anything-V2-Small-hf",
    device=None,
    *,
    invert: bool = False,
    batch_size: int = 4,
) -> list[torch.Tensor]:
    """Optional: depth maps for your own images with a monocular depth model (transformers pipeline).

    Needs the model from the Hugging Face Hub (about 100 MB for the default, downloaded once; a local
    folder works too) and is much faster on a GPU. Not needed when your depth maps are already in
    ``depth/``. Depth Anything predicts relative inverse depth, so near = large = 1 after the per-image
    min-max here, the convention of :class:`KontextPairs`. For a metric model (metres, far = large) pass
    ``invert=True``.

    Args:
        images: a PIL image or a list of them (EXIF orientation applied), or ``[3, H, W]`` tensors in
            ``[0, 1]``.
        model: Hub id or local path of a depth-estimation model.
        device: ``"cuda"``, ``"cpu"``, ... (default: CUDA when available).
        invert: flip the prediction (for models whose output grows with distance).
    Returns:
        one ``[1, H, W]`` float32 tensor in ``[0, 1]`` (near = 1) per image, at the image's own size; save
        them with :func:`write_pair_folder` (16-bit PNG) or view them with :func:`depth_to_pil`.
    Raises:
        RuntimeError: the model cannot be loaded (no network, wrong id), with what to do.
    """
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    batch = [images] if isinstance(images, Image.Image | torch.Tensor) else list(images)
    pil_images = []
    for i, image in enumerate(batch):
        rgb = _as_rgb_tensor(image, f"images[{i}]").clamp(0, 1)
        pixels = (rgb * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()  # [3, H, W] -> [H, W, 3]
        pil_images.append(Image.fromarray(np.ascontiguousarray(pixels)))
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
    outputs = estimator(pil_images, batch_size=batch_size)
    if isinstance(outputs, dict):
        outputs = [outputs]
    depths = []
    for img, out in zip(pil_images, outputs):
        pred = torch.as_tensor(out["predicted_depth"]).detach().float().cpu().squeeze()  # -> [h, w]
        if pred.shape != (img.height, img.width):  # older transformers return the model's own grid
            pred = F.interpolate(pred[None, None], size=(img.height, img.width), mode="bilinear",
                                 align_corners=False)[0, 0]
        lo, hi = pred.min(), pred.max()
        unit = (pred - lo) / (hi - lo) if hi > lo else torch.zeros_like(pred)
        depths.append((1.0 - unit if invert else unit)[None])  # [1, H, W]
    return depths


def show_pairs(dataset, indices=None, *, max_pairs: int = 4, mask_alpha: float = 0.5, cmap: str = "magma"):
    """A figure with one row per pair: context | target | mask over context | depth, the prompt above.

    What to notice: outside the red region the target should equal the context (the title reports the mean
    absolute difference there: the loss asks the model to preserve it); the red region covers the whole
    edit; the depth map is bright where the scene is near.

    Args:
        dataset: a :class:`KontextPairs` (or anything whose items look like one).
        indices: which pairs (default: the first ``max_pairs``).
        mask_alpha: opacity of the red tint.
        cmap: matplotlib colormap of the depth panel.
    Returns:
        a matplotlib ``Figure`` (object API, works headless). In a notebook make it the cell's last
        expression to show it; ``fig.savefig("pairs.png")`` writes it to a file.
    """
    import textwrap

    from matplotlib.figure import Figure

    indices = list(range(min(len(dataset), max_pairs))) if indices is None else list(indices)
    if not indices:
        raise ValueError("show_pairs needs at least one pair (the dataset or indices are empty)")
    fig = Figure(figsize=(12.0, 3.4 * len(indices)), layout="constrained")
    rows = fig.subfigures(len(indices), 1, squeeze=False)[:, 0]
    for row, index in zip(rows, indices):
        item = dataset[index]
        context = item["context"].permute(1, 2, 0).numpy()  # [3, H, W] -> [H, W, 3]
        target = item["target"].permute(1, 2, 0).numpy()  # [3, H, W] -> [H, W, 3]
        mask = item["mask"][0].numpy()  # [H, W] in {0, 1}
        tint = mask_alpha * mask[..., None]
        overlay = context * (1.0 - tint) + tint * [1.0, 0.0, 0.0]
        outside = mask < 0.5
        change = float(abs(target - context)[outside].mean()) if outside.any() else 0.0
        axes = row.subplots(1, 4)
        axes[0].imshow(context)
        axes[0].set_title("context (input)")
        axes[1].imshow(target)
        axes[1].set_title(f"target (edit)\n|target - context| outside mask: {change:.3f}")
        axes[2].imshow(overlay.clip(0.0, 1.0))
        if 0 < mask.sum() < mask.size:
            axes[2].contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        axes[2].set_title(f"mask on context: red = editable\n{100 * mask.mean():.0f}% of pixels")
        axes[3].imshow(item["depth"][0].numpy(), cmap=cmap, vmin=0.0, vmax=1.0)
        axes[3].set_title("depth: bright = near")
        for ax in axes:
            ax.set_axis_off()
        row.suptitle(textwrap.shorten(f"{item['name']}: \"{item['prompt']}\"", width=110), fontsize="large")
    return fig


# ==================================================================================================
# 4. Training
# ==================================================================================================


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
    """CLIP image embeddings of depth maps for the IP-Adapter, from the frozen image encoder (DESIGN §5.7).

    Args:
        depth_images: one image or a list of B images (PIL RGB, e.g. from ``depth_to_pil``), one per sample.
    Returns:
        ``[image_embeds [B, 1, E]]``: a list with one tensor per IP-Adapter, the layout
        ``joint_attention_kwargs={"ip_adapter_image_embeds": ...}`` expects (B samples, 1 image each).
    """
    if getattr(pipe, "image_encoder", None) is None:
        raise ValueError("this pipeline has no image encoder / IP-Adapter: load it with load_pipeline(...) "
                         "(ip_adapter=...) to use depth conditioning")
    device = device if device is not None else pipe._execution_device
    images = depth_images if isinstance(depth_images, list | tuple) else [depth_images]
    embeds = pipe.encode_image(list(images), device, 1)  # [B, E]
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
) -> torch.Tensor:
    """One transformer call on ``[noisy target | clean context | region]``; returns the target velocity.

    The same call ``FluxKontextPipeline.__call__`` makes (``timestep = sigma = t / 1000``, ids ``[S, 3]``),
    plus the region token with its own id row.

    Args:
        noisy_tok, ctx_tok: ``[B, N, 4C]``; region_tok: ``[B, 1, 4C]`` or ``None``.
        sigma: ``[B]`` in ``(0, 1]``, the flow-matching time (DESIGN §5.5).
        prompt_embeds ``[B, T, D_t5]``, pooled_prompt_embeds ``[B, D_clip]``, txt_ids ``[T, 3]``.
        guidance: the distilled guidance value (a float, or ``[B]``); ignored when the model has no
            guidance embedding.
        ip_adapter_image_embeds: ``[[B, 1, E]]`` from :func:`encode_depth_for_ip_adapter`.
    Returns:
        ``pred_v [B, N, 4C]``: the velocity predicted on the target tokens.
    """
    b, n, _ = noisy_tok.shape
    parts = [noisy_tok, ctx_tok] + ([region_tok] if region_tok is not None else [])
    base = getattr(transformer, "module", transformer)  # unwrap DistributedDataParallel for config/dtype
    dtype = base.dtype
    hidden = torch.cat([p.to(dtype) for p in parts], dim=1)  # -> [B, 2N(+1), 4C]
    img_ids = kontext_img_ids(h_tok, w_tok, with_region=region_tok is not None, device=hidden.device, dtype=dtype)
    sigma = sigma.to(device=hidden.device, dtype=dtype).reshape(b)  # [B]
    guidance_t = None
    if base.config.guidance_embeds and guidance is not None:
        guidance_t = torch.as_tensor(guidance, device=hidden.device, dtype=torch.float32).expand(b)  # [B]
    kwargs = dict(joint_attention_kwargs or {})  # the transformer pops keys out of this dict: copy it
    if ip_adapter_image_embeds is not None:
        kwargs["ip_adapter_image_embeds"] = [e.to(device=hidden.device, dtype=dtype) for e in ip_adapter_image_embeds]
    elif _has_ip_adapter(base):
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
    )[0]  # [B, 2N(+1), 4C]
    return out[:, :n]  # -> [B, N, 4C], the target part


# LoRA target presets. "attn" adapts every attention projection; "attn_ff" adds the feed-forward layers of the
# double blocks (diffusers' train_dreambooth_lora_flux_kontext.py list) and the single blocks' proj_mlp / proj_out.
LORA_TARGET_PRESETS = {
    "attn": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"],
    "attn_ff": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"],
}
IP_ADAPTER_LORA_TARGETS = ["to_k_ip.0", "to_v_ip.0"]


def add_lora(
    transformer,
    *,
    rank: int = 16,
    alpha: float | None = None,
    targets: str | list[str] = "attn",
    include_ip_adapter: bool = False,
    adapter_name: str = "default",
    init_lora_weights: str | bool = "gaussian",
) -> list[tuple[str, nn.Parameter]]:
    """Attach a PEFT LoRA to the Flux transformer with ``transformer.add_adapter`` and return its parameters.

    Args:
        rank, alpha: LoRA rank and alpha (``alpha=None`` means ``alpha = rank``, a scale of 1).
        targets: a preset name from :data:`LORA_TARGET_PRESETS` or a list of module-name suffixes.
        include_ip_adapter: also adapt the IP-Adapter's ``to_k_ip`` / ``to_v_ip`` projections.
    Returns:
        the trainable LoRA ``(name, parameter)`` pairs (:func:`collect_lora_named_params`).
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if isinstance(targets, str):
        if targets not in LORA_TARGET_PRESETS:
            raise ValueError(f"unknown LoRA target preset {targets!r}; choose one of {sorted(LORA_TARGET_PRESETS)}")
        targets = LORA_TARGET_PRESETS[targets]
    targets = list(targets)
    if include_ip_adapter:
        if getattr(transformer, "encoder_hid_proj", None) is None:
            raise ValueError("include_ip_adapter=True but the transformer has no IP-Adapter loaded")
        targets += IP_ADAPTER_LORA_TARGETS
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        init_lora_weights=init_lora_weights, target_modules=targets)
    transformer.add_adapter(config, adapter_name=adapter_name)
    transformer.set_adapter(adapter_name)
    return collect_lora_named_params(transformer)


# --------------------------------------------------------------------------------------------------
# 4.1 Configuration and GPU presets
# --------------------------------------------------------------------------------------------------



@dataclass
class TrainConfig:
    """Every setting of :func:`train`, with its default and why.

    The names ``steps``, ``resolution``, ``batch_size``, ``learning_rate``, ``seed``, ``output_dir``,
    ``checkpoint_every`` and ``resume`` are fixed: scripts outside the module use them.
    """

    # --- data and schedule
    resolution: int = 512  # side in pixels, a multiple of 16 (VAE 8x, 2x2 packing); must equal the dataset's
    steps: int = 1000  # optimizer updates (each of batch_size * gradient_accumulation_steps samples per process)
    batch_size: int = 1  # samples per forward pass per process; 1 fits every Colab GPU at 512 px
    gradient_accumulation_steps: int = 1  # micro-batches summed per update: a larger effective batch at no memory cost
    max_sequence_length: int = 512  # T5 tokens; 512 is Kontext's default, shorter prompts are padded to it
    # --- optimisation
    learning_rate: float = 1e-4  # LoRA learning rate, the value diffusers' Kontext script uses
    region_learning_rate: float = 1e-3  # region module: a fresh linear layer, it can move faster than the LoRA
    optimizer: str = "adamw"  # "adamw" (torch) or "adamw8bit" (bitsandbytes, saves optimizer memory on GPUs)
    weight_decay: float = 0.0  # AdamW decay; the L2 terms below already regularise
    lr_scheduler: str = "constant"  # any diffusers.optimization.get_scheduler name ("cosine", "linear", ...)
    lr_warmup_steps: int = 0  # warm-up updates for the scheduler
    max_grad_norm: float = 1.0  # gradient clipping of LoRA + region parameters (0 disables)
    # --- LoRA
    rank: int = 16  # LoRA rank: 16 is a common editing-LoRA size; 4-8 for tiny datasets
    alpha: float | None = None  # LoRA alpha; None means alpha = rank (scale 1)
    lora_targets: str = "attn"  # "attn" (attention only) or "attn_ff" (attention + feed-forward, diffusers' script)
    lora_ip_adapter: bool = False  # also adapt the IP-Adapter's to_k_ip / to_v_ip (lets the LoRA re-learn depth use)
    # --- loss
    w_in: float = 1.0  # weight of the in-mask velocity term (learn the edit)
    w_out: float = 1.0  # weight of the out-of-mask term (keep the rest of the image)
    l2_region_lambda: float = 1e-4  # L2 on the region module, the seed's stabiliser
    l2_lora_lambda: float = 1e-4  # L2 on the LoRA weights, the seed's stabiliser
    preservation: str = "identity"  # outside the mask: "identity" (flow to the context, the seed) or "prior"
    #   ("prior" is ai-toolkit's inverted_mask_prior: match the base model's own prediction, LoRA off)
    # --- noise schedule and conditioning
    timestep_sampling: str = "uniform"  # "uniform" over the 1000 training sigmas (never 0) or "logit_normal"
    logit_mean: float = 0.0  # logit-normal location (SD3 / diffusers' default)
    logit_std: float = 1.0  # logit-normal scale
    guidance: float = 1.0  # distilled guidance value fed to Kontext while training, as the established trainers do
    use_depth: bool = True  # feed the depth map through the IP-Adapter when the pipeline has one
    # --- hardware
    mixed_precision: str = "no"  # "no", "fp16" (T4) or "bf16" (L4, A100, H100)
    gradient_checkpointing: bool = False  # trade compute for activation memory on big models
    quantize_base: str | None = None  # "nf4": load the transformer 4-bit (bitsandbytes) via load_pipeline
    offload_encoders: bool = True  # on a GPU, each encoder visits the GPU only while it caches, then goes to the CPU
    # --- bookkeeping
    seed: int = 0  # every random draw of a step derives from (seed, step): runs are reproducible and resumable
    output_dir: str = "outputs/kontext-lora"  # checkpoints/, previews/ and the final adapter go here (Drive works)
    checkpoint_every: int = 250  # updates between checkpoints (0: only the final one)
    keep_checkpoints: int = 3  # newest complete checkpoints kept on disk
    resume: bool = False  # continue from the newest complete checkpoint under output_dir/checkpoints
    preview_every: int = 0  # updates between preview images (0: none); needs the sampling loop
    preview_steps: int = 8  # denoising steps of a preview
    log_every: int = 1  # updates between progress-bar / callback updates
    expected_peak_memory_gb: float | None = field(default=None, repr=False)  # set by presets, informative only
    peak_memory_source: str = field(default="", repr=False)  # "measured" or "estimated", set by presets

    def validate(self, dataset=None) -> None:
        """Raise one ``ValueError`` listing every bad setting, before any model work."""
        problems = []
        if self.resolution <= 0 or self.resolution % 16:
            problems.append(f"resolution={self.resolution}: must be a positive multiple of 16 (VAE 8x, 2x2 packing)")
        if self.steps < 0:
            problems.append(f"steps={self.steps}: must be >= 0")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            problems.append("batch_size and gradient_accumulation_steps must be >= 1")
        if self.rank < 1:
            problems.append(f"rank={self.rank}: LoRA rank must be >= 1")
        if self.lora_targets not in LORA_TARGET_PRESETS:
            problems.append(f"lora_targets={self.lora_targets!r}: choose one of {sorted(LORA_TARGET_PRESETS)}")
        for name, allowed in (("preservation", ("identity", "prior")),
                              ("timestep_sampling", ("uniform", "logit_normal")),
                              ("mixed_precision", ("no", "fp16", "bf16")),
                              ("optimizer", ("adamw", "adamw8bit")),
                              ("quantize_base", (None, "nf4"))):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
        if self.learning_rate <= 0 or self.region_learning_rate < 0:
            problems.append("learning_rate must be > 0 and region_learning_rate >= 0")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            problems.append("checkpoint_every must be >= 0 and keep_checkpoints >= 1")
        if dataset is not None:
            ds_res = getattr(dataset, "resolution", None)
            if ds_res is not None and ds_res != self.resolution:
                problems.append(f"the dataset was opened at resolution {ds_res} but the config says {self.resolution}: "
                                f"open it with KontextPairs(root, resolution={self.resolution})")
            if len(dataset) == 0:
                problems.append("the dataset is empty")
        if problems:
            raise ValueError("invalid TrainConfig:\n  - " + "\n  - ".join(problems))

    @classmethod
    def for_gpu(cls, name: str = "auto", **overrides) -> TrainConfig:
        """A config tuned for a GPU: ``"auto"`` (detect), or one of :data:`GPU_PRESETS` (``"t4"``, ``"l4"``,
        ``"a100-40"``, ``"a100-80"``, ``"h100"``, ``"cpu"``). ``overrides`` replace any field."""
        key = detect_gpu_preset() if name == "auto" else name.lower()
        if key not in GPU_PRESETS:
            raise ValueError(f"unknown GPU preset {name!r}; choose 'auto' or one of {sorted(GPU_PRESETS)}")
        settings = {k: v for k, v in GPU_PRESETS[key].items() if k not in ("label", "note")}
        settings.update(overrides)
        return cls(**settings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Peak memory figures are estimates for FLUX.1 Kontext [dev] (12B transformer) with a LoRA of the given
# rank at the given resolution, batch 1, encoders offloaded after caching; none was measured on that GPU here.
GPU_PRESETS: dict[str, dict] = {
    "cpu": dict(label="CPU (tiny model)", mixed_precision="no", gradient_checkpointing=False, optimizer="adamw",
                quantize_base=None, resolution=512, rank=16, expected_peak_memory_gb=None,
                peak_memory_source="not applicable: the tiny model needs well under 1 GB"),
    "t4": dict(label="T4 16 GB", mixed_precision="fp16", gradient_checkpointing=True, optimizer="adamw8bit",
               quantize_base="nf4", resolution=512, rank=8, expected_peak_memory_gb=14.0,
               peak_memory_source="estimated", note="no bf16 on T4: fp16 autocast, LoRA weights kept in fp32"),
    "l4": dict(label="L4 24 GB", mixed_precision="bf16", gradient_checkpointing=True, optimizer="adamw8bit",
               quantize_base="nf4", resolution=768, rank=16, expected_peak_memory_gb=20.0,
               peak_memory_source="estimated"),
    "a100-40": dict(label="A100 40 GB", mixed_precision="bf16", gradient_checkpointing=True, optimizer="adamw",
                    quantize_base=None, resolution=768, rank=16, expected_peak_memory_gb=36.0,
                    peak_memory_source="estimated"),
    "a100-80": dict(label="A100 80 GB", mixed_precision="bf16", gradient_checkpointing=False, optimizer="adamw",
                    quantize_base=None, resolution=1024, rank=32, expected_peak_memory_gb=62.0,
                    peak_memory_source="estimated"),
    "h100": dict(label="H100 80 GB", mixed_precision="bf16", gradient_checkpointing=False, optimizer="adamw",
                 quantize_base=None, resolution=1024, rank=32, expected_peak_memory_gb=60.0,
                 peak_memory_source="estimated"),
}


def detect_gpu_preset() -> str:
    """The :data:`GPU_PRESETS` key for this machine's first CUDA device (``"cpu"`` without one)."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    mem_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    if "t4" in name or mem_gb < 20:
        return "t4"
    if "l4" in name or mem_gb < 30:
        return "l4"
    if "h100" in name or "h200" in name:
        return "h100"
    return "a100-40" if mem_gb < 60 else "a100-80"


def nf4_quantization_config(compute_dtype: torch.dtype | None = None):
    """diffusers' ``BitsAndBytesConfig`` for an NF4 base transformer (pass to ``load_pipeline``).

    ``compute_dtype`` defaults to :func:`default_dtype` (bf16 on recent GPUs, fp16 on a T4).
    """
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype or default_dtype())


# --------------------------------------------------------------------------------------------------
# 4.2 Cache: constant work once per sample (DESIGN §5.2)
# --------------------------------------------------------------------------------------------------


@dataclass
class CachedSample:
    """Everything constant about one training sample, computed once (all tensors detached, on ``device``)."""

    name: str
    prompt_embeds: torch.Tensor  # [1, T, D_t5]
    pooled_prompt_embeds: torch.Tensor  # [1, D_clip]
    ctx_tok: torch.Tensor  # [1, N, 4C]
    tgt_tok: torch.Tensor  # [1, N, 4C]
    mask_small: torch.Tensor  # [1, 1, H', W']
    ip_embeds: torch.Tensor | None  # [1, 1, E] or None without IP-Adapter / depth


@dataclass
class TrainCache:
    """Per-sample cache, indexed by sample (never by step), plus what every sample shares."""

    samples: list[CachedSample]
    txt_ids: torch.Tensor  # [T, 3]
    h_tok: int
    w_tok: int

    def batch(self, indices: list[int], device=None) -> dict[str, torch.Tensor | None]:
        """Stack the cached tensors of ``indices`` into a batch (``[B, ...]``)."""
        picked = [self.samples[i] for i in indices]

        def cat(attr):
            values = [getattr(s, attr) for s in picked]
            return None if values[0] is None else torch.cat(values, dim=0).to(device)

        return {k: cat(k) for k in ("prompt_embeds", "pooled_prompt_embeds", "ctx_tok", "tgt_tok", "mask_small",
                                    "ip_embeds")}


def build_train_cache(pipe, dataset, *, max_sequence_length: int = 512, use_depth: bool = True, device=None,
                      offload: bool = False, progress: bool = True) -> TrainCache:
    """Encode every sample once: prompts (T5 + CLIP), context/target latents, token-grid masks, depth embeddings.

    Three stages, each with only its own encoders on ``device``: text encoders, then the VAE, then the
    image encoder. With ``offload=True`` each stage's encoders go back to the CPU when it ends, so the GPU
    never holds more than the transformer plus one encoder (the way to fit T5-XXL beside an NF4 transformer).
    The transformer itself is not used. All cached tensors are detached and live on ``device``.
    """
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else pipe._execution_device
    with_ip = use_depth and getattr(pipe, "image_encoder", None) is not None and \
        getattr(pipe.transformer, "encoder_hid_proj", None) is not None
    items = [dataset[i] for i in range(len(dataset))]
    show = dict(disable=not progress, leave=False)
    with _modules_on(device, [pipe.text_encoder, pipe.text_encoder_2], offload=offload):
        texts = [encode_prompts(pipe, it["prompt"], device=device, max_sequence_length=max_sequence_length)
                 for it in tqdm(items, desc="caching prompts", **show)]  # [(1, T, D_t5), (1, D_clip), (T, 3)]
    latents, masks, grid = [], [], None
    with _modules_on(device, [pipe.vae], offload=offload), torch.no_grad():
        for it in tqdm(items, desc="caching latents", **show):
            pair = torch.stack([it["context"], it["target"]])  # [2, 3, H, W]
            tok, grid = pack_like_pipeline(to_latents(normalize_01_to_m11(pair.to(device)), pipe.vae))  # [2, N, 4C]
            latents.append(tok)
            masks.append(mask_to_token_grid(it["mask"][None].to(device), *grid))  # [1, 1, H', W']
    ips = [None] * len(items)
    if with_ip:
        with _modules_on(device, [pipe.image_encoder], offload=offload):
            ips = [encode_depth_for_ip_adapter(pipe, depth_to_pil(it["depth"]), device=device)[0]  # [1, 1, E]
                   for it in tqdm(items, desc="caching depth", **show)]
    samples = [
        CachedSample(name=it.get("name", str(i)), prompt_embeds=text[0], pooled_prompt_embeds=text[1],
                     ctx_tok=tok[:1], tgt_tok=tok[1:], mask_small=m, ip_embeds=ip)
        for i, (it, text, tok, m, ip) in enumerate(zip(items, texts, latents, masks, ips))
    ]
    return TrainCache(samples=samples, txt_ids=texts[0][2], h_tok=grid[0], w_tok=grid[1])


@contextlib.contextmanager
def _modules_on(device, modules, *, offload: bool = False, restore: bool = False):
    """Move ``modules`` to ``device`` for a block. Afterwards ``offload`` sends them to the CPU, ``restore``
    back to where each one was (an encoder that training left on the CPU visits the GPU and returns)."""
    modules = [m for m in modules if isinstance(m, nn.Module) and not _is_quantized(m)]
    before = [next(m.parameters()).device if any(True for _ in m.parameters()) else None for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        if offload or restore:
            for m, where in zip(modules, before):
                target = "cpu" if offload else where
                if target is not None:
                    m.to(target)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# 4.3 One step's randomness, derived from (seed, step): reproducible and exactly resumable
# --------------------------------------------------------------------------------------------------


def _step_generator(seed: int, *keys: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + sum(k * 7919**i for i, k in enumerate(keys, 1))) % (2**63))
    return g


def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Sample indices ``start .. start+count-1`` of an endless stream of epochs, each a fresh permutation."""
    out = []
    for j in range(start, start + count):
        epoch, pos = divmod(j, n)
        out.append(int(torch.randperm(n, generator=_step_generator(seed, 1, epoch))[pos]))
    return out


def sample_sigmas(batch: int, config: TrainConfig, generator: torch.Generator, num_train_timesteps: int = 1000):
    """``[B]`` training sigmas in ``(0, 1]``, never the terminal 0 (DESIGN §5.5).

    ``uniform``: one of the scheduler's ``num_train_timesteps`` training sigmas ``k / 1000``, ``k = 1..1000``,
    uniformly (the seed's choice). ``logit_normal``: diffusers' ``compute_density_for_timestep_sampling``
    mapped onto the same table, as diffusers' Kontext script does.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheme = "logit_normal" if config.timestep_sampling == "logit_normal" else "uniform"
    u = compute_density_for_timestep_sampling(scheme, batch, config.logit_mean, config.logit_std,
                                              generator=generator)  # [B] in (0, 1)
    k = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)  # [B] in 0..999
    return (num_train_timesteps - k).float() / num_train_timesteps  # [B] in {0.001, ..., 1.0}


# --------------------------------------------------------------------------------------------------
# 4.4 The loss of one batch
# --------------------------------------------------------------------------------------------------


def training_loss(transformer, region_module, batch: dict, txt_ids: torch.Tensor, h_tok: int, w_tok: int,
                  noise: torch.Tensor, sigma: torch.Tensor, config: TrainConfig, lora_named_params=None):
    """Loss of one batch with given noise ``[B, N, 4C]`` and sigmas ``[B]``; returns ``(loss, parts)``."""
    tgt, ctx = batch["tgt_tok"], batch["ctx_tok"]
    s = sigma.to(tgt.dtype)[:, None, None]  # [B] -> [B, 1, 1]
    noisy = (1.0 - s) * tgt + s * noise  # x_t = (1 - s) x_0 + s e
    region_tok = region_module(batch["mask_small"]) if region_module is not None else None  # [B, 1, 4C]
    ip = [batch["ip_embeds"]] if batch.get("ip_embeds") is not None else None
    kw = dict(sigma=sigma, prompt_embeds=batch["prompt_embeds"], pooled_prompt_embeds=batch["pooled_prompt_embeds"],
              txt_ids=txt_ids, h_tok=h_tok, w_tok=w_tok, guidance=config.guidance, ip_adapter_image_embeds=ip)
    pred = kontext_forward(transformer, noisy, ctx, region_tok, **kw)
    outside_ref = ctx
    if config.preservation == "prior":
        # inverted_mask_prior: outside the mask, match the base model (LoRA off, no region token).
        # With ctx := e - v_prior the loss's outside term is exactly MSE(v_pred, v_prior).
        base = getattr(transformer, "module", transformer)
        with torch.no_grad(), _lora_off(base):
            prior_v = kontext_forward(transformer, noisy, ctx, None, **kw).float()
        outside_ref = noise.float() - prior_v
    return fm_masked_dual_loss_with_l2(
        pred, tgt, outside_ref, noise, batch["mask_small"], h_tok, w_tok, w_in=config.w_in, w_out=config.w_out,
        l2_region_lambda=config.l2_region_lambda, l2_lora_lambda=config.l2_lora_lambda,
        region_token_module=getattr(region_module, "module", region_module), lora_named_params=lora_named_params,
        return_parts=True)


@torch.no_grad()
def evaluation_loss(pipe, region_module, cache: TrainCache, *, index: int = 0,
                    sigmas: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8), seed: int = 1234,
                    guidance: float = 1.0) -> dict[str, float]:
    """A fixed yardstick: the same pair, fixed noise, fixed sigmas; mean of loss, ``err_in`` and ``err_out``.

    ``err_in`` is the in-mask velocity error to the target, ``err_out`` the out-of-mask error to the context.
    """
    cfg = TrainConfig(guidance=guidance, l2_region_lambda=0.0, l2_lora_lambda=0.0)
    device = pipe.transformer.device
    batch = cache.batch([index], device=device)
    g = torch.Generator().manual_seed(seed)
    totals = {"loss": 0.0, "err_in": 0.0, "err_out": 0.0}
    for s in sigmas:
        noise = torch.randn(batch["tgt_tok"].shape, generator=g).to(batch["tgt_tok"])
        loss, parts = training_loss(pipe.transformer, region_module, batch, cache.txt_ids.to(device), cache.h_tok,
                                    cache.w_tok, noise, torch.tensor([s], device=device), cfg)
        totals["loss"] += float(loss) / len(sigmas)
        totals["err_in"] += parts["loss_in"] / len(sigmas)
        totals["err_out"] += parts["loss_out"] / len(sigmas)
    return totals


# --------------------------------------------------------------------------------------------------
# 4.5 Checkpoints: atomic folders, newest complete one wins
# --------------------------------------------------------------------------------------------------

_CKPT_RE = re.compile(r"^step-(\d{6,})$")


def _checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints ``(step, path)``, oldest first. A folder without ``state.json`` is ignored."""
    root = _checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _CKPT_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "state.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _optimizer_to_files(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (safetensors) and everything else (JSON)."""
    sd = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "scalars": {}}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{idx}.{key}"] = value
    return tensors, meta


def _optimizer_from_files(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # not every filesystem (e.g. a Drive mount) supports directory fsync
        pass


def save_checkpoint(output_dir: str, step: int, *, lora_state: dict[str, torch.Tensor], region_module: nn.Module,
                    optimizer, lr_scheduler, history: list[dict], config: TrainConfig, keep: int = 3) -> str:
    """Write ``output_dir/checkpoints/step-NNNNNN/`` atomically: a temporary folder, fsync, then rename.

    Holds ``lora.safetensors``, ``region.safetensors``, ``optimizer.safetensors`` + ``optimizer.json``,
    ``rng.safetensors`` and ``state.json`` (step, scheduler, history, config; written last). Keeps the
    newest ``keep`` complete checkpoints.
    """
    from safetensors.torch import save_file

    root = _checkpoint_root(output_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = os.path.join(root, f".tmp-step-{step:06d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in lora_state.items()}, os.path.join(tmp, "lora.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in region_module.state_dict().items()},
              os.path.join(tmp, "region.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    save_file(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, os.path.join(tmp, "rng.safetensors"))
    with open(os.path.join(tmp, "optimizer.json"), "w") as f:
        json.dump(opt_meta, f)
    state = {"step": step, "lr_scheduler": lr_scheduler.state_dict(), "history": history, "config": config.to_dict(),
             "region": {"h_tok": region_module.h_tok, "w_tok": region_module.w_tok, "c_in": region_module.c_in}}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f, default=str)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # a re-run of the same step: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint folder written by :func:`save_checkpoint` (tensors on the CPU)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    with open(os.path.join(path, "optimizer.json")) as f:
        opt_meta = json.load(f)
    state.update(lora=load_file(os.path.join(path, "lora.safetensors")),
                 region=dict(state["region"], state_dict=load_file(os.path.join(path, "region.safetensors"))),
                 optimizer=(load_file(os.path.join(path, "optimizer.safetensors")), opt_meta),
                 rng=load_file(os.path.join(path, "rng.safetensors")), path=path)
    return state


# --------------------------------------------------------------------------------------------------
# 4.6 The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns. The LoRA stays on ``pipe.transformer``."""

    history: list[dict]  # one record per logged update: step, loss, loss_in, loss_out, lr, seconds
    region: MaskRegionToken  # the trained region module (unwrapped, on the training device)
    output_dir: str
    config: TrainConfig
    resumed_from: int | None = None  # step of the checkpoint the run continued from


def _make_optimizer(config: TrainConfig, lora_params: list[nn.Parameter], region_params: list[nn.Parameter]):
    groups = [{"params": lora_params, "lr": config.learning_rate},
              {"params": region_params, "lr": config.region_learning_rate}]
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("optimizer='adamw8bit' needs bitsandbytes: `pip install bitsandbytes` (CUDA only), "
                              "or use optimizer='adamw'") from err
        return bnb.optim.AdamW8bit(groups, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def _lora_state(transformer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in collect_lora_named_params(transformer)}


def train(pipe, dataset, config: TrainConfig, *, callback=None, accelerator=None, progress: bool = True,
          cache: TrainCache | None = None) -> TrainResult:
    """Train a LoRA on ``pipe.transformer`` and a region token module on ``dataset``.

    Steps: validate the config; cache every sample once (:func:`build_train_cache`); attach the LoRA; then
    ``config.steps`` updates through ``accelerate`` (device placement, mixed precision, gradient
    accumulation, several processes under ``accelerate launch``), with atomic checkpoints every
    ``config.checkpoint_every`` updates and exact resume (``config.resume``).

    Args:
        callback: called with each history record (a dict) on the main process, e.g. a live loss plot;
            preview records carry ``"preview"`` (an image path).
        accelerator: an ``accelerate.Accelerator`` to use (one is made from the config otherwise).
        cache: a ready :class:`TrainCache` (skips encoding).
    Raises:
        ValueError: a bad config or a dataset of another resolution, before any model work.
        FloatingPointError: a NaN/inf loss; the last good checkpoint is kept.
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    config.validate(dataset)
    if accelerator is None:
        from accelerate.state import AcceleratorState, PartialState

        state = AcceleratorState._shared_state
        if state.get("_mixed_precision", config.mixed_precision) != config.mixed_precision and \
                PartialState().num_processes == 1:
            # a second train() in the same notebook with another precision: accelerate's state is a
            # process-wide singleton that refuses the change; in a single process it is safe to reset.
            AcceleratorState._reset_state()
        accelerator = Accelerator(mixed_precision=config.mixed_precision,
                                  gradient_accumulation_steps=config.gradient_accumulation_steps,
                                  cpu=not torch.cuda.is_available())
    device = accelerator.device
    transformer = pipe.transformer
    if cache is None:
        cache = build_train_cache(pipe, dataset, max_sequence_length=config.max_sequence_length,
                                  use_depth=config.use_depth, device=device,
                                  offload=config.offload_encoders and device.type == "cuda",
                                  progress=progress and accelerator.is_main_process)
    if not _is_quantized(transformer):  # a bitsandbytes model is placed when it is loaded
        transformer.to(device)
    pipe.vae.to(device)  # previews decode latents

    # LoRA: reuse an adapter that is already there (a notebook re-running the cell) instead of stacking one.
    if getattr(transformer, "peft_config", None):
        lora = collect_lora_named_params(transformer)
    else:
        with torch.random.fork_rng(devices=[]):  # the LoRA's random init depends on the seed only
            torch.manual_seed(config.seed)
            lora = add_lora(transformer, rank=config.rank, alpha=config.alpha, targets=config.lora_targets,
                            include_ip_adapter=config.lora_ip_adapter)
    if config.mixed_precision != "no" or transformer.dtype != torch.float32:
        for _, p in lora:  # trainable weights in fp32, as diffusers' cast_training_params does
            p.data = p.data.float()
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()  # no dropout in Flux; LoRA dropout is 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        region = MaskRegionToken(cache.h_tok, cache.w_tok, transformer.config.in_channels).to(device)

    optimizer = _make_optimizer(config, [p for _, p in lora], list(region.parameters()))
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max(config.steps, 1) * accelerator.num_processes)

    start, history, resumed_from = 0, [], None
    if config.resume:
        found = list_checkpoints(config.output_dir)
        if found:
            ckpt = load_checkpoint(found[-1][1])
            named = dict(lora)
            missing = set(named) - set(ckpt["lora"])
            if missing:
                raise ValueError(f"checkpoint {ckpt['path']} does not match this LoRA (missing {sorted(missing)[:3]}"
                                 "...): was it trained with another rank or target preset?")
            with torch.no_grad():
                for n, p in lora:
                    p.copy_(ckpt["lora"][n])
            region.load_state_dict(ckpt["region"]["state_dict"])
            _optimizer_from_files(optimizer, *ckpt["optimizer"])
            lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
            torch.set_rng_state(ckpt["rng"]["torch_cpu"])
            start, history, resumed_from = ckpt["step"], ckpt["history"], ckpt["step"]
            if accelerator.is_main_process:
                print(f"resumed from {ckpt['path']} (step {start})")

    model, region_p, optimizer, lr_scheduler = accelerator.prepare(transformer, region, optimizer, lr_scheduler)
    n, b, accum, procs = len(cache.samples), config.batch_size, config.gradient_accumulation_steps, \
        accelerator.num_processes
    trainable = [p for _, p in lora] + list(region.parameters())
    bar = tqdm(total=config.steps, initial=start, desc="training", mininterval=0.5,
               disable=not (progress and accelerator.is_main_process))
    existing = list_checkpoints(config.output_dir)
    last_good = existing[-1][1] if existing else None
    t_start = time.perf_counter()
    for step in range(start, config.steps):
        parts_sum = {"loss": 0.0, "loss_in": 0.0, "loss_out": 0.0}
        for micro in range(accum):
            first = ((step * accum + micro) * procs + accelerator.process_index) * b
            idx = sample_indices(n, config.seed, first, b)
            g = _step_generator(config.seed, 2, step, micro, accelerator.process_index)
            batch = cache.batch(idx, device=device)
            noise = torch.randn(batch["tgt_tok"].shape, generator=g).to(device=device, dtype=batch["tgt_tok"].dtype)
            sigma = sample_sigmas(b, config, g).to(device)
            with accelerator.accumulate(model, region_p), accelerator.autocast():
                loss, parts = training_loss(model, region_p, batch, cache.txt_ids.to(device), cache.h_tok,
                                            cache.w_tok, noise, sigma, config, lora_named_params=lora)
                if not torch.isfinite(loss):
                    bar.close()
                    raise FloatingPointError(
                        f"loss became {float(loss.detach())} at step {step + 1} "
                        f"(batch {[cache.samples[i].name for i in idx]})."
                        f" Training stopped; the last good checkpoint is {last_good or 'none (no checkpoint yet)'}."
                        " Lower learning_rate, use bf16 instead of fp16, or check the data.")
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            parts_sum["loss"] += float(loss.detach()) / accum
            parts_sum["loss_in"] += parts["loss_in"] / accum
            parts_sum["loss_out"] += parts["loss_out"] / accum
        done = step + 1
        if procs > 1:
            reduced = accelerator.reduce(torch.tensor([parts_sum[k] for k in ("loss", "loss_in", "loss_out")],
                                                      device=device), reduction="mean")
            parts_sum = dict(zip(("loss", "loss_in", "loss_out"), reduced.tolist()))
        record = {"step": done, **parts_sum, "lr": optimizer.param_groups[0]["lr"],
                  "seconds": time.perf_counter() - t_start}
        history.append(record)
        bar.update(1)
        if done % config.log_every == 0 or done == config.steps:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}", refresh=False)
            if callback is not None and accelerator.is_main_process:
                callback(record)
        if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                last_good = save_checkpoint(config.output_dir, done, lora_state=_lora_state(transformer),
                                            region_module=accelerator.unwrap_model(region_p), optimizer=optimizer,
                                            lr_scheduler=lr_scheduler, history=history, config=config,
                                            keep=config.keep_checkpoints)
        if config.preview_every and done % config.preview_every == 0 and accelerator.is_main_process:
            path = _training_preview(pipe, accelerator.unwrap_model(region_p), dataset, config, done)
            if callback is not None:
                callback({"step": done, "preview": path})
    bar.close()
    accelerator.wait_for_everyone()
    transformer.eval()
    region = accelerator.unwrap_model(region_p).eval()
    return TrainResult(history=history, region=region, output_dir=config.output_dir, config=config,
                       resumed_from=resumed_from)


def _is_quantized(module) -> bool:
    return bool(getattr(module, "is_quantized", False) or getattr(module, "quantization_config", None))


def _training_preview(pipe, region, dataset, config: TrainConfig, step: int) -> str:
    """Sample the first pair with the current LoRA + region and save ``previews/step-NNNNNN.png``."""
    item = dataset[0]
    from torchvision.transforms.functional import to_pil_image

    was_training = pipe.transformer.training
    pipe.transformer.eval()
    device = pipe.transformer.device
    encoders = [pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "image_encoder", None)]
    offload = config.offload_encoders and device.type == "cuda"
    try:
        with _modules_on(device, encoders, offload=offload):  # the cache may have sent them to the CPU
            use_depth = config.use_depth and _has_ip_adapter(pipe.transformer)
            image = sample_edit(
                pipe, to_pil_image(item["context"]), item["prompt"], mask=item["mask"],
                depth=depth_to_pil(item["depth"]) if use_depth else None, region=region,
                height=config.resolution, width=config.resolution, num_inference_steps=config.preview_steps,
                guidance_scale=2.5, generator=torch.Generator().manual_seed(config.seed),
                max_sequence_length=config.max_sequence_length)
    finally:
        pipe.transformer.train(was_training)
    folder = os.path.join(config.output_dir, "previews")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:06d}.png")
    image.save(path)
    return path


class LiveLossPlot:
    """A callback for :func:`train` that redraws total, in-mask and out-of-mask loss in a notebook.

    ``train(pipe, data, cfg, callback=LiveLossPlot(every=10))``. Headless it only collects the records;
    ``.figure()`` draws them at any time.
    """

    def __init__(self, every: int = 10, smooth: int = 10):
        self.every, self.smooth, self.records = every, smooth, []

    def __call__(self, record: dict) -> None:
        if "loss" not in record:
            return
        self.records.append(record)
        if len(self.records) % self.every == 0:
            try:
                from IPython import get_ipython
                from IPython.display import clear_output, display
            except ImportError:
                return
            if get_ipython() is None:
                return
            import matplotlib.pyplot as plt

            fig = self.figure()
            clear_output(wait=True)
            display(fig)
            plt.close(fig)

    def figure(self):
        """The loss curves so far: total, in-mask (learning the edit), out-of-mask (keeping the rest)."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        steps = [r["step"] for r in self.records]
        for key, label in (("loss", "total"), ("loss_in", "in-mask (edit)"), ("loss_out", "out-of-mask (keep)")):
            values = torch.tensor([r[key] for r in self.records], dtype=torch.float64)
            k = max(1, min(self.smooth, len(values)))
            smooth = torch.nn.functional.avg_pool1d(values[None, None], k, 1).flatten() if len(values) else values
            ax.plot(steps[k - 1:], smooth.tolist(), label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(f"loss (moving mean of {self.smooth})")
        ax.set_yscale("log")
        ax.set_title("Training loss: in-mask = learning the edit, out-of-mask = keeping the rest")
        ax.legend()
        fig.tight_layout()
        return fig


# ==================================================================================================
# 5. Inference
# ==================================================================================================


# Files of a saved adapter folder (save_adapter / load_adapter).
# diffusers' default LoRA file name: pipe.load_lora_weights(folder) finds it.
LORA_WEIGHT_FILE = "pytorch_lora_weights.safetensors"
REGION_WEIGHT_FILE = "region_token.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def _has_ip_adapter(transformer) -> bool:
    """True when an IP-Adapter is attached (diffusers' ``load_ip_adapter`` sets ``encoder_hid_proj``)."""
    return getattr(transformer, "encoder_hid_proj", None) is not None


def _one_image(image, what: str = "image"):
    """A PIL image, or a ``[3, H, W]`` / ``[1, 3, H, W]`` tensor in ``[0, 1]`` -> PIL or ``[1, 3, H, W]``."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image[None]  # [3, H, W] -> [1, 3, H, W]
        if image.ndim != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"{what}: expected one image, [3, H, W] or [1, 3, H, W] in [0, 1], "
                             f"got shape {tuple(image.shape)}")
        return image.detach().float().cpu()
    raise TypeError(f"{what}: expected a PIL image or a [3, H, W] tensor in [0, 1], got {type(image).__name__}")


def _mask_batch(mask, what: str = "mask") -> torch.Tensor:
    """An edit mask -> ``[1, 1, H, W]`` float32 in ``[0, 1]`` (1 = editable).

    Accepts a PIL image (white = editable, thresholded at 50 %) or a ``[H, W]`` / ``[1, H, W]`` /
    ``[1, 1, H, W]`` tensor in ``[0, 1]`` (e.g. ``dataset[i]["mask"]``).
    """
    import numpy as np
    from PIL import Image

    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0  # [H, W]
        return (torch.from_numpy(arr) > 0.5).float()[None, None]  # [H, W] -> [1, 1, H, W]
    if isinstance(mask, torch.Tensor):
        m = mask.detach().float().cpu()
        if m.ndim == 2:
            m = m[None, None]  # [H, W] -> [1, 1, H, W]
        elif m.ndim == 3:
            m = m[None]  # [1, H, W] -> [1, 1, H, W]
        if m.ndim != 4 or m.shape[:2] != (1, 1):
            raise ValueError(f"{what}: expected one mask, [H, W], [1, H, W] or [1, 1, H, W], "
                             f"got shape {tuple(mask.shape)}")
        if m.numel() and (m.min() < 0 or m.max() > 1):
            raise ValueError(f"{what}: values must lie in [0, 1] (1 = editable), got [{m.min():.3g}, {m.max():.3g}]")
        return m
    raise TypeError(f"{what}: expected a PIL image or a tensor [1, H, W] in {{0, 1}}, got {type(mask).__name__}")


def _depth_pil(depth):
    """A depth map as the IP-Adapter's image processor takes it: an 8-bit RGB PIL image.

    A PIL image is converted to RGB; a ``[H, W]`` / ``[1, H, W]`` / ``[1, 1, H, W]`` float tensor in ``[0, 1]``
    goes through :func:`depth_to_pil`.
    """
    from PIL import Image

    if isinstance(depth, Image.Image):
        return depth if depth.mode == "RGB" else depth.convert("RGB")
    if isinstance(depth, torch.Tensor) and depth.ndim == 4:
        if depth.shape[:2] != (1, 1):
            raise ValueError(f"depth: expected one map [1, H, W], got shape {tuple(depth.shape)}")
        depth = depth[0]  # [1, 1, H, W] -> [1, H, W]
    return depth_to_pil(depth)


def _ip_attn_processors(transformer) -> list:
    """The transformer's IP-Adapter attention processors (those with a per-adapter ``scale`` list)."""
    return [p for p in transformer.attn_processors.values() if isinstance(getattr(p, "scale", None), list)]


@torch.no_grad()
def sample_edit(
    pipe,
    image,
    prompt: str,
    mask=None,
    depth=None,
    region: nn.Module | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 28,
    guidance_scale: float = 2.5,
    generator: torch.Generator | None = None,
    output_type: str = "pil",
    max_sequence_length: int = 512,
    ip_adapter_scale: float | list | None = None,
    callback=None,
):
    """Edit one image with the Kontext sampling loop plus the region token and depth through the IP-Adapter.

    This is ``FluxKontextPipeline.__call__`` step for step (same prompt encoding, same image preprocessing,
    same ``prepare_latents``, same timesteps and ``mu`` shift, same guidance, same Euler steps) with two
    additions the pipeline cannot make:

    * the **region token** ``region(mask on the token grid)`` ``[1, 1, 4C]`` appended after the context
      tokens, with its own id row ``(2, 0, 0)``: the sequence is ``[noisy target | context | region]``;
    * ``depth=None`` on a pipeline that has an IP-Adapter: the adapter then gets no image tokens
      (``ip_hidden_states=[]``) and adds exactly zero, as if it were not loaded. (``pipe(...)`` itself
      crashes there.)

    With ``mask``, ``depth`` and ``region`` all ``None`` (on a pipeline without IP-Adapter, or with one) the
    result equals ``pipe(image=image, prompt=prompt, height=h, width=w, max_area=h*w,
    num_inference_steps=..., guidance_scale=..., generator=..., _auto_resize=False)``; with ``depth`` it
    equals that call with ``ip_adapter_image=depth``.

    Args:
        pipe: a ``FluxKontextPipeline`` (``load_pipeline(...)``), with the LoRA attached or loaded.
        image: the context image: PIL, or a ``[3, H, W]`` / ``[1, 3, H, W]`` tensor in ``[0, 1]``. As in the
            pipeline with ``_auto_resize=False`` it keeps its own size, rounded down to a multiple of 16
            (pass an image of the output size to match training, where context and target share one size).
        prompt: the edit instruction (one string).
        mask: where the edit may happen (white / 1 = editable): PIL ``L`` image or a ``[1, H, W]`` /
            ``[1, 1, H, W]`` tensor in ``{0, 1}``, any size (it is pooled to the output token grid). Needs
            ``region``.
        depth: depth map for the IP-Adapter: PIL RGB, or a ``[1, H, W]`` float tensor in ``[0, 1]``.
        region: a trained :class:`MaskRegionToken` (``load_adapter`` returns it); needs ``mask``.
        height, width: the exact output size in pixels, multiples of 16; default: the context image's size.
            (The pipeline itself rescales ``height``/``width`` to ``max_area``; here no rescaling happens.)
        num_inference_steps, guidance_scale, generator, max_sequence_length: as in ``pipe(...)``.
        output_type: ``"pil"`` (one PIL image), ``"latent"`` (packed latents ``[1, N, 4C]``, exactly what
            ``pipe(..., output_type="latent").images`` holds), ``"pt"`` (``[1, 3, H, W]`` in ``[0, 1]``) or
            ``"np"`` (``[1, H, W, 3]``).
        ip_adapter_scale: IP-Adapter strength for this call only (float or diffusers' per-adapter list);
            ``None`` keeps the pipeline's current scale. The previous scale is restored afterwards.
        callback: ``callback(step, t, latents)`` after every step, ``latents [1, N, 4C]``; a returned
            tensor replaces the latents (like diffusers' ``callback_on_step_end``).
    Returns:
        the edited image in ``output_type``.
    """
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift, retrieve_timesteps

    # --- checks: fail before any model work
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be one string (sample_edit edits one image), got {type(prompt).__name__}")
    if output_type not in ("pil", "latent", "pt", "np"):
        raise ValueError(f"output_type must be 'pil', 'latent', 'pt' or 'np', got {output_type!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    transformer = pipe.transformer
    c_in = transformer.config.in_channels
    if mask is not None and region is None:
        raise ValueError("a mask reaches the model only through a trained region module: pass region=... "
                         "(load_adapter returns it, train returns it) or leave mask=None")
    if region is not None and mask is None:
        raise ValueError("region=... needs the edit mask it was trained with: pass mask=... (white / 1 = editable)")
    if region is not None and getattr(region, "c_in", None) != c_in:
        raise ValueError(f"the region module was built for c_in={getattr(region, 'c_in', None)} but this "
                         f"transformer takes {c_in}-channel tokens (transformer.config.in_channels): "
                         "it was trained for another model")
    has_ip = _has_ip_adapter(transformer)
    if depth is not None and not has_ip:
        raise ValueError("depth needs an IP-Adapter on the pipeline: load_pipeline(..., ip_adapter=...) attaches one")
    if ip_adapter_scale is not None and not has_ip:
        raise ValueError("ip_adapter_scale was given but the pipeline has no IP-Adapter")
    image = _one_image(image)
    multiple = pipe.vae_scale_factor * 2  # 16: VAE 8x and 2x2 packing
    img_h, img_w = pipe.image_processor.get_default_height_width(image)
    ctx_h, ctx_w = img_h // multiple * multiple, img_w // multiple * multiple
    if ctx_h == 0 or ctx_w == 0:
        raise ValueError(f"the image is {img_w}x{img_h} px (W x H): both sides must be at least {multiple} px")
    height = ctx_h if height is None else int(height)
    width = ctx_w if width is None else int(width)
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"height and width must be positive multiples of {multiple} px (VAE 8x and 2x2 packing), "
                         f"got {height}x{width} (H x W); e.g. {max(multiple, height // multiple * multiple)}x"
                         f"{max(multiple, width // multiple * multiple)}")
    device = pipe._execution_device

    # --- 1. prompt (the pipeline's own encode_prompt)
    with _modules_on(device, [pipe.text_encoder, pipe.text_encoder_2], restore=True):  # e.g. offloaded by train
        prompt_embeds, pooled_prompt_embeds, text_ids = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )  # [1, T, D_t5], [1, D_clip], [T, 3]

    # --- 2. context image: __call__ step 3 with _auto_resize=False
    image_t = pipe.image_processor.resize(image, ctx_h, ctx_w)
    image_t = pipe.image_processor.preprocess(image_t, ctx_h, ctx_w)  # [1, 3, H_c, W_c] in [-1, 1]

    # --- 3. latents: noise [1, N, 4C], context tokens [1, N_c, 4C], ids [N, 3] and [N_c, 3]
    latents, image_latents, latent_ids, image_ids = pipe.prepare_latents(
        image_t, 1, c_in // 4, height, width, prompt_embeds.dtype, device, generator, None
    )
    img_ids = torch.cat([latent_ids, image_ids], dim=0)  # [N + N_c, 3]
    cond = image_latents  # [1, N_c, 4C]
    if region is not None:
        h_tok, w_tok = height // multiple, width // multiple
        m_small = mask_to_token_grid(_mask_batch(mask), h_tok, w_tok)  # [1, 1, H, W] -> [1, 1, H', W']
        region_param = next(region.parameters())
        region_tok = region(m_small.to(region_param.device))  # [1, 1, 4C]
        cond = torch.cat([cond, region_tok.to(device=device, dtype=latents.dtype)], dim=1)  # -> [1, N_c + 1, 4C]
        img_ids = torch.cat([img_ids, region_token_id(device=device, dtype=img_ids.dtype)], dim=0)  # [N+N_c+1, 3]

    # --- 4. timesteps: the pipeline's sigmas, mu shift from the target sequence length
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    mu = calculate_shift(
        latents.shape[1],
        pipe.scheduler.config.get("base_image_seq_len", 256),
        pipe.scheduler.config.get("max_image_seq_len", 4096),
        pipe.scheduler.config.get("base_shift", 0.5),
        pipe.scheduler.config.get("max_shift", 1.15),
    )
    timesteps, num_inference_steps = retrieve_timesteps(pipe.scheduler, num_inference_steps, device,
                                                        sigmas=sigmas, mu=mu)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(latents.shape[0])  # [1]

    # --- 5. depth through the IP-Adapter: the pipeline's own prepare_ip_adapter_image_embeds
    image_embeds = None
    if depth is not None:
        with _modules_on(device, [pipe.image_encoder], restore=True):
            image_embeds = pipe.prepare_ip_adapter_image_embeds(_depth_pil(depth), None, device, 1)  # [[1, 1, E]]

    saved_scales = [(p, list(p.scale)) for p in _ip_attn_processors(transformer)] if has_ip else []
    if ip_adapter_scale is not None:
        pipe.set_ip_adapter_scale(ip_adapter_scale)
    try:
        pipe.scheduler.set_begin_index(0)
        with pipe.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                # a fresh dict every step: the transformer pops the embeddings out of it
                if image_embeds is not None:
                    attn_kwargs = {"ip_adapter_image_embeds": image_embeds}
                elif has_ip:
                    attn_kwargs = {"ip_hidden_states": []}  # no IP tokens: the adapter adds exactly zero
                else:
                    attn_kwargs = None
                hidden = torch.cat([latents, cond], dim=1)  # [1, N + N_c (+1), 4C]
                timestep = t.expand(latents.shape[0]).to(latents.dtype)  # [1], as the pipeline casts it
                noise_pred = transformer(
                    hidden_states=hidden,
                    timestep=timestep / 1000,
                    guidance=guidance,
                    pooled_projections=pooled_prompt_embeds,
                    encoder_hidden_states=prompt_embeds,
                    txt_ids=text_ids,
                    img_ids=img_ids,
                    joint_attention_kwargs=attn_kwargs,
                    return_dict=False,
                )[0]
                noise_pred = noise_pred[:, : latents.shape[1]]  # [1, N, 4C]: the target part
                latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if callback is not None:
                    replaced = callback(i, t, latents)
                    if replaced is not None:
                        latents = replaced
                progress_bar.update()
    finally:
        for proc, scale in saved_scales:
            proc.scale = scale

    if output_type == "latent":
        pipe.maybe_free_model_hooks()
        return latents
    lat = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)  # [1, N, 4C] -> [1, C, H_l, W_l]
    lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    decoded = pipe.vae.decode(lat, return_dict=False)[0]  # [1, 3, H, W] in [-1, 1]
    out = pipe.image_processor.postprocess(decoded, output_type=output_type)
    pipe.maybe_free_model_hooks()
    return out[0] if output_type == "pil" else out


def _jsonable(value):
    """A training config (dataclass, ``to_dict()`` object, mapping or ``None``) as JSON-ready data."""
    import dataclasses
    import json

    if value is None:
        return None
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))  # sets, dtypes, paths... become strings or lists


def _library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "diffusers", "transformers", "peft", "safetensors", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def save_adapter(pipe, region: nn.Module | None, path: str, config=None, *, adapter_name: str | None = None) -> str:
    """Save the LoRA (diffusers' format) and the region module so that they load anywhere.

    Writes into the folder ``path``:

    * ``pytorch_lora_weights.safetensors``: ``FluxKontextPipeline.save_lora_weights`` output, keys
      ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, with the PEFT ``LoraConfig`` (rank, alpha,
      targets) in the file's ``lora_adapter_metadata``. ``pipe.load_lora_weights(path)`` loads it alone.
    * ``region_token.safetensors``: the region module's ``proj.weight [c_in, H'*W']`` and ``proj.bias [c_in]``,
      its grid and ``c_in`` in the metadata (absent when ``region`` is ``None``).
    * ``adapter_config.json``: grid size, ``c_in``, LoRA rank / alpha / targets, the training config and the
      library versions.

    Args:
        pipe: the pipeline whose ``transformer`` carries the trained LoRA.
        region: the trained :class:`MaskRegionToken`, or ``None`` for a LoRA alone.
        path: output folder (created; files of an earlier save are replaced).
        config: the training config (``TrainConfig``, a dataclass or a dict), stored for the record.
        adapter_name: which PEFT adapter to save; default: the only one.
    Returns:
        ``path``.
    """
    import json

    from diffusers import FluxKontextPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    transformer = pipe.transformer
    peft_config = dict(getattr(transformer, "peft_config", None) or {})
    if not peft_config:
        raise ValueError("the transformer carries no LoRA: attach one with add_lora(...) or train(...), "
                         "or load one with load_adapter(...), before save_adapter")
    if adapter_name is None:
        if len(peft_config) > 1:
            raise ValueError(f"the transformer has several LoRA adapters {sorted(peft_config)}: pass adapter_name=")
        adapter_name = next(iter(peft_config))
    elif adapter_name not in peft_config:
        raise ValueError(f"no adapter named {adapter_name!r}; the transformer has {sorted(peft_config)}")
    if region is not None and not all(hasattr(region, a) for a in ("h_tok", "w_tok", "c_in")):
        raise TypeError(f"region must be a MaskRegionToken (h_tok, w_tok, c_in), got {type(region).__name__}")
    if region is not None and region.c_in != transformer.config.in_channels:
        raise ValueError(f"the region module was built for c_in={region.c_in} but this transformer takes "
                         f"{transformer.config.in_channels}-channel tokens: it does not belong to this LoRA's model")
    lora_config = peft_config[adapter_name]
    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)  # "<module>.lora_A.weight", ...
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    os.makedirs(path, exist_ok=True)
    FluxKontextPipeline.save_lora_weights(
        path, transformer_lora_layers=state, weight_name=LORA_WEIGHT_FILE,
        transformer_lora_adapter_metadata=lora_config.to_dict(),
    )
    region_file = os.path.join(path, REGION_WEIGHT_FILE)
    region_info = None
    if region is not None:
        region_info = {"file": REGION_WEIGHT_FILE, "h_tok": int(region.h_tok), "w_tok": int(region.w_tok),
                       "c_in": int(region.c_in), "grid": f"{region.h_tok}x{region.w_tok}",
                       "pixels_at_build_grid": f"{region.h_tok * 16}x{region.w_tok * 16}"}
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in region.state_dict().items()}
        meta = {k: str(region_info[k]) for k in ("h_tok", "w_tok", "c_in")}
        save_file(tensors, region_file, metadata={"format": "pt", **meta})
    elif os.path.exists(region_file):
        os.remove(region_file)  # a stale region module of an earlier save must not pair with this LoRA
    info = {
        "format": "kontext-region-lora",
        "format_version": 1,
        "lora": {
            "file": LORA_WEIGHT_FILE,
            "adapter_name": adapter_name,
            "rank": int(lora_config.r),
            "alpha": float(lora_config.lora_alpha),
            "use_rslora": bool(getattr(lora_config, "use_rslora", False)),
            "target_modules": ([lora_config.target_modules] if isinstance(lora_config.target_modules, str)
                               else sorted(lora_config.target_modules or [])),
            "num_tensors": len(state),
        },
        "region": region_info,
        "transformer": {
            "in_channels": int(transformer.config.in_channels),
            "num_layers": int(transformer.config.num_layers),
            "num_single_layers": int(transformer.config.num_single_layers),
            "inner_dim": int(transformer.config.num_attention_heads * transformer.config.attention_head_dim),
            "ip_adapter": _has_ip_adapter(transformer),
        },
        "base_model": getattr(getattr(pipe, "config", None), "_name_or_path", None) or None,
        "train_config": _jsonable(config),
        "versions": _library_versions(),
    }
    with open(os.path.join(path, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2, sort_keys=True)
    return path


def load_adapter(pipe, path: str, *, adapter_name: str = "default", replace: bool = True, device=None):
    """Load a folder written by :func:`save_adapter`: the LoRA with diffusers' ``pipe.load_lora_weights``, and
    the region module rebuilt from its file.

    Adapters are never stacked silently: when the transformer already carries a LoRA (loaded before, or
    attached with :func:`add_lora`), it is unloaded first with a warning (``replace=True``), or a
    ``ValueError`` is raised (``replace=False``).

    Args:
        pipe: a ``FluxKontextPipeline`` of the model the adapter was trained on.
        path: the adapter folder.
        adapter_name: name of the loaded PEFT adapter.
        replace: unload an existing LoRA first (``True``) or refuse (``False``).
        device: where the region module goes; default: the transformer's device (kept in float32).
    Returns:
        the :class:`MaskRegionToken` in eval mode, or ``None`` when the folder holds a LoRA alone.
    """
    import warnings

    from safetensors import safe_open

    lora_file = os.path.join(path, LORA_WEIGHT_FILE)
    if not os.path.isfile(lora_file):
        raise FileNotFoundError(f"{lora_file} does not exist: load_adapter expects a folder written by "
                                f"save_adapter (with {LORA_WEIGHT_FILE} and, optionally, {REGION_WEIGHT_FILE})")
    transformer = pipe.transformer
    region_file = os.path.join(path, REGION_WEIGHT_FILE)
    region_meta = None
    if os.path.isfile(region_file):  # check the region module before touching the pipeline
        with safe_open(region_file, framework="pt") as fh:
            region_meta = fh.metadata() or {}
            region_state = {k: fh.get_tensor(k) for k in fh.keys()}
        missing = [k for k in ("h_tok", "w_tok", "c_in") if k not in region_meta]
        if missing:
            raise ValueError(f"{region_file} lacks the metadata {missing}: it was not written by save_adapter")
        c_in = int(region_meta["c_in"])
        if c_in != transformer.config.in_channels:
            raise ValueError(f"the region module in {region_file} was built for c_in={c_in} but this transformer "
                             f"takes {transformer.config.in_channels}-channel tokens: it belongs to another model")
    existing = sorted(getattr(transformer, "peft_config", None) or {})
    if existing:
        if not replace:
            raise ValueError(f"the transformer already carries LoRA adapter(s) {existing}; loading {path} would "
                             "stack a second one. Call pipe.unload_lora_weights() first, or pass replace=True")
        warnings.warn(f"the transformer already carried LoRA adapter(s) {existing}: they are unloaded before "
                      f"loading {path} (adapters are replaced, not stacked)", stacklevel=2)
        pipe.unload_lora_weights()
    pipe.load_lora_weights(path, weight_name=LORA_WEIGHT_FILE, adapter_name=adapter_name)
    if region_meta is None:
        return None
    region = MaskRegionToken(int(region_meta["h_tok"]), int(region_meta["w_tok"]), int(region_meta["c_in"]))
    region.load_state_dict(region_state)
    return region.to(device if device is not None else transformer.device).eval().requires_grad_(False)


# ComfyUI's key layout for Flux LoRAs. ComfyUI (comfy/lora.py, model_lora_keys_unet) maps
# "lora_unet_<key>" for every key of its Flux model "diffusion_model.<key>.weight", i.e. the original
# Black Forest Labs layout, and converts diffusers names with comfy/utils.py flux_to_diffusers, where
# to_q / to_k / to_v are row slices of one fused "qkv" weight (and of "linear1" in single blocks, with
# proj_mlp after them). The weights are read with the "<x>.lora_up.weight" / "<x>.lora_down.weight" /
# "<x>.alpha" names, and a patch adds (alpha / rank) * up @ down to the weight (comfy/weight_adapter/lora.py).
# Entries: diffusers module suffix -> (BFL module suffix, slice) with slice = (offset, size, total) in units
# of the hidden size D for fused weights, None for a weight of its own.
_COMFY_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", (0, 1, 3)),
    "attn.to_k": ("img_attn.qkv", (1, 1, 3)),
    "attn.to_v": ("img_attn.qkv", (2, 1, 3)),
    "attn.add_q_proj": ("txt_attn.qkv", (0, 1, 3)),
    "attn.add_k_proj": ("txt_attn.qkv", (1, 1, 3)),
    "attn.add_v_proj": ("txt_attn.qkv", (2, 1, 3)),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
_COMFY_FLUX_SINGLE = {
    "attn.to_q": ("linear1", (0, 1, 7)),
    "attn.to_k": ("linear1", (1, 1, 7)),
    "attn.to_v": ("linear1", (2, 1, 7)),
    "proj_mlp": ("linear1", (3, 4, 7)),  # Flux's MLP ratio 4: linear1 = [q | k | v | mlp] = 7 D rows
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
_COMFY_FLUX_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}


def _comfyui_flux_name(module: str) -> tuple[str, tuple[int, int, int] | None] | None:
    """ComfyUI's Flux module for a diffusers transformer module name, or ``None`` when it has none.

    ``"transformer_blocks.0.attn.to_k"`` -> ``("double_blocks.0.img_attn.qkv", (1, 1, 3))``: rows ``D..2D`` of
    a ``3D``-row weight. The LoRA key ComfyUI loads is ``"lora_unet_" + name.replace(".", "_")``.
    """
    import re

    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in _COMFY_FLUX_DOUBLE:
        name, sl = _COMFY_FLUX_DOUBLE[m.group(2)]
        return f"double_blocks.{m.group(1)}.{name}", sl
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in _COMFY_FLUX_SINGLE:
        name, sl = _COMFY_FLUX_SINGLE[m.group(2)]
        return f"single_blocks.{m.group(1)}.{name}", sl
    if module in _COMFY_FLUX_GLOBAL:
        return _COMFY_FLUX_GLOBAL[module], None
    return None


def _lora_scaling_from_metadata(meta: dict, path: str):
    """PEFT's scale rule from the LoRA file's metadata: ``rank -> alpha / rank`` (or ``alpha / sqrt(rank)``)."""
    import json
    import warnings

    raw = meta.get("lora_adapter_metadata")
    cfg = {}
    if raw:
        cfg = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    if not cfg or "lora_alpha" not in cfg:
        warnings.warn(f"{path} records no LoRA alpha: assuming alpha = rank (scale 1), what diffusers assumes",
                      stacklevel=3)
        return lambda r: 1.0
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank_pattern / alpha_pattern are not supported by export_comfyui")
    alpha = float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        return lambda r: alpha / math.sqrt(r)
    return lambda r: alpha / r


def export_comfyui(path: str, out_file: str, *, dtype: torch.dtype | None = None) -> str:
    """Write the LoRA of an adapter folder as one safetensors file in the layout ComfyUI loads for Flux.

    Keys are ComfyUI's native Flux names ``lora_unet_<BFL module>.lora_down.weight`` ``[r, in]``,
    ``.lora_up.weight`` ``[out, r]`` and ``.alpha`` (a scalar; ComfyUI applies ``alpha / r * up @ down``).
    diffusers' separate ``to_q`` / ``to_k`` / ``to_v`` (and ``proj_mlp`` in single blocks) are fused exactly:
    their ``lora_down`` rows are stacked and their ``lora_up`` placed block-diagonally in the fused weight's
    row slices, so the fused rank is the sum of theirs and the weight update is unchanged. Layers ComfyUI's
    Flux model does not have (the IP-Adapter's ``to_k_ip`` / ``to_v_ip``) are left out with a warning.

    The region token is **not** in this file: ComfyUI's Flux sampler has no way to append an extra token,
    so outside :func:`sample_edit` the LoRA works as a plain Kontext LoRA, without mask guidance.

    Args:
        path: an adapter folder from :func:`save_adapter` (or a diffusers LoRA ``.safetensors`` file).
        out_file: the ``.safetensors`` file to write (e.g. ``ComfyUI/models/loras/my_edit.safetensors``).
        dtype: store the weights in this dtype (e.g. ``torch.bfloat16``); default: as saved.
    Returns:
        ``out_file``.
    """
    import re
    import warnings

    from safetensors import safe_open
    from safetensors.torch import save_file

    src = path if os.path.isfile(path) else os.path.join(path, LORA_WEIGHT_FILE)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src} does not exist: pass a folder written by save_adapter or a LoRA file")
    with safe_open(src, framework="pt") as fh:
        meta = fh.metadata() or {}
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    scaling = _lora_scaling_from_metadata(meta, src)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"(?:transformer\.)?(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise ValueError(f"{src}: unexpected key {key!r} (only LoRA A/B weights of the transformer are exported)")
        modules.setdefault(m.group(1), {})[m.group(2)] = tensor
    groups: dict[str, list] = {}
    skipped = []
    for module, ab in sorted(modules.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{src}: module {module} lacks its lora_{'B' if 'A' in ab else 'A'} weight")
        target = _comfyui_flux_name(module)
        if target is None:
            skipped.append(module)
            continue
        name, sl = target
        groups.setdefault(name, []).append((module, ab["A"], ab["B"], sl))
    if skipped:
        warnings.warn(f"export_comfyui: {len(skipped)} LoRA layer(s) have no counterpart in ComfyUI's Flux model "
                      f"and are left out: {skipped}", stacklevel=2)
    if not groups:
        raise ValueError(f"{src}: no LoRA layer maps onto ComfyUI's Flux model")
    out: dict[str, torch.Tensor] = {}
    for name, parts in groups.items():
        key = "lora_unet_" + name.replace(".", "_")
        scales = [scaling(a.shape[0]) for _, a, _, _ in parts]
        if parts[0][3] is None:  # a weight of its own: the LoRA as it is
            (_, a, b, _), s = parts[0], scales[0]
            down, up, alpha = a, b, s * a.shape[0]
        else:  # row slices of a fused weight: stack the downs, place the ups block-diagonally
            hidden = {b.shape[0] // sl[1] for _, _, b, sl in parts}
            if len(hidden) != 1:
                raise ValueError(f"{name}: its parts {[p[0] for p in parts]} disagree on the hidden size")
            d = hidden.pop()
            total = parts[0][3][2] * d
            rank = sum(a.shape[0] for _, a, _, _ in parts)
            uniform = all(s == scales[0] for s in scales)
            down = torch.cat([a for _, a, _, _ in parts], dim=0)  # [sum r_i, in]
            up = torch.zeros(total, rank, dtype=parts[0][2].dtype)  # [total, sum r_i]
            col = 0
            for (_, a, b, (off, size, _)), s in zip(parts, scales):
                r = a.shape[0]
                up[off * d:(off + size) * d, col:col + r] = b if uniform else b * s  # [size*D, r_i] block
                col += r
            alpha = scales[0] * rank if uniform else float(rank)  # ComfyUI scale alpha / rank = PEFT's scale
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    if dtype is not None:
        out = {k: (v if k.endswith(".alpha") else v.to(dtype)) for k, v in out.items()}
    out = {k: v.contiguous() for k, v in out.items()}
    folder = os.path.dirname(os.path.abspath(out_file))
    os.makedirs(folder, exist_ok=True)
    save_file(out, out_file, metadata={
        "format": "pt",
        "kontext_helpers.source": os.path.abspath(src),
        "kontext_helpers.note": "Flux Kontext LoRA only; the region token of this adapter is not included",
    })
    return out_file


def _rgb01(image, what: str) -> torch.Tensor:
    """PIL image or ``[3, H, W]`` / ``[1, 3, H, W]`` tensor in ``[0, 1]`` -> ``[3, H, W]`` float32 on the CPU."""
    if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[0] == 1:
        image = image[0]  # [1, 3, H, W] -> [3, H, W]
    return _as_rgb_tensor(image, what)


def _mask_hw(mask, height: int, width: int) -> torch.Tensor:
    """An edit mask at ``height x width``: ``[H, W]`` bool (nearest resize when its size differs)."""
    m = _mask_batch(mask)  # [1, 1, H_m, W_m]
    if m.shape[-2:] != (height, width):
        m = F.interpolate(m, size=(height, width), mode="nearest")  # -> [1, 1, H, W]
    return m[0, 0] > 0.5  # [H, W]


def _psnr(mse: float) -> float:
    """PSNR in dB of images in ``[0, 1]``: ``10 log10(1 / mse)`` (``inf`` for identical, ``nan`` for no pixels)."""
    if math.isnan(mse):
        return float("nan")
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


_LPIPS_CACHE: dict = {}


def _lpips_model():
    """The ``lpips`` AlexNet metric when the package and all its weights are on disk, else ``None``.

    Never downloads: ``lpips.LPIPS`` loads torchvision's ImageNet AlexNet (``torch.hub`` cache) and the linear
    heads shipped in the package; both files must already exist.
    """
    if "model" in _LPIPS_CACHE:
        return _LPIPS_CACHE["model"]
    model = None
    try:
        import lpips  # optional, never required

        backbone = os.path.join(torch.hub.get_dir(), "checkpoints", "alexnet-owt-7be5be79.pth")
        heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
        if os.path.isfile(backbone) and os.path.isfile(heads):
            model = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception:  # an absent or broken optional package means: no LPIPS
        model = None
    _LPIPS_CACHE["model"] = model
    return model


def edit_metrics(pred, context, target, mask, *, lpips: bool | None = None) -> dict[str, float]:
    """Did the model edit where asked, and only there?

    * ``psnr_in_vs_target``: PSNR (dB) of the prediction against the target **inside** the mask (higher:
      the edit looks like the target; ``nan`` without a target);
    * ``psnr_out_vs_context``: PSNR against the context **outside** the mask (higher: the rest of the image
      was kept; ``inf`` when untouched);
    * ``mse_in_vs_target``, ``mse_out_vs_context``: the mean squared errors behind them (per pixel and
      channel, images in ``[0, 1]``);
    * ``change_in_mask``: mean absolute change against the context inside the mask (did it edit at all);
    * ``mask_fraction``: share of editable pixels;
    * ``lpips_vs_target`` (whole image, lower is closer) only when the ``lpips`` package and its weights are
      present locally (``lpips=None``: when available; ``True``: required; ``False``: never).

    Args:
        pred, context, target: PIL images or ``[3, H, W]`` tensors in ``[0, 1]`` of one size (``target`` may be
            ``None``).
        mask: PIL ``L`` (white = editable) or ``[1, H, W]`` tensor in ``{0, 1}``; resized (nearest) when its
            size differs.
    Returns:
        ``{name: float}``.
    """
    p, c = _rgb01(pred, "pred"), _rgb01(context, "context")
    t = _rgb01(target, "target") if target is not None else None
    for name, img in (("context", c), ("target", t)):
        if img is not None and img.shape != p.shape:
            raise ValueError(f"pred is {p.shape[2]}x{p.shape[1]} but {name} is {img.shape[2]}x{img.shape[1]} "
                             "(W x H): compare images of one size")
    inside = _mask_hw(mask, p.shape[1], p.shape[2])  # [H, W] bool
    outside = ~inside
    n_in, n_out = int(inside.sum()), int(outside.sum())

    def mse(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor, n: int) -> float:
        if n == 0:
            return float("nan")
        return float(((a - b) ** 2)[:, where].mean())  # [3, H, W] -> [3, n] -> mean

    mse_in = mse(p, t, inside, n_in) if t is not None else float("nan")
    mse_out = mse(p, c, outside, n_out)
    out = {
        "psnr_in_vs_target": _psnr(mse_in),
        "psnr_out_vs_context": _psnr(mse_out),
        "mse_in_vs_target": mse_in,
        "mse_out_vs_context": mse_out,
        "change_in_mask": float((p - c).abs()[:, inside].mean()) if n_in else float("nan"),
        "mask_fraction": n_in / inside.numel(),
    }
    if lpips is not False:
        model = _lpips_model()
        if model is None and lpips:
            raise RuntimeError("lpips=True but the lpips package or its weights (torchvision AlexNet in the "
                               "torch hub cache, the package's alex.pth) are not available locally")
        if model is not None and t is not None:
            with torch.no_grad():
                out["lpips_vs_target"] = float(model(p[None] * 2 - 1, t[None] * 2 - 1).mean())
    return out


def _to_numpy_hwc(image):
    """PIL / tensor image -> numpy ``[H, W, 3]`` float32 in ``[0, 1]``."""
    return _rgb01(image, "image").permute(1, 2, 0).numpy()  # [3, H, W] -> [H, W, 3]


def _resize_like(image, height: int, width: int):
    """``image`` as a ``[3, height, width]`` tensor (bilinear when its size differs)."""
    t = _rgb01(image, "image")
    if t.shape[1:] != (height, width):
        t = F.interpolate(t[None], size=(height, width), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    return t


def _overlay(context: torch.Tensor, inside: torch.Tensor, alpha: float = 0.45):
    """Context ``[3, H, W]`` with the editable pixels tinted red -> ``[H, W, 3]``."""
    red = torch.tensor([1.0, 0.1, 0.1])[:, None, None]  # [3, 1, 1]
    m = inside.float()[None] * alpha  # [1, H, W]
    return (context * (1 - m) + red * m).permute(1, 2, 0).numpy()  # -> [H, W, 3]


def _fmt_db(x: float) -> str:
    return "n/a" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.1f} dB")


def preview_grid(context, mask, depth, target, prediction, *, prompt: str | None = None, figsize_per_panel=2.6):
    """One sample as one matplotlib figure: context | mask overlay | depth | target | prediction | error map.

    The titles say what to look for: the prediction should follow the target inside the red region and
    leave everything else as in the context; the error map ``|prediction - context|`` should be bright only
    inside the mask outline. The figure title holds the prompt and :func:`edit_metrics`.

    Args:
        context, prediction: PIL or ``[3, H, W]`` in ``[0, 1]`` (the prediction is resized to the context's
            size for display when they differ).
        mask: PIL ``L`` or ``[1, H, W]`` in ``{0, 1}``; depth: PIL or ``[1, H, W]`` in ``[0, 1]``, or ``None``;
        target: the expected result, or ``None``.
        prompt: shown in the title.
    Returns:
        a ``matplotlib.figure.Figure`` (headless: no pyplot state; ``fig.savefig(...)`` or display it).
    """
    from matplotlib.figure import Figure

    ctx = _rgb01(context, "context")
    h, w = ctx.shape[1:]
    pred = _resize_like(prediction, h, w)
    tgt = _resize_like(target, h, w) if target is not None else None
    inside = _mask_hw(mask, h, w)  # [H, W] bool
    metrics = edit_metrics(pred, ctx, tgt, inside[None].float(), lpips=False)
    err = (pred - ctx).abs().mean(0).numpy()  # [3, H, W] -> [H, W]

    fig = Figure(figsize=(6 * figsize_per_panel, figsize_per_panel + 0.9), layout="constrained")
    axes = fig.subplots(1, 6)
    axes[0].imshow(ctx.permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
    axes[0].set_title("context (input)")
    axes[1].imshow(_overlay(ctx, inside))
    axes[1].set_title(f"mask: red may change\n({metrics['mask_fraction']:.0%} of the image)")
    if depth is not None:
        axes[2].imshow(_to_numpy_hwc(_depth_pil(depth)))
        axes[2].set_title("depth (IP-Adapter)\nlight = near")
    else:
        axes[2].set_title("no depth")
    if tgt is not None:
        axes[3].imshow(tgt.permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
        axes[3].set_title("target: the edit asked for")
    else:
        axes[3].set_title("no target")
    axes[4].imshow(pred.permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
    axes[4].set_title(f"prediction: like the target\ninside red? ({_fmt_db(metrics['psnr_in_vs_target'])})")
    im = axes[5].imshow(err, cmap="magma", vmin=0.0, vmax=max(float(err.max()), 1e-6))
    if inside.any() and not inside.all():
        axes[5].contour(inside.numpy().astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
    axes[5].set_title("|prediction - context|: bright only\ninside cyan? "
                      f"(outside {_fmt_db(metrics['psnr_out_vs_context'])})")
    fig.colorbar(im, ax=axes[5], fraction=0.046, pad=0.02)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    head = f"“{prompt}”   " if prompt else ""
    fig.suptitle(f"{head}PSNR in mask vs target {_fmt_db(metrics['psnr_in_vs_target'])}, "
                 f"outside mask vs context {_fmt_db(metrics['psnr_out_vs_context'])}", fontsize=10)
    return fig


class Comparison(NamedTuple):
    """What :func:`compare_variants` returns: the figure, ``{variant: edit_metrics}`` and ``{variant: PIL}``."""

    figure: object
    metrics: dict
    images: dict


def metrics_table(metrics: dict[str, dict[str, float]], columns: Iterable[str] | None = None) -> str:
    """``{row: {column: value}}`` as a Markdown table (floats with 2 decimals; ``inf``/``nan`` written out)."""
    rows = list(metrics)
    if columns is None:
        columns = []
        for r in rows:
            columns += [c for c in metrics[r] if c not in columns]
    columns = list(columns)

    def cell(v) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.2f}")
        return "" if v is None else str(v)

    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += ["| " + r + " | " + " | ".join(cell(metrics[r].get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _lora_layers(transformer) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def _lora_off(transformer):
    """Run the base model: LoRA layers disabled inside the block; their state and ``requires_grad`` restored after
    (PEFT's ``enable_adapters`` also switches gradients, which must not leak into a training run)."""
    layers = _lora_layers(transformer)
    was_disabled = [layer.disable_adapters for layer in layers]
    grads = [(p, p.requires_grad) for n, p in transformer.named_parameters() if "lora_" in n]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for param, flag in grads:
            param.requires_grad_(flag)


def compare_variants(
    pipe,
    image,
    prompt: str,
    mask,
    *,
    region: nn.Module | None = None,
    depth=None,
    target=None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 28,
    guidance_scale: float = 2.5,
    seed: int = 0,
    max_sequence_length: int = 512,
    inpaint: bool = True,
) -> Comparison:
    """Run the same inputs and the same noise through every variant, into one figure and one metrics table.

    Variants (those whose parts exist): ``base`` (LoRA switched off), ``LoRA``, ``LoRA + region``,
    ``LoRA + region + depth``, and ``inpaint (base)``: diffusers' mask-aware ``FluxKontextInpaintPipeline``
    built from the same components with the LoRA off and no depth, the baseline a trained region token
    should beat. All run at ``height x width`` from one seed.

    Args:
        pipe: a ``FluxKontextPipeline`` with the trained (or loaded) LoRA.
        image, prompt, mask, region, depth: as in :func:`sample_edit`; ``target``: the expected edit, for
            the in-mask PSNR.
        seed: every variant starts from ``torch.Generator().manual_seed(seed)``.
        inpaint: include the inpainting baseline.
    Returns:
        :class:`Comparison` ``(figure, metrics, images)``; ``metrics_table(result.metrics)`` prints the table.
    """
    from diffusers import FluxKontextInpaintPipeline
    from matplotlib.figure import Figure

    image = _one_image(image)
    multiple = pipe.vae_scale_factor * 2
    img_h, img_w = pipe.image_processor.get_default_height_width(image)
    height = height or img_h // multiple * multiple
    width = width or img_w // multiple * multiple
    transformer = pipe.transformer
    has_lora = bool(_lora_layers(transformer))
    lead = "LoRA" if has_lora else "base"
    common = dict(height=height, width=width, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                  max_sequence_length=max_sequence_length)

    def run(**kw):
        return sample_edit(pipe, image, prompt, generator=torch.Generator().manual_seed(seed), **common, **kw)

    images = {}
    with _lora_off(transformer):
        images["base"] = run()
    if has_lora:
        images["LoRA"] = run()
    if region is not None:
        images[f"{lead} + region"] = run(mask=mask, region=region)
        if depth is not None:
            images[f"{lead} + region + depth"] = run(mask=mask, region=region, depth=depth)
    if inpaint:
        inpainter = FluxKontextInpaintPipeline(**pipe.components)
        inpainter.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
        ctx_pil = _pil_from(image).resize((width, height))  # its output size is its input image's size
        mask_pil = _pil_from_mask(mask)
        with _lora_off(transformer):
            images["inpaint (base)"] = inpainter(
                image=ctx_pil, mask_image=mask_pil, prompt=prompt, strength=1.0, max_area=height * width,
                generator=torch.Generator().manual_seed(seed), _auto_resize=False,
                joint_attention_kwargs={"ip_hidden_states": []} if _has_ip_adapter(transformer) else None,
                **common,
            ).images[0]

    ctx = _resize_like(_pil_from(image), height, width)  # [3, H, W]
    tgt = _resize_like(target, height, width) if target is not None else None
    inside = _mask_hw(mask, height, width)
    metrics = {name: edit_metrics(_rgb01(img, name), ctx, tgt, inside[None].float()) for name, img in images.items()}

    inputs = [("context", ctx.permute(1, 2, 0).numpy()), ("mask (red may change)", _overlay(ctx, inside))]
    if depth is not None:
        inputs.append(("depth", _to_numpy_hwc(_depth_pil(depth))))
    if tgt is not None:
        inputs.append(("target", tgt.permute(1, 2, 0).numpy()))
    ncols = max(len(inputs), len(images))
    fig = Figure(figsize=(2.6 * ncols, 2.8 * 3), layout="constrained")
    axes = fig.subplots(3, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for j, (title, arr) in enumerate(inputs):
        axes[0, j].imshow(arr)
        axes[0, j].set_title(title, fontsize=9)
    for j, (name, img) in enumerate(images.items()):
        pred = _rgb01(img, name)
        err = (pred - ctx).abs().mean(0).numpy()  # [H, W]
        m = metrics[name]
        axes[1, j].imshow(pred.permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
        axes[1, j].set_title(f"{name}\nin vs target {_fmt_db(m['psnr_in_vs_target'])}", fontsize=9)
        axes[2, j].imshow(err, cmap="magma", vmin=0.0, vmax=1.0)
        if inside.any() and not inside.all():
            axes[2, j].contour(inside.numpy().astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        axes[2, j].set_title(f"|{name} - context|\nout vs context {_fmt_db(m['psnr_out_vs_context'])}", fontsize=9)
    fig.suptitle(f"“{prompt}”: same noise (seed {seed}) through every variant. Edits belong inside the cyan "
                 "outline; outside it the error map should stay dark.", fontsize=10)
    return Comparison(fig, metrics, images)


def _pil_from(image):
    """PIL RGB from a PIL image or a ``[3, H, W]`` / ``[1, 3, H, W]`` tensor in ``[0, 1]``."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = (_rgb01(image, "image").clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # [H, W, 3]
    return Image.fromarray(arr)


def _pil_from_mask(mask):
    """PIL ``L`` (white = editable) from any mask :func:`sample_edit` accepts."""
    from PIL import Image

    m = _mask_batch(mask)[0, 0]  # [H, W]
    return Image.fromarray(((m > 0.5).to(torch.uint8) * 255).numpy(), mode="L")


# ==================================================================================================
# 6. Command line: python -m kontext_helpers train --data DIR --out DIR [options]
# ==================================================================================================


def _cli_parser():
    import argparse
    import typing

    parser = argparse.ArgumentParser(prog="python -m kontext_helpers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a LoRA + region token on a dataset folder (works under accelerate launch)")
    p.add_argument("--data", required=True, help="dataset folder: context/ target/ masks/ depth/ prompts.txt")
    p.add_argument("--out", required=True, help="output folder (checkpoints/, previews/, adapter/)")
    p.add_argument("--model", default="tiny", help="'tiny', a Hub id or a local pipeline folder")
    p.add_argument("--preset", default=None, help="GPU preset: auto, " + ", ".join(sorted(GPU_PRESETS)))
    p.add_argument("--resize", default="square", choices=["square", "crop"], help="dataset resize policy")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("output_dir", "expected_peak_memory_gb", "peak_memory_source"):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            base = next((t for t in (int, float, str) if t in typing.get_args(kind) or kind is t), str)
            p.add_argument(flag, type=base, default=None, help=f"default {f.default!r}")
    return parser


def main(argv: list[str] | None = None) -> TrainResult:
    """Entry point of ``python -m kontext_helpers train``; returns the :class:`TrainResult`."""
    args = _cli_parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    overrides["output_dir"] = args.out
    config = TrainConfig.for_gpu(args.preset, **overrides) if args.preset else TrainConfig(**overrides)
    dataset = KontextPairs(args.data, resolution=config.resolution, resize=args.resize)
    config.validate(dataset)
    quant = nf4_quantization_config() if config.quantize_base == "nf4" and args.model != "tiny" else None
    pipe = load_pipeline(args.model, seed=config.seed, quantization_config=quant)
    result = train(pipe, dataset, config)
    from accelerate import PartialState

    if PartialState().is_main_process:
        path = save_adapter(pipe, result.region, os.path.join(args.out, "adapter"), config=config)
        print(f"adapter saved to {path}")
        last = result.history[-1] if result.history else {}
        print(f"done: {len(result.history)} steps, final loss {last.get('loss', float('nan')):.4f}")
    return result


if __name__ == "__main__":
    main()
