"""Conditioning: the region token, the mask on the token grid, the forward call and the loss, one training step."""

import pytest
import torch
from PIL import Image
from torch import nn

import kontext_helpers as kh

H_TOK, W_TOK, C = 2, 3, 4
N = H_TOK * W_TOK


@pytest.fixture(scope="module")
def loss_tensors():
    """``loss_tensors(seed=0, b=2)``: prediction, target, context and noise, each ``[B, N, C]`` on a 2x3 grid."""

    def make(seed=0, b=2):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(b, N, C, generator=g) for _ in range(4)]

    return make


@pytest.fixture()
def token_mask():
    """A ``[2, 1, 2, 3]`` token-grid mask: tokens 0 and 1 (the top row's first two cells) are inside."""
    m = torch.zeros(2, 1, H_TOK, W_TOK)
    m[:, :, 0, :2] = 1
    return m


@pytest.fixture(scope="module")
def edit_batch():
    """``edit_batch(size=64, b=2)``: context, target (top-left quadrant turned red), its mask and grey depth maps."""

    def make(size=64, b=2):
        g = torch.Generator().manual_seed(0)
        ctx = torch.rand(b, 3, size, size, generator=g)
        tgt = ctx.clone()
        tgt[:, 0, : size // 2, : size // 2] = 1.0  # edit: top-left quadrant turns red
        mask = torch.zeros(b, 1, size, size)
        mask[:, :, : size // 2, : size // 2] = 1
        depth = [Image.new("RGB", (size, size), (v, v, v)) for v in (60, 180)][:b]
        return ctx, tgt, mask, depth

    return make


# --------------------------------------------------------------------------------------------------
# the mask on the token grid and the region token
# --------------------------------------------------------------------------------------------------


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


def _randomised(module, seed=0):
    """The module with every parameter drawn at random (a marked context starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


def test_make_region_module_builds_every_kind_and_refuses_others():
    for kind, cls in kh.REGION_KINDS.items():
        module = kh.make_region_module(kind, 4, 4, 64)
        assert isinstance(module, cls) and module.kind == kind, f"{kind!r} must build a {cls.__name__}"
    assert kh.DEFAULT_REGION_KIND in kh.REGION_KINDS, "the default must be one of the kinds"
    with pytest.raises(ValueError, match="marked_context"):
        kh.make_region_module("gaussian", 4, 4, 64)


def test_marked_context_adds_the_embedding_on_masked_context_tokens_only():
    module = _randomised(kh.MaskedContextEmbedding(4, 4, 8))
    ctx = torch.randn(2, 16, 8)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, 1, 2] = 1.0  # token 1 * 4 + 2 = 6 of sample 0
    mask[1, 0, 3, 0] = 0.5  # token 12 of sample 1, half
    out, ids = kh.apply_region(module, ctx, mask, 4, 4)
    assert ids is None and out.shape == ctx.shape, "a marked context appends no tokens"
    expected = ctx.clone()
    expected[0, 6] += module.embedding.detach()
    expected[1, 12] += 0.5 * module.embedding.detach()
    torch.testing.assert_close(out.detach(), expected, msg="m * e is added to the masked tokens, in packing order")
    fresh = kh.MaskedContextEmbedding(4, 4, 8)
    torch.testing.assert_close(kh.apply_region(fresh, ctx, mask, 4, 4)[0], ctx,
                               msg="an untrained marked context leaves the context as it is")
    other_grid, _ = kh.apply_region(module, torch.randn(1, 60, 8), torch.ones(1, 1, 6, 10), 6, 10)
    assert other_grid.shape == (1, 60, 8), "a marked context works on any grid"


def test_marked_kind_marks_the_target_tokens_with_the_same_offset():
    module = _randomised(kh.MaskedTokenEmbedding(4, 4, 8))
    ctx, mask = torch.randn(1, 16, 8), (torch.rand(1, 1, 4, 4) > 0.5).float()
    parts = kh.region_inputs(module, ctx, mask, 4, 4)
    assert isinstance(parts, kh.RegionInputs), "region_inputs returns a RegionInputs (context, ids, target_offset)"
    offset = mask.flatten(2).transpose(1, 2) * module.embedding.detach()  # [1, 1, 4, 4] -> [1, 16, 1] -> [1, 16, 8]
    torch.testing.assert_close(parts.target_offset.detach(), offset, msg="the noisy target gets m * e")
    torch.testing.assert_close(parts.context.detach(), ctx + offset, msg="and so does the context")
    assert parts.ids is None, "nothing is appended"
    for kind in ("marked_context", "cells", "linear"):
        assert kh.region_inputs(_randomised(kh.make_region_module(kind, 4, 4, 8)), ctx, mask, 4, 4).target_offset \
            is None, f"{kind!r} leaves the target tokens alone"


def test_cell_tokens_sit_at_their_cells_centres():
    module = _randomised(kh.RegionCellTokens(4, 4, 8))
    mask = torch.zeros(1, 1, 4, 6)
    mask[..., :2, 4:] = 1.0  # the top-right 2x2 cell
    out, ids = kh.apply_region(module, torch.zeros(1, 24, 8), mask, 4, 6)
    assert out.shape == (1, 24 + 6, 8) and ids.shape == (6, 3), "one token per 2x2 cell: 2 x 3 cells"
    torch.testing.assert_close(ids[2], torch.tensor([kh.REGION_ID, 0.5, 4.5]),
                               msg="cell (0, 2) covers rows 0-1 and columns 4-5")
    torch.testing.assert_close(out[0, 24 + 2].detach(), module.on.detach(), msg="a fully masked cell carries e_on")
    torch.testing.assert_close(out[0, 24 + 0].detach(), module.off.detach(), msg="an unmasked cell carries e_off")


def test_linear_kind_is_the_original_single_token_with_id_2_0_0():
    module = _randomised(kh.MaskRegionToken(4, 4, 8))
    mask = torch.rand(1, 1, 4, 4)
    out, ids = kh.apply_region(module, torch.zeros(1, 16, 8), mask, 4, 4)
    torch.testing.assert_close(out[:, 16:].detach(), module(mask).detach(), msg="the appended token is module(mask)")
    torch.testing.assert_close(ids, kh.region_token_id(), msg="its id is (2, 0, 0)")


def test_region_token_pools_with_area_average():
    module = kh.MaskRegionToken(2, 2, 8)
    fine = torch.zeros(1, 1, 4, 4)
    fine[..., :2, :2] = 1
    coarse = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(module(fine), module(coarse), msg="4x4 mask must pool onto the 2x2 grid")


# --------------------------------------------------------------------------------------------------
# fm_masked_dual_loss_with_l2 against hand computations
# --------------------------------------------------------------------------------------------------


def test_inside_and_outside_terms_match_hand_computation(loss_tensors, token_mask):
    pred, tgt, ctx, noise = loss_tensors()
    loss, parts = kh.fm_masked_dual_loss_with_l2(pred, tgt, ctx, noise, token_mask, H_TOK, W_TOK, w_in=2.0,
                                                 w_out=0.5, l2_region_lambda=0.0, l2_lora_lambda=0.0,
                                                 return_parts=True)
    inside = torch.zeros(N, dtype=torch.bool)
    inside[:2] = True
    hand_in = ((pred - (noise - tgt))[:, inside] ** 2).mean()
    hand_out = (((noise - pred) - ctx)[:, ~inside] ** 2).mean()
    torch.testing.assert_close(torch.tensor(parts["loss_in"]), hand_in, msg="in-mask term")
    torch.testing.assert_close(torch.tensor(parts["loss_out"]), hand_out, msg="out-of-mask term")
    torch.testing.assert_close(loss, 2.0 * hand_in + 0.5 * hand_out, rtol=1e-5, atol=1e-6, msg="weighted total")


def test_outside_term_equals_velocity_mse_against_noise_minus_context(loss_tensors):
    pred, tgt, ctx, noise = loss_tensors(seed=1)
    zeros = torch.zeros(2, 1, H_TOK, W_TOK)  # everything outside
    loss = kh.fm_masked_dual_loss_with_l2(pred, tgt, ctx, noise, zeros, H_TOK, W_TOK,
                                          l2_region_lambda=0.0, l2_lora_lambda=0.0)
    velocity_mse = ((pred - (noise - ctx)) ** 2).mean()
    torch.testing.assert_close(loss, velocity_mse, rtol=1e-5, atol=1e-6,
                               msg="identity on x_pred = e - v must equal velocity MSE against e - ctx")


def test_all_zero_and_all_one_masks_are_finite(loss_tensors):
    pred, tgt, ctx, noise = loss_tensors(seed=2)
    for value in (0.0, 1.0):
        mask = torch.full((2, 1, H_TOK, W_TOK), value)
        loss, parts = kh.fm_masked_dual_loss_with_l2(pred, tgt, ctx, noise, mask, H_TOK, W_TOK, return_parts=True)
        assert torch.isfinite(loss), f"loss must be finite for an all-{value:g} mask"
        empty = "loss_out" if value == 1.0 else "loss_in"
        assert parts[empty] == 0.0, f"{empty} must be 0 when its region is empty (mask all {value:g})"


def test_all_one_mask_is_plain_flow_matching(loss_tensors):
    pred, tgt, ctx, noise = loss_tensors(seed=3)
    ones = torch.ones(2, 1, H_TOK, W_TOK)
    loss = kh.fm_masked_dual_loss_with_l2(pred, tgt, ctx, noise, ones, H_TOK, W_TOK,
                                          l2_region_lambda=0.0, l2_lora_lambda=0.0)
    torch.testing.assert_close(loss, ((pred - (noise - tgt)) ** 2).mean(), rtol=1e-5, atol=1e-6,
                               msg="an all-one mask is the usual flow-matching MSE")


def test_l2_terms_are_mean_squares_times_lambda(loss_tensors, token_mask):
    pred, tgt, ctx, noise = loss_tensors(seed=4)
    region = nn.Linear(3, 2)
    lora_a = nn.Parameter(torch.full((2, 2), 0.5))
    lora_b = nn.Parameter(torch.zeros(2, 2))
    base = kh.fm_masked_dual_loss_with_l2(pred, tgt, ctx, noise, token_mask, H_TOK, W_TOK,
                                          l2_region_lambda=0.0, l2_lora_lambda=0.0)
    loss, parts = kh.fm_masked_dual_loss_with_l2(
        pred, tgt, ctx, noise, token_mask, H_TOK, W_TOK, l2_region_lambda=0.1, l2_lora_lambda=0.01,
        region_token_module=region, lora_named_params=[("lora_A", lora_a), ("lora_B", lora_b)], return_parts=True)
    region_sq = (region.weight.pow(2).sum() + region.bias.pow(2).sum()) / 8  # 6 weights + 2 biases
    torch.testing.assert_close(torch.tensor(parts["l2_region"]), region_sq.detach(),
                               msg="region L2 is the mean square of its parameters")
    torch.testing.assert_close(torch.tensor(parts["l2_lora"]), torch.tensor(0.125), msg="(4 * 0.5^2 + 4 * 0) / 8")
    torch.testing.assert_close(loss, base + 0.1 * region_sq + 0.01 * 0.125, msg="lambdas scale the L2 terms")
    loss.backward()
    torch.testing.assert_close(lora_a.grad, torch.full((2, 2), 0.01 * 2 * 0.5 / 8),
                               msg="d/dp lambda mean(p^2) = 2 lambda p / numel")


@pytest.mark.parametrize("form", kh.L2_FORMS)
def test_each_l2_form_gives_its_gradient(loss_tensors, token_mask, form):
    """Per weight: 2 lambda p for the sum (the original design), 2 lambda p / n for the mean square, nothing in the
    loss for "decoupled" (AdamW's weight decay acts instead: tests/test_training.py)."""
    pred, tgt, ctx, noise = loss_tensors(seed=6)
    pred.requires_grad_()  # the loss has a graph even when no L2 term enters it ("decoupled")
    lora_a = nn.Parameter(torch.linspace(-0.3, 0.5, 6).reshape(2, 3))
    lora_b = nn.Parameter(torch.linspace(0.1, 0.2, 4).reshape(2, 2))
    region = nn.Linear(3, 2)
    lam, lam_region, n = 0.01, 0.1, 10  # n: the LoRA's 6 + 4 weights
    loss, parts = kh.fm_masked_dual_loss_with_l2(
        pred, tgt, ctx, noise, token_mask, H_TOK, W_TOK, l2_region_lambda=lam_region, l2_lora_lambda=lam,
        region_token_module=region, lora_named_params=[("lora_A", lora_a), ("lora_B", lora_b)], return_parts=True,
        l2_form=form)
    loss.backward()
    grad = lambda p: torch.zeros_like(p) if p.grad is None else p.grad  # noqa: E731  (None: no term in the loss)
    factor = {"mean_square": 2 * lam / n, "sum": 2 * lam, "decoupled": 0.0}[form]
    for name, p in (("lora_A", lora_a), ("lora_B", lora_b)):
        torch.testing.assert_close(grad(p), factor * p.detach(), msg=f"{form}: gradient of {name}")
    region_factor = {"mean_square": 2 * lam_region / 8, "sum": 2 * lam_region, "decoupled": 0.0}[form]
    torch.testing.assert_close(grad(region.weight), region_factor * region.weight.detach(),
                               msg=f"{form}: gradient of the region module's weight (8 parameters)")
    mean_sq = (lora_a.detach().pow(2).sum() + lora_b.detach().pow(2).sum()) / n
    torch.testing.assert_close(torch.tensor(parts["l2_lora"]), mean_sq,
                               msg=f"{form}: the logged l2_lora is the mean square in every form")


def test_an_unknown_l2_form_is_refused(loss_tensors, token_mask):
    pred, tgt, ctx, noise = loss_tensors(seed=7)
    with pytest.raises(ValueError, match="l2_form='l1'.*mean_square"):
        kh.fm_masked_dual_loss_with_l2(pred, tgt, ctx, noise, token_mask, H_TOK, W_TOK, l2_form="l1")


def test_lora_l2_does_not_grow_with_the_number_of_lora_weights(loss_tensors, token_mask):
    """The design's sum grew with the model (about 51,000 at rank 16 on the real model); the mean must not."""
    pred, tgt, ctx, noise = loss_tensors(seed=5)
    layer = [("lora_A", nn.Parameter(torch.linspace(-0.1, 0.1, 48).reshape(3, 16)))]
    terms = [kh.fm_masked_dual_loss_with_l2(pred, tgt, ctx, noise, token_mask, H_TOK, W_TOK,
                                            lora_named_params=layer * copies, return_parts=True)[1]["l2_lora"]
             for copies in (1, 57)]  # one layer, and as many layers as FLUX.1 has blocks
    assert terms[0] == pytest.approx(terms[1]), f"the LoRA L2 must not depend on the number of layers: {terms}"


def test_mask_order_follows_packing_order():
    # a mask on the token grid must select the tokens pack_like_pipeline puts at those grid cells
    lat = torch.randn(1, 1, 2 * H_TOK, 2 * W_TOK)
    tok, _ = kh.pack_like_pipeline(lat)
    mask = torch.zeros(1, 1, H_TOK, W_TOK)
    mask[0, 0, 1, 2] = 1  # bottom-right cell
    zeros = torch.zeros_like(tok)
    _, parts = kh.fm_masked_dual_loss_with_l2(zeros, -tok, zeros, zeros, mask, H_TOK, W_TOK, return_parts=True)
    cell = lat[0, 0, 2:4, 4:6]
    torch.testing.assert_close(torch.tensor(parts["loss_in"]), (cell**2).mean(),
                               msg="in-mask term must read cell (1,2)")


# --------------------------------------------------------------------------------------------------
# kontext_forward on [target | context | region] with IP-Adapter depth embeddings and a PEFT LoRA
# --------------------------------------------------------------------------------------------------


def test_training_step_reaches_only_lora_and_region(fresh_pipe, edit_batch):
    pipe = fresh_pipe  # this test adds a LoRA
    ctx, tgt, mask, depth = edit_batch()
    with torch.no_grad():
        ctx_tok, (h_tok, w_tok) = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(ctx), pipe.vae))
        tgt_tok, _ = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(tgt), pipe.vae))
    prompt_embeds, pooled, txt_ids = kh.encode_prompts(pipe, ["make it red"] * 2, max_sequence_length=32)
    ip_embeds = kh.encode_depth_for_ip_adapter(pipe, depth)
    for name, t in {"prompt": prompt_embeds, "pooled": pooled, "ip": ip_embeds[0], "ctx": ctx_tok}.items():
        assert not t.requires_grad and t.grad_fn is None, f"frozen encoder output '{name}' must carry no graph"
    assert ip_embeds[0].shape[:2] == (2, 1), "IP embeddings must be [B, 1, E]"

    lora = kh.add_lora(pipe.transformer, rank=4, targets="attn")
    region = kh.MaskRegionToken(h_tok, w_tok, pipe.transformer.config.in_channels)
    base_before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters() if "lora_" not in n}

    m_small = kh.mask_to_token_grid(mask, h_tok, w_tok)
    noise = torch.randn_like(tgt_tok)
    sigma = torch.tensor([0.3, 0.7])
    noisy = (1 - sigma[:, None, None]) * tgt_tok + sigma[:, None, None] * noise
    pred = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(m_small), sigma=sigma,
                              prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, txt_ids=txt_ids,
                              h_tok=h_tok, w_tok=w_tok, guidance=1.0, ip_adapter_image_embeds=ip_embeds)
    assert pred.shape == tgt_tok.shape, "prediction must cover exactly the target tokens"
    loss = kh.fm_masked_dual_loss_with_l2(pred, tgt_tok, ctx_tok, noise, m_small, h_tok, w_tok,
                                          region_token_module=region, lora_named_params=lora)
    loss.backward()
    # a second step through the same cached embeddings must also work (no graph kept through encoders)
    pred2 = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(m_small), sigma=sigma,
                               prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, txt_ids=txt_ids,
                               h_tok=h_tok, w_tok=w_tok, ip_adapter_image_embeds=ip_embeds)
    kh.fm_masked_dual_loss_with_l2(pred2, tgt_tok, ctx_tok, noise, m_small, h_tok, w_tok).backward()

    assert lora, "the LoRA must have trainable parameters"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora if "lora_B" in _), (
        "every lora_B must receive a gradient")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in region.parameters()), "region must get grads"
    for n, p in pipe.transformer.named_parameters():
        if "lora_" not in n:
            assert p.grad is None, f"base parameter {n} must not receive a gradient"
            torch.testing.assert_close(p.detach(), base_before[n], rtol=0, atol=0, msg=f"base parameter {n} changed")
    for name in ("text_encoder", "text_encoder_2", "vae", "image_encoder"):
        assert all(p.grad is None for p in getattr(pipe, name).parameters()), f"{name} must stay untouched"


def test_region_token_changes_the_prediction(fresh_pipe, edit_batch):
    pipe = fresh_pipe
    ctx, tgt, mask, depth = edit_batch(b=1)
    with torch.no_grad():
        ctx_tok, (h_tok, w_tok) = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(ctx), pipe.vae))
        pe, pooled, txt_ids = kh.encode_prompts(pipe, "make it red", max_sequence_length=32)
        noisy = torch.randn_like(ctx_tok)
        kw = dict(sigma=torch.tensor([0.5]), prompt_embeds=pe, pooled_prompt_embeds=pooled, txt_ids=txt_ids,
                  h_tok=h_tok, w_tok=w_tok, ip_adapter_image_embeds=kh.encode_depth_for_ip_adapter(pipe, depth))
        c = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, None, **kw)
        m_small = kh.mask_to_token_grid(mask, h_tok, w_tok)
        for kind in kh.REGION_KINDS:
            region = _randomised(kh.make_region_module(kind, h_tok, w_tok, 64))
            outs = []
            for m in (m_small, torch.zeros_like(m_small)):
                cond, ids = kh.apply_region(region, ctx_tok, m, h_tok, w_tok)
                extra = cond[:, ctx_tok.shape[1]:] if ids is not None else None
                outs.append(kh.kontext_forward(pipe.transformer, noisy, cond[:, :ctx_tok.shape[1]], extra,
                                               region_ids=ids, **kw))
            assert not torch.allclose(*outs), f"{kind}: a different mask must change the prediction"
            assert outs[0].shape == c.shape, f"{kind}: the region signal must not change the output length"


def test_forward_without_depth_equals_zero_ip_scale(fresh_pipe, edit_batch):
    pipe = fresh_pipe  # this test changes the IP-Adapter scale
    ctx, _, _, depth = edit_batch(b=1)
    with torch.no_grad():
        ctx_tok, (h_tok, w_tok) = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(ctx), pipe.vae))
        pe, pooled, txt_ids = kh.encode_prompts(pipe, "make it red", max_sequence_length=32)
        kw = dict(sigma=torch.tensor([0.5]), prompt_embeds=pe, pooled_prompt_embeds=pooled, txt_ids=txt_ids,
                  h_tok=h_tok, w_tok=w_tok)
        none = kh.kontext_forward(pipe.transformer, ctx_tok, ctx_tok, None, **kw)
        pipe.set_ip_adapter_scale(0.0)
        zero = kh.kontext_forward(pipe.transformer, ctx_tok, ctx_tok, None,
                                  ip_adapter_image_embeds=kh.encode_depth_for_ip_adapter(pipe, depth), **kw)
        pipe.set_ip_adapter_scale(1.0)
    torch.testing.assert_close(none, zero, msg="no depth must equal an IP-Adapter at scale 0")


def test_ip_adapter_branch_ignores_token_positions(tiny_pipe):
    """notebooks 03 and 05: FluxIPAdapterAttnProcessor takes its queries before RoPE, so the depth tokens' output
    at an image token depends on that token's features alone, never on its position id."""
    block = tiny_pipe.transformer.transformer_blocks[0]
    width, n_img, n_txt = block.attn.to_q.in_features, 16, 4
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(1, n_img, width, generator=g), torch.randn(1, n_txt, width, generator=g)
    ip_width = block.attn.processor.to_k_ip[0].in_features
    ip_tokens = [torch.randn(1, 4, ip_width, generator=g)]  # what encoder_hid_proj makes of one image embedding

    def run(rows):
        img_ids = torch.stack([torch.zeros(n_img), rows, torch.arange(n_img) % 4.0], dim=1)  # [N, 3]
        ids = torch.cat([torch.zeros(n_txt, 3), img_ids])  # [T + N, 3]
        with torch.no_grad():
            return block.attn.processor(block.attn, hidden, text, image_rotary_emb=tiny_pipe.transformer.pos_embed(ids),
                                        ip_hidden_states=ip_tokens)

    near, far = run(torch.arange(n_img) // 4.0), run(torch.arange(n_img) // 4.0 + 40)
    assert not torch.allclose(near[0], far[0]), "the image attention must depend on the position ids (RoPE)"
    torch.testing.assert_close(near[2], far[2], msg="the IP-Adapter branch must not depend on the position ids")
