"""Figures: slider figures, pair grids, the live loss plot, preview grids and edit metrics."""

import io
import math

import pytest
import torch
from PIL import Image

import kontext_helpers as kh


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


def test_show_pairs_returns_a_figure_with_four_panels_per_pair(pair_folder):
    ds = kh.KontextPairs(pair_folder, resolution=32)
    fig = kh.show_pairs(ds, [0, 2])
    assert len(fig.axes) == 8, f"two pairs x four panels, got {len(fig.axes)} axes"
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert "red = editable" in titles[2] and "near" in titles[3], f"panel titles: {titles}"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    assert buf.getvalue()[:4] == b"\x89PNG", "the figure must render headless"
    assert len(kh.show_pairs(ds).axes) == 12, "by default the first (up to four) pairs are shown"


def test_live_loss_plot_collects_and_draws():
    plot = kh.LiveLossPlot(every=1000)
    for step in range(1, 6):
        plot({"step": step, "loss": 1.0 / step, "loss_in": 0.5 / step, "loss_out": 0.5 / step})
    plot({"step": 5, "preview": "x.png"})  # preview records are not loss records
    fig = plot.figure()
    assert len(plot.records) == 5, "only loss records are collected"
    assert len(fig.axes[0].lines) == 3, "total, in-mask and out-of-mask curves"


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


def test_preview_grid_is_one_headless_figure_with_six_panels(random_image, random_depth, quadrant_mask, edit_prompt):
    from matplotlib.figure import Figure

    ctx, tgt = random_image(32, 48, 0), random_image(32, 48, 1)
    fig = kh.preview_grid(ctx, quadrant_mask(32, 48), random_depth(32, 48), tgt, tgt, prompt=edit_prompt,
                          label="tiny model, 48 px")
    assert isinstance(fig, Figure), "preview_grid must return a matplotlib Figure"
    assert fig.get_suptitle().endswith("(tiny model, 48 px)"), f"the label ends the title: {fig.get_suptitle()!r}"
    titles = [ax.get_title() for ax in fig.axes]
    for word in ("context", "mask", "depth", "target", "prediction", "|prediction - context|"):
        assert any(word in t for t in titles), f"a panel title must mention {word!r}: {titles}"
    assert "inf" in fig.get_suptitle(), "the title must carry the metrics (a perfect prediction: inf dB inside)"
    fig.savefig(io.BytesIO(), format="png")  # renders without a display
    bare = kh.preview_grid(ctx, quadrant_mask(32, 48), None, None, ctx)
    assert any("no depth" in ax.get_title() for ax in bare.axes), "a missing depth map must be said"


def test_packing_figure_draws_the_grid_and_both_labellings():
    patch_id = torch.arange(4).reshape(2, 2).repeat_interleave(2, 0).repeat_interleave(2, 1).float()  # [4, 4]
    packed_patch, _ = kh.pack_like_pipeline(patch_id.expand(1, 2, 4, 4))  # [1, 4, 8]
    packed_feature, _ = kh.pack_like_pipeline(torch.rand(1, 2, 4, 4))  # [1, 4, 8]
    fig = kh.packing_figure(patch_id, packed_patch, packed_feature)
    assert len(fig.axes) == 3, f"grid, patch-labelled and feature-labelled panels, got {len(fig.axes)}"
    assert "latent grid 4x4 (x C = 2 channels)" in fig.axes[0].get_title(), fig.axes[0].get_title()


def test_denoising_figure_has_one_frame_per_step_and_the_distance_curve():
    frames = [torch.rand(8, 8, 3).numpy() for _ in range(3)]
    fig = kh.denoising_figure(frames, ["a", "b", "c"], [1, 2, 3], [1.0, 0.5, 0.0])
    assert len(fig.axes) == 4, f"3 frames and 1 curve, got {len(fig.axes)}"
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "b", "c"], "each frame titled by its label"


def test_depth_precision_figure_counts_the_levels_of_both_precisions():
    ramp16 = (torch.linspace(0, 1, 64)[None, :].expand(64, 64) * 65535).round().numpy()  # [H, W], 64 levels
    fig = kh.depth_precision_figure(ramp16, (ramp16 / 257).round(), (16, 16, 32))
    titles = [ax.get_title() for ax in fig.axes]
    assert "16-bit zoom: 32 levels" in titles, f"the zoom keeps every 16-bit level: {titles}"
    assert len(fig.axes) == 7, f"six panels and a colour bar, got {len(fig.axes)}"


def test_show_token_grid_stretches_the_grid_over_the_pixel_frame():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    im = kh.show_token_grid(ax, torch.eye(4).numpy(), "grid", size=64)
    assert im.get_extent() == [-0.5, 63.5, 63.5, -0.5], f"a 4x4 grid over 64 px, got {im.get_extent()}"
    assert len(ax.lines) == 2 * (64 // 16 + 1), f"one horizontal and one vertical line per token edge: {len(ax.lines)}"
    plt.close(fig)
