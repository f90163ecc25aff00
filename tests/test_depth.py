"""Depth on the tokens: features in packing order, a zero start, the cache equal to sampling, training, dropout,
adapters, the hook, and clear errors."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import kontext_helpers as kh


@pytest.fixture(scope="module")
def plain_pipe():
    """The pretrained tiny pipeline without IP-Adapter (read-only)."""
    return kh.load_pipeline("tiny", ip_adapter=None)


def _random_depth_module(c_in=64, seed=0):
    """A ``"tokens"`` depth module with a random (non-zero) projection."""
    module = kh.make_depth_module("tokens", c_in)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module.eval()


def _depth_forms(h, w, seed=3):
    """One depth map as an 8-bit PIL image, a 16-bit PIL image and a ``[1, H, W]`` float tensor (same values)."""
    levels = np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.uint8)  # [H, W]
    return {"8-bit": Image.fromarray(levels), "16-bit": Image.fromarray(levels.astype(np.uint16) * 257),
            "float": torch.from_numpy(levels.astype(np.float32) / 255.0)[None]}


# --------------------------------------------------------------------------------------------------
# features and the module
# --------------------------------------------------------------------------------------------------


def test_features_follow_the_packing_order():
    from diffusers import FluxKontextPipeline

    d = torch.rand(2, 1, 64, 48, generator=torch.Generator().manual_seed(0))  # distinct values
    features = kh.depth_token_features(d, 4, 3)
    assert features.shape == (2, 12, 256), f"[B, N, 256] on a 4x3 grid, got {tuple(features.shape)}"
    unshuffled = F.pixel_unshuffle(d * 2 - 1, 8)  # [2, 1, 64, 48] -> [2, 64, 8, 6]: 8x8 pixels per latent cell
    packed, grid = kh.pack_like_pipeline(unshuffled)  # [2, 12, 256]: 2x2 latent cells per token
    theirs = FluxKontextPipeline._pack_latents(unshuffled, 2, 64, 8, 6)
    torch.testing.assert_close(packed, theirs, rtol=0, atol=0, msg="kh.pack_like_pipeline is diffusers' packing")
    assert grid == (4, 3), f"packing grid {grid}"
    torch.testing.assert_close(features.sort(dim=-1).values, packed.sort(dim=-1).values, rtol=0, atol=0,
                               msg="token k of the features holds exactly the pixels of packed token k")
    row, col, y, x = 2, 1, 5, 11
    torch.testing.assert_close(features[1, row * 3 + col, 16 * y + x], d[1, 0, 16 * row + y, 16 * col + x] * 2 - 1,
                               msg="channel 16 y + x of token (row, col) is pixel (y, x) of its 16x16 patch")


def test_features_convert_every_bit_depth_resize_and_refuse_another_aspect():
    forms = _depth_forms(64, 48)
    features = {name: kh.depth_token_features(d, 4, 3) for name, d in forms.items()}
    for name in ("16-bit", "float"):
        torch.testing.assert_close(features[name], features["8-bit"], rtol=0, atol=0,
                                   msg=f"the {name} form of the map must give the 8-bit form's features")
    big = F.interpolate(forms["float"][None], size=(128, 96), mode="nearest")  # same aspect, twice the size
    expected = F.interpolate(big, size=(64, 48), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(kh.depth_token_features(big, 4, 3), kh.depth_token_features(expected, 4, 3),
                               rtol=0, atol=0, msg="another size of the same aspect is resized (antialiased bilinear)")
    zeros = kh.depth_token_features(torch.zeros(1, 64, 48), 4, 3)
    assert torch.equal(zeros, torch.full_like(zeros, -1.0)), "an all-zero map (all far) gives -1 everywhere"
    with pytest.raises(ValueError, match="aspect ratios differ"):
        kh.depth_token_features(torch.rand(1, 48, 64), 4, 3)


def test_the_module_starts_at_zero_and_the_kinds_are_named():
    module = kh.make_depth_module(kh.DEFAULT_DEPTH_KIND, 64)
    assert isinstance(module, kh.DepthTokenEmbedding) and module.kind == "tokens" == kh.TrainConfig().depth_kind, (
        "the default depth kind is the token module, as in TrainConfig")
    assert (module.c_in, module.patch, module.on_context) == (64, 16, True), "c_in, patch and on_context attributes"
    assert all(torch.count_nonzero(p) == 0 for p in module.parameters()), "weight and bias start at zero"
    assert set(kh.DEPTH_KINDS) == {"tokens", "ip_adapter"}, f"the depth kinds: {kh.DEPTH_KINDS}"
    assert kh.make_depth_module("ip_adapter", 64) is None and kh.make_depth_module("none", 64) is None, (
        "the IP-Adapter path and 'none' have no module")
    with pytest.raises(ValueError, match="unknown"):
        kh.make_depth_module("channels", 64)
    target, context = kh.depth_inputs(kh.DepthTokenEmbedding(64, on_context=False), torch.rand(1, 4, 256))
    assert target.shape == (1, 4, 64) and context is None, "on_context=False offsets the target tokens only"
    with pytest.raises(ValueError, match="depth_kind"):
        kh.train(None, [], kh.TrainConfig(depth_kind="channels", depth_source="result"), progress=False)


def test_a_zero_module_leaves_the_lora_free_forward_bit_identical(tiny_pipe, random_image, edit_prompt, fast):
    pipe, zero = tiny_pipe, kh.make_depth_module("tokens", 64)
    g = torch.Generator().manual_seed(0)
    noisy, ctx = torch.randn(1, 16, 64, generator=g), torch.randn(1, 16, 64, generator=g)
    pe, pooled, txt_ids = kh.encode_prompts(pipe, edit_prompt, max_sequence_length=32)
    target, context = kh.depth_inputs(zero, kh.depth_token_features(torch.rand(1, 64, 64), 4, 4))
    kw = dict(sigma=torch.tensor([0.6]), prompt_embeds=pe, pooled_prompt_embeds=pooled, txt_ids=txt_ids, h_tok=4,
              w_tok=4)
    with torch.no_grad():
        plain = kh.kontext_forward(pipe.transformer, noisy, ctx, None, **kw)
        with_depth = kh.kontext_forward(pipe.transformer, noisy + target, ctx + context, None, **kw)
    torch.testing.assert_close(with_depth, plain, rtol=0, atol=0, msg="a zero depth module adds exactly nothing")
    image = random_image(64, 64, 1)
    run = dict(height=64, width=64, output_type="latent", **fast)
    ours = kh.sample_edit(pipe, image, edit_prompt, depth=torch.rand(1, 64, 64), depth_module=zero,
                          generator=torch.Generator().manual_seed(2), **run)
    base = kh.sample_edit(pipe, image, edit_prompt, generator=torch.Generator().manual_seed(2), **run)
    torch.testing.assert_close(ours, base, rtol=0, atol=0, msg="sample_edit with a zero depth module equals no depth")


# --------------------------------------------------------------------------------------------------
# the cache and training
# --------------------------------------------------------------------------------------------------


def test_cached_features_equal_the_features_sample_edit_computes(fresh_pipe, one_pair, fast, monkeypatch):
    item = one_pair()[0]
    forms = _depth_forms(64, 64)
    items = [dict(item, depth=d, name=name) for name, d in forms.items()]
    cache = kh.build_train_cache(fresh_pipe, items, max_sequence_length=32, depth_kind="tokens", progress=False)
    assert all(s.ip_embeds is None for s in cache.samples), "the tokens kind caches no IP-Adapter embedding"
    assert cache.batch([0, 1])["depth_feat"].shape == (2, 16, 256), "batch returns depth_feat [B, N, 256]"
    seen = []
    real = kh.inference.depth_token_features
    monkeypatch.setattr(kh.inference, "depth_token_features", lambda *a: seen.append(real(*a)) or seen[-1])
    for (name, d), sample in zip(forms.items(), cache.samples):
        kh.sample_edit(fresh_pipe, item["context"], item["prompt"], depth=d, depth_module=_random_depth_module(),
                       output_type="latent", **dict(fast, num_inference_steps=1))
        torch.testing.assert_close(seen[-1], sample.depth_feat, rtol=0, atol=0,
                                   msg=f"{name}: the cached features must equal sample_edit's, bit for bit")


def test_the_target_source_reads_target_depth_or_estimates_it(fresh_pipe, one_pair, monkeypatch):
    item = one_pair()[0]
    target_depth = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(4))
    estimated = []
    monkeypatch.setattr(kh.cache, "estimate_depth", lambda image: estimated.append(image) or [1 - target_depth])
    without = {k: v for k, v in item.items() if k != "target_depth"}
    items = [dict(item, target_depth=target_depth), without]
    cache = kh.build_train_cache(fresh_pipe, items, max_sequence_length=32, depth_source="target", progress=False)
    torch.testing.assert_close(cache.samples[0].depth_feat, kh.depth_token_features(target_depth, 4, 4), rtol=0,
                               atol=0, msg="depth_source='target' reads item['target_depth']")
    assert len(estimated) == 1 and estimated[0] is items[1]["target"], "an item without one is estimated once"
    torch.testing.assert_close(cache.samples[1].depth_feat, kh.depth_token_features(1 - target_depth, 4, 4),
                               rtol=0, atol=0, msg="the estimated target depth is what the cache holds")


def test_training_moves_the_projection_and_lowers_the_loss(fresh_pipe, one_pair, train_config, tmp_path):
    pipe, data = fresh_pipe, one_pair()
    cfg = train_config(tmp_path, steps=30, depth_kind="tokens", depth_dropout=0.0, depth_learning_rate=1e-2)
    cache = kh.build_train_cache(pipe, data, max_sequence_length=32, progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        region = kh.make_region_module(cfg.region_kind, cache.h_tok, cache.w_tok, 64)  # train()'s start
    before = kh.evaluation_loss(pipe, region, cache, depth_module=kh.make_depth_module("tokens", 64))
    result = kh.train(pipe, data, cfg, cache=cache, progress=False)
    assert isinstance(result.depth, kh.DepthTokenEmbedding) and not result.depth.training, "TrainResult.depth, eval"
    assert result.depth.proj.weight.abs().max() > 0, "the depth projection must move away from zero"
    after = kh.evaluation_loss(pipe, result.region, cache, depth_module=result.depth)
    assert after["loss"] < 0.8 * before["loss"], f"the evaluation loss must fall: {before} -> {after}"
    assert {r["depth_kept"] for r in result.history} == {1.0}, "depth dropout 0 keeps every sample"


def test_depth_dropout_drops_some_samples(fresh_pipe, one_pair, train_config, tmp_path):
    cfg = train_config(tmp_path, steps=8, depth_dropout=0.5, checkpoint_every=8)
    result = kh.train(fresh_pipe, one_pair(), cfg, progress=False)
    kept = [r["depth_kept"] for r in result.history]
    assert 0.0 in kept and 1.0 in kept, f"at dropout 0.5 some steps train without depth, some with: {kept}"
    ckpt = kh.load_checkpoint(kh.list_checkpoints(cfg.output_dir)[-1][1])
    assert ckpt["depth"]["kind"] == "tokens" and "proj.weight" in ckpt["depth"]["state_dict"], (
        "the checkpoint holds the depth module")
    none = kh.train(kh.load_pipeline("tiny"), one_pair(), train_config(tmp_path / "b", steps=1, depth_kind="none"),
                    progress=False)
    assert none.depth is None and "depth_kept" not in none.history[-1], "depth_kind='none' trains no depth module"


# --------------------------------------------------------------------------------------------------
# adapters, the hook, bad input
# --------------------------------------------------------------------------------------------------


def test_save_and_load_give_the_same_edit(fresh_pipe, random_image, edit_prompt, fast, tmp_path, attn_targets):
    pipe, module = fresh_pipe, _random_depth_module()
    kh.add_lora(pipe.transformer, rank=4, targets=attn_targets)
    path = str(tmp_path / "adapter")
    kh.save_adapter(pipe, None, path, config=kh.TrainConfig(depth_source="target"), depth_module=module)
    with open(os.path.join(path, kh.ADAPTER_CONFIG_FILE)) as fh:
        record = json.load(fh)["depth"]
    assert record["kind"] == "tokens" and record["source"] == "target" and record["c_in"] == 64, record
    assert os.path.isfile(os.path.join(path, kh.DEPTH_WEIGHT_FILE)), "the depth module has its own file"
    fresh = kh.load_pipeline("tiny", seed=0)
    assert kh.load_adapter(fresh, path) is None, "load_adapter returns the region module (none here)"
    loaded = kh.load_depth_module(path, fresh)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters()), "eval, no gradients"
    image, depth = random_image(64, 48, 2), _depth_forms(64, 48)["16-bit"]

    def edit(p, m):
        return kh.sample_edit(p, image, edit_prompt, depth=depth, depth_module=m, output_type="latent",
                              generator=torch.Generator().manual_seed(1), **fast)

    torch.testing.assert_close(edit(fresh, loaded), edit(pipe, module), rtol=0, atol=0,
                               msg="a saved and loaded depth module gives the same edit")
    card = open(kh.write_model_card(path, "me/edit")).read()
    assert "depth kind `tokens`" in card and "depth source `target`" in card and "depth_module=" in card, card
    kh.save_adapter(pipe, None, path)
    assert kh.load_depth_module(path) is None, "a folder without a depth module loads None (older folders too)"


def test_pipeline_call_with_the_hook_equals_sample_edit(tiny_pipe, random_image, quadrant_mask, edit_prompt, fast):
    h, w = 64, 48
    image, mask, depth = random_image(h, w, 3), quadrant_mask(h, w), _depth_forms(h, w)["8-bit"]
    region = kh.make_region_module("marked", h // 16, w // 16, 64)
    with torch.no_grad():
        region.embedding.copy_(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    module = _random_depth_module(seed=2)
    run = dict(height=h, width=w, generator=torch.Generator().manual_seed(5), output_type="latent", **fast)
    ours = kh.sample_edit(tiny_pipe, image, edit_prompt, mask=mask, region=region, depth=depth, depth_module=module,
                          **run)
    with kh.RegionHook(tiny_pipe, region, mask, depth=depth, depth_module=module):
        theirs = tiny_pipe(image=image, prompt=edit_prompt, max_area=h * w, _auto_resize=False,
                           **dict(run, generator=torch.Generator().manual_seed(5))).images
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5, msg="pipe(...) with the hook != sample_edit")
    only_depth = kh.sample_edit(tiny_pipe, image, edit_prompt, depth=depth, depth_module=module,
                                **dict(run, generator=torch.Generator().manual_seed(5)))
    with kh.RegionHook(tiny_pipe, None, None, depth=depth, depth_module=module):
        theirs = tiny_pipe(image=image, prompt=edit_prompt, max_area=h * w, _auto_resize=False,
                           **dict(run, generator=torch.Generator().manual_seed(5))).images
    torch.testing.assert_close(theirs, only_depth, rtol=1e-5, atol=1e-5, msg="the hook with depth alone")
    assert (only_depth - ours).abs().max() > 1e-4, "the region signal changes the edit"


def test_bad_depth_input_is_a_clear_error(tiny_pipe, plain_pipe, random_image, edit_prompt, fast):
    image, module = random_image(64, 48, 0), _random_depth_module()
    with pytest.raises(ValueError, match="aspect ratios differ"):
        kh.sample_edit(tiny_pipe, image, edit_prompt, depth=torch.rand(1, 48, 64), depth_module=module, **fast)
    with pytest.raises(ValueError, match="context's size"):
        kh.sample_edit(tiny_pipe, image, edit_prompt, depth=torch.rand(1, 64, 48), depth_module=module, height=32,
                       width=32, **fast)
    with pytest.raises(ValueError, match="c_in=32"):
        kh.sample_edit(tiny_pipe, image, edit_prompt, depth=torch.rand(1, 64, 48),
                       depth_module=kh.DepthTokenEmbedding(32), **fast)
    with pytest.raises(ValueError, match="IP-Adapter"):
        kh.sample_edit(plain_pipe, image, edit_prompt, depth=torch.rand(1, 64, 48), **fast)
    with pytest.raises(ValueError, match="depth_module"):
        kh.RegionHook(tiny_pipe, None, None, depth=torch.rand(1, 64, 48))
    out = kh.sample_edit(plain_pipe, image, edit_prompt, depth=None, depth_module=module, output_type="latent", **fast)
    assert out.shape == (1, 12, 64), "a depth module without a depth map runs without depth (what dropout trains)"
    big = kh.sample_edit(tiny_pipe, image, edit_prompt, depth=torch.rand(1, 128, 96), depth_module=module,
                         output_type="latent", **fast)
    assert torch.isfinite(big).all(), "a depth map of another size with the context's aspect is resized"


def test_a_cache_without_features_and_an_older_checkpoint_are_named(fresh_pipe, one_pair, train_config, tmp_path):
    data = one_pair()
    cache = kh.build_train_cache(fresh_pipe, data, max_sequence_length=32, depth_kind="ip_adapter", progress=False)
    assert cache.samples[0].depth_feat is None, "the ip_adapter kind caches no token features"
    with pytest.raises(ValueError, match="depth features"):
        kh.train(fresh_pipe, data, train_config(tmp_path, steps=1), cache=cache, progress=False)
    saved = {k: v for k, v in kh.TrainConfig().to_dict().items() if not k.startswith("depth_")}  # before depth kinds
    blocking, _ = kh.resume_config_changes(saved, kh.TrainConfig().to_dict())
    assert blocking == ["depth_kind: 'ip_adapter' -> 'tokens'"], (
        f"a checkpoint from before depth kinds trained through the IP-Adapter: {blocking}")
