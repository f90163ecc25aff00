"""Core helpers against diffusers' own FluxKontextPipeline functions on the tiny model (the oracle)."""

import pytest
import torch
from diffusers import FluxKontextPipeline

import kontext_helpers as kh


def _latents(b=2, c=16, h=8, w=12, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_normalize_maps_unit_interval_to_symmetric():
    x = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(kh.normalize_01_to_m11(x), torch.tensor([-1.0, -0.5, 1.0]))


@pytest.mark.parametrize("shape", [(1, 16, 8, 8), (2, 16, 8, 12), (3, 4, 6, 2)])
def test_pack_equals_pipeline_pack_bit_for_bit(shape):
    lat = _latents(*shape)
    tokens, (h_tok, w_tok) = kh.pack_like_pipeline(lat)
    ref = FluxKontextPipeline._pack_latents(lat, shape[0], shape[1], shape[2], shape[3])
    assert (h_tok, w_tok) == (shape[2] // 2, shape[3] // 2), "token grid must be half the latent grid"
    assert torch.equal(tokens, ref), "packing differs from FluxKontextPipeline._pack_latents"


def test_unpack_inverts_pack_and_matches_pipeline_unpack():
    lat = _latents(2, 16, 8, 12)
    tokens, (h_tok, w_tok) = kh.pack_like_pipeline(lat)
    assert torch.equal(kh.unpack_like_pipeline(tokens, h_tok, w_tok), lat), "unpack(pack(x)) must give x back"
    ref = FluxKontextPipeline._unpack_latents(tokens, 8 * 8, 12 * 8, 8)
    assert torch.equal(kh.unpack_like_pipeline(tokens, h_tok, w_tok), ref), "differs from pipeline _unpack_latents"


def test_pack_rejects_odd_latents_with_clear_message():
    with pytest.raises(ValueError, match="multiples of 16"):
        kh.pack_like_pipeline(torch.zeros(1, 16, 7, 8))


def test_unpack_rejects_wrong_grid():
    with pytest.raises(ValueError, match="cannot unpack"):
        kh.unpack_like_pipeline(torch.zeros(1, 12, 64), 3, 5)


@pytest.mark.parametrize("mark", [0.0, 1.0])
def test_img_ids_equal_pipeline_ids_with_channel0_set(mark):
    ids = kh.img_ids_grid(4, 6, mark)
    ref = FluxKontextPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32)
    ref[..., 0] = mark
    assert ids.shape == (24, 3), "ids must be 2D [N, 3]"
    assert torch.equal(ids, ref), "ids differ from FluxKontextPipeline._prepare_latent_image_ids"


def test_kontext_img_ids_layout_target_context_region():
    ids = kh.kontext_img_ids(3, 5)
    n = 15
    assert ids.shape == (2 * n + 1, 3), "sequence ids must be [2N+1, 3]"
    assert torch.all(ids[:n, 0] == 0) and torch.all(ids[n : 2 * n, 0] == 1), "type column must be 0 then 1"
    torch.testing.assert_close(ids[-1], torch.tensor([2.0, 0.0, 0.0]), msg="region row must be (2, 0, 0)")
    torch.testing.assert_close(ids[-1:], kh.region_token_id(), msg="the last row is region_token_id()")
    assert float(ids[-1, 0]) == kh.REGION_ID == 2.0, "the region's type id is REGION_ID = 2"
    assert torch.equal(ids[:n, 1:], ids[n : 2 * n, 1:]), "target and context share row/col positions"
    assert kh.kontext_img_ids(3, 5, with_region=False).shape == (2 * n, 3), "without region: [2N, 3]"


def test_kontext_img_ids_match_what_the_pipeline_builds():
    latent_ids = FluxKontextPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    image_ids = FluxKontextPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    image_ids[..., 0] = 1
    ref = torch.cat([latent_ids, image_ids], dim=0)
    assert torch.equal(kh.kontext_img_ids(4, 4, with_region=False), ref), "must equal the pipeline's id sequence"


def test_to_latents_argmax_equals_pipeline_encode_vae_image(tiny_pipe):
    img = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = kh.to_latents(img, tiny_pipe.vae, sample_mode="argmax")
    ref = tiny_pipe._encode_vae_image(img, generator=None)
    assert ours.shape == (2, 16, 8, 6), f"latents shape {tuple(ours.shape)}: expected 8x downsampling, 16 channels"
    assert torch.equal(ours, ref), "to_latents differs from FluxKontextPipeline._encode_vae_image"


def test_to_latents_applies_shift_and_scale(tiny_pipe):
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    raw = tiny_pipe.vae.encode(img).latent_dist.mode()
    cfg = tiny_pipe.vae.config
    assert cfg.shift_factor != 0, "the tiny VAE must carry Flux's non-zero shift_factor"
    torch.testing.assert_close(kh.to_latents(img, tiny_pipe.vae), (raw - cfg.shift_factor) * cfg.scaling_factor)


def test_to_latents_sample_mode_uses_generator(tiny_pipe):
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a = kh.to_latents(img, tiny_pipe.vae, sample_mode="sample", generator=torch.Generator().manual_seed(0))
    b = kh.to_latents(img, tiny_pipe.vae, sample_mode="sample", generator=torch.Generator().manual_seed(0))
    c = kh.to_latents(img, tiny_pipe.vae, sample_mode="argmax")
    assert torch.equal(a, b), "same generator must give the same sample"
    assert not torch.equal(a, c), "a posterior sample must differ from the mode"
    with pytest.raises(ValueError, match="argmax"):
        kh.to_latents(img, tiny_pipe.vae, sample_mode="mean")


def test_mask_to_token_grid_max_and_area():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 0:4, 0:2] = 1  # a quarter of the top-left 8x8 block
    grid_max = kh.mask_to_token_grid(mask, 4, 4, mode="max")
    grid_area = kh.mask_to_token_grid(mask, 4, 4, mode="area")
    assert grid_max.shape == (1, 1, 4, 4), "token grid shape"
    assert grid_max[0, 0, 0, 0] == 1 and grid_max.sum() == 1, "max pooling marks a token with any edited pixel"
    torch.testing.assert_close(grid_area[0, 0, 0, 0], torch.tensor(0.125), msg="area = editable fraction")


def test_region_token_shapes_and_other_resolutions():
    torch.manual_seed(0)
    module = kh.MaskRegionToken(4, 4, 64)
    out = module(torch.ones(2, 1, 4, 4))
    assert out.shape == (2, 1, 64), "region token must be [B, 1, c_in]"
    big = torch.ones(2, 1, 8, 8)
    torch.testing.assert_close(module(big), out, msg="a uniform mask on another grid pools to the same token")
    with pytest.raises(ValueError, match=r"\[B, 1, H', W'\]"):
        module(torch.ones(4, 4))


def test_region_token_pools_with_area_average():
    module = kh.MaskRegionToken(2, 2, 8)
    fine = torch.zeros(1, 1, 4, 4)
    fine[..., :2, :2] = 1
    coarse = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(module(fine), module(coarse), msg="4x4 mask must pool onto the 2x2 grid")


def test_tiny_pipeline_is_a_real_kontext_pipeline(tiny_pipe):
    t = tiny_pipe.transformer
    assert isinstance(tiny_pipe, FluxKontextPipeline), "load_pipeline('tiny') must return a FluxKontextPipeline"
    assert t.config.in_channels == 64 and t.config.guidance_embeds, "Flux layout: 64 input channels, guidance"
    assert len(t.config.axes_dims_rope) == 3, "3-axis RoPE"
    assert t.config.num_attention_heads * t.config.attention_head_dim >= 128, "inner width must be >= 128"
    assert t.config.num_layers >= 2 and t.config.num_single_layers >= 2, "several blocks of each kind"
    assert tiny_pipe.vae.config.latent_channels == 16 and tiny_pipe.vae_scale_factor == 8, "Flux VAE layout"
    assert tiny_pipe.image_encoder is not None and tiny_pipe.feature_extractor is not None, "IP image encoder"
    assert t.encoder_hid_proj is not None and t.encoder_hid_proj.num_ip_adapters == 1, "IP-Adapter attached"
    for name in ("text_encoder", "text_encoder_2", "vae", "transformer", "image_encoder"):
        module = getattr(tiny_pipe, name)
        assert not module.training, f"{name} must be in eval mode, as from_pretrained leaves it"
        assert not any(p.requires_grad for p in module.parameters()), f"{name} must be frozen"


def test_tiny_pipeline_same_seed_same_weights_other_seed_other_weights(tiny_pipe):
    again = kh.load_pipeline("tiny", seed=0)
    other = kh.load_pipeline("tiny", seed=1)
    for name in ("text_encoder", "text_encoder_2", "vae", "transformer", "image_encoder"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(again, name).state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs between two seed-0 builds"
    ta, to = tiny_pipe.transformer.state_dict(), other.transformer.state_dict()
    assert any(not torch.equal(ta[k], to[k]) for k in ta), "seed 1 must give other weights"


def test_tiny_pipeline_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    kh.load_pipeline("tiny", seed=5)
    torch.testing.assert_close(torch.rand(3), expected, msg="building the tiny pipeline must not consume global RNG")


def test_tiny_tokenizers_round_trip(tiny_pipe):
    clip_ids = tiny_pipe.tokenizer("make the red sphere blue").input_ids
    assert clip_ids[0] == tiny_pipe.tokenizer.bos_token_id and clip_ids[-1] == tiny_pipe.tokenizer.eos_token_id, (
        "CLIP-style tokenizer must wrap text in bos/eos"
    )
    t5_ids = tiny_pipe.tokenizer_2("make the red sphere blue").input_ids
    assert t5_ids[-1] == tiny_pipe.tokenizer_2.eos_token_id, "T5-style tokenizer must end with </s>"
    text = tiny_pipe.tokenizer_2.decode(t5_ids, skip_special_tokens=True)
    assert text == "make the red sphere blue", f"T5 tokenizer must round-trip, got {text!r}"


def _call(pipe, img, **kw):
    return pipe(image=img, prompt="make the red sphere blue", height=64, width=64, max_area=64 * 64,
                num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent",
                _auto_resize=False, **kw).images


def test_same_pipe_call_twice_gives_identical_latents(tiny_pipe):
    from PIL import Image

    img = Image.new("RGB", (64, 64), (200, 30, 30))
    a = _call(tiny_pipe, img, ip_adapter_image=img)
    b = _call(tiny_pipe, img, ip_adapter_image=img)
    assert a.shape == (1, 16, 64), "64 px -> 4x4 tokens of 64 channels"
    assert torch.equal(a, b), "two identical pipe(...) calls must give identical latents (eval mode, no dropout)"


def test_ip_adapter_changes_the_output(tiny_pipe):
    from PIL import Image

    img = Image.new("RGB", (64, 64), (200, 30, 30))
    a = _call(tiny_pipe, img, ip_adapter_image=Image.new("RGB", (64, 64), (0, 0, 0)))
    b = _call(tiny_pipe, img, ip_adapter_image=Image.new("RGB", (64, 64), (255, 255, 255)))
    assert not torch.allclose(a, b), "a different IP-Adapter image must change the result"


def test_default_dtype_is_float32_on_a_cpu():
    assert kh.default_dtype("cpu") == torch.float32, "the CPU world computes in float32"


def test_real_model_offline_error_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as info:
        kh.load_pipeline("black-forest-labs/FLUX.1-Kontext-dev", device="cpu")
    msg = str(info.value)
    assert "HF_HUB_OFFLINE" in msg and "accept the licence" in msg and "login" in msg, f"unhelpful error: {msg}"


def test_missing_local_folder_is_named():
    with pytest.raises(FileNotFoundError, match="./no/such/folder"):
        kh.load_pipeline("./no/such/folder")


def _fingerprint_code():
    return ("import hashlib, json, kontext_helpers as kh\n"
            "p = kh.load_pipeline('tiny', seed=0)\n"
            "v = [sorted(t.get_vocab().items()) for t in (p.tokenizer, p.tokenizer_2)]\n"
            "w = sorted((k, float(x.double().sum())) for k, x in p.transformer.state_dict().items())\n"
            "print(hashlib.sha256(json.dumps([v, w]).encode()).hexdigest())\n")


def test_tiny_pipeline_is_identical_across_processes():
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    prints = {subprocess.run([sys.executable, "-c", _fingerprint_code()], capture_output=True, text=True, env=env,
                             cwd=repo, timeout=300).stdout.strip() for _ in range(2)}
    assert len(prints) == 1 and "" not in prints, f"tokenizers/weights differ between two processes: {prints}"


def test_tiny_tokenizers_know_the_prompt_words(tiny_pipe):
    for word in ("sphere", "cylinder", "remove", "glossy", "please"):
        assert len(tiny_pipe.tokenizer(word).input_ids) == 3, f"CLIP-style tokenizer must keep '{word}' whole"
        assert len(tiny_pipe.tokenizer_2(word).input_ids) == 2, f"T5-style tokenizer must keep '{word}' whole"


def test_real_loading_path_from_local_folders(tmp_path):
    """The Hub path of load_pipeline, run offline on folders: from_pretrained + CLIP image encoder + XLabs file."""
    from PIL import Image
    from safetensors.torch import save_file

    saved = kh.build_tiny_pipeline(0, with_ip_adapter=False)
    saved.save_pretrained(tmp_path / "kontext")
    donor = kh.build_tiny_pipeline(0)
    donor.image_encoder.save_pretrained(tmp_path / "clip")
    (tmp_path / "ip").mkdir()
    save_file(kh.tiny_ip_adapter_state_dict(donor.transformer, 32), tmp_path / "ip" / "ip_adapter.safetensors")

    pipe = kh.load_pipeline(str(tmp_path / "kontext"), device="cpu", dtype=torch.float32,
                            ip_adapter=str(tmp_path / "ip"), image_encoder=str(tmp_path / "clip"))
    assert isinstance(pipe, FluxKontextPipeline), "a local folder must load as a FluxKontextPipeline"
    assert pipe.transformer.encoder_hid_proj.num_ip_adapters == 1, "the XLabs IP-Adapter file must be attached"
    for name in ("text_encoder", "text_encoder_2", "vae", "transformer", "image_encoder"):
        module = getattr(pipe, name)
        assert not module.training and not any(p.requires_grad for p in module.parameters()), f"{name} frozen, eval"
    ref = saved.transformer.state_dict()
    for key, value in pipe.transformer.state_dict().items():
        if key in ref:
            assert torch.equal(value, ref[key]), f"transformer weight {key} changed on the way through the folder"
    img = Image.new("RGB", (64, 64), (10, 200, 10))
    out = _call(pipe, img, ip_adapter_image=img)
    assert out.shape == (1, 16, 64) and torch.isfinite(out).all(), "the loaded pipeline must sample with depth"


def test_interactive_figure_draws_once_and_redraws_on_slider_change():
    import matplotlib.pyplot as plt
    from ipywidgets import IntSlider

    calls = []

    def draw(index):
        calls.append(index)
        fig, ax = plt.subplots()
        ax.plot([0, index])
        return fig

    slider = IntSlider(value=2, min=0, max=5)
    kh.interactive_figure(draw, index=slider)
    assert calls == [2], f"the figure must be drawn once with the slider's value, got {calls}"
    slider.value = 4
    assert calls == [2, 4], f"moving the slider must redraw with the new value, got {calls}"
    assert not plt.get_fignums(), "figures must be closed after rendering (shown once, as an image)"


def test_public_names_exist_and_import_is_light():
    import os
    import subprocess
    import sys

    missing = [name for name in kh.__all__ if not hasattr(kh, name)]
    assert not missing, f"__all__ lists names the module does not define: {missing}"
    code = ("import sys, kontext_helpers\n"
            "print(sorted(m for m in ('diffusers', 'transformers', 'peft', 'accelerate', 'matplotlib') "
            "if m in sys.modules))")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=120,
                         env=dict(os.environ)).stdout.strip()
    assert out == "[]", f"importing kontext_helpers must not import heavy libraries (no import-time work): {out}"
