"""Inference: sample_edit against FluxKontextPipeline (the oracle), its region token and depth, compare_variants."""

import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

import kontext_helpers as kh


@pytest.fixture(scope="module")
def plain_pipe():
    """The pretrained tiny pipeline without IP-Adapter (read-only)."""
    return kh.load_pipeline("tiny", ip_adapter=None)


@pytest.fixture(scope="module")
def pipe_latents(edit_prompt, fast):
    """``pipe_latents(pipe, image, h, w, seed, **extra)``: the pipeline's own ``pipe(...)`` call, packed latents out."""

    def call(pipe, image, h, w, seed, **extra):
        out = pipe(image=image, prompt=edit_prompt, height=h, width=w, max_area=h * w, _auto_resize=False,
                   generator=torch.Generator().manual_seed(seed), output_type="latent", **fast, **extra)
        return out.images

    return call


# --------------------------------------------------------------------------------------------------
# the sampling loop against the pipeline
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_sample_edit_equals_pipeline_latents(plain_pipe, pipe_latents, sample_latents, random_image, size, seed):
    h, w = size
    image = random_image(h, w, seed)
    ref = pipe_latents(plain_pipe, image, h, w, seed)
    ours = sample_latents(plain_pipe, image, h, w, seed)
    assert ours.shape == ref.shape == (1, (h // 16) * (w // 16), 64), f"packed latents shape {tuple(ours.shape)}"
    torch.testing.assert_close(ours, ref, atol=0, rtol=0,
                               msg=lambda m: f"sample_edit differs from pipe(..., output_type='latent'): {m}")


def test_sample_edit_pil_equals_pipeline_pil(plain_pipe, random_image, edit_prompt, fast):
    h, w = 48, 80
    image = random_image(h, w, 3)
    ref = plain_pipe(image=image, prompt=edit_prompt, height=h, width=w, max_area=h * w, _auto_resize=False,
                     generator=torch.Generator().manual_seed(3), **fast).images[0]
    ours = kh.sample_edit(plain_pipe, image, edit_prompt, height=h, width=w,
                          generator=torch.Generator().manual_seed(3), **fast)
    assert isinstance(ours, Image.Image) and ours.size == (w, h), "output_type='pil' must give one W x H PIL image"
    diff = np.abs(np.asarray(ours, dtype=int) - np.asarray(ref, dtype=int)).max()
    assert diff == 0, f"decoded image differs from the pipeline's by {diff} grey levels"


def test_sample_edit_takes_a_tensor_image_and_defaults_to_its_size(plain_pipe, pipe_latents, edit_prompt, fast):
    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0))  # [3, H, W] in [0, 1]
    ref = pipe_latents(plain_pipe, image[None], 32, 48, 0)
    ours = kh.sample_edit(plain_pipe, image, edit_prompt, generator=torch.Generator().manual_seed(0),
                          output_type="latent", **fast)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0,
                               msg=lambda m: f"a tensor image must give the pipeline's result at its own size: {m}")


@pytest.mark.parametrize("seed", [0, 1])
def test_sample_edit_with_depth_equals_pipeline_ip_adapter_image(tiny_pipe, pipe_latents, sample_latents, random_image,
                                                                 random_depth, seed):
    h, w = 64, 48
    image, depth = random_image(h, w, seed), random_depth(h, w)
    ref = pipe_latents(tiny_pipe, image, h, w, seed, ip_adapter_image=depth)
    ours = sample_latents(tiny_pipe, image, h, w, seed, depth=depth)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0,
                               msg=lambda m: f"with depth, sample_edit differs from pipe(ip_adapter_image=depth): {m}")
    no_depth = sample_latents(tiny_pipe, image, h, w, seed)
    assert (ours - no_depth).abs().max() > 1e-3, "the depth map must change the result through the IP-Adapter"


def test_depth_none_with_ip_adapter_equals_a_pipeline_without_adapter(tiny_pipe, plain_pipe, pipe_latents,
                                                                      sample_latents, random_image):
    with_ip = tiny_pipe.transformer.state_dict()
    for key, value in plain_pipe.transformer.state_dict().items():
        torch.testing.assert_close(value, with_ip[key], rtol=0, atol=0,
                                   msg="premise: the tiny transformer has the same weights with or without the "
                                       "IP-Adapter")
    h, w = 64, 64
    image = random_image(h, w, 5)
    ours = sample_latents(tiny_pipe, image, h, w, 5)  # the adapter is loaded but gets no depth
    ref = pipe_latents(plain_pipe, image, h, w, 5)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0,
                               msg=lambda m: f"depth=None must make the IP-Adapter contribute nothing: {m}")


def test_plain_pipe_call_on_a_pipeline_with_ip_adapter_equals_it_unloaded(fresh_pipe, pipe_latents, sample_latents,
                                                                          random_image, random_depth, quadrant_mask):
    """``pipe(image=..., prompt=...)`` without ``ip_adapter_image`` on what ``load_pipeline`` returns: it runs
    (diffusers' ``FluxIPAdapterAttnProcessor`` alone stops on ``zip(None, ...)``) and gives, with and without
    ``RegionHook``, bit for bit what the same pipeline gives after diffusers' ``unload_ip_adapter()``."""
    pipe = fresh_pipe  # its IP-Adapter is unloaded below
    h, w = 64, 48
    image, mask = random_image(h, w, 6), quadrant_mask(h, w)
    region = _random_region("marked", h // 16, w // 16)
    loaded = pipe_latents(pipe, image, h, w, 6)
    with kh.RegionHook(pipe, region, mask):
        hooked = pipe_latents(pipe, image, h, w, 6)
    with_depth = pipe_latents(pipe, image, h, w, 6, ip_adapter_image=random_depth(h, w))
    ours = sample_latents(pipe, image, h, w, 6)
    pipe.unload_ip_adapter()  # diffusers' own removal: FluxAttnProcessor in every block, no encoder_hid_proj
    assert pipe.transformer.encoder_hid_proj is None and not kh.ip_adapter_processors(pipe.transformer), \
        "premise: unload_ip_adapter leaves no IP-Adapter on the transformer"
    unloaded = pipe_latents(pipe, image, h, w, 6)
    with kh.RegionHook(pipe, region, mask):
        hooked_unloaded = pipe_latents(pipe, image, h, w, 6)
    torch.testing.assert_close(loaded, unloaded, rtol=0, atol=0,
                               msg=lambda m: f"pipe(...) without ip_adapter_image must equal the unloaded adapter: {m}")
    torch.testing.assert_close(hooked, hooked_unloaded, rtol=0, atol=0,
                               msg=lambda m: f"with RegionHook, pipe(...) must equal the unloaded adapter: {m}")
    torch.testing.assert_close(ours, loaded, rtol=0, atol=0,
                               msg=lambda m: f"sample_edit without depth must equal the plain pipe(...): {m}")
    assert (with_depth - loaded).abs().max() > 1e-3, "premise: the adapter was attached and acts with an image"
    assert (hooked - loaded).abs().max() > 1e-4, "premise: the region module changes the result"


def test_ip_adapter_scale_applies_for_one_call_and_is_restored(fresh_pipe, sample_latents, random_image,
                                                               random_depth):
    pipe = fresh_pipe  # this test changes the adapter scale
    h, w = 64, 64
    image, depth = random_image(h, w, 2), random_depth(h, w)
    scales_before = [list(p.scale) for p in kh.ip_adapter_processors(pipe.transformer)]
    zero = sample_latents(pipe, image, h, w, 2, depth=depth, ip_adapter_scale=0.0)
    none = sample_latents(pipe, image, h, w, 2)
    torch.testing.assert_close(zero, none, atol=1e-6, rtol=0,
                               msg=lambda m: f"ip_adapter_scale=0 must equal no depth: {m}")
    scales_after = [list(p.scale) for p in kh.ip_adapter_processors(pipe.transformer)]
    assert scales_after == scales_before, "the IP-Adapter scale must be restored after the call"
    full = sample_latents(pipe, image, h, w, 2, depth=depth)
    assert (full - zero).abs().max() > 1e-3, "the restored scale must let depth act again"


def test_region_token_is_appended_after_context_with_its_own_id(fresh_pipe, sample_latents, random_image,
                                                                quadrant_mask):
    pipe = fresh_pipe  # a hook is registered on its transformer
    h, w = 64, 48
    h_tok, w_tok, n = h // 16, w // 16, (h // 16) * (w // 16)
    region = kh.MaskRegionToken(h_tok, w_tok, 64)
    torch.nn.init.normal_(region.proj.weight)
    mask = quadrant_mask(h, w)
    seen, steps = [], []

    def grab(module, args, kwargs):
        seen.append((kwargs["hidden_states"].clone(), kwargs["img_ids"].clone()))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with_region = sample_latents(pipe, random_image(h, w, 0), h, w, 0, mask=mask, region=region,
                                     callback=lambda i, t, lat: steps.append(i))
    finally:
        handle.remove()
    hidden, ids = seen[0]
    assert hidden.shape == (1, 2 * n + 1, 64), f"sequence must be [target N | context N | region 1], got {hidden.shape}"
    torch.testing.assert_close(ids[-1], torch.tensor([2.0, 0.0, 0.0]),
                               msg="the region token's id row must be (2, 0, 0)")
    torch.testing.assert_close(ids[:-1], kh.kontext_img_ids(h_tok, w_tok, with_region=False),
                               msg="target and context ids must be the pipeline's")
    expected = region(kh.mask_to_token_grid(mask[None], h_tok, w_tok))[0, 0]
    torch.testing.assert_close(hidden[0, -1], expected.detach(),
                               msg="the last token must be region(mask on the token grid)")
    assert steps == [0, 1, 2], f"callback must run once per step, got {steps}"
    without = sample_latents(pipe, random_image(h, w, 0), h, w, 0)
    assert (with_region - without).abs().max() > 1e-4, "the region token must change the result"
    pil_mask = Image.fromarray((mask[0].numpy() * 255).astype(np.uint8), mode="L")
    again = sample_latents(pipe, random_image(h, w, 0), h, w, 0, mask=pil_mask, region=region)
    torch.testing.assert_close(again, with_region, msg="a PIL mask must act like the same tensor mask")


def _random_region(kind, h_tok, w_tok, seed=0):
    region = kh.make_region_module(kind, h_tok, w_tok, 64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in region.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return region.eval()


@pytest.mark.parametrize("kind", ["marked", "marked_context", "cells", "linear"])
@pytest.mark.parametrize("blend", [False, True])
def test_pipeline_call_with_region_hook_equals_sample_edit(tiny_pipe, random_image, random_depth, quadrant_mask,
                                                           edit_prompt, fast, kind, blend):
    h, w = 64, 48
    image, depth, mask = random_image(h, w, 3), random_depth(h, w), quadrant_mask(h, w)
    region = _random_region(kind, h // 16, w // 16)
    ours = kh.sample_edit(tiny_pipe, image, edit_prompt, mask=mask, region=region, depth=depth, blend=blend,
                          generator=torch.Generator().manual_seed(5), output_type="latent", **fast)
    with kh.RegionHook(tiny_pipe, region, mask, blend=blend) as hook:
        theirs = tiny_pipe(image=image, prompt=edit_prompt, ip_adapter_image=depth, height=h, width=w,
                           max_area=h * w, _auto_resize=False, generator=torch.Generator().manual_seed(5),
                           output_type="latent", callback_on_step_end=hook.callback, **fast).images
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0,
                               msg=lambda m: f"pipe(...) with RegionHook ({kind}, blend={blend}) != sample_edit: {m}")
    plain = tiny_pipe(image=image, prompt=edit_prompt, ip_adapter_image=depth, height=h, width=w, max_area=h * w,
                      _auto_resize=False, generator=torch.Generator().manual_seed(5), output_type="latent",
                      **fast).images
    assert (plain - ours).abs().max() > 1e-4, "after the with-block the pipeline is plain again, and differs"


def test_blend_alone_equals_the_inpaint_pipeline(plain_pipe, random_image, quadrant_mask, edit_prompt, fast):
    from diffusers import FluxKontextInpaintPipeline

    h = w = 64
    image, mask = random_image(h, w, 4), quadrant_mask(h, w)
    ours = kh.sample_edit(plain_pipe, image, edit_prompt, mask=mask, blend=True,
                          generator=torch.Generator().manual_seed(2), output_type="latent", **fast)
    inpainter = FluxKontextInpaintPipeline(**plain_pipe.components)
    pil_mask = Image.fromarray((mask[0].numpy() * 255).astype(np.uint8), mode="L")
    theirs = inpainter(image=image, mask_image=pil_mask, prompt=edit_prompt, strength=1.0, height=h, width=w,
                       max_area=h * w, _auto_resize=False, generator=torch.Generator().manual_seed(2),
                       output_type="latent", **fast).images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"sample_edit(blend=True) must be the inpaint pipeline's blend: {m}")
    steps = []
    kh.sample_edit(plain_pipe, image, edit_prompt, mask=mask, blend=True, generator=torch.Generator().manual_seed(2),
                   output_type="latent", callback=lambda i, t, lat: steps.append(lat.clone()), **fast)
    mask_tok = kh.blend_mask_tokens(mask, h, w)
    scheduler = copy.deepcopy(plain_pipe.scheduler)  # the run's timesteps; scale_noise looks the sigma up by value
    scheduler._begin_index = scheduler._step_index = None
    timesteps = scheduler.timesteps
    first = kh.blend_latents(scheduler, steps[0], torch.ones_like(steps[0]), torch.zeros_like(steps[0]), mask_tok,
                             timesteps, 0)
    sigma_next = float(scheduler.sigmas[1])
    torch.testing.assert_close(first * (1 - mask_tok), (1 - sigma_next) * (1 - mask_tok),
                               msg="blend_latents puts the context noised to the next sigma outside the mask")
    torch.testing.assert_close(first * mask_tok, steps[0] * mask_tok, msg="and keeps the latents inside it")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]  # [1, 3, H, W]
    with torch.no_grad():
        ctx_tok, _ = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(pixels), plain_pipe.vae))
    outside = 1 - kh.blend_mask_tokens(mask, h, w)  # [1, N, 4C]
    assert 0 < outside.mean() < 1, "the quadrant mask leaves part of the latents outside"
    torch.testing.assert_close(ours * outside, ctx_tok * outside, rtol=0, atol=1e-5,
                               msg="after the last step the latents outside the mask are the context's")


def test_sample_edit_rejects_bad_input_clearly(tiny_pipe, plain_pipe, random_image, random_depth, quadrant_mask,
                                               edit_prompt, fast):
    image = random_image(64, 64, 0)
    with pytest.raises(ValueError, match="region module or blending"):
        kh.sample_edit(tiny_pipe, image, edit_prompt, mask=quadrant_mask(64, 64), **fast)
    with pytest.raises(ValueError, match="blend=True keeps the context"):
        kh.sample_edit(tiny_pipe, image, edit_prompt, blend=True, **fast)
    with pytest.raises(ValueError, match="context's size"):
        kh.sample_edit(tiny_pipe, image, edit_prompt, mask=quadrant_mask(64, 64), blend=True, height=32, **fast)
    with pytest.raises(ValueError, match="needs the edit mask"):
        kh.sample_edit(tiny_pipe, image, edit_prompt, region=kh.MaskRegionToken(4, 4, 64), **fast)
    with pytest.raises(ValueError, match="c_in=32"):
        kh.sample_edit(tiny_pipe, image, edit_prompt, mask=quadrant_mask(64, 64), region=kh.MaskRegionToken(4, 4, 32),
                       **fast)
    with pytest.raises(ValueError, match="multiples of 16"):
        kh.sample_edit(tiny_pipe, image, edit_prompt, height=60, width=64, **fast)
    with pytest.raises(ValueError, match="IP-Adapter"):
        kh.sample_edit(plain_pipe, image, edit_prompt, depth=random_depth(64, 64), **fast)
    with pytest.raises(ValueError, match="output_type"):
        kh.sample_edit(tiny_pipe, image, edit_prompt, output_type="tensor", **fast)


# --------------------------------------------------------------------------------------------------
# comparing variants, offloaded encoders
# --------------------------------------------------------------------------------------------------


def test_compare_variants_runs_every_variant_into_one_figure_and_table(trained, edit_latents, random_image,
                                                                       random_depth, quadrant_mask, edit_prompt, fast):
    from matplotlib.figure import Figure

    pipe, region, _ = trained
    image, mask, depth = random_image(64, 64, 11), quadrant_mask(64, 64), random_depth(64, 64)
    target = random_image(64, 64, 12)
    before = edit_latents(pipe, region)
    grads = [p.requires_grad for n, p in pipe.transformer.named_parameters() if "lora_" in n]
    result = kh.compare_variants(pipe, image, edit_prompt, mask, region=region, depth=depth, target=target, seed=4,
                                 label="tiny model, 64 px", **fast)
    assert isinstance(result, kh.Comparison), "compare_variants returns a Comparison"
    names = ["base", "LoRA", "LoRA + region", "LoRA + region + depth", "inpaint (base)"]
    assert list(result.metrics) == names and list(result.images) == names, f"variants: {list(result.metrics)}"
    assert isinstance(result.figure, Figure), "one matplotlib figure"
    assert "(tiny model, 64 px)" in result.figure.get_suptitle(), f"labelled: {result.figure.get_suptitle()!r}"
    assert all(isinstance(v["psnr_out_vs_context"], float) for v in result.metrics.values()), "metrics are floats"
    base = kh.sample_edit(kh.load_pipeline("tiny"), image, edit_prompt, height=64, width=64,
                          generator=torch.Generator().manual_seed(4), **fast)
    assert np.array_equal(np.asarray(result.images["base"]), np.asarray(base)), "'base' must be the model without LoRA"
    assert not np.array_equal(np.asarray(result.images["LoRA"]), np.asarray(base)), "'LoRA' must use the LoRA"
    torch.testing.assert_close(edit_latents(pipe, region), before, msg="the LoRA must be active again afterwards")
    assert grads == [p.requires_grad for n, p in pipe.transformer.named_parameters() if "lora_" in n], (
        "switching the LoRA off and on must leave requires_grad as it was")
    table = kh.metrics_table(result.metrics)
    assert table.count("\n") == len(names) + 1 and "psnr_in_vs_target" in table, f"markdown table:\n{table}"
    result.figure.savefig(io.BytesIO(), format="png")


def test_sample_edit_brings_offloaded_encoders_back_where_they_were(fresh_pipe, random_image, edit_prompt, fast):
    pipe = fresh_pipe  # its encoders' .to is spied on
    moves = []
    for name in ("text_encoder", "text_encoder_2", "image_encoder"):
        module = getattr(pipe, name)
        original = module.to

        def spy(*args, _name=name, _original=original, **kwargs):
            moves.append((_name, str(args[0]) if args else str(kwargs)))
            return _original(*args, **kwargs)

        module.to = spy
    img = random_image(32, 32, 0)
    kh.sample_edit(pipe, img, edit_prompt, depth=img, height=32, width=32, output_type="latent", **fast)
    names = {n for n, _ in moves}
    assert names == {"text_encoder", "text_encoder_2", "image_encoder"}, f"encoders must visit the device: {moves}"
    assert all(where == "cpu" for _, where in moves), f"on a CPU pipeline every move is to the CPU: {moves}"
