"""Figures and metrics shared by the notebooks: sliders, the pair grid, loss curves, previews and edit metrics.

Every figure is built with matplotlib's object API (``matplotlib.figure.Figure``), so it works headless;
its title says what to notice.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .images import depth_to_pil, image_to_hwc_array, image_to_rgb_tensor, mask_to_tensor


def interactive_figure(draw, **sliders):
    """Show ``draw(**slider values)`` (a matplotlib Figure) under ipywidgets sliders; redraw it when one moves.

    ``kh.interactive_figure(show_pair, index=IntSlider(0, 0, 9), alpha=FloatSlider(0.5, 0, 1))``. The figure is
    an ordinary display output updated in place (not ``interact``'s output widget), so a headless run (CI,
    ``make demo``) records the picture and never waits on a widget. Returns the display handle.
    """
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image, display
    from ipywidgets import HBox

    def render():
        fig = draw(**{name: slider.value for name, slider in sliders.items()})
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight")
        plt.close(fig)  # shown once, as the PNG below
        return Image(buffer.getvalue())

    display(HBox(list(sliders.values())))
    view = display(render(), display_id=True)  # None outside IPython

    def redraw(_change) -> None:
        image = render()
        if view is not None:
            view.update(image)

    for slider in sliders.values():
        slider.observe(redraw, names="value")
    return view


def show_pairs(dataset, indices=None, *, max_pairs: int = 4, mask_alpha: float = 0.5, cmap: str = "magma"):
    """A figure with one row per pair: context | target | mask over context | depth, the prompt above.

    What to notice: outside the red region the target should equal the context (the title reports the mean
    absolute difference there: the loss asks the model to preserve it); the red region covers the whole
    edit; the depth map is bright where the scene is near.

    Args:
        dataset: a :class:`KontextPairs` (or anything whose items look like one).
        indices: which pairs (default: the first ``max_pairs``).
        mask_alpha: opacity of the red tint.
        cmap: matplotlib colormap of the depth panel.
    Returns:
        a matplotlib ``Figure`` (object API, works headless). In a notebook make it the cell's last
        expression to show it; ``fig.savefig("pairs.png")`` writes it to a file.
    """
    import textwrap

    from matplotlib.figure import Figure

    indices = list(range(min(len(dataset), max_pairs))) if indices is None else list(indices)
    if not indices:
        raise ValueError("show_pairs needs at least one pair (the dataset or indices are empty)")
    fig = Figure(figsize=(12.0, 3.4 * len(indices)), layout="constrained")
    rows = fig.subfigures(len(indices), 1, squeeze=False)[:, 0]
    for row, index in zip(rows, indices):
        item = dataset[index]
        context = item["context"].permute(1, 2, 0).numpy()  # [3, H, W] -> [H, W, 3]
        target = item["target"].permute(1, 2, 0).numpy()  # [3, H, W] -> [H, W, 3]
        mask = item["mask"][0].numpy()  # [H, W] in {0, 1}
        tint = mask_alpha * mask[..., None]
        overlay = context * (1.0 - tint) + tint * [1.0, 0.0, 0.0]
        outside = mask < 0.5
        change = float(abs(target - context)[outside].mean()) if outside.any() else 0.0
        axes = row.subplots(1, 4)
        axes[0].imshow(context)
        axes[0].set_title("context (input)")
        axes[1].imshow(target)
        axes[1].set_title(f"target (edit)\n|target - context| outside mask: {change:.3f}")
        axes[2].imshow(overlay.clip(0.0, 1.0))
        if 0 < mask.sum() < mask.size:
            axes[2].contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        axes[2].set_title(f"mask on context: red = editable\n{100 * mask.mean():.0f}% of pixels")
        axes[3].imshow(item["depth"][0].numpy(), cmap=cmap, vmin=0.0, vmax=1.0)
        axes[3].set_title("depth: bright = near")
        for ax in axes:
            ax.set_axis_off()
        row.suptitle(textwrap.shorten(f"{item['name']}: \"{item['prompt']}\"", width=110), fontsize="large")
    return fig


class LiveLossPlot:
    """A callback for :func:`train` that redraws total, in-mask and out-of-mask loss in a notebook.

    ``train(pipe, data, cfg, callback=LiveLossPlot(every=10))``. Headless it only collects the records;
    ``.figure()`` draws them at any time.
    """

    def __init__(self, every: int = 10, smooth: int = 10):
        self.every, self.smooth, self.records = every, smooth, []

    def __call__(self, record: dict) -> None:
        if "loss" not in record:
            return
        self.records.append(record)
        if len(self.records) % self.every == 0:
            try:
                from IPython import get_ipython
                from IPython.display import clear_output, display
            except ImportError:
                return
            if get_ipython() is None:
                return
            import matplotlib.pyplot as plt

            fig = self.figure()
            clear_output(wait=True)
            display(fig)
            plt.close(fig)

    def figure(self):
        """The loss curves so far: total, in-mask (learning the edit), out-of-mask (keeping the rest)."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        steps = [r["step"] for r in self.records]
        for key, label in (("loss", "total"), ("loss_in", "in-mask (edit)"), ("loss_out", "out-of-mask (keep)")):
            values = torch.tensor([r[key] for r in self.records], dtype=torch.float64)
            k = max(1, min(self.smooth, len(values)))
            smooth = torch.nn.functional.avg_pool1d(values[None, None], k, 1).flatten() if len(values) else values
            ax.plot(steps[k - 1:], smooth.tolist(), label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(f"loss (moving mean of {self.smooth})")
        ax.set_yscale("log")
        ax.set_title("Training loss: in-mask = learning the edit, out-of-mask = keeping the rest")
        ax.legend()
        fig.tight_layout()
        return fig


def mask_at_size(mask, height: int, width: int) -> torch.Tensor:
    """An edit mask at ``height x width``: ``[H, W]`` bool (nearest resize when its size differs)."""
    m = mask_to_tensor(mask)  # [1, 1, H_m, W_m]
    if m.shape[-2:] != (height, width):
        m = F.interpolate(m, size=(height, width), mode="nearest")  # -> [1, 1, H, W]
    return m[0, 0] > 0.5  # [H, W]


def _psnr(mse: float) -> float:
    """PSNR in dB of images in ``[0, 1]``: ``10 log10(1 / mse)`` (``inf`` for identical, ``nan`` for no pixels)."""
    if math.isnan(mse):
        return float("nan")
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


_LPIPS_CACHE: dict = {}


def _lpips_model():
    """The ``lpips`` AlexNet metric when the package and all its weights are on disk, else ``None``.

    Never downloads: ``lpips.LPIPS`` loads torchvision's ImageNet AlexNet (``torch.hub`` cache) and the linear
    heads shipped in the package; both files must already exist.
    """
    if "model" in _LPIPS_CACHE:
        return _LPIPS_CACHE["model"]
    model = None
    try:
        import lpips  # optional, never required

        backbone = os.path.join(torch.hub.get_dir(), "checkpoints", "alexnet-owt-7be5be79.pth")
        heads = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
        if os.path.isfile(backbone) and os.path.isfile(heads):
            model = lpips.LPIPS(net="alex", verbose=False).eval()
    except Exception:  # an absent or broken optional package means: no LPIPS
        model = None
    _LPIPS_CACHE["model"] = model
    return model


def edit_metrics(pred, context, target, mask, *, lpips: bool | None = None) -> dict[str, float]:
    """Did the model edit where asked, and only there?

    * ``psnr_in_vs_target``: PSNR (dB) of the prediction against the target **inside** the mask (higher:
      the edit looks like the target; ``nan`` without a target);
    * ``psnr_out_vs_context``: PSNR against the context **outside** the mask (higher: the rest of the image
      was kept; ``inf`` when untouched);
    * ``mse_in_vs_target``, ``mse_out_vs_context``: the mean squared errors behind them (per pixel and
      channel, images in ``[0, 1]``);
    * ``change_in_mask``: mean absolute change against the context inside the mask (did it edit at all);
    * ``mask_fraction``: share of editable pixels;
    * ``lpips_vs_target`` (whole image, lower is closer) only when the ``lpips`` package and its weights are
      present locally (``lpips=None``: when available; ``True``: required; ``False``: never).

    Args:
        pred, context, target: PIL images or ``[3, H, W]`` tensors in ``[0, 1]`` of one size (``target`` may be
            ``None``).
        mask: PIL ``L`` (white = editable) or ``[1, H, W]`` tensor in ``{0, 1}``; resized (nearest) when its
            size differs.
    Returns:
        ``{name: float}``.
    """
    p, c = image_to_rgb_tensor(pred, "pred"), image_to_rgb_tensor(context, "context")
    t = image_to_rgb_tensor(target, "target") if target is not None else None
    for name, img in (("context", c), ("target", t)):
        if img is not None and img.shape != p.shape:
            raise ValueError(f"pred is {p.shape[2]}x{p.shape[1]} but {name} is {img.shape[2]}x{img.shape[1]} "
                             "(W x H): compare images of one size")
    inside = mask_at_size(mask, p.shape[1], p.shape[2])  # [H, W] bool
    outside = ~inside
    n_in, n_out = int(inside.sum()), int(outside.sum())

    def mse(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor, n: int) -> float:
        if n == 0:
            return float("nan")
        return float(((a - b) ** 2)[:, where].mean())  # [3, H, W] -> [3, n] -> mean

    mse_in = mse(p, t, inside, n_in) if t is not None else float("nan")
    mse_out = mse(p, c, outside, n_out)
    out = {
        "psnr_in_vs_target": _psnr(mse_in),
        "psnr_out_vs_context": _psnr(mse_out),
        "mse_in_vs_target": mse_in,
        "mse_out_vs_context": mse_out,
        "change_in_mask": float((p - c).abs()[:, inside].mean()) if n_in else float("nan"),
        "mask_fraction": n_in / inside.numel(),
    }
    if lpips is not False:
        model = _lpips_model()
        if model is None and lpips:
            raise RuntimeError("lpips=True but the lpips package or its weights (torchvision AlexNet in the "
                               "torch hub cache, the package's alex.pth) are not available locally")
        if model is not None and t is not None:
            with torch.no_grad():
                out["lpips_vs_target"] = float(model(p[None] * 2 - 1, t[None] * 2 - 1).mean())
    return out


def resize_rgb(image, height: int, width: int):
    """``image`` as a ``[3, height, width]`` tensor (bilinear when its size differs)."""
    t = image_to_rgb_tensor(image, "image")
    if t.shape[1:] != (height, width):
        t = F.interpolate(t[None], size=(height, width), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    return t


def mask_overlay(context: torch.Tensor, inside: torch.Tensor, alpha: float = 0.45):
    """Context ``[3, H, W]`` with the editable pixels tinted red -> ``[H, W, 3]``."""
    red = torch.tensor([1.0, 0.1, 0.1])[:, None, None]  # [3, 1, 1]
    m = inside.float()[None] * alpha  # [1, H, W]
    return (context * (1 - m) + red * m).permute(1, 2, 0).numpy()  # -> [H, W, 3]


def format_db(x: float) -> str:
    """A PSNR for a title: ``"31.2 dB"``, ``"inf"`` (identical) or ``"n/a"``."""
    return "n/a" if math.isnan(x) else ("inf" if math.isinf(x) else f"{x:.1f} dB")


def preview_grid(context, mask, depth, target, prediction, *, prompt: str | None = None, label: str | None = None,
                 figsize_per_panel=2.6):
    """One sample as one matplotlib figure: context | mask overlay | depth | target | prediction | error map.

    The titles say what to look for: the prediction should follow the target inside the red region and
    leave everything else as in the context; the error map ``|prediction - context|`` should be bright only
    inside the mask outline. The figure title holds the prompt and :func:`edit_metrics`.

    Args:
        context, prediction: PIL or ``[3, H, W]`` in ``[0, 1]`` (the prediction is resized to the context's
            size for display when they differ).
        mask: PIL ``L`` or ``[1, H, W]`` in ``{0, 1}``; depth: PIL or ``[1, H, W]`` in ``[0, 1]``, or ``None``;
        target: the expected result, or ``None``.
        prompt: shown in the title; label: which model made it, e.g. ``"tiny model, 128 px"`` (title, end).
    Returns:
        a ``matplotlib.figure.Figure`` (headless: no pyplot state; ``fig.savefig(...)`` or display it).
    """
    from matplotlib.figure import Figure

    ctx = image_to_rgb_tensor(context, "context")
    h, w = ctx.shape[1:]
    pred = resize_rgb(prediction, h, w)
    tgt = resize_rgb(target, h, w) if target is not None else None
    inside = mask_at_size(mask, h, w)  # [H, W] bool
    metrics = edit_metrics(pred, ctx, tgt, inside[None].float(), lpips=False)
    err = (pred - ctx).abs().mean(0).numpy()  # [3, H, W] -> [H, W]

    fig = Figure(figsize=(6 * figsize_per_panel, figsize_per_panel + 0.9), layout="constrained")
    axes = fig.subplots(1, 6)
    axes[0].imshow(ctx.permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
    axes[0].set_title("context (input)")
    axes[1].imshow(mask_overlay(ctx, inside))
    axes[1].set_title(f"mask: red may change\n({metrics['mask_fraction']:.0%} of the image)")
    if depth is not None:
        axes[2].imshow(image_to_hwc_array(depth_to_pil(depth)))
        axes[2].set_title("depth map\nlight = near")
    else:
        axes[2].set_title("no depth")
    if tgt is not None:
        axes[3].imshow(tgt.permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
        axes[3].set_title("target: the edit asked for")
    else:
        axes[3].set_title("no target")
    axes[4].imshow(pred.permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
    axes[4].set_title(f"prediction: like the target\ninside red? ({format_db(metrics['psnr_in_vs_target'])})")
    im = axes[5].imshow(err, cmap="magma", vmin=0.0, vmax=max(float(err.max()), 1e-6))
    if inside.any() and not inside.all():
        axes[5].contour(inside.numpy().astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
    axes[5].set_title("|prediction - context|: bright only\ninside cyan? "
                      f"(outside {format_db(metrics['psnr_out_vs_context'])})")
    fig.colorbar(im, ax=axes[5], fraction=0.046, pad=0.02)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    head = f"“{prompt}”   " if prompt else ""
    fig.suptitle(f"{head}PSNR in mask vs target {format_db(metrics['psnr_in_vs_target'])}, "
                 f"outside mask vs context {format_db(metrics['psnr_out_vs_context'])}{_label_tail(label)}",
                 fontsize=10)
    return fig


def _label_tail(label: str | None) -> str:
    return f"   ({label})" if label else ""


def metrics_table(metrics: dict[str, dict[str, float]], columns: Iterable[str] | None = None) -> str:
    """``{row: {column: value}}`` as a Markdown table (floats with 2 decimals; ``inf``/``nan`` written out)."""
    rows = list(metrics)
    if columns is None:
        columns = []
        for r in rows:
            columns += [c for c in metrics[r] if c not in columns]
    columns = list(columns)

    def cell(v) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.2f}")
        return "" if v is None else str(v)

    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += ["| " + r + " | " + " | ".join(cell(metrics[r].get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _blank_axes(axes) -> None:
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)


def variants_figure(context: torch.Tensor, inside: torch.Tensor, depth, target: torch.Tensor | None,
                    images: dict, metrics: dict, *, prompt: str, seed: int, label: str | None = None):
    """The figure of ``compare_variants``: inputs on top, one column per variant, its error map below.

    Args:
        context ``[3, H, W]``, inside ``[H, W]`` bool, target ``[3, H, W]`` or ``None``; depth: any depth map or
        ``None``; images ``{variant: image}`` and metrics ``{variant: edit_metrics}``; label: as in
        :func:`preview_grid`.
    """
    from matplotlib.figure import Figure

    inputs = [("context", context.permute(1, 2, 0).numpy()), ("mask (red may change)", mask_overlay(context, inside))]
    if depth is not None:
        inputs.append(("depth", image_to_hwc_array(depth_to_pil(depth))))
    if target is not None:
        inputs.append(("target", target.permute(1, 2, 0).numpy()))  # [3, H, W] -> [H, W, 3]
    ncols = max(len(inputs), len(images))
    fig = Figure(figsize=(2.6 * ncols, 2.8 * 3), layout="constrained")
    axes = fig.subplots(3, ncols, squeeze=False)
    _blank_axes(axes)
    for j, (title, arr) in enumerate(inputs):
        axes[0, j].imshow(arr)
        axes[0, j].set_title(title, fontsize=9)
    for j, (name, img) in enumerate(images.items()):
        pred = image_to_rgb_tensor(img, name)
        err = (pred - context).abs().mean(0).numpy()  # [3, H, W] -> [H, W]
        m = metrics[name]
        axes[1, j].imshow(pred.permute(1, 2, 0).numpy())  # [3, H, W] -> [H, W, 3]
        axes[1, j].set_title(f"{name}\nin vs target {format_db(m['psnr_in_vs_target'])}", fontsize=9)
        axes[2, j].imshow(err, cmap="magma", vmin=0.0, vmax=1.0)
        if inside.any() and not inside.all():
            axes[2, j].contour(inside.numpy().astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        axes[2, j].set_title(f"|{name} - context|\nout vs context {format_db(m['psnr_out_vs_context'])}", fontsize=9)
    fig.suptitle(f"“{prompt}”: same noise (seed {seed}) through every variant. Edits belong inside the cyan "
                 f"outline; outside it the error map should stay dark.{_label_tail(label)}", fontsize=10)
    return fig


def _packing_grid_panel(ax, patch_id: torch.Tensor, cmap) -> None:
    """A toy latent grid coloured by the token (2x2 patch) each cell goes to, with each cell's place in its patch."""
    toy_h, toy_w = patch_id.shape
    tw = toy_w // 2
    ax.imshow(patch_id.numpy(), cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5)
    for yy in range(toy_h):
        for xx in range(toy_w):
            ax.text(xx, yy + 0.3, f"({yy % 2},{xx % 2})", ha="center", va="center", fontsize=7)
    for t in range(cmap.N):
        ax.text((t % tw) * 2 + 0.5, (t // tw) * 2 + 0.5, str(t), ha="center", va="center", fontsize=15,
                weight="bold", bbox=dict(boxstyle="circle,pad=0.2", fc="white", alpha=0.85, lw=0))
    for k in range(0, toy_w + 1, 2):
        ax.axvline(k - 0.5, color="black", lw=2)
    for k in range(0, toy_h + 1, 2):
        ax.axhline(k - 0.5, color="black", lw=2)
    ax.set_xticks(range(toy_w))
    ax.set_yticks(range(toy_h))
    ax.set_xlabel("latent column")
    ax.set_ylabel("latent row")


def packing_figure(patch_id: torch.Tensor, packed_patch: torch.Tensor, packed_feature: torch.Tensor):
    """Notebook 02's packing picture: a toy latent grid ``[H_l, W_l]`` labelled by patch, and its packed tokens
    ``[1, N, 4C]`` labelled by patch (``packed_patch``) and by feature index ``4c + 2dy + dx`` (``packed_feature``)."""
    import matplotlib.pyplot as plt

    n, c4 = packed_patch.shape[1:]
    cmap = plt.get_cmap("tab20", n)
    fig, axes = plt.subplots(1, 3, figsize=(18, 6.2), gridspec_kw={"width_ratios": [1.25, 1, 1]}, layout="constrained")
    _packing_grid_panel(axes[0], patch_id, cmap)
    axes[0].set_title(f"latent grid {tuple(patch_id.shape)[0]}x{tuple(patch_id.shape)[1]} (x C = {c4 // 4} "
                      "channels):\nbold = token number, (dy,dx) = place in the patch")
    axes[1].imshow(packed_patch[0].numpy(), cmap=cmap, vmin=-0.5, vmax=n - 0.5, aspect="auto")
    for t in range(n):
        axes[1].text(c4 / 2 - 0.5, t, f"token {t}: patch {t}", ha="center", va="center", fontsize=8)
    axes[1].set_xlabel(f"feature (4C = {c4})")
    axes[1].set_ylabel("token (sequence position)")
    axes[1].set_title("packed [N, 4C], labelled by patch:\nrow n comes from patch n")
    axes[2].imshow(packed_feature[0].numpy(), cmap="viridis", aspect="auto")
    for t in range(n):
        for f in range(c4):
            axes[2].text(f, t, str(int(packed_feature[0, t, f])), ha="center", va="center", fontsize=7,
                         color="white" if f < c4 / 2 else "black")
    axes[2].set_xticks(range(c4), [f"c{ch}({dy},{dx})" for ch in range(c4 // 4) for dy in range(2) for dx in range(2)],
                       rotation=90, fontsize=8)
    for k in range(4, c4, 4):
        axes[2].axvline(k - 0.5, color="white", lw=2)
    axes[2].set_ylabel("token (sequence position)")
    axes[2].set_title("packed [N, 4C], labelled 4c + 2dy + dx:\n"
                      "every token: channel 0's 4 cells, then channel 1's, ...")
    return fig


def denoising_figure(frames: list, labels: list[str], steps: list[int], distance: list[float]):
    """Notebook 05's denoising picture: one decoded frame ``[H, W, 3]`` per recorded step, titled by ``labels``,
    over the relative distance of each step's latents to the final ones."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(2.0 * len(frames), 4.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.2, 1])
    for ax, frame, label in zip(top.subplots(1, len(frames), squeeze=False)[0], frames, labels):
        ax.imshow(frame)
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    ax = bottom.subplots()
    ax.plot(steps, distance, "o-")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("relative distance\nto the final latents")
    return fig


def depth_precision_figure(v16, v8, window: tuple[int, int, int]):
    """Notebook 01's picture of 16-bit vs 8-bit depth: the map, a zoom ``(y0, x0, side)`` at both precisions, one
    row as a curve vs a staircase, and the slope (|gradient|) of each. ``v16``: 0-65535, ``v8``: 0-255 arrays."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    y0, x0, side = window
    win16 = v16[y0 : y0 + side, x0 : x0 + side].astype(np.float64)
    win8 = v8[y0 : y0 + side, x0 : x0 + side] * 257.0  # back on the 16-bit scale for a fair comparison
    lo, hi = win16.min(), win16.max()  # contrast stretched to the window
    slope16, slope8 = (np.hypot(*np.gradient(w)) for w in (win16, win8))  # how steeply depth changes: the shape
    fig, axes = plt.subplots(2, 3, figsize=(14, 9.5))
    shown = axes[0, 0].imshow(v16 / 65535, cmap="magma", vmin=0, vmax=1)
    fig.colorbar(shown, ax=axes[0, 0], fraction=0.046, label="depth value (1 = near)")
    axes[0, 0].add_patch(Rectangle((x0, y0), side, side, fill=False, color="cyan", lw=2))
    axes[0, 0].set_title("full map: bright = near, sky = 0")
    for ax, win, bits in ((axes[0, 1], win16, 16), (axes[0, 2], win8, 8)):
        ax.imshow(win, cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(f"{bits}-bit zoom: {len(np.unique(win))} levels")
    axes[1, 0].plot(win16[side // 2], label="16-bit", lw=2)
    axes[1, 0].step(np.arange(side), win8[side // 2], where="mid", label="8-bit", lw=1.2)
    axes[1, 0].set_xlabel("pixel along the middle row of the zoom")
    axes[1, 0].set_ylabel("depth value (16-bit scale)")
    axes[1, 0].set_title("one row: a curve vs a staircase")
    axes[1, 0].legend()
    top = np.percentile(slope16, 95)
    axes[1, 1].imshow(slope16, cmap="gray", vmin=0, vmax=top)
    axes[1, 1].set_title("16-bit slope |gradient|: smooth")
    axes[1, 2].imshow(slope8, cmap="gray", vmin=0, vmax=top)
    axes[1, 2].set_title("8-bit slope: 0 on terraces, lines at steps")
    for ax in (axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 1], axes[1, 2]):
        ax.set_axis_off()
    return fig


def token_grid_lines(ax, size: int, cell: int = 16, color: str = "white") -> None:
    """Draw the token grid (one cell = 16x16 pixels) over an image of ``size`` pixels shown in pixel coordinates."""
    for p in range(0, size + 1, cell):
        ax.axhline(p - 0.5, color=color, lw=0.5, alpha=0.6)
        ax.axvline(p - 0.5, color=color, lw=0.5, alpha=0.6)
    ax.set_xticks([])
    ax.set_yticks([])


def show_token_grid(ax, grid, title: str, *, size: int, cmap: str = "gray", vmin=0.0, vmax=1.0, **kw):
    """Show an ``[H', W']`` token-grid map stretched over a ``size``-pixel frame, with the token grid on top."""
    im = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, extent=(-0.5, size - 0.5, size - 0.5, -0.5),
                   interpolation="nearest", **kw)
    token_grid_lines(ax, size)
    ax.set_title(title, fontsize=9)
    return im
