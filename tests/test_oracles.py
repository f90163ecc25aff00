"""The training path against an outside oracle: diffusers' own packing, ids, VAE encoding, prompt and depth
encoding, and a raw ``pipe.transformer(...)`` call, with the loss and the region signal written out by hand.

The package's ``training_loss`` (with ``kontext_forward``, ``region_inputs``, the depth offsets and the cache) must
equal this hand computation, value and gradients, for every region kind, both depth kinds and both preservation
modes. A wrong convention (the
timestep, the guidance, a lost target mark, a prior that keeps the LoRA on, another depth picture) shows here.
"""

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

import kontext_helpers as kh

SIZE = 64  # px: an 8x8 latent, a 4x4 token grid
GUIDANCE = 2.0  # neither the default 1.0 nor diffusers' script's 3.5: a hard-coded guidance shows
SIGMAS = (0.3, 0.85)  # one per sample; never 0.5, where sigma and 1 - sigma agree


@pytest.fixture(scope="module")
def lora_pipe(attn_targets):
    """A tiny pipeline with a rank-4 LoRA whose ``lora_B`` is random (non-zero), so LoRA on and off differ."""
    pipe = kh.load_pipeline("tiny", seed=0)
    lora = kh.add_lora(pipe.transformer, rank=4, alpha=4, targets=attn_targets, include_ip_adapter=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in lora:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pipe, lora


@pytest.fixture(scope="module")
def two_pairs(sample_data):
    full = kh.KontextPairs(sample_data, resolution=SIZE)
    return [full[0], full[3]]


@pytest.fixture(scope="module")
def caches(lora_pipe, two_pairs):
    """The training cache of the two pairs for each depth kind (IP-Adapter embeddings, or depth features)."""
    return {kind: kh.build_train_cache(lora_pipe[0], two_pairs, max_sequence_length=32, depth_kind=kind,
                                       progress=False) for kind in kh.DEPTH_KINDS}


def _random_depth_module(c_in: int):
    module = kh.DepthTokenEmbedding(c_in)
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def _random_region(kind: str, h_tok: int, w_tok: int, c_in: int):
    region = kh.make_region_module(kind, h_tok, w_tok, c_in)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in region.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return region


def _block_max(mask: torch.Tensor, h_tok: int, w_tok: int) -> torch.Tensor:
    """``[B, 1, H, W]`` -> ``[B, 1, H', W']``: a token is editable when any of its 16x16 pixels is."""
    b = mask.shape[0]
    blocks = mask.reshape(b, 1, h_tok, 16, w_tok, 16)  # [B, 1, H, W] -> [B, 1, H', 16, W', 16]
    return blocks.amax(dim=(3, 5))


def _region_by_hand(kind: str, region, m_tok: torch.Tensor):
    """The region signal written out: (added to the context, added to the noisy target, appended tokens, ids)."""
    b, _, h, w = m_tok.shape
    flat = m_tok.reshape(b, h * w, 1)  # [B, 1, H', W'] -> [B, N, 1], row-major like the packing
    if kind == "marked":
        return flat * region.embedding, flat * region.embedding, None, None
    if kind == "marked_context":
        return flat * region.embedding, None, None, None
    if kind == "cells":  # 2x2 cells: their masked fraction, ids at each cell's centre
        a = m_tok.reshape(b, 1, h // 2, 2, w // 2, 2).mean(dim=(3, 5))  # -> [B, 1, H'/2, W'/2]
        a = a.reshape(b, -1, 1)  # -> [B, K, 1]
        rows, cols = torch.meshgrid(torch.arange(h // 2) * 2 + 0.5, torch.arange(w // 2) * 2 + 0.5, indexing="ij")
        ids = torch.stack([torch.full_like(rows, 2.0), rows, cols], dim=-1).reshape(-1, 3)  # [K, 3]
        return None, None, a * region.on + (1 - a) * region.off, ids
    if kind == "linear":  # the original design's single token, id (2, 0, 0)
        token = m_tok.reshape(b, h * w) @ region.proj.weight.T + region.proj.bias  # [B, c_in]
        return None, None, token[:, None], torch.tensor([[2.0, 0.0, 0.0]])
    return None, None, None, None


def _pipeline_encodings(pipe, items):
    """Latents, packing, ids, prompts and depth through diffusers' own pipeline functions."""
    images = torch.stack([torch.stack([it["context"], it["target"]]) for it in items])  # [B, 2, 3, H, W]
    b = images.shape[0]
    with torch.no_grad():
        lat = pipe._encode_vae_image(pipe.image_processor.normalize(images.flatten(0, 1)), None)  # [2B, C, h, w]
    c, h, w = lat.shape[1:]
    tok = FluxKontextPipeline._pack_latents(lat, 2 * b, c, h, w).reshape(b, 2, (h // 2) * (w // 2), 4 * c)
    ids = FluxKontextPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)  # [N, 3]
    ctx_ids = ids.clone()
    ctx_ids[:, 0] = 1  # FluxKontextPipeline.prepare_latents marks the context tokens
    text = [pipe.encode_prompt(prompt=it["prompt"], prompt_2=None, device="cpu", max_sequence_length=32)
            for it in items]
    ip = [pipe.prepare_ip_adapter_image_embeds(kh.depth_to_pil(it["depth"]), None, "cpu", 1)[0] for it in items]
    return dict(ctx=tok[:, 0], tgt=tok[:, 1], ids=torch.cat([ids, ctx_ids]), grid=(h // 2, w // 2),
                embeds=torch.cat([t[0] for t in text]), pooled=torch.cat([t[1] for t in text]), txt_ids=text[0][2],
                ip=torch.cat(ip), mask=torch.stack([it["mask"] for it in items]),
                depth=torch.stack([it["depth"] for it in items]))


def _depth_offset_by_hand(depth_module, depth: torch.Tensor, h_tok: int, w_tok: int) -> torch.Tensor:
    """Each token's 16x16 depth patch (row-major, in [-1, 1]) through the projection: ``[B, N, 4C]``."""
    b = depth.shape[0]
    tiles = (depth * 2 - 1).reshape(b, h_tok, 16, w_tok, 16)  # [B, 1, H, W] -> [B, H', 16, W', 16]
    patches = tiles.permute(0, 1, 3, 2, 4).reshape(b, h_tok * w_tok, 256)  # -> [B, N, 256], pixel 16 y + x
    return patches @ depth_module.proj.weight.T + depth_module.proj.bias


def _raw_velocity(pipe, hidden, img_ids, enc, sigma, n, ip: bool):
    """One raw transformer call, as ``FluxKontextPipeline.__call__`` makes it; the target part ``[B, N, 4C]``.
    Without IP-Adapter depth, the adapter gets no image tokens (``ip_hidden_states=[]``: it adds zero)."""
    b = hidden.shape[0]
    attn = {"ip_adapter_image_embeds": [enc["ip"]]} if ip else {"ip_hidden_states": []}
    out = pipe.transformer(hidden_states=hidden, timestep=sigma, guidance=torch.full([b], GUIDANCE),
                           pooled_projections=enc["pooled"], encoder_hidden_states=enc["embeds"],
                           txt_ids=enc["txt_ids"], img_ids=img_ids, joint_attention_kwargs=attn, return_dict=False)[0]
    return out[:, :n]


def _loss_by_hand(pipe, region, kind, enc, noise, sigma, cfg, lora, depth_module=None, keep=None):
    """``training_loss`` written out against the raw transformer: returns ``(loss, loss_in, loss_out)``."""
    ctx, tgt = enc["ctx"], enc["tgt"]
    b, n, c = tgt.shape
    s = sigma[:, None, None]
    noisy = (1 - s) * tgt + s * noise
    m_tok = _block_max(enc["mask"], *enc["grid"])  # [B, 1, H', W']
    ctx_add, tgt_add, extra, extra_ids = _region_by_hand(kind, region, m_tok)
    ctx_in = ctx if ctx_add is None else ctx + ctx_add
    noisy_in = noisy if tgt_add is None else noisy + tgt_add
    if depth_module is not None:  # each token's own depth patch, on the target and the context tokens
        depth = _depth_offset_by_hand(depth_module, enc["depth"], *enc["grid"])
        depth = depth if keep is None else depth * keep[:, None, None]  # depth dropout: no offset at all
        noisy_in, ctx_in = noisy_in + depth, ctx_in + depth
    parts, ids = [noisy_in, ctx_in], enc["ids"]
    if extra is not None:
        parts, ids = parts + [extra], torch.cat([ids, extra_ids])
    ip = depth_module is None
    pred = _raw_velocity(pipe, torch.cat(parts, dim=1), ids, enc, sigma, n, ip)
    velocity_out = noise - ctx  # identity: flow to the context outside the mask
    if cfg.preservation == "prior":  # the base model's own prediction: LoRA off, no region or depth signal
        pipe.transformer.disable_adapters()
        with torch.no_grad():
            velocity_out = _raw_velocity(pipe, torch.cat([noisy, ctx], dim=1), enc["ids"], enc, sigma, n, ip)
        pipe.transformer.enable_adapters()
        for _, p in lora:
            p.requires_grad_(True)
    m = m_tok.reshape(b, n, 1)  # [B, 1, H', W'] -> [B, N, 1]
    loss_in = ((pred - (noise - tgt)) ** 2 * m).sum() / (m.sum() * c)
    loss_out = ((pred - velocity_out) ** 2 * (1 - m)).sum() / ((1 - m).sum() * c)
    loss = cfg.w_in * loss_in + cfg.w_out * loss_out
    def l2(params, lam):  # cfg.l2_form: lambda * mean(p^2), lambda * sum(p^2), or nothing (AdamW decays instead)
        total = sum((p**2).sum() for p in params)
        return {"mean_square": lam * total / sum(p.numel() for p in params), "sum": lam * total,
                "decoupled": 0.0}[cfg.l2_form]

    if region is not None:
        loss = loss + l2(list(region.parameters()), cfg.l2_region_lambda)
    loss = loss + l2([p for _, p in lora], cfg.l2_lora_lambda)
    return loss, loss_in, loss_out


def _grads(params):
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return grads


@pytest.mark.parametrize("preservation", ["identity", "prior"])
@pytest.mark.parametrize("kind, depth_kind", [(k, "tokens") for k in (*kh.REGION_KINDS, "none")]
                         + [("marked", "ip_adapter"), ("none", "ip_adapter")])
def test_training_loss_equals_a_raw_transformer_call(lora_pipe, two_pairs, caches, kind, depth_kind, preservation):
    pipe, lora = lora_pipe
    cache = caches[depth_kind]
    enc = _pipeline_encodings(pipe, two_pairs)
    c_in = pipe.transformer.config.in_channels
    region = None if kind == "none" else _random_region(kind, cache.h_tok, cache.w_tok, c_in)
    depth_module = _random_depth_module(c_in) if depth_kind == "tokens" else None
    cfg = kh.TrainConfig(guidance=GUIDANCE, preservation=preservation, w_in=1.5, w_out=0.7, l2_region_lambda=0.1,
                         l2_lora_lambda=0.2, l2_form="mean_square", depth_kind=depth_kind)  # an L2 term in the loss
    g = torch.Generator().manual_seed(5)
    noise, sigma = torch.randn(enc["tgt"].shape, generator=g), torch.tensor(SIGMAS)
    trained = [p for _, p in lora] + [p for m in (region, depth_module) if m is not None for p in m.parameters()]
    ours, parts = kh.training_loss(pipe.transformer, region, cache.batch([0, 1]), cache.txt_ids, cache.h_tok,
                                   cache.w_tok, noise, sigma, cfg, lora_named_params=lora, depth_module=depth_module)
    ours.backward()
    our_grads = _grads(trained)
    theirs, loss_in, loss_out = _loss_by_hand(pipe, region, kind, enc, noise, sigma, cfg, lora, depth_module)
    theirs.backward()
    their_grads = _grads(trained)
    what = f"region kind {kind!r}, depth kind {depth_kind!r}, preservation {preservation!r}"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: loss differs: {m}")
    torch.testing.assert_close(torch.tensor(parts["loss_out"]), loss_out.detach(), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{what}: the outside term differs: {m}")
    assert parts["loss_out"] > 1e-6, f"{what}: with a non-zero lora_B the outside term must be > 0"
    for k, (a, b) in enumerate(zip(our_grads, their_grads)):
        scale = float(b.abs().max())  # float32 sums in another order differ by ~1e-6 of the tensor's own scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale + 1e-9,
                                   msg=lambda m, k=k: f"{what}: gradient of trained tensor {k} differs: {m}")


@pytest.fixture(scope="module")
def wide_pairs(sample_data, tmp_path_factory):
    """Two sample pairs cut to 16:9 and read at their aspect-ratio bucket: 80x48 px, a 3x5 token grid."""
    square = kh.KontextPairs(sample_data, resolution=128, resize="square")
    items = [kh.crop_to_aspect(square[i], (16, 9)) for i in (0, 3)]
    parts = [[it[k] for it in items] for k in ("context", "target", "mask", "depth", "prompt")]
    pairs = kh.write_pair_folder(tmp_path_factory.mktemp("wide") / "pairs", *parts, resolution=SIZE)
    assert pairs.buckets == {(80, 48): 2}, f"both pairs in the 80x48 bucket: {pairs.buckets}"
    return [pairs[0], pairs[1]]


@pytest.mark.parametrize("kind", ["marked", "marked_context", "linear"])
def test_training_loss_equals_a_raw_transformer_call_at_a_non_square_bucket(lora_pipe, wide_pairs, kind):
    pipe, lora = lora_pipe
    cache = kh.build_train_cache(pipe, wide_pairs, max_sequence_length=32, depth_kind="tokens", progress=False)
    enc = _pipeline_encodings(pipe, wide_pairs)
    h_tok, w_tok = cache.grid_of(0)
    assert (h_tok, w_tok) == enc["grid"] == (3, 5), f"rows x columns of tokens: {cache.grid_of(0)}, {enc['grid']}"
    c_in = pipe.transformer.config.in_channels
    region, depth_module = _random_region(kind, 4, 4, c_in), _random_depth_module(c_in)  # built on the square grid
    if kind == "linear":  # its projection pools any mask onto its own 4x4 grid; by hand: that grid's mask
        region = _random_region(kind, h_tok, w_tok, c_in)
    cfg = kh.TrainConfig(guidance=GUIDANCE, w_in=1.5, w_out=0.7, l2_region_lambda=0.1, l2_lora_lambda=0.2)
    g = torch.Generator().manual_seed(6)
    noise, sigma = torch.randn(enc["tgt"].shape, generator=g), torch.tensor(SIGMAS)
    ours, _ = kh.training_loss(pipe.transformer, region, cache.batch([0, 1]), cache.txt_ids, h_tok, w_tok, noise,
                               sigma, cfg, lora_named_params=lora, depth_module=depth_module)
    with torch.no_grad():
        theirs, _, _ = _loss_by_hand(pipe, region, kind, enc, noise, sigma, cfg, lora, depth_module)
    torch.testing.assert_close(ours.detach(), theirs, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"region kind {kind!r} at the 3x5 grid: loss differs: {m}")


def test_depth_dropout_removes_the_whole_offset_of_a_dropped_sample(lora_pipe, two_pairs, caches):
    pipe, lora = lora_pipe
    cache, enc = caches["tokens"], _pipeline_encodings(pipe, two_pairs)
    c_in = pipe.transformer.config.in_channels
    region, depth_module = _random_region("marked", cache.h_tok, cache.w_tok, c_in), _random_depth_module(c_in)
    cfg = kh.TrainConfig(guidance=GUIDANCE, depth_kind="tokens", l2_region_lambda=0.1, l2_lora_lambda=0.2,
                         l2_form="sum")  # the original design's L2 term in the loss
    g = torch.Generator().manual_seed(6)
    noise, sigma, keep = torch.randn(enc["tgt"].shape, generator=g), torch.tensor(SIGMAS), torch.tensor([0.0, 1.0])
    batch = dict(cache.batch([0, 1]), depth_keep=keep)
    with torch.no_grad():
        ours, parts = kh.training_loss(pipe.transformer, region, batch, cache.txt_ids, cache.h_tok, cache.w_tok,
                                       noise, sigma, cfg, lora_named_params=lora, depth_module=depth_module)
        theirs, _, _ = _loss_by_hand(pipe, region, "marked", enc, noise, sigma, cfg, lora, depth_module, keep)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"a sample depth dropout drops must get no depth offset at all: {m}")
    assert parts["depth_kept"] == 0.5, f"one of two samples kept its depth, parts say {parts['depth_kept']}"


# --------------------------------------------------------------------------------------------------
# depth: the training cache encodes a depth map exactly as the pipeline does at inference
# --------------------------------------------------------------------------------------------------


def _depth_files(root, ramp: np.ndarray) -> dict:
    """The same depth ramp (``uint8`` levels) as an 8-bit PNG, a 16-bit PNG and a float TIFF."""
    return {"8-bit": Image.fromarray(ramp), "16-bit": Image.fromarray(ramp.astype(np.uint16) * 257),
            "float": Image.fromarray(ramp.astype(np.float32) / 255.0)}


@pytest.mark.parametrize("bits", ["8-bit", "16-bit", "float"])
def test_cached_depth_embeddings_equal_the_pipelines_ip_adapter_encoding(tiny_pipe, make_pairs, tmp_path, bits):
    root = make_pairs(tmp_path, stems=("a",), size=32)
    yy, xx = np.mgrid[0:32, 0:32]
    ramp = ((xx * 5 + yy * 3) % 256).astype(np.uint8)
    ramp[0, 0], ramp[-1, -1] = 0, 255  # the full range: the per-map min-max leaves the levels as they are
    depth_file = root / "depth" / ("a.tiff" if bits == "float" else "a.png")
    (root / "depth" / "a.png").unlink()
    _depth_files(root, ramp)[bits].save(depth_file)
    data = kh.KontextPairs(root, resolution=32)
    cache = kh.build_train_cache(tiny_pipe, data, max_sequence_length=16, depth_kind="ip_adapter", progress=False)
    grey = Image.fromarray(ramp).convert("RGB")  # what the pipeline's CLIP image processor is given at inference
    expected = tiny_pipe.prepare_ip_adapter_image_embeds(grey, None, "cpu", 1)[0]  # [1, 1, E]
    torch.testing.assert_close(cache.samples[0].ip_embeds, expected, rtol=0, atol=0,
                               msg=lambda m: f"{bits} depth: the cache must encode what sample_edit encodes: {m}")
    none = kh.build_train_cache(tiny_pipe, data, max_sequence_length=16, use_depth=False, progress=False)
    assert none.samples[0].ip_embeds is None and none.samples[0].depth_feat is None, "use_depth=False caches no depth"
    tokens = kh.build_train_cache(tiny_pipe, data, max_sequence_length=16, depth_kind="tokens", progress=False)
    h_tok, w_tok = tokens.h_tok, tokens.w_tok
    by_hand = (torch.from_numpy(ramp).float() / 255 * 2 - 1).reshape(h_tok, 16, w_tok, 16)  # [H, W] -> [H', 16, W', 16]
    by_hand = by_hand.permute(0, 2, 1, 3).reshape(1, h_tok * w_tok, 256)  # -> [1, N, 256]: each token's own pixels
    torch.testing.assert_close(tokens.samples[0].depth_feat, by_hand, rtol=0, atol=1e-6,
                               msg=lambda m: f"{bits} depth: the cached features are each token's 16x16 pixels: {m}")


# --------------------------------------------------------------------------------------------------
# sharper unit checks: values only the right convention gives
# --------------------------------------------------------------------------------------------------


def test_region_token_and_area_grid_average_a_mask_that_is_not_block_aligned():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 4:12, 4:20] = 1.0  # 8x16 px: half of token (0, 0)'s rows, across tokens (0, 0) and (0, 1)
    area = kh.mask_to_token_grid(mask, 2, 2, mode="area")
    expected = torch.tensor([[[[8 * 12 / 256, 8 * 4 / 256], [0.0, 0.0]]]])
    torch.testing.assert_close(area, expected, msg="mode='area' is each token's editable fraction")
    region = _random_region("linear", 2, 2, 8)
    fine = torch.zeros(1, 1, 4, 4)
    fine[..., 0, 0] = 1.0  # one of the four fine cells of coarse cell (0, 0)
    by_hand = torch.tensor([[0.25, 0.0, 0.0, 0.0]]) @ region.proj.weight.T + region.proj.bias  # the average, 1/4
    torch.testing.assert_close(region(fine)[:, 0], by_hand, msg="a finer grid is area-averaged (1/4), not max-pooled")


def test_region_hook_serves_two_pipeline_calls_each_equal_to_sample_edit(tiny_pipe, random_image, random_depth,
                                                                          quadrant_mask, edit_prompt, fast):
    h = w = 48
    mask, depth = quadrant_mask(h, w), random_depth(h, w)
    region = _random_region("marked", h // 16, w // 16, tiny_pipe.transformer.config.in_channels)
    calls = [(random_image(h, w, 1), 3), (random_image(h, w, 2), 8)]  # other images, other seeds
    expected = [kh.sample_edit(tiny_pipe, image, edit_prompt, mask=mask, region=region, depth=depth, blend=True,
                               generator=torch.Generator().manual_seed(seed), output_type="latent", **fast)
                for image, seed in calls]
    with kh.RegionHook(tiny_pipe, region, mask, blend=True) as hook:
        for (image, seed), ours in zip(calls, expected):
            theirs = tiny_pipe(image=image, prompt=edit_prompt, ip_adapter_image=depth, height=h, width=w,
                               max_area=h * w, _auto_resize=False, generator=torch.Generator().manual_seed(seed),
                               output_type="latent", callback_on_step_end=hook.callback, **fast).images
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5, msg=lambda m, s=seed: (
                f"call with seed {s}: one hook over several pipe(...) calls must start each from its own "
                f"context and noise: {m}"))


def test_gradient_checkpointing_recomputes_the_blocks(one_pair, train_config, tmp_path):
    calls = {}
    for flag in (False, True):
        pipe = kh.load_pipeline("tiny", seed=0)
        block = pipe.transformer.transformer_blocks[0]
        counter = []
        block.register_forward_pre_hook(lambda *_, c=counter: c.append(1))  # recomputation may stop early
        kh.train(pipe, one_pair(), train_config(tmp_path / str(flag), steps=1, gradient_checkpointing=flag),
                 progress=False)
        assert pipe.transformer.is_gradient_checkpointing == flag, f"gradient_checkpointing={flag} must be set"
        calls[flag] = len(counter)
    assert calls == {False: 1, True: 2}, f"one update runs block 0 once, twice when checkpointed: {calls}"


def test_mask_threshold_decides_which_grey_pixels_are_editable(make_pairs, tmp_path):
    root = make_pairs(tmp_path, stems=("a",), size=32)
    grey = np.zeros((32, 32), np.uint8)
    grey[:16] = 100  # 39% grey in the top half
    Image.fromarray(grey).save(root / "masks" / "a.png")
    low = kh.KontextPairs(root, resolution=32, mask_threshold=0.3)[0]["mask"]
    high = kh.KontextPairs(root, resolution=32, mask_threshold=0.5)[0]["mask"]
    assert low[0, :16].min() == 1 and low[0, 16:].max() == 0, "threshold 0.3: the 39% grey half is editable"
    assert high.max() == 0, "threshold 0.5: the 39% grey half is kept"


def test_training_draws_every_sample_once_per_epoch(fresh_pipe, one_pair, train_config, tmp_path):
    data = one_pair(count=3)
    cache = kh.build_train_cache(fresh_pipe, data, max_sequence_length=32, progress=False)
    drawn, batch = [], cache.batch

    def recorded(indices, device=None):
        drawn.extend(indices)
        return batch(indices, device=device)

    cache.batch = recorded
    kh.train(fresh_pipe, data, train_config(tmp_path, steps=6), cache=cache, progress=False)
    assert sorted(drawn[:3]) == [0, 1, 2] and sorted(drawn[3:]) == [0, 1, 2], f"each epoch a permutation: {drawn}"
    assert drawn[:3] != drawn[3:], f"each epoch its own permutation: {drawn}"


def test_visiting_encoders_go_back_where_they_were():
    from kontext_helpers.models import modules_visiting

    encoder, moves = torch.nn.Linear(2, 2), []
    encoder.to = lambda *args, **kwargs: moves.append(torch.device(args[0]).type) or encoder  # recorded, not moved
    with modules_visiting(torch.device("cuda"), [encoder]):
        assert moves == ["cuda"], f"the encoder visits the device for the block: {moves}"
    assert moves == ["cuda", "cpu"], f"then it goes back to the CPU it came from: {moves}"
