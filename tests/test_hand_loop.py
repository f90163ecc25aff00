"""The whole training loop written by hand from public names (as notebook 04 shows it) equals ``kh.train``.

Tolerance: none. On the CPU in fp32 the hand loop performs the same operations in the same order as
``kh.train`` (``accelerate`` with ``mixed_precision="no"`` and one process adds no autocast, scaling or
reduction), so its losses and its LoRA after the last update are equal bit for bit.
"""

import torch
from diffusers.optimization import get_scheduler

import kontext_helpers as kh


def hand_loop(pipe, cache, cfg):
    """``cfg.steps`` updates over ``cache`` (region "marked", depth "tokens", identity preservation, any batch size, no
    accumulation): ``(losses, {LoRA name: tensor})``."""
    tf = pipe.transformer
    c_in, dev = tf.config.in_channels, tf.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the LoRA's random A depends on the seed only
        lora = kh.add_lora(tf, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.lora_targets,
                           include_ip_adapter=cfg.lora_ip_adapter)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # so does the region module's start
        side = cfg.resolution // 16  # on the square bucket's grid, serving every bucket
        region = kh.make_region_module(cfg.region_kind, side, side, c_in).to(dev)
    depth = kh.make_depth_module(cfg.depth_kind, c_in).to(dev)  # zero projection
    for _, p in lora:
        p.data = p.data.float()  # trainable weights in fp32
    tf.train()
    modules = [[p for _, p in lora], list(region.parameters()), list(depth.parameters())]
    lrs = [cfg.learning_rate, cfg.region_learning_rate, cfg.depth_learning_rate]
    optimizer = torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd}
                                   for ps, lr, wd in zip(modules, lrs, cfg.weight_decays())])
    schedule = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                             num_training_steps=cfg.steps)
    losses, b = [], cfg.batch_size
    for step in range(cfg.steps):
        idx = kh.batch_indices(cache.groups(), cfg.seed, step, b)  # one bucket's samples, epoch permutations
        batch, (h_tok, w_tok) = cache.batch(idx, device=dev), cache.grid_of(idx[0])
        g = kh.step_generator(cfg.seed, 2, step, 0, 0)  # (2, step, micro-batch 0, process 0)
        noise = torch.randn(batch["tgt_tok"].shape, generator=g).to(dev, batch["tgt_tok"].dtype)  # [B, N, 4C]
        sigma = kh.sample_sigmas(b, cfg, g).to(dev)  # [B]
        keep = (torch.rand(b, generator=g) >= cfg.depth_dropout).float().to(dev)  # [B]: depth dropout
        s = sigma[:, None, None]  # [B] -> [B, 1, 1]
        x_t = (1 - s) * batch["tgt_tok"] + s * noise  # [B, N, 4C]
        marked = kh.region_inputs(region, batch["ctx_tok"], batch["mask_small"], h_tok, w_tok)
        d_tgt, d_ctx = (o.to(batch["ctx_tok"]) for o in kh.depth_inputs(depth, batch["depth_feat"], keep=keep))
        pred = kh.kontext_forward(tf, x_t + (marked.target_offset + d_tgt), marked.context + d_ctx, None,
                                  sigma=sigma, prompt_embeds=batch["prompt_embeds"],
                                  pooled_prompt_embeds=batch["pooled_prompt_embeds"], txt_ids=cache.txt_ids.to(dev),
                                  h_tok=h_tok, w_tok=w_tok, guidance=cfg.guidance)  # [B, N, 4C]
        loss = kh.fm_masked_dual_loss_with_l2(
            pred, batch["tgt_tok"], batch["ctx_tok"], noise, batch["mask_small"], h_tok, w_tok,
            w_in=cfg.w_in, w_out=cfg.w_out, l2_region_lambda=cfg.l2_region_lambda, l2_lora_lambda=cfg.l2_lora_lambda,
            region_token_module=region, lora_named_params=lora, l2_form=cfg.l2_form)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for ps in modules for p in ps], cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, {name: p.detach().clone() for name, p in lora}


def test_hand_written_loop_equals_train_bit_for_bit(one_pair, train_config, tmp_path):
    data = one_pair(count=2)  # 3 updates over 2 pairs: the second epoch's permutation is drawn too
    for form in ("mean_square", "decoupled"):
        cfg = train_config(tmp_path / form, steps=3, l2_form=form, l2_lora_lambda=0.1 if form == "decoupled" else 1e-4)
        assert (cfg.region_kind, cfg.depth_kind, cfg.preservation, cfg.gradient_accumulation_steps) == (
            "marked", "tokens", "identity", 1), "the hand loop writes out the default kinds"
        pipe = kh.load_pipeline("tiny", seed=0)
        cache = kh.build_train_cache(pipe, data, max_sequence_length=cfg.max_sequence_length, progress=False)
        losses, lora = hand_loop(pipe, cache, cfg)
        trained = kh.load_pipeline("tiny", seed=0)
        result = kh.train(trained, data, cfg, cache=cache, progress=False)
        assert losses == [r["loss"] for r in result.history], (
            f"{form}: the hand loop's losses {losses} must equal kh.train's {[r['loss'] for r in result.history]}")
        theirs = dict(kh.collect_lora_named_params(trained.transformer))
        assert lora.keys() == theirs.keys(), f"{form}: the same LoRA tensors"
        for name, p in lora.items():
            torch.testing.assert_close(p, theirs[name].detach(), rtol=0, atol=0,
                                       msg=f"{form}: {name} after {cfg.steps} updates")


def test_hand_written_loop_equals_train_over_two_buckets(sample_data, train_config, tmp_path):
    square = kh.KontextPairs(sample_data, 128, resize="square")
    items = [kh.crop_to_aspect(square[i], a) for i, a in enumerate(((16, 9), (3, 4), (16, 9), (3, 4)))]
    parts = [[it[k] for it in items] for k in ("context", "target", "mask", "depth", "prompt")]
    data = kh.write_pair_folder(tmp_path / "mixed", *parts, resolution=64)
    assert data.buckets == {(48, 80): 2, (80, 48): 2}, f"two buckets of two pairs: {data.buckets}"
    cfg = train_config(tmp_path / "run", steps=3, batch_size=2)
    pipe = kh.load_pipeline("tiny", seed=0)
    cache = kh.build_train_cache(pipe, data, max_sequence_length=cfg.max_sequence_length, progress=False)
    losses, lora = hand_loop(pipe, cache, cfg)
    trained = kh.load_pipeline("tiny", seed=0)
    result = kh.train(trained, data, cfg, cache=cache, progress=False)
    assert losses == [r["loss"] for r in result.history], f"two buckets, batches of two: {losses} against kh.train"
    theirs = dict(kh.collect_lora_named_params(trained.transformer))
    for name, p in lora.items():
        torch.testing.assert_close(p, theirs[name].detach(), rtol=0, atol=0, msg=f"{name} after 3 bucketed updates")
