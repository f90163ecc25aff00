"""Latents: normalisation, VAE encoding, 2x2 packing and position ids against diffusers' FluxKontextPipeline."""

import pytest
import torch
from diffusers import FluxKontextPipeline

import kontext_helpers as kh


@pytest.fixture(scope="module")
def random_latents():
    """``random_latents(b, c, h, w, seed=0)``: standard-normal latents ``[B, C, H_l, W_l]``."""

    def make(b=2, c=16, h=8, w=12, seed=0):
        return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))

    return make


def test_normalize_maps_unit_interval_to_symmetric():
    x = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(kh.normalize_01_to_m11(x), torch.tensor([-1.0, -0.5, 1.0]),
                               msg="[0, 1] must map linearly onto [-1, 1]")


@pytest.mark.parametrize("shape", [(1, 16, 8, 8), (2, 16, 8, 12), (3, 4, 6, 2)])
def test_pack_equals_pipeline_pack_bit_for_bit(random_latents, shape):
    lat = random_latents(*shape)
    tokens, (h_tok, w_tok) = kh.pack_like_pipeline(lat)
    ref = FluxKontextPipeline._pack_latents(lat, shape[0], shape[1], shape[2], shape[3])
    assert (h_tok, w_tok) == (shape[2] // 2, shape[3] // 2), "token grid must be half the latent grid"
    torch.testing.assert_close(tokens, ref, rtol=0, atol=0,
                               msg="packing differs from FluxKontextPipeline._pack_latents")


def test_unpack_inverts_pack_and_matches_pipeline_unpack(random_latents):
    lat = random_latents(2, 16, 8, 12)
    tokens, (h_tok, w_tok) = kh.pack_like_pipeline(lat)
    torch.testing.assert_close(kh.unpack_like_pipeline(tokens, h_tok, w_tok), lat, rtol=0, atol=0,
                               msg="unpack(pack(x)) must give x back")
    ref = FluxKontextPipeline._unpack_latents(tokens, 8 * 8, 12 * 8, 8)
    torch.testing.assert_close(kh.unpack_like_pipeline(tokens, h_tok, w_tok), ref, rtol=0, atol=0,
                               msg="differs from pipeline _unpack_latents")


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
    torch.testing.assert_close(ids, ref, rtol=0, atol=0,
                               msg="ids differ from FluxKontextPipeline._prepare_latent_image_ids")


def test_kontext_img_ids_layout_target_context_region():
    ids = kh.kontext_img_ids(3, 5)
    n = 15
    assert ids.shape == (2 * n + 1, 3), "sequence ids must be [2N+1, 3]"
    assert torch.all(ids[:n, 0] == 0) and torch.all(ids[n : 2 * n, 0] == 1), "type column must be 0 then 1"
    torch.testing.assert_close(ids[-1], torch.tensor([2.0, 0.0, 0.0]), msg="region row must be (2, 0, 0)")
    torch.testing.assert_close(ids[-1:], kh.region_token_id(), msg="the last row is region_token_id()")
    assert float(ids[-1, 0]) == kh.REGION_ID == 2.0, "the region's type id is REGION_ID = 2"
    torch.testing.assert_close(ids[:n, 1:], ids[n : 2 * n, 1:], rtol=0, atol=0,
                               msg="target and context share row/col positions")
    assert kh.kontext_img_ids(3, 5, with_region=False).shape == (2 * n, 3), "without region: [2N, 3]"


def test_kontext_img_ids_match_what_the_pipeline_builds():
    latent_ids = FluxKontextPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    image_ids = FluxKontextPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
    image_ids[..., 0] = 1
    ref = torch.cat([latent_ids, image_ids], dim=0)
    torch.testing.assert_close(kh.kontext_img_ids(4, 4, with_region=False), ref, rtol=0, atol=0,
                               msg="must equal the pipeline's id sequence")


def test_to_latents_argmax_equals_pipeline_encode_vae_image(tiny_pipe):
    img = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ours = kh.to_latents(img, tiny_pipe.vae, sample_mode="argmax")
    ref = tiny_pipe._encode_vae_image(img, generator=None)
    assert ours.shape == (2, 16, 8, 6), f"latents shape {tuple(ours.shape)}: expected 8x downsampling, 16 channels"
    torch.testing.assert_close(ours, ref, rtol=0, atol=0,
                               msg="to_latents differs from FluxKontextPipeline._encode_vae_image")


def test_to_latents_applies_shift_and_scale(tiny_pipe):
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    raw = tiny_pipe.vae.encode(img).latent_dist.mode()
    cfg = tiny_pipe.vae.config
    assert cfg.shift_factor != 0, "the tiny VAE must carry Flux's non-zero shift_factor"
    torch.testing.assert_close(kh.to_latents(img, tiny_pipe.vae), (raw - cfg.shift_factor) * cfg.scaling_factor,
                               msg="latents must be (mode - shift_factor) * scaling_factor")


def test_to_latents_sample_mode_uses_generator(tiny_pipe):
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a = kh.to_latents(img, tiny_pipe.vae, sample_mode="sample", generator=torch.Generator().manual_seed(0))
    b = kh.to_latents(img, tiny_pipe.vae, sample_mode="sample", generator=torch.Generator().manual_seed(0))
    c = kh.to_latents(img, tiny_pipe.vae, sample_mode="argmax")
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg="same generator must give the same sample")
    assert not torch.equal(a, c), "a posterior sample must differ from the mode"
    with pytest.raises(ValueError, match="argmax"):
        kh.to_latents(img, tiny_pipe.vae, sample_mode="mean")
