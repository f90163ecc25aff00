"""kontext_helpers: LoRA training for FLUX.1 Kontext with a region token and depth through an IP-Adapter.

One module, imported by every notebook in ``notebooks/`` and by the tests. It has no import-time work
beyond imports, no global pipeline, and takes ``device`` / ``dtype`` as arguments.

Sections
    1. Core tensors: normalisation, VAE latents, 2x2 packing, position ids, region token, loss.
    2. Pipelines: ``load_pipeline("tiny")`` (offline, random, ~1 s on a CPU) or a real Hub id / local path.
    3. Data: ``KontextPairs`` and helpers for a user's own pairs.
    4. Training.
    5. Inference.

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

import math
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "REGION_ID",
    "MaskRegionToken",
    "collect_lora_named_params",
    "fm_masked_dual_loss_with_l2",
    "img_ids_grid",
    "kontext_img_ids",
    "load_pipeline",
    "mask_to_token_grid",
    "normalize_01_to_m11",
    "pack_like_pipeline",
    "to_latents",
    "unpack_like_pipeline",
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

# Words the tiny tokenizers are trained on: the vocabulary of editing prompts. Unknown words still
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


def _tiny_corpus() -> list[str]:
    words = _TINY_WORDS
    # every word, and rotations of the whole list so pairs of words occur: a deterministic corpus
    return [" ".join(words[i:] + words[:i]) for i in range(0, len(words), 7)] + words


def _tiny_clip_tokenizer(vocab_size: int):
    """A CLIP-style byte-level BPE tokenizer (``CLIPTokenizerFast``) trained on :data:`_TINY_WORDS`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import CLIPTokenizerFast

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(unk_token=eos, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    # the same split pattern as CLIP's tokenizer.json
    split = Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=split, behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[bos, eos],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer)
    tok.post_processor = processors.RobertaProcessing((eos, 1), (bos, 0), add_prefix_space=False, trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    return CLIPTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=eos, pad_token=eos, model_max_length=77
    )


def _tiny_t5_tokenizer(vocab_size: int):
    """A T5-style Unigram tokenizer (``T5TokenizerFast``: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("  ", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(_tiny_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0, model_max_length=512
    )


# Sizes of the tiny world. The transformer is Flux's architecture at a small width: in_channels 64
# (16 latent channels x 2x2 packing), guidance embeddings, 3-axis RoPE whose axes sum to the head dim.
TINY_CONFIG = {
    "clip_vocab": 512,
    "t5_vocab": 400,
    "clip_text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "projection_dim": 32, "max_position_embeddings": 77},
    "t5": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu"},
    "vae": {"block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8,
            "latent_channels": 16, "shift_factor": 0.1159, "scaling_factor": 0.3611},
    "transformer": {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 32, "num_attention_heads": 4,
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
        "ip_adapter_proj_model.proj.weight": torch.randn(num_tokens * text_dim, image_embed_dim) * image_embed_dim**-0.5,
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


def build_tiny_pipeline(seed: int = 0, *, with_ip_adapter: bool = True, device=None, dtype: torch.dtype = torch.float32):
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
    tokenizer = _tiny_clip_tokenizer(cfg["clip_vocab"])
    tokenizer_2 = _tiny_t5_tokenizer(cfg["t5_vocab"])
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
                size={"shortest_edge": vcfg["image_size"]}, crop_size={"height": vcfg["image_size"], "width": vcfg["image_size"]}
            )
            ip_sd = _tiny_ip_adapter_state_dict(transformer, vcfg["projection_dim"])
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxKontextPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer, image_encoder=image_encoder, feature_extractor=feature_extractor,
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
    lines = [f"Could not load {what} from '{repo}': {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"]
    if offline:
        lines.append("HF_HUB_OFFLINE is set, so only the local cache is used. Unset it (os.environ.pop('HF_HUB_OFFLINE'))"
                     " to download, or use load_pipeline('tiny') to work offline.")
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
        return build_tiny_pipeline(seed, device=device, dtype=dtype or torch.float32)
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
    return pipe


# ==================================================================================================
# 3. Data
# ==================================================================================================

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
    dtype = transformer.dtype
    hidden = torch.cat([p.to(dtype) for p in parts], dim=1)  # -> [B, 2N(+1), 4C]
    img_ids = kontext_img_ids(h_tok, w_tok, with_region=region_tok is not None, device=hidden.device, dtype=dtype)
    sigma = sigma.to(device=hidden.device, dtype=dtype).reshape(b)  # [B]
    guidance_t = None
    if transformer.config.guidance_embeds and guidance is not None:
        guidance_t = torch.as_tensor(guidance, device=hidden.device, dtype=torch.float32).expand(b)  # [B]
    kwargs = dict(joint_attention_kwargs or {})  # the transformer pops keys out of this dict: copy it
    if ip_adapter_image_embeds is not None:
        kwargs["ip_adapter_image_embeds"] = [e.to(device=hidden.device, dtype=dtype) for e in ip_adapter_image_embeds]
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


# LoRA target presets. "attn_ff" is the default list of diffusers' train_dreambooth_lora_flux_kontext.py.
LORA_TARGET_PRESETS = {
    "attn": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"],
    "attn_ff": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
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

# ==================================================================================================
# 5. Inference
# ==================================================================================================
