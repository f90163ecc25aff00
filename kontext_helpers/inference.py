"""Notebook 05: sampling an edit with the region signal and depth, and comparing variants.

:func:`sample_edit` is ``FluxKontextPipeline.__call__`` written out in named steps (prompt, context
latents, region signal, timesteps, depth, denoising, decoding) with the additions the pipeline cannot
make: the region signal in the sequence, depth offsets on the tokens (the ``"tokens"`` depth kind), and an
IP-Adapter that may receive no image.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .conditioning import mask_to_token_grid, region_inputs
from .depth import add_offsets, check_depth_module, depth_inputs, depth_token_features
from .figures import edit_metrics, mask_at_size, resize_rgb, variants_figure
from .images import depth_to_pil, image_to_pil_rgb, image_to_rgb_tensor, mask_to_pil, mask_to_tensor, pil_to_rgb
from .latents import CONTEXT_ID, TARGET_ID, pack_like_pipeline
from .models import has_ip_adapter, ip_adapter_processors, lora_layers, lora_off, modules_visiting, without_ip_image


def image_for_pipeline(image, what: str = "image"):
    """The context image as the pipeline's image processor takes it: a PIL ``RGB`` image (any mode, EXIF
    applied) stays PIL; a ``[3, H, W]`` / ``[1, 3, H, W]`` tensor in ``[0, 1]`` becomes ``[1, 3, H, W]`` float32."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        t = image[None] if image.ndim == 3 else image  # [3, H, W] -> [1, 3, H, W]
        if t.ndim != 4 or t.shape[:2] != (1, 3):
            raise ValueError(f"{what}: expected one image, [3, H, W] or [1, 3, H, W] in [0, 1], "
                             f"got shape {tuple(image.shape)}")
        return t.detach().float().cpu()
    raise TypeError(f"{what}: expected a PIL image or a [3, H, W] tensor in [0, 1], got {type(image).__name__}")


def _check_edit_inputs(transformer, prompt, mask, depth, region, output_type, num_inference_steps,
                       ip_adapter_scale, blend=False, depth_module=None) -> None:
    """Every argument problem of :func:`sample_edit`, raised before any model work."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be one string (sample_edit edits one image), got {type(prompt).__name__}")
    if output_type not in ("pil", "latent", "pt", "np"):
        raise ValueError(f"output_type must be 'pil', 'latent', 'pt' or 'np', got {output_type!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    c_in = transformer.config.in_channels
    if mask is not None and region is None and not blend:
        raise ValueError("a mask reaches the model only through a trained region module or blending: pass "
                         "region=... (load_adapter returns it, train returns it), blend=True, or leave mask=None")
    if blend and mask is None:
        raise ValueError("blend=True keeps the context outside the mask: pass mask=... (white / 1 = editable)")
    if region is not None and mask is None:
        raise ValueError("region=... needs the edit mask it was trained with: pass mask=... (white / 1 = editable)")
    if region is not None and not hasattr(region, "appends"):
        raise TypeError(f"region must be a region module of kh.REGION_KINDS, got {type(region).__name__}")
    if region is not None and getattr(region, "c_in", None) != c_in:
        raise ValueError(f"the region module was built for c_in={getattr(region, 'c_in', None)} but this "
                         f"transformer takes {c_in}-channel tokens (transformer.config.in_channels): "
                         "it was trained for another model")
    if depth_module is not None:
        check_depth_module(depth_module, c_in)
    elif depth is not None and not has_ip_adapter(transformer):
        raise ValueError("depth needs a depth module (depth_module=..., from train or load_depth_module) or an "
                         "IP-Adapter on the pipeline: load_pipeline(..., ip_adapter=...) attaches one")
    if ip_adapter_scale is not None and not has_ip_adapter(transformer):
        raise ValueError("ip_adapter_scale was given but the pipeline has no IP-Adapter")


def _edit_sizes(pipe, image, height, width) -> tuple[int, int, int, int]:
    """``(ctx_h, ctx_w, height, width)``: the context's own size rounded down to 16 px, and the output size."""
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
    return ctx_h, ctx_w, height, width


def _encode_edit_prompt(pipe, prompt: str, device, max_sequence_length: int):
    """The pipeline's own ``encode_prompt``; text encoders that training offloaded visit ``device`` and return."""
    with modules_visiting(device, [pipe.text_encoder, pipe.text_encoder_2]):
        return pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1,
                                  max_sequence_length=max_sequence_length)  # [1, T, D_t5], [1, D_clip], [T, 3]


def _noise_and_context(pipe, image, sizes, dtype, device, generator):
    """``__call__``'s steps 3-5 with ``_auto_resize=False``: noise ``[1, N, 4C]``, context tokens ``[1, N_c, 4C]``
    and the ids ``[N + N_c, 3]`` of both, from the pipeline's ``prepare_latents``."""
    ctx_h, ctx_w, height, width = sizes
    image_t = pipe.image_processor.resize(image, ctx_h, ctx_w)
    image_t = pipe.image_processor.preprocess(image_t, ctx_h, ctx_w)  # [1, 3, H_c, W_c] in [-1, 1]
    c_in = pipe.transformer.config.in_channels
    latents, image_latents, latent_ids, image_ids = pipe.prepare_latents(
        image_t, 1, c_in // 4, height, width, dtype, device, generator, None)
    return latents, image_latents, torch.cat([latent_ids, image_ids], dim=0)  # ids: [N + N_c, 3]


def _depth_offsets(depth_module, features, cond):
    """:func:`depth_inputs` of the depth features ``[1, N_c, 256]`` on the context's token grid: ``(target_offset
    [1, N_c, 4C], context_offset [1, N_c, 4C] or None)`` as ``cond``'s dtype and device; ``(None, None)`` without
    features."""
    if depth_module is None or features is None:
        return None, None
    offsets = depth_inputs(depth_module, features.to(next(depth_module.parameters()).device))
    return tuple(None if t is None else t.to(cond) for t in offsets)


def _add_context_offset(cond, offset, n_c: int):
    """The context tokens (the first ``n_c`` of ``cond [B, N_c (+K), 4C]``) plus ``offset [B, N_c, 4C]``."""
    if offset is None:
        return cond
    return torch.cat([cond[:, :n_c] + offset, cond[:, n_c:]], dim=1)  # [B, N_c (+K), 4C]


def _signals_on_context(region, mask, depth_module, features, cond, grid: tuple[int, int]):
    """The region signal and the depth offsets on the context's ``grid``, as :func:`sample_edit` and
    :class:`RegionHook` both apply them: the context part ``[1, N_c (+K), 4C]``, the ids of appended tokens
    ``[K, 3]`` (or ``None``), the region's target offset and the depth's target offset (each ``[1, N_c, 4C]`` or
    ``None``)."""
    extra_ids = target_offset = None
    if region is not None:
        cond, extra_ids, target_offset = _region_context(region, mask, cond, grid)
    depth_target, depth_context = _depth_offsets(depth_module, features, cond)
    return _add_context_offset(cond, depth_context, grid[0] * grid[1]), extra_ids, target_offset, depth_target


def _region_context(region, mask, cond, grid: tuple[int, int]):
    """:func:`region_inputs` of the mask on the context's grid: the context with the region signal
    ``[1, N_c (+K), 4C]``, the ids of appended tokens ``[K, 3]`` (or ``None``) and the target offset (or ``None``)."""
    m_small = mask_to_token_grid(mask_to_tensor(mask), *grid)  # [1, 1, H, W] -> [1, 1, H', W']
    m_small = m_small.to(next(region.parameters()).device)
    return region_inputs(region, cond, m_small, *grid)


def blend_mask_tokens(mask, height: int, width: int, latent_channels: int = 16, *, device=None,
                      dtype=torch.float32) -> torch.Tensor:
    """The mask as ``FluxKontextInpaintPipeline`` blends with it: binarised at 0.5, resized to ``height x width``,
    nearest to the latent grid, repeated over the channels and packed -> ``[1, N, 4C]`` in ``{0, 1}``."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=16, vae_latent_channels=latent_channels, do_normalize=False,
                                  do_binarize=True, do_convert_grayscale=True)  # the inpaint pipeline's mask_processor
    m = processor.preprocess(mask_to_pil(mask), height=height, width=width)  # [1, 1, H, W] in {0, 1}
    m = torch.nn.functional.interpolate(m, size=(height // 8, width // 8))  # -> [1, 1, H_l, W_l], nearest
    tokens, _ = pack_like_pipeline(m.repeat(1, latent_channels, 1, 1))  # [1, C, H_l, W_l] -> [1, N, 4C]
    return tokens.to(device=device, dtype=dtype)


def blend_latents(scheduler, latents, context_latents, noise, mask_tok, timesteps, step: int) -> torch.Tensor:
    """``FluxKontextInpaintPipeline``'s hard constraint after Euler step ``step``: outside the mask the latents
    become the context noised to the next timestep (the clean context after the last step)."""
    proper = context_latents
    if step < len(timesteps) - 1:
        proper = scheduler.scale_noise(context_latents, torch.tensor([timesteps[step + 1]]), noise)
    return (1 - mask_tok) * proper + mask_tok * latents  # [1, N, 4C]


def _edit_timesteps(pipe, num_inference_steps: int, image_seq_len: int, device):
    """The pipeline's sigmas ``linspace(1, 1/n, n)``, shifted by ``mu`` from the target's sequence length."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift, retrieve_timesteps

    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    config = pipe.scheduler.config
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
    return timesteps


def _depth_embeds(pipe, depth, device):
    """Depth through the pipeline's own ``prepare_ip_adapter_image_embeds`` -> ``[[1, 1, E]]``."""
    with modules_visiting(device, [pipe.image_encoder]):
        return pipe.prepare_ip_adapter_image_embeds(depth_to_pil(depth), None, device, 1)


@contextlib.contextmanager
def _ip_adapter_scale(pipe, scale):
    """Set the IP-Adapter scale for a block (``None``: keep it); the previous scales come back afterwards."""
    saved = [(p, list(p.scale)) for p in ip_adapter_processors(pipe.transformer)]
    if scale is not None:
        pipe.set_ip_adapter_scale(scale)
    try:
        yield
    finally:
        for proc, old in saved:
            proc.scale = old


def _denoise(pipe, latents, cond, img_ids, text, timesteps, guidance_scale, image_embeds, callback, blend=None,
             target_offset=None):
    """The Euler loop of ``__call__`` on ``[noisy target | context (| region)]``; returns latents ``[1, N, 4C]``.

    ``blend``: ``(context_latents, noise, mask_tok)`` for :func:`blend_latents` after every step, or ``None``;
    ``target_offset``: ``[1, N, 4C]`` added to the noisy target tokens in the transformer's input (``"marked"``)."""
    transformer = pipe.transformer
    prompt_embeds, pooled_prompt_embeds, text_ids = text
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([1], guidance_scale, device=latents.device, dtype=torch.float32)  # [1]
    pipe.scheduler.set_begin_index(0)
    with pipe.progress_bar(total=len(timesteps)) as progress_bar:
        for i, t in enumerate(timesteps):
            # a fresh dict every step: the transformer pops the embeddings out of it
            if image_embeds is not None:
                attn_kwargs = {"ip_adapter_image_embeds": image_embeds}
            else:  # no IP tokens: an attached adapter adds exactly zero
                attn_kwargs = {"ip_hidden_states": []} if has_ip_adapter(transformer) else None
            noisy = latents if target_offset is None else latents + target_offset  # [1, N, 4C]
            hidden = torch.cat([noisy, cond], dim=1)  # [1, N + N_c (+K), 4C]
            timestep = t.expand(latents.shape[0]).to(latents.dtype)  # [1], as the pipeline casts it
            noise_pred = transformer(
                hidden_states=hidden, timestep=timestep / 1000, guidance=guidance,
                pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                img_ids=img_ids, joint_attention_kwargs=attn_kwargs, return_dict=False,
            )[0]
            noise_pred = noise_pred[:, : latents.shape[1]]  # [1, N, 4C]: the target part
            latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if blend is not None:
                latents = blend_latents(pipe.scheduler, latents, *blend, timesteps, i)
            if callback is not None:
                replaced = callback(i, t, latents)
                latents = latents if replaced is None else replaced
            progress_bar.update()
    return latents


def _decode(pipe, latents, height: int, width: int, output_type: str):
    """Latents ``[1, N, 4C]`` -> the image in ``output_type``, as ``__call__`` decodes them."""
    if output_type == "latent":
        return latents
    lat = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)  # [1, N, 4C] -> [1, C, H_l, W_l]
    lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    decoded = pipe.vae.decode(lat, return_dict=False)[0]  # [1, 3, H, W] in [-1, 1]
    out = pipe.image_processor.postprocess(decoded, output_type=output_type)
    return out[0] if output_type == "pil" else out


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
    blend: bool = False,
    depth_module: nn.Module | None = None,
):
    """Edit one image with the Kontext sampling loop plus the region signal and depth.

    ``FluxKontextPipeline.__call__`` step for step (same prompt encoding, image preprocessing,
    ``prepare_latents``, timesteps and ``mu`` shift, guidance and Euler steps), plus:

    * the **region signal** from ``region(mask on the context's token grid)`` (:func:`apply_region`): tokens
      appended after the context with their own ids (``"linear"``: one token, id ``(2, 0, 0)``; ``"cells"``),
      or an embedding added to the masked context tokens (``"marked_context"``) and, at every step, to the
      masked noisy target tokens (``"marked"``);
    * ``blend=True``: ``FluxKontextInpaintPipeline``'s hard constraint, outside the mask the latents are reset to
      the context noised to the next step (:func:`blend_latents`); needs ``mask``;
    * **depth** with ``depth_module`` (depth kind ``"tokens"``): :func:`depth_token_features` of the map on the
      context's token grid through the module, an offset added to the noisy target tokens at every step and to
      the context tokens (the IP-Adapter gets no image); the output must have the context's size. Without
      ``depth_module`` the map goes to the IP-Adapter. ``depth_module`` with ``depth=None`` runs without depth,
      what depth dropout trains for;
    * ``depth=None`` on a pipeline that has an IP-Adapter: the adapter gets no image tokens and adds exactly
      zero. (``pipe(...)`` itself crashes there.)

    With ``mask``, ``depth`` and ``region`` all ``None`` the result equals ``pipe(image=image, prompt=prompt,
    height=h, width=w, max_area=h*w, num_inference_steps=..., guidance_scale=..., generator=...,
    _auto_resize=False)``; with ``depth`` it equals that call with ``ip_adapter_image=depth``.

    Args:
        image: the context image: PIL, or a ``[3, H, W]`` / ``[1, 3, H, W]`` tensor in ``[0, 1]``. It keeps its
            own size, rounded down to a multiple of 16 (as the pipeline with ``_auto_resize=False``).
        mask: where the edit may happen (white / 1 = editable), any size; needs ``region`` or ``blend=True``.
        depth: depth map (near = bright), for ``depth_module`` or else the IP-Adapter: a PIL image of any bit depth
            (8-bit, 16-bit, float), or a ``[1, H, W]`` float tensor in ``[0, 1]``; the same map in any of these forms
            gives the same result. For ``depth_module`` it must frame the context (its aspect ratio within one
            token of the context's; another size is resized). An adapter trained with ``depth_source="target"``
            takes the depth the result should have.
        region: a trained region module (``train`` and ``load_adapter`` return it); needs ``mask``.
        height, width: the exact output size, multiples of 16; default: the context image's size.
        output_type: ``"pil"``, ``"latent"`` (packed ``[1, N, 4C]``, as ``pipe(..., output_type="latent")``),
            ``"pt"`` (``[1, 3, H, W]``) or ``"np"`` (``[1, H, W, 3]``).
        ip_adapter_scale: IP-Adapter strength for this call only; ``None`` keeps the pipeline's.
        callback: ``callback(step, t, latents)`` after every step; a returned tensor replaces the latents.
        blend: keep the latents outside the mask on the context's noising path (the inpaint pipeline's blend).
        depth_module: a trained depth module (``train(...).depth``, :func:`load_depth_module`), or ``None``.
    Returns:
        the edited image in ``output_type``.
    """
    _check_edit_inputs(pipe.transformer, prompt, mask, depth, region, output_type, num_inference_steps,
                       ip_adapter_scale, blend, depth_module)
    image = image_for_pipeline(image)
    sizes = _edit_sizes(pipe, image, height, width)
    height, width = sizes[2:]
    if blend and sizes[:2] != sizes[2:]:
        raise ValueError(f"blend=True keeps the context outside the mask, so the output must have the context's size "
                         f"{sizes[0]}x{sizes[1]} (H x W), got height={height}, width={width}")
    device = pipe._execution_device
    text = _encode_edit_prompt(pipe, prompt, device, max_sequence_length)
    latents, cond, img_ids = _noise_and_context(pipe, image, sizes, text[0].dtype, device, generator)
    blend_parts = None
    if blend:
        mask_tok = blend_mask_tokens(mask, height, width, pipe.transformer.config.in_channels // 4,
                                     device=device, dtype=latents.dtype)  # [1, N, 4C]
        blend_parts = (cond, latents.clone(), mask_tok)  # context latents, the starting noise, the mask
    cond, img_ids, target_offset = _context_signals(pipe, region, mask, depth_module, depth, cond, img_ids, sizes)
    timesteps = _edit_timesteps(pipe, num_inference_steps, latents.shape[1], device)
    image_embeds = _depth_embeds(pipe, depth, device) if depth is not None and depth_module is None else None
    with _ip_adapter_scale(pipe, ip_adapter_scale):
        latents = _denoise(pipe, latents, cond, img_ids, text, timesteps, guidance_scale, image_embeds, callback,
                           blend_parts, target_offset)
    out = _decode(pipe, latents, height, width, output_type)
    pipe.maybe_free_model_hooks()
    return out


def _context_signals(pipe, region, mask, depth_module, depth, cond, img_ids, sizes):
    """The region signal and the depth offsets on the context's token grid: the context part ``[1, N_c (+K), 4C]``,
    the ids ``[N + N_c (+K), 3]`` and the offset of the noisy target tokens ``[1, N, 4C]`` (or ``None``)."""
    multiple = pipe.vae_scale_factor * 2
    grid = (sizes[0] // multiple, sizes[1] // multiple)
    features = depth_token_features(depth, *grid) if depth_module is not None and depth is not None else None
    cond, extra_ids, target_offset, depth_target = _signals_on_context(region, mask, depth_module, features, cond, grid)
    if target_offset is not None and sizes[:2] != sizes[2:]:
        raise ValueError(f"a {region.kind!r} region marks the target tokens on the context's grid, so the output "
                         f"must have the context's size {sizes[0]}x{sizes[1]} (H x W), got {sizes[2]}x{sizes[3]}")
    if depth_target is not None and sizes[:2] != sizes[2:]:
        raise ValueError(f"the depth module adds the depth to the target tokens on the context's grid, so the output "
                         f"must have the context's size {sizes[0]}x{sizes[1]} (H x W), got {sizes[2]}x{sizes[3]}")
    if extra_ids is not None:
        img_ids = torch.cat([img_ids, extra_ids.to(img_ids)], dim=0)  # -> [N + N_c + K, 3]
    return cond, img_ids, add_offsets(target_offset, depth_target)


class RegionHook:
    """The region signal, depth offsets (and blending) inside diffusers' own ``FluxKontextPipeline.__call__``.

    A forward pre-hook on ``pipe.transformer`` finds the context tokens by their ids (type 1), applies
    ``region`` to them exactly as :func:`sample_edit` does (appended tokens and their ids, or the marked
    context), and, with ``depth_module``, adds the depth offsets to the noisy target and the context tokens;
    the pipeline keeps only the target part of the output. With ``blend=True``, pass
    ``callback_on_step_end=hook.callback`` to get :func:`blend_latents` after every step. Use it as a context
    manager, or call :meth:`remove`::

        with kh.RegionHook(pipe, region, mask, depth=depth, depth_module=depth_module) as hook:
            image = pipe(image=context, prompt=prompt, callback_on_step_end=hook.callback).images[0]

    ``mask`` is needed with ``region`` or ``blend``; ``depth`` goes through ``depth_module`` only (for an
    IP-Adapter, pass ``ip_adapter_image=depth`` to ``pipe(...)``). A pipeline with an IP-Adapter called without
    ``ip_adapter_image`` gets no image tokens from it (it adds exactly zero, as in :func:`sample_edit`).
    """

    def __init__(self, pipe, region: nn.Module | None, mask, *, blend: bool = False, depth=None,
                 depth_module: nn.Module | None = None):
        if depth is not None and depth_module is None:
            raise ValueError("RegionHook(depth=...) needs depth_module=...; for the IP-Adapter pass "
                             "ip_adapter_image=depth to pipe(...) instead")
        if region is None and not blend and depth_module is None:
            raise ValueError("RegionHook needs a region module, blend=True, a depth module, or several")
        if mask is None and (region is not None or blend):
            raise ValueError("RegionHook needs the edit mask (white / 1 = editable) with a region module or blend")
        if depth_module is not None:
            check_depth_module(depth_module, pipe.transformer.config.in_channels)
        self.pipe, self.region, self.blend = pipe, region, blend
        self.mask = None if mask is None else mask_to_tensor(mask)
        self.depth, self.depth_module = depth, depth_module
        self._features = {}  # the depth map's token features per context grid: every step of a run reuses them
        self._blend_parts = None  # (context latents, noise, mask tokens), captured at the first call of a run
        self._handle = pipe.transformer.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def _pre_hook(self, module, args, kwargs):
        hidden, ids = kwargs["hidden_states"], kwargs["img_ids"]  # [B, N + N_c, 4C], [N + N_c, 3]
        n, n_c = int((ids[:, 0] == TARGET_ID).sum()), int((ids[:, 0] == CONTEXT_ID).sum())
        ctx_ids = ids[n: n + n_c]  # [N_c, 3]
        h_c, w_c = int(ctx_ids[:, 1].max()) + 1, int(ctx_ids[:, 2].max()) + 1
        if self.blend and self._blend_parts is None:
            h, w = int(ids[:n, 1].max()) + 1, int(ids[:n, 2].max()) + 1
            if (h, w) != (h_c, w_c):
                raise ValueError(f"blending needs the output on the context's token grid {h_c}x{w_c}, got {h}x{w}")
            mask_tok = blend_mask_tokens(self.mask, 16 * h, 16 * w, hidden.shape[-1] // 4, device=hidden.device,
                                         dtype=hidden.dtype)  # [1, N, 4C]
            self._blend_parts = (hidden[:, n: n + n_c].clone(), hidden[:, :n].clone(), mask_tok)
        kwargs = without_ip_image(module, kwargs)  # no depth image: an attached IP-Adapter adds zero
        features = self._depth_features((h_c, w_c))
        if self.region is None and features is None:
            return args, kwargs
        cond, extra_ids, target_offset, depth_target = _signals_on_context(
            self.region, self.mask, self.depth_module, features, hidden[:, n: n + n_c], (h_c, w_c))
        target_offset = add_offsets(target_offset, depth_target)
        noisy = hidden[:, :n]  # [B, N, 4C]
        if target_offset is not None:  # "marked" region or depth: the target tokens too, on the context's grid
            if n != n_c:
                raise ValueError(f"the {'depth module' if depth_target is not None else repr(self.region.kind)} "
                                 f"needs the output on the context's token grid ({n_c} tokens), got {n} target tokens")
            noisy = noisy + target_offset
        kwargs["hidden_states"] = torch.cat([noisy, cond, hidden[:, n + n_c:]], dim=1)  # [B, N + N_c + K, 4C]
        if extra_ids is not None:
            kwargs["img_ids"] = torch.cat([ids, extra_ids.to(ids)], dim=0)  # -> [N + N_c + K, 3]
        return args, kwargs

    def _depth_features(self, grid: tuple[int, int]):
        """:func:`depth_token_features` of the depth map on the context's ``grid`` ``[1, N_c, 256]``, once per grid;
        ``None`` without a depth module or map."""
        if self.depth_module is None or self.depth is None:
            return None
        if grid not in self._features:
            self._features[grid] = depth_token_features(self.depth, *grid)
        return self._features[grid]

    def callback(self, pipe, step: int, t, callback_kwargs: dict) -> dict:
        """``callback_on_step_end`` for ``pipe(...)``: the blend after each step (nothing without ``blend``)."""
        if not self.blend:
            return {}
        timesteps = pipe.scheduler.timesteps
        latents = blend_latents(pipe.scheduler, callback_kwargs["latents"], *self._blend_parts, timesteps, step)
        if step == len(timesteps) - 1:
            self._blend_parts = None  # the next pipe(...) call starts from its own noise
        return {"latents": latents}

    def remove(self) -> None:
        """Detach the hook: the transformer is as before."""
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class Comparison(NamedTuple):
    """What :func:`compare_variants` returns: the figure, ``{variant: edit_metrics}`` and ``{variant: PIL}``."""

    figure: object
    metrics: dict
    images: dict


def _inpaint_baseline(pipe, image, prompt: str, mask, seed: int, common: dict):
    """diffusers' ``FluxKontextInpaintPipeline`` from the same components, LoRA off, no depth."""
    from diffusers import FluxKontextInpaintPipeline

    inpainter = FluxKontextInpaintPipeline(**pipe.components)
    inpainter.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    ctx_pil = image_to_pil_rgb(image).resize((common["width"], common["height"]))  # output size = input size
    no_ip = {"ip_hidden_states": []} if has_ip_adapter(pipe.transformer) else None
    with lora_off(pipe.transformer):
        return inpainter(image=ctx_pil, mask_image=mask_to_pil(mask), prompt=prompt, strength=1.0,
                         max_area=common["height"] * common["width"], generator=torch.Generator().manual_seed(seed),
                         _auto_resize=False, joint_attention_kwargs=no_ip, **common).images[0]


def _variant_images(pipe, image, prompt, mask, region, depth, seed, common, inpaint, depth_module=None) -> dict:
    """``{variant: PIL}`` for every variant whose parts exist, all from the same seed."""
    def run(**kw):
        return sample_edit(pipe, image, prompt, generator=torch.Generator().manual_seed(seed), **common, **kw)

    has_lora = bool(lora_layers(pipe.transformer))
    lead = "LoRA" if has_lora else "base"
    images = {}
    with lora_off(pipe.transformer):
        images["base"] = run()
    if has_lora:
        images["LoRA"] = run()
    if region is not None:
        images[f"{lead} + region"] = run(mask=mask, region=region)
        if depth is not None:
            images[f"{lead} + region + depth"] = run(mask=mask, region=region, depth=depth, depth_module=depth_module)
    if inpaint:
        images["inpaint (base)"] = _inpaint_baseline(pipe, image, prompt, mask, seed, common)
    return images


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
    label: str | None = None,
    depth_module: nn.Module | None = None,
) -> Comparison:
    """Run the same inputs and the same noise through every variant, into one figure and one metrics table.

    Variants (those whose parts exist): ``base`` (LoRA switched off), ``LoRA``, ``LoRA + region``,
    ``LoRA + region + depth``, and ``inpaint (base)``: diffusers' mask-aware ``FluxKontextInpaintPipeline``
    with the LoRA off and no depth, the baseline a trained region signal should beat.

    Args:
        image, prompt, mask, region, depth, depth_module: as in :func:`sample_edit`; ``target``: the expected edit.
        seed: every variant starts from ``torch.Generator().manual_seed(seed)``.
        inpaint: include the inpainting baseline.
        label: which model made the figure, e.g. ``"tiny model, 128 px"`` (end of its title).
    Returns:
        :class:`Comparison` ``(figure, metrics, images)``; ``metrics_table(result.metrics)`` prints the table.
    """
    image = image_for_pipeline(image)
    _, _, height, width = _edit_sizes(pipe, image, height, width)
    common = dict(height=height, width=width, num_inference_steps=num_inference_steps,
                  guidance_scale=guidance_scale, max_sequence_length=max_sequence_length)
    images = _variant_images(pipe, image, prompt, mask, region, depth, seed, common, inpaint, depth_module)
    ctx = resize_rgb(image_to_pil_rgb(image), height, width)  # [3, H, W]
    tgt = resize_rgb(target, height, width) if target is not None else None
    inside = mask_at_size(mask, height, width)  # [H, W] bool
    metrics = {name: edit_metrics(image_to_rgb_tensor(img, name), ctx, tgt, inside[None].float())
               for name, img in images.items()}
    figure = variants_figure(ctx, inside, depth, tgt, images, metrics, prompt=prompt, seed=seed, label=label)
    return Comparison(figure, metrics, images)
