"""Inference: the sampling loop against FluxKontextPipeline (the oracle), adapter round trips, the ComfyUI
export against ComfyUI's own key mapping, metrics on images with known answers, previews and comparisons."""

import io
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import kontext_helpers as kh

PROMPT = "make the cube red"
FAST = dict(num_inference_steps=3, guidance_scale=2.5, max_sequence_length=32)


def _image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _depth(h, w, seed=7):
    ramp = np.linspace(0, 255, w, dtype=np.float64)[None, :] * np.ones((h, 1))  # near on the right
    noise = np.random.default_rng(seed).integers(0, 40, (h, w))
    return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8)).convert("RGB")


def _mask(h, w):
    m = torch.zeros(1, h, w)
    m[:, : h // 2, : w // 2] = 1.0  # top-left quadrant is editable
    return m


def _pipe_latents(pipe, image, h, w, seed, **extra):
    out = pipe(image=image, prompt=PROMPT, height=h, width=w, max_area=h * w, _auto_resize=False,
               generator=torch.Generator().manual_seed(seed), output_type="latent", **FAST, **extra)
    return out.images


def _ours(pipe, image, h, w, seed, **extra):
    return kh.sample_edit(pipe, image, PROMPT, height=h, width=w, generator=torch.Generator().manual_seed(seed),
                          output_type="latent", **FAST, **extra)


@pytest.fixture(scope="module")
def plain_pipe():
    """A tiny pipeline without IP-Adapter (read-only)."""
    return kh.build_tiny_pipeline(0, with_ip_adapter=False)


# --------------------------------------------------------------------------------------------------
# the sampling loop against the pipeline
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_sample_edit_equals_pipeline_latents(plain_pipe, size, seed):
    h, w = size
    image = _image(h, w, seed)
    ref = _pipe_latents(plain_pipe, image, h, w, seed)
    ours = _ours(plain_pipe, image, h, w, seed)
    assert ours.shape == ref.shape == (1, (h // 16) * (w // 16), 64), f"packed latents shape {tuple(ours.shape)}"
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0,
                               msg=lambda m: f"sample_edit differs from pipe(..., output_type='latent'): {m}")


def test_sample_edit_pil_equals_pipeline_pil(plain_pipe):
    h, w = 48, 80
    image = _image(h, w, 3)
    ref = plain_pipe(image=image, prompt=PROMPT, height=h, width=w, max_area=h * w, _auto_resize=False,
                     generator=torch.Generator().manual_seed(3), **FAST).images[0]
    ours = kh.sample_edit(plain_pipe, image, PROMPT, height=h, width=w, generator=torch.Generator().manual_seed(3),
                          **FAST)
    assert isinstance(ours, Image.Image) and ours.size == (w, h), "output_type='pil' must give one W x H PIL image"
    diff = np.abs(np.asarray(ours, dtype=int) - np.asarray(ref, dtype=int)).max()
    assert diff <= 1, f"decoded image differs from the pipeline's by {diff} grey levels"


def test_sample_edit_takes_a_tensor_image_and_defaults_to_its_size(plain_pipe):
    image = torch.rand(3, 32, 48, generator=torch.Generator().manual_seed(0))  # [3, H, W] in [0, 1]
    ref = _pipe_latents(plain_pipe, image[None], 32, 48, 0)
    ours = kh.sample_edit(plain_pipe, image, PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent",
                          **FAST)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0,
                               msg=lambda m: f"a tensor image must give the pipeline's result at its own size: {m}")


@pytest.mark.parametrize("seed", [0, 1])
def test_sample_edit_with_depth_equals_pipeline_ip_adapter_image(tiny_pipe, seed):
    h, w = 64, 48
    image, depth = _image(h, w, seed), _depth(h, w)
    ref = _pipe_latents(tiny_pipe, image, h, w, seed, ip_adapter_image=depth)
    ours = _ours(tiny_pipe, image, h, w, seed, depth=depth)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0,
                               msg=lambda m: f"with depth, sample_edit differs from pipe(ip_adapter_image=depth): {m}")
    no_depth = _ours(tiny_pipe, image, h, w, seed)
    assert (ours - no_depth).abs().max() > 1e-3, "the depth map must change the result through the IP-Adapter"


def test_depth_none_with_ip_adapter_equals_a_pipeline_without_adapter(tiny_pipe, plain_pipe):
    with_ip = tiny_pipe.transformer.state_dict()
    same = all(torch.equal(v, with_ip[k]) for k, v in plain_pipe.transformer.state_dict().items())
    assert same, "premise: the tiny transformer of one seed has the same weights with or without the IP-Adapter"
    h, w = 64, 64
    image = _image(h, w, 5)
    ours = _ours(tiny_pipe, image, h, w, 5)  # the adapter is loaded but gets no depth
    ref = _pipe_latents(plain_pipe, image, h, w, 5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0,
                               msg=lambda m: f"depth=None must make the IP-Adapter contribute nothing: {m}")


def test_ip_adapter_scale_applies_for_one_call_and_is_restored():
    pipe = kh.load_pipeline("tiny")  # fresh: this test changes the adapter scale
    h, w = 64, 64
    image, depth = _image(h, w, 2), _depth(h, w)
    scales_before = [list(p.scale) for p in kh.ip_adapter_processors(pipe.transformer)]
    zero = _ours(pipe, image, h, w, 2, depth=depth, ip_adapter_scale=0.0)
    none = _ours(pipe, image, h, w, 2)
    torch.testing.assert_close(zero, none, atol=1e-6, rtol=0,
                               msg=lambda m: f"ip_adapter_scale=0 must equal no depth: {m}")
    scales_after = [list(p.scale) for p in kh.ip_adapter_processors(pipe.transformer)]
    assert scales_after == scales_before, "the IP-Adapter scale must be restored after the call"
    full = _ours(pipe, image, h, w, 2, depth=depth)
    assert (full - zero).abs().max() > 1e-3, "the restored scale must let depth act again"


def test_region_token_is_appended_after_context_with_its_own_id():
    pipe = kh.load_pipeline("tiny")  # fresh: a hook is registered on its transformer
    h, w = 64, 48
    h_tok, w_tok, n = h // 16, w // 16, (h // 16) * (w // 16)
    region = kh.MaskRegionToken(h_tok, w_tok, 64)
    torch.nn.init.normal_(region.proj.weight)
    mask = _mask(h, w)
    seen, steps = [], []

    def grab(module, args, kwargs):
        seen.append((kwargs["hidden_states"].clone(), kwargs["img_ids"].clone()))

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with_region = _ours(pipe, _image(h, w, 0), h, w, 0, mask=mask, region=region,
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
    without = _ours(pipe, _image(h, w, 0), h, w, 0)
    assert (with_region - without).abs().max() > 1e-4, "the region token must change the result"
    pil_mask = Image.fromarray((mask[0].numpy() * 255).astype(np.uint8), mode="L")
    again = _ours(pipe, _image(h, w, 0), h, w, 0, mask=pil_mask, region=region)
    torch.testing.assert_close(again, with_region, msg="a PIL mask must act like the same tensor mask")


def test_sample_edit_rejects_bad_input_clearly(tiny_pipe, plain_pipe):
    image = _image(64, 64, 0)
    with pytest.raises(ValueError, match="region module"):
        kh.sample_edit(tiny_pipe, image, PROMPT, mask=_mask(64, 64), **FAST)
    with pytest.raises(ValueError, match="needs the edit mask"):
        kh.sample_edit(tiny_pipe, image, PROMPT, region=kh.MaskRegionToken(4, 4, 64), **FAST)
    with pytest.raises(ValueError, match="c_in=32"):
        kh.sample_edit(tiny_pipe, image, PROMPT, mask=_mask(64, 64), region=kh.MaskRegionToken(4, 4, 32), **FAST)
    with pytest.raises(ValueError, match="multiples of 16"):
        kh.sample_edit(tiny_pipe, image, PROMPT, height=60, width=64, **FAST)
    with pytest.raises(ValueError, match="IP-Adapter"):
        kh.sample_edit(plain_pipe, image, PROMPT, depth=_depth(64, 64), **FAST)
    with pytest.raises(ValueError, match="output_type"):
        kh.sample_edit(tiny_pipe, image, PROMPT, output_type="tensor", **FAST)


# --------------------------------------------------------------------------------------------------
# adapters: save, load, ComfyUI
# --------------------------------------------------------------------------------------------------


# LoRA targets spelt out (not a preset name), so the expected ComfyUI keys below stay valid if presets change
ATTN_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
ALL_TARGETS = ATTN_TARGETS + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                              "proj_mlp", "proj_out"]


def _train_a_few_steps(pipe, targets=ATTN_TARGETS, include_ip_adapter=False, steps=3):
    """Three Adam steps (lr 1e-2) of the training objective on one pair: LoRA B becomes non-zero."""
    h = w = 64
    g = torch.Generator().manual_seed(0)
    ctx = torch.rand(1, 3, h, w, generator=g)
    tgt = ctx.clone()
    tgt[:, 0, : h // 2, : w // 2] = 1.0
    mask = _mask(h, w)[None]  # [1, 1, H, W]
    with torch.no_grad():
        ctx_tok, (h_tok, w_tok) = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(ctx), pipe.vae))
        tgt_tok, _ = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(tgt), pipe.vae))
    pe, pooled, txt_ids = kh.encode_prompts(pipe, PROMPT, max_sequence_length=32)
    ip = kh.encode_depth_for_ip_adapter(pipe, _depth(h, w))
    lora = kh.add_lora(pipe.transformer, rank=4, alpha=8, targets=targets, include_ip_adapter=include_ip_adapter)
    region = kh.MaskRegionToken(h_tok, w_tok, pipe.transformer.config.in_channels)
    opt = torch.optim.Adam([p for _, p in lora] + list(region.parameters()), lr=1e-2)
    m_small = kh.mask_to_token_grid(mask, h_tok, w_tok)
    for step in range(steps):
        noise = torch.randn(tgt_tok.shape, generator=g)
        sigma = torch.tensor([0.3 + 0.2 * step])
        noisy = (1 - sigma) * tgt_tok + sigma * noise
        pred = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(m_small), sigma=sigma, prompt_embeds=pe,
                                  pooled_prompt_embeds=pooled, txt_ids=txt_ids, h_tok=h_tok, w_tok=w_tok,
                                  ip_adapter_image_embeds=ip)
        loss = kh.fm_masked_dual_loss_with_l2(pred, tgt_tok, ctx_tok, noise, m_small, h_tok, w_tok,
                                              region_token_module=region, lora_named_params=lora)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pipe.transformer.eval()
    region.eval()
    assert all(p.abs().max() > 0 for n, p in lora if "lora_B" in n), "training must make every lora_B non-zero"
    return region


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny pipeline trained for three steps, its region module and the adapter saved from them."""
    pipe = kh.load_pipeline("tiny")
    region = _train_a_few_steps(pipe)
    path = str(tmp_path_factory.mktemp("adapter") / "my_edit")
    kh.save_adapter(pipe, region, path, config={"steps": 3, "learning_rate": 1e-2, "rank": 4})
    return pipe, region, path


def _edit(pipe, region=None, seed=0, depth=True, **extra):
    h = w = 64
    kw = dict(mask=_mask(h, w), region=region) if region is not None else {}
    return _ours(pipe, _image(h, w, 11), h, w, seed, depth=_depth(h, w) if depth else None, **kw, **extra)


def test_save_adapter_writes_diffusers_lora_region_and_config(trained):
    pipe, region, path = trained
    assert sorted(os.listdir(path)) == sorted([kh.LORA_WEIGHT_FILE, kh.REGION_WEIGHT_FILE, kh.ADAPTER_CONFIG_FILE]), (
        f"unexpected files {os.listdir(path)}")
    with safe_open(os.path.join(path, kh.LORA_WEIGHT_FILE), framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys), (
        f"LoRA keys must be diffusers' transformer.*lora_A/B*, got e.g. {keys[:3]}")
    lora_meta = json.loads(meta["lora_adapter_metadata"])
    assert lora_meta["transformer.lora_alpha"] == 8 and lora_meta["transformer.r"] == 4, (
        "alpha and rank must be recorded in the file's metadata")
    cfg = json.load(open(os.path.join(path, kh.ADAPTER_CONFIG_FILE)))
    assert cfg["region"]["h_tok"] == 4 and cfg["region"]["c_in"] == 64, f"region grid / c_in missing: {cfg['region']}"
    assert cfg["train_config"]["steps"] == 3, "the training config must be stored"
    assert cfg["versions"]["diffusers"] and cfg["versions"]["torch"], "library versions must be stored"


def test_round_trip_gives_the_same_latents(trained):
    pipe, region, path = trained
    fresh = kh.load_pipeline("tiny")
    loaded = kh.load_adapter(fresh, path)
    assert isinstance(loaded, kh.MaskRegionToken) and loaded.c_in == 64, "load_adapter must rebuild the region module"
    torch.testing.assert_close(loaded.proj.weight, region.proj.weight, msg="region weights must round-trip")
    torch.testing.assert_close(_edit(fresh, loaded), _edit(pipe, region),
                               msg=lambda m: f"loaded adapter must reproduce the trained pipeline: {m}")
    assert (_edit(fresh, loaded) - _edit(kh.load_pipeline("tiny"), None)).abs().max() > 1e-4, (
        "the loaded LoRA + region must change the base model's result")


def test_diffusers_load_lora_weights_alone_loads_the_lora(trained, monkeypatch):
    pipe, _, path = trained
    fresh = kh.load_pipeline("tiny")
    fresh.load_lora_weights(path, weight_name=kh.LORA_WEIGHT_FILE)
    torch.testing.assert_close(_edit(fresh), _edit(pipe),
                               msg=lambda m: f"pipe.load_lora_weights must load the LoRA: {m}")
    # with the Hub reachable diffusers also finds the file in the folder by itself (the lookup stays local)
    monkeypatch.setattr("diffusers.loaders.lora_base.HF_HUB_OFFLINE", False)
    other = kh.load_pipeline("tiny")
    other.load_lora_weights(path)
    torch.testing.assert_close(_edit(other), _edit(pipe), msg="pipe.load_lora_weights(folder) must find the weights")


def test_loading_twice_or_over_an_adapter_replaces_instead_of_stacking(trained):
    pipe, region, path = trained
    fresh = kh.load_pipeline("tiny")
    kh.add_lora(fresh.transformer, rank=2, targets=ATTN_TARGETS)  # an unrelated adapter already attached
    with pytest.raises(ValueError, match="stack"):
        kh.load_adapter(fresh, path, replace=False)
    with pytest.warns(UserWarning, match="replaced, not stacked"):
        kh.load_adapter(fresh, path)
    with pytest.warns(UserWarning, match="replaced, not stacked"):
        loaded = kh.load_adapter(fresh, path)
    assert list(fresh.transformer.peft_config) == ["default"], "exactly one adapter must remain"
    torch.testing.assert_close(_edit(fresh, loaded), _edit(pipe, region),
                               msg=lambda m: f"loading twice must equal loading once: {m}")


def test_load_adapter_rejects_missing_files_and_foreign_region(trained, tmp_path):
    _, _, path = trained
    with pytest.raises(FileNotFoundError, match="save_adapter"):
        kh.load_adapter(kh.load_pipeline("tiny"), str(tmp_path / "nothing"))
    pipe = kh.load_pipeline("tiny")
    kh.add_lora(pipe.transformer, rank=2, targets=ATTN_TARGETS)
    with pytest.raises(ValueError, match="c_in=32"):
        kh.save_adapter(pipe, kh.MaskRegionToken(4, 4, 32), str(tmp_path / "bad"))
    foreign = kh.save_adapter(pipe, kh.MaskRegionToken(4, 4, 64), str(tmp_path / "foreign"))
    small = kh.MaskRegionToken(4, 4, 32)  # as if trained for a model with 32-channel tokens
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, os.path.join(foreign, kh.REGION_WEIGHT_FILE),
              metadata={"h_tok": "4", "w_tok": "4", "c_in": "32"})
    fresh = kh.load_pipeline("tiny")
    with pytest.raises(ValueError, match="c_in=32"):
        kh.load_adapter(fresh, foreign)
    assert not getattr(fresh.transformer, "peft_config", None), "a refused adapter must leave the pipeline untouched"


# ComfyUI loads a Flux LoRA key "lora_unet_<k>" for every key "diffusion_model.<k>.weight" of its Flux model
# (comfy/lora.py, model_lora_keys_unet), i.e. Black Forest Labs names; comfy/utils.py flux_to_diffusers maps
# diffusers' transformer_blocks.i.attn.to_q/to_k/to_v onto rows [0, D), [D, 2D), [2D, 3D) of
# double_blocks.i.img_attn.qkv (add_*_proj onto txt_attn.qkv), to_out.0 -> img_attn.proj, to_add_out ->
# txt_attn.proj, ff.net.0.proj / ff.net.2 -> img_mlp.0 / img_mlp.2, ff_context.* -> txt_mlp.*; in
# single_transformer_blocks.i to_q/to_k/to_v/proj_mlp onto rows [0, D), [D, 2D), [2D, 3D), [3D, 7D) of
# single_blocks.i.linear1 and proj_out -> single_blocks.i.linear2; the final proj_out -> final_layer.linear.
# The tiny model has 3 double and 4 single blocks, D = 128.
EXPECTED_ATTN = [
    "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
    "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_txt_attn_proj",
    "lora_unet_double_blocks_1_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_qkv",
    "lora_unet_double_blocks_1_img_attn_proj", "lora_unet_double_blocks_1_txt_attn_proj",
    "lora_unet_double_blocks_2_img_attn_qkv", "lora_unet_double_blocks_2_txt_attn_qkv",
    "lora_unet_double_blocks_2_img_attn_proj", "lora_unet_double_blocks_2_txt_attn_proj",
    "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_1_linear1",
    "lora_unet_single_blocks_2_linear1", "lora_unet_single_blocks_3_linear1",
]
EXPECTED_BEYOND_ATTN = [
    "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_img_mlp_2",
    "lora_unet_double_blocks_0_txt_mlp_0", "lora_unet_double_blocks_0_txt_mlp_2",
    "lora_unet_double_blocks_1_img_mlp_0", "lora_unet_double_blocks_1_img_mlp_2",
    "lora_unet_double_blocks_1_txt_mlp_0", "lora_unet_double_blocks_1_txt_mlp_2",
    "lora_unet_double_blocks_2_img_mlp_0", "lora_unet_double_blocks_2_img_mlp_2",
    "lora_unet_double_blocks_2_txt_mlp_0", "lora_unet_double_blocks_2_txt_mlp_2",
    "lora_unet_single_blocks_0_linear2", "lora_unet_single_blocks_1_linear2",
    "lora_unet_single_blocks_2_linear2", "lora_unet_single_blocks_3_linear2",
    "lora_unet_final_layer_linear",
]
# diffusers module -> (ComfyUI layer, first row, rows) as flux_to_diffusers states it, D = 128
_D = 128
_COMFY_ROWS = {
    "attn.to_q": ("img_attn_qkv", 0, _D), "attn.to_k": ("img_attn_qkv", _D, _D),
    "attn.to_v": ("img_attn_qkv", 2 * _D, _D),
    "attn.add_q_proj": ("txt_attn_qkv", 0, _D), "attn.add_k_proj": ("txt_attn_qkv", _D, _D),
    "attn.add_v_proj": ("txt_attn_qkv", 2 * _D, _D), "attn.to_out.0": ("img_attn_proj", 0, None),
    "attn.to_add_out": ("txt_attn_proj", 0, None), "ff.net.0.proj": ("img_mlp_0", 0, None),
    "ff.net.2": ("img_mlp_2", 0, None), "ff_context.net.0.proj": ("txt_mlp_0", 0, None),
    "ff_context.net.2": ("txt_mlp_2", 0, None),
}
_COMFY_SINGLE_ROWS = {"attn.to_q": ("linear1", 0, _D), "attn.to_k": ("linear1", _D, _D),
                      "attn.to_v": ("linear1", 2 * _D, _D), "proj_mlp": ("linear1", 3 * _D, 4 * _D),
                      "proj_out": ("linear2", 0, None)}


def _comfy_deltas(out_file):
    """Weight updates as ComfyUI computes them (comfy/weight_adapter/lora.py): alpha / rank * up @ down."""
    with safe_open(out_file, framework="pt") as fh:
        sd = {k: fh.get_tensor(k) for k in fh.keys()}
    layers = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd})
    deltas = {}
    for layer in layers:
        up, down = sd[f"{layer}.lora_up.weight"].float(), sd[f"{layer}.lora_down.weight"].float()
        deltas[layer] = sd[f"{layer}.alpha"].item() / down.shape[0] * (up @ down)
    return sd, deltas


def _expected_comfy_deltas(transformer):
    """The same updates built from PEFT's own per-module deltas, placed where ComfyUI's mapping puts them."""
    from peft.tuners.lora import LoraLayer

    expected = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, LoraLayer) or "processor" in name:
            continue
        delta = module.get_delta_weight("default").float()  # [out, in]
        if name == "proj_out":
            key, row, rows, total = "lora_unet_final_layer_linear", 0, None, delta.shape[0]
        else:
            block, index, rest = name.split(".", 2)
            if block == "transformer_blocks":
                layer, row, rows = _COMFY_ROWS[rest]
                key, total = f"lora_unet_double_blocks_{index}_{layer}", 3 * _D
            else:
                layer, row, rows = _COMFY_SINGLE_ROWS[rest]
                key, total = f"lora_unet_single_blocks_{index}_{layer}", 7 * _D
            total = total if rows else delta.shape[0]
        full = expected.setdefault(key, torch.zeros(total, delta.shape[1]))
        full[row:row + (rows or delta.shape[0])] += delta
    return expected


def test_comfyui_export_keys_and_updates_match_comfyui_mapping(trained, tmp_path):
    pipe, _, path = trained
    out = kh.export_comfyui(path, str(tmp_path / "comfy" / "my_edit.safetensors"))
    sd, deltas = _comfy_deltas(out)
    expected_keys = sorted(f"{layer}.{part}" for layer in EXPECTED_ATTN
                           for part in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert sorted(sd) == expected_keys, (
        f"keys differ from ComfyUI's Flux mapping: {sorted(set(sd) ^ set(expected_keys))}")
    expected = _expected_comfy_deltas(pipe.transformer)
    assert sorted(expected) == sorted(deltas), "every trained layer must be exported"
    for layer, delta in deltas.items():
        torch.testing.assert_close(delta, expected[layer], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, layer=layer: f"{layer}: ComfyUI's update differs from PEFT's: {m}")
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * _D, 12), (
        "single-block q, k, v must be fused into linear1 [q | k | v | mlp] with the ranks summed")


def test_comfyui_export_with_feed_forward_and_ip_adapter_layers(tmp_path):
    pipe = kh.load_pipeline("tiny")
    lora = kh.add_lora(pipe.transformer, rank=3, alpha=6, targets=ALL_TARGETS, include_ip_adapter=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lora:
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = kh.save_adapter(pipe, None, str(tmp_path / "ff"))
    assert not os.path.exists(os.path.join(path, kh.REGION_WEIGHT_FILE)), "no region file for a LoRA alone"
    with pytest.warns(UserWarning, match="to_k_ip"):
        out = kh.export_comfyui(path, str(tmp_path / "ff.safetensors"))
    sd, deltas = _comfy_deltas(out)
    expected_layers = EXPECTED_ATTN + EXPECTED_BEYOND_ATTN
    assert sorted(deltas) == sorted(expected_layers), (
        f"attention + feed-forward layers, no IP-Adapter ones: {sorted(set(deltas) ^ set(expected_layers))}")
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * _D, 12), (
        "single-block q, k, v and proj_mlp must share linear1 with their ranks summed")
    expected = _expected_comfy_deltas(pipe.transformer)
    for layer, delta in deltas.items():
        torch.testing.assert_close(delta, expected[layer], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, layer=layer: f"{layer}: ComfyUI's update differs from PEFT's: {m}")
    with pytest.warns(UserWarning, match="to_k_ip"):
        half = kh.export_comfyui(path, str(tmp_path / "ff_bf16.safetensors"), dtype=torch.bfloat16)
    with safe_open(half, framework="pt") as fh:
        for key in fh.keys():
            t = fh.get_tensor(key)
            if key.endswith(".alpha"):
                assert t.dtype == torch.float32 and t.item() == sd[key].item(), f"{key}: alpha must stay exact"
            else:
                assert t.dtype == torch.bfloat16, f"{key}: dtype= must apply"
                torch.testing.assert_close(t, sd[key].to(torch.bfloat16), msg=f"{key}: bf16 export must round only")


# --------------------------------------------------------------------------------------------------
# metrics, previews, comparison
# --------------------------------------------------------------------------------------------------


def test_edit_metrics_on_constructed_images():
    context = torch.zeros(3, 16, 16)
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :8] = 1  # left half editable
    target = context.clone()
    target[:, :, :8] = 0.5
    pred = target.clone()
    pred[:, :, :8] += 0.1  # inside: error 0.1 against the target -> MSE 1e-2 -> 20 dB
    pred[:, :, 8:] += 0.01  # outside: error 0.01 against the context -> MSE 1e-4 -> 40 dB
    m = kh.edit_metrics(pred, context, target, mask, lpips=False)
    assert math.isclose(m["psnr_in_vs_target"], 20.0, abs_tol=1e-3), f"in-mask PSNR {m['psnr_in_vs_target']}"
    assert math.isclose(m["psnr_out_vs_context"], 40.0, abs_tol=1e-3), f"out-of-mask PSNR {m['psnr_out_vs_context']}"
    assert math.isclose(m["change_in_mask"], 0.6, abs_tol=1e-6), f"in-mask change {m['change_in_mask']}"
    assert m["mask_fraction"] == 0.5 and "lpips_vs_target" not in m, "mask fraction 0.5, no LPIPS when disabled"
    perfect = kh.edit_metrics(target, context, target, mask, lpips=False)
    assert perfect["psnr_in_vs_target"] == math.inf and perfect["psnr_out_vs_context"] == math.inf, (
        "an exact edit that keeps the rest must score inf / inf")
    lazy = kh.edit_metrics(context, context, target, mask, lpips=False)
    assert math.isclose(lazy["psnr_in_vs_target"], 10 * math.log10(1 / 0.25), abs_tol=1e-3), (
        "doing nothing must score the context's PSNR against the target inside")


def test_edit_metrics_accepts_pil_and_handles_edge_cases():
    ctx = Image.new("RGB", (8, 8), (0, 0, 0))
    tgt = Image.new("RGB", (8, 8), (51, 51, 51))  # 0.2 everywhere
    mask = Image.new("L", (16, 16), 255)  # all editable, at another size (resized)
    m = kh.edit_metrics(tgt, ctx, tgt, mask, lpips=False)
    assert m["psnr_in_vs_target"] == math.inf and math.isnan(m["psnr_out_vs_context"]), (
        "no pixel outside the mask: out-of-mask PSNR is nan")
    assert math.isnan(kh.edit_metrics(tgt, ctx, None, mask, lpips=False)["psnr_in_vs_target"]), "no target: nan"
    with pytest.raises(ValueError, match="one size"):
        kh.edit_metrics(tgt, Image.new("RGB", (8, 16)), tgt, mask)
    import importlib.util

    if importlib.util.find_spec("lpips") is None:
        assert "lpips_vs_target" not in kh.edit_metrics(tgt, ctx, tgt, mask), "LPIPS is optional: absent, no key"
        with pytest.raises(RuntimeError, match="lpips"):
            kh.edit_metrics(tgt, ctx, tgt, mask, lpips=True)


def test_preview_grid_is_one_headless_figure_with_six_panels():
    from matplotlib.figure import Figure

    ctx, tgt = _image(32, 48, 0), _image(32, 48, 1)
    fig = kh.preview_grid(ctx, _mask(32, 48), _depth(32, 48), tgt, tgt, prompt=PROMPT)
    assert isinstance(fig, Figure), "preview_grid must return a matplotlib Figure"
    titles = [ax.get_title() for ax in fig.axes]
    for word in ("context", "mask", "depth", "target", "prediction", "|prediction - context|"):
        assert any(word in t for t in titles), f"a panel title must mention {word!r}: {titles}"
    assert "inf" in fig.get_suptitle(), "the title must carry the metrics (a perfect prediction: inf dB inside)"
    fig.savefig(io.BytesIO(), format="png")  # renders without a display
    bare = kh.preview_grid(ctx, _mask(32, 48), None, None, ctx)
    assert any("no depth" in ax.get_title() for ax in bare.axes), "a missing depth map must be said"


def test_compare_variants_runs_every_variant_into_one_figure_and_table(trained):
    from matplotlib.figure import Figure

    pipe, region, _ = trained
    image, mask, depth = _image(64, 64, 11), _mask(64, 64), _depth(64, 64)
    target = _image(64, 64, 12)
    before = _edit(pipe, region)
    grads = [p.requires_grad for n, p in pipe.transformer.named_parameters() if "lora_" in n]
    result = kh.compare_variants(pipe, image, PROMPT, mask, region=region, depth=depth, target=target, seed=4, **FAST)
    assert isinstance(result, kh.Comparison), "compare_variants returns a Comparison"
    names = ["base", "LoRA", "LoRA + region", "LoRA + region + depth", "inpaint (base)"]
    assert list(result.metrics) == names and list(result.images) == names, f"variants: {list(result.metrics)}"
    assert isinstance(result.figure, Figure), "one matplotlib figure"
    assert all(isinstance(v["psnr_out_vs_context"], float) for v in result.metrics.values()), "metrics are floats"
    base = kh.sample_edit(kh.load_pipeline("tiny"), image, PROMPT, height=64, width=64,
                          generator=torch.Generator().manual_seed(4), **FAST)
    assert np.array_equal(np.asarray(result.images["base"]), np.asarray(base)), "'base' must be the model without LoRA"
    assert not np.array_equal(np.asarray(result.images["LoRA"]), np.asarray(base)), "'LoRA' must use the LoRA"
    torch.testing.assert_close(_edit(pipe, region), before, msg="the LoRA must be active again afterwards")
    assert grads == [p.requires_grad for n, p in pipe.transformer.named_parameters() if "lora_" in n], (
        "switching the LoRA off and on must leave requires_grad as it was")
    table = kh.metrics_table(result.metrics)
    assert table.count("\n") == len(names) + 1 and "psnr_in_vs_target" in table, f"markdown table:\n{table}"
    result.figure.savefig(io.BytesIO(), format="png")


def test_sample_edit_brings_offloaded_encoders_back_where_they_were():
    pipe = kh.load_pipeline("tiny", seed=0)
    moves = []
    for name in ("text_encoder", "text_encoder_2", "image_encoder"):
        module = getattr(pipe, name)
        original = module.to

        def spy(*args, _name=name, _original=original, **kwargs):
            moves.append((_name, str(args[0]) if args else str(kwargs)))
            return _original(*args, **kwargs)

        module.to = spy
    img = _image(32, 32, 0)
    kh.sample_edit(pipe, img, PROMPT, depth=img, height=32, width=32, output_type="latent", **FAST)
    names = {n for n, _ in moves}
    assert names == {"text_encoder", "text_encoder_2", "image_encoder"}, f"encoders must visit the device: {moves}"
    assert all(where == "cpu" for _, where in moves), f"on a CPU pipeline every move is to the CPU: {moves}"
