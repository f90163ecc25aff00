"""fm_masked_dual_loss_with_l2 against hand computations."""

import torch
from torch import nn

import kontext_helpers as kh

H_TOK, W_TOK, C = 2, 3, 4
N = H_TOK * W_TOK


def _tensors(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, N, C, generator=g) for _ in range(4)]


def _mask(b=2):
    m = torch.zeros(b, 1, H_TOK, W_TOK)
    m[:, :, 0, :2] = 1  # tokens 0 and 1 are inside
    return m


def test_inside_and_outside_terms_match_hand_computation():
    pred, tgt, ctx, noise = _tensors()
    mask = _mask()
    loss, parts = kh.fm_masked_dual_loss_with_l2(pred, tgt, ctx, noise, mask, H_TOK, W_TOK, w_in=2.0, w_out=0.5,
                                                 l2_region_lambda=0.0, l2_lora_lambda=0.0, return_parts=True)
    inside = torch.zeros(N, dtype=torch.bool)
    inside[:2] = True
    hand_in = ((pred - (noise - tgt))[:, inside] ** 2).mean()
    hand_out = (((noise - pred) - ctx)[:, ~inside] ** 2).mean()
    torch.testing.assert_close(torch.tensor(parts["loss_in"]), hand_in, msg="in-mask term")
    torch.testing.assert_close(torch.tensor(parts["loss_out"]), hand_out, msg="out-of-mask term")
    torch.testing.assert_close(loss, 2.0 * hand_in + 0.5 * hand_out, rtol=1e-5, atol=1e-6, msg="weighted total")


def test_outside_term_equals_velocity_mse_against_noise_minus_context():
    pred, tgt, ctx, noise = _tensors(seed=1)
    zeros = torch.zeros(2, 1, H_TOK, W_TOK)  # everything outside
    loss = kh.fm_masked_dual_loss_with_l2(pred, tgt, ctx, noise, zeros, H_TOK, W_TOK,
                                          l2_region_lambda=0.0, l2_lora_lambda=0.0)
    velocity_mse = ((pred - (noise - ctx)) ** 2).mean()
    torch.testing.assert_close(loss, velocity_mse, rtol=1e-5, atol=1e-6,
                               msg="identity on x_pred = e - v must equal velocity MSE against e - ctx")


def test_all_zero_and_all_one_masks_are_finite():
    pred, tgt, ctx, noise = _tensors(seed=2)
    for value in (0.0, 1.0):
        mask = torch.full((2, 1, H_TOK, W_TOK), value)
        loss, parts = kh.fm_masked_dual_loss_with_l2(pred, tgt, ctx, noise, mask, H_TOK, W_TOK, return_parts=True)
        assert torch.isfinite(loss), f"loss must be finite for an all-{value:g} mask"
        empty = "loss_out" if value == 1.0 else "loss_in"
        assert parts[empty] == 0.0, f"{empty} must be 0 when its region is empty (mask all {value:g})"


def test_all_one_mask_is_plain_flow_matching():
    pred, tgt, ctx, noise = _tensors(seed=3)
    ones = torch.ones(2, 1, H_TOK, W_TOK)
    loss = kh.fm_masked_dual_loss_with_l2(pred, tgt, ctx, noise, ones, H_TOK, W_TOK,
                                          l2_region_lambda=0.0, l2_lora_lambda=0.0)
    torch.testing.assert_close(loss, ((pred - (noise - tgt)) ** 2).mean(), rtol=1e-5, atol=1e-6,
                               msg="an all-one mask is the usual flow-matching MSE")


def test_l2_terms_are_sums_of_squares_times_lambda():
    pred, tgt, ctx, noise = _tensors(seed=4)
    mask = _mask()
    region = nn.Linear(3, 2)
    lora_a = nn.Parameter(torch.full((2, 2), 0.5))
    base = kh.fm_masked_dual_loss_with_l2(pred, tgt, ctx, noise, mask, H_TOK, W_TOK,
                                          l2_region_lambda=0.0, l2_lora_lambda=0.0)
    loss, parts = kh.fm_masked_dual_loss_with_l2(
        pred, tgt, ctx, noise, mask, H_TOK, W_TOK, l2_region_lambda=0.1, l2_lora_lambda=0.01,
        region_token_module=region, lora_named_params=[("lora_A", lora_a)], return_parts=True)
    region_sq = region.weight.pow(2).sum() + region.bias.pow(2).sum()
    torch.testing.assert_close(torch.tensor(parts["l2_region"]), region_sq.detach(),
                               msg="region L2 is a sum of squares")
    torch.testing.assert_close(torch.tensor(parts["l2_lora"]), torch.tensor(1.0), msg="4 * 0.5^2 = 1")
    torch.testing.assert_close(loss, base + 0.1 * region_sq + 0.01 * 1.0, msg="lambdas scale the L2 terms")
    loss.backward()
    torch.testing.assert_close(lora_a.grad, torch.full((2, 2), 0.01 * 2 * 0.5), msg="d/dp lambda p^2 = 2 lambda p")


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
