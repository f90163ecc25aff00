"""Notebook 02: pixels to Flux latents, 2x2 packing, and the position ids of every token.

Each function mirrors one of ``FluxKontextPipeline``'s own (``_encode_vae_image``, ``_pack_latents``,
``_unpack_latents``, ``_prepare_latent_image_ids``) and is tested against it bit for bit.
"""

from __future__ import annotations

import torch

# Column 0 of an image id: which part of the sequence a token belongs to (the pipeline marks context with 1).
TARGET_ID, CONTEXT_ID, REGION_ID = 0.0, 1.0, 2.0


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

    ``z = (vae.encode(x) - shift_factor) * scaling_factor``. The original design forgot the shift
    (docs/design.md, correction 1); without it the latents are offset from what the pipeline samples.

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

    The original design's ids were 3D ``[B, N, 3]``; diffusers deprecates that and wants 2D ``[N, 3]``
    (docs/design.md, correction 6).

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

    Type 2 keeps it apart from target (0) and context (1) tokens in the first RoPE axis. Row and column 0 are
    the top-left token's position: only the type axis separates the region token from that token.
    """
    return torch.tensor([[REGION_ID, 0.0, 0.0]], device=device, dtype=dtype)


def kontext_img_ids(h_tok: int, w_tok: int, *, with_region: bool = True, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
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
