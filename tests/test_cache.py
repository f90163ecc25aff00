"""The training cache: a step on cached encodings equals the same step encoded inline."""

import torch

import kontext_helpers as kh


def test_cached_step_equals_uncached_step(fresh_pipe, one_pair, train_config, tmp_path):
    pipe = fresh_pipe
    data = one_pair()
    cfg = train_config(tmp_path)
    cache = kh.build_train_cache(pipe, data, max_sequence_length=32, depth_kind="ip_adapter", progress=False)
    assert isinstance(cache, kh.TrainCache), "build_train_cache returns a TrainCache"
    region = kh.MaskRegionToken(cache.h_tok, cache.w_tok, 64)
    g = torch.Generator().manual_seed(0)
    noise, sigma = torch.randn(1, cache.h_tok * cache.w_tok, 64, generator=g), torch.tensor([0.37])
    cached, _ = kh.training_loss(pipe.transformer, region, cache.batch([0]), cache.txt_ids, cache.h_tok, cache.w_tok,
                                 noise, sigma, cfg)
    item = data[0]  # everything encoded again, inline, as the original design did at every step
    pe, pooled, txt_ids = kh.encode_prompts(pipe, item["prompt"], max_sequence_length=32)
    ctx_tok, (h, w) = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(item["context"][None]), pipe.vae))
    tgt_tok, _ = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(item["target"][None]), pipe.vae))
    m = kh.mask_to_token_grid(item["mask"][None], h, w)
    ip = kh.encode_depth_for_ip_adapter(pipe, kh.depth_to_pil(item["depth"]))
    s = sigma[:, None, None]
    pred = kh.kontext_forward(pipe.transformer, (1 - s) * tgt_tok + s * noise, ctx_tok, region(m), sigma=sigma,
                              prompt_embeds=pe, pooled_prompt_embeds=pooled, txt_ids=txt_ids, h_tok=h, w_tok=w,
                              guidance=cfg.guidance, ip_adapter_image_embeds=ip)
    uncached = kh.fm_masked_dual_loss_with_l2(pred, tgt_tok, ctx_tok, noise, m, h, w, region_token_module=region)
    torch.testing.assert_close(cached, uncached, msg="a cached step must equal the uncached step")
