"""Graded exercises: you write a function in the notebook, a checker here grades it.

``check_<name>(fn)`` calls your ``fn`` on inputs it makes, compares what comes back with diffusers' own function
or the package's (never with a copy of the solution), and raises ``AssertionError`` naming the shape that was
expected or the first value that differs and where; it prints ``✓ <name> passed`` when all agree. In a notebook::

    def pack(latents):
        # [B, C, H_l, W_l] -> [B, N, 4C]
        raise NotImplementedError("your code here")


    kh.exercises.check_pack(pack)

A function that still raises ``NotImplementedError`` gets a message saying what to do. Stuck?
``show_solution(name)`` prints one solution and ``solution(name)`` returns it (``kontext_helpers/solutions.py``).
Headless runs (``make demo``, the tests: ``scripts/run_notebooks.py`` sets ``KONTEXT_FILL_SOLUTIONS=1``) grade the
solution in place of a stub, so the notebooks run from top to bottom.
"""

from __future__ import annotations

import functools
import inspect
import os

import numpy as np
import torch

from . import solutions
from .conditioning import fm_masked_dual_loss_with_l2, mask_to_token_grid, mean_square
from .config import TrainConfig
from .figures import edit_metrics
from .images import pil_to_binary_mask, pil_to_depth_array
from .inference import blend_latents
from .labels import mask_from_difference
from .pipeline import load_pipeline
from .training import sample_sigmas

FILL_SOLUTIONS_ENV = "KONTEXT_FILL_SOLUTIONS"  # "1": a stub's NotImplementedError grades the solution instead

EXERCISES = {  # name: (notebook, the function you write)
    "binarize_mask": ("01", "binarize_mask(grey, threshold): a grey mask [H, W] -> {0, 1}"),
    "depth_near_one": ("01", "depth_near_one(distance): distances [H, W] -> [0, 1] with near = 1"),
    "mask_from_difference": ("01", "mask_from_difference(context, target, threshold, dilate) -> [1, H, W]"),
    "pack": ("02", "pack(latents): [B, C, H_l, W_l] -> [B, N, 4C]"),
    "unpack": ("02", "unpack(tokens, h_tok, w_tok): [B, N, 4C] -> [B, C, H_l, W_l]"),
    "image_ids": ("02", "image_ids(h_tok, w_tok): the ids of [target | context] -> [2N, 3]"),
    "token_grid": ("03", "token_grid(mask, h_tok, w_tok, mode): [B, 1, H, W] -> [B, 1, H', W']"),
    "flow_matching": ("03", "flow_matching(x0, noise, sigma) -> (x_t, v)"),
    "masked_loss": ("03", "masked_loss(pred_v, tgt, ctx, noise, mask_tok) -> (loss_in, loss_out)"),
    "training_sigmas": ("04", "training_sigmas(u): draws in [0, 1) -> the training sigmas k / 1000"),
    "clean_estimate": ("04", "clean_estimate(x_t, v, sigma): one Euler step to sigma = 0"),
    "lora_mean_square": ("04", "lora_mean_square(d_in, d_out, rank): a fresh LoRA's mean square"),
    "shifted_sigmas": ("05", "shifted_sigmas(num_steps, image_seq_len, config) -> [num_steps + 1]"),
    "euler_sample": ("05", "euler_sample(velocity, x, sigmas): the sampling loop"),
    "blend": ("05", "blend(latents, context_latents, noise, mask_tok, sigma_next): the inpainting blend"),
    "psnr_in_mask": ("05", "psnr_in_mask(pred, target, mask): PSNR in dB inside the mask"),
}
_CACHE: dict = {}


class _Stub(Exception):
    """The graded function raised NotImplementedError: the exercise cell is not filled in yet."""


def solution(name: str):
    """The solution of exercise ``name`` (a function of :mod:`kontext_helpers.solutions`)."""
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}; the exercises are {sorted(EXERCISES)}")
    return getattr(solutions, name)


def show_solution(name: str) -> None:
    """Print the source of exercise ``name``'s solution. Try first: the checker's messages point the way."""
    print(inspect.getsource(solution(name)))


def _stub_message(name: str) -> str:
    return (f"Exercise '{name}' is not done yet: your function still raises NotImplementedError. Replace the "
            "`raise NotImplementedError(...)` line in the exercise cell with your code, run that cell, then run "
            f"this check again. Stuck? kh.exercises.show_solution('{name}') prints one solution.")


def _checker(name: str):
    """Turn ``check(fn) -> summary`` into the public checker: the stub message, the headless fill, the tick."""

    def wrap(check):
        @functools.wraps(check)
        def run(fn, **options) -> None:
            if not callable(fn):
                raise TypeError(f"check_{name} takes your function itself, e.g. check_{name}(my_function), "
                                f"got {type(fn).__name__}")
            try:
                summary = check(fn, **options)
            except _Stub:
                if os.environ.get(FILL_SOLUTIONS_ENV) != "1":
                    raise NotImplementedError(_stub_message(name)) from None
                print(f"(headless run: the cell is a stub, so the solution of '{name}' is graded)")
                summary = check(solution(name), **options)
            print(f"✓ {name} passed: {summary}")

        return run

    return wrap


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return "a function" if callable(value) else repr(value)


def _call(name: str, fn, *args):
    """``fn(*args)``: a stub ends the check; another error names the inputs it came from."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise _Stub from None
    except AssertionError:
        raise
    except Exception as err:
        raise AssertionError(f"{name}: your function raised {type(err).__name__}: {err}\n    called with "
                             f"({', '.join(_describe(a) for a in args)})") from err


def _compare(name: str, what: str, got, expected: torch.Tensor, *, atol: float = 0.0, rtol: float = 0.0,
             hint: str = "") -> None:
    """``got`` must be a tensor of ``expected``'s shape and values; else the shape or the first differing value."""
    if not isinstance(got, torch.Tensor):
        extra = " (did your function `return` it?)" if got is None else ""
        raise AssertionError(f"{name}: {what} should be a torch.Tensor, got {type(got).__name__}{extra}")
    if tuple(got.shape) != tuple(expected.shape):
        raise AssertionError(f"{name}: {what} should have shape {list(expected.shape)}, got {list(got.shape)}. "
                             f"{hint}")
    g, e = got.detach().cpu().double(), expected.detach().cpu().double()
    bad = ~torch.isclose(g, e, rtol=rtol, atol=atol)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {what} differs at index {list(index)}: expected {e[index].item():.6g}, got "
                             f"{g[index].item():.6g} ({int(bad.sum())} of {bad.numel()} values differ). {hint}")


def _compare_number(name: str, what: str, got, expected: float, *, rtol: float, hint: str = "",
                    measured: str = "expected", yours: str = "got") -> None:
    try:
        value = float(got)
    except (TypeError, ValueError, RuntimeError):
        raise AssertionError(f"{name}: {what} should be one number, got {_describe(got)}") from None
    if not abs(value - expected) <= rtol * abs(expected):
        raise AssertionError(f"{name}: {what}: {measured} {expected:.6g}, {yours} {value:.6g}. {hint}")


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _scheduler(scheduler=None):
    """A fresh copy of ``scheduler`` (default: the tiny pipeline's, built once), so no pipeline's state changes."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if scheduler is None:
        if "tiny" not in _CACHE:
            _CACHE["tiny"] = load_pipeline("tiny", pretrained=False, ip_adapter=None)  # the config is what counts
        scheduler = _CACHE["tiny"].scheduler
    return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)


def _set_sampling_sigmas(scheduler, num_steps: int, image_seq_len: int) -> None:
    """The pipeline's schedule (``FluxKontextPipeline.__call__``): ``linspace(1, 1/n, n)`` and ``calculate_shift``."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

    c = scheduler.config
    mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)


# ------------------------------------------------------------------------------------------- notebook 01: data


@_checker("binarize_mask")
def check_binarize_mask(fn) -> str:
    """``fn(grey [H, W] in [0, 1], threshold) -> [H, W]`` in {0, 1}, against the package's mask reading
    (``KontextPairs(mask_threshold=...)`` binarises with ``kontext_helpers.images.pil_to_binary_mask``)."""
    from PIL import Image

    grey = torch.randint(0, 9, (12, 10), generator=_generator()).float() / 8  # [H, W]: k / 8, some at each threshold
    for threshold in (0.5, 0.375, 1.0):
        binary = pil_to_binary_mask(Image.fromarray(grey.numpy()), threshold)  # mode F in, L {0, 255} out
        expected = torch.from_numpy(np.array(binary)).float() / 255  # [H, W]
        got = _call("binarize_mask", fn, grey.clone(), threshold)
        _compare("binarize_mask", f"the mask at threshold {threshold}", got, expected,
                 hint="A pixel is editable when its value is >= the threshold (exactly at it too).")
    return "editable where grey >= threshold, as KontextPairs reads a mask"


@_checker("depth_near_one")
def check_depth_near_one(fn) -> str:
    """``fn(distance [H, W]) -> [H, W]`` in [0, 1], near = 1, against ``kh.pil_to_depth_array(..., "minmax",
    invert=True)`` (how ``KontextPairs(depth_invert=True)`` reads a far = bright map)."""
    from PIL import Image

    metres = 0.5 + 19.5 * torch.rand(16, 12, generator=_generator())  # [H, W], far = large
    for what, distance in (("the map in metres", metres), ("a constant map", torch.full((8, 8), 3.0))):
        expected = torch.from_numpy(pil_to_depth_array(Image.fromarray(distance.numpy()), "minmax", invert=True))
        got = _call("depth_near_one", fn, distance.clone())
        _compare("depth_near_one", what, got, expected, atol=1e-6,
                 hint="Near = 1: (farthest - d) / (farthest - nearest); a constant map holds no depth: zeros.")
    return "(farthest - d) / (farthest - nearest), and zeros for a constant map, as kh.pil_to_depth_array"


@_checker("mask_from_difference")
def check_mask_from_difference(fn) -> str:
    """``fn(context, target [3, H, W], threshold, dilate) -> [1, H, W]`` in {0, 1}, against
    ``kh.mask_from_difference``."""
    context = 0.25 + 0.5 * torch.rand(3, 20, 24, generator=_generator())  # [3, H, W]
    target = context.clone()
    target[2, 5, 6] += 0.1  # the blue channel alone: its mean over channels stays under 0.04
    target[:, 0, 23] -= 0.2  # a corner: the margin stops at the border
    target[:, 12:15, 9:12] += 0.02  # a faint change: above threshold 0, under 0.04
    for threshold, dilate in ((0.04, 2), (0.0, 0), (0.04, 0)):
        expected = mask_from_difference(context, target, threshold=threshold, dilate=dilate)  # [1, H, W]
        got = _call("mask_from_difference", fn, context.clone(), target.clone(), threshold, dilate)
        _compare("mask_from_difference", f"the mask at threshold {threshold}, dilate {dilate}", got, expected,
                 hint="Editable where the largest of the three channel differences is > threshold; then a "
                      "(2 dilate + 1) square max-pool, stride 1, padding dilate (the size stays).")
    return "the largest channel difference > threshold, grown by dilate pixels, as kh.mask_from_difference"


# ------------------------------------------------------------------------------------------- notebook 02: latents


@_checker("pack")
def check_pack(fn) -> str:
    """``fn(latents [B, C, H_l, W_l]) -> [B, N, 4C]``, bit for bit ``FluxKontextPipeline._pack_latents``."""
    from diffusers import FluxKontextPipeline

    latents = torch.randn(2, 16, 12, 20, generator=_generator())  # [B, C, H_l, W_l], not square
    expected = FluxKontextPipeline._pack_latents(latents, 2, 16, 12, 20)  # [B, N, 4C]
    got = _call("pack", fn, latents.clone())
    _compare("pack", "the tokens of latents [2, 16, 12, 20]", got, expected,
             hint="Token n = row-major 2x2 patch n; its 4C values channel-major: view [B, C, H', 2, W', 2], "
                  "permute to [B, H', W', C, 2, 2], reshape.")
    return "[2, 16, 12, 20] -> [2, 60, 64], bit for bit FluxKontextPipeline._pack_latents"


@_checker("unpack")
def check_unpack(fn) -> str:
    """``fn(tokens [B, N, 4C], h_tok, w_tok) -> [B, C, 2 h_tok, 2 w_tok]``, bit for bit
    ``FluxKontextPipeline._unpack_latents``."""
    from diffusers import FluxKontextPipeline

    tokens = torch.randn(2, 6 * 10, 64, generator=_generator())  # [B, N, 4C] on a 6 x 10 grid
    expected = FluxKontextPipeline._unpack_latents(tokens, 6 * 16, 10 * 16, 8)  # [B, C, H_l, W_l]
    got = _call("unpack", fn, tokens.clone(), 6, 10)
    _compare("unpack", "the latents of tokens [2, 60, 64] on a 6 x 10 grid", got, expected,
             hint="Packing backwards: view [B, H', W', C, 2, 2], permute to [B, C, H', 2, W', 2], reshape.")
    return "[2, 60, 64] -> [2, 16, 12, 20], bit for bit FluxKontextPipeline._unpack_latents"


@_checker("image_ids")
def check_image_ids(fn) -> str:
    """``fn(h_tok, w_tok) -> [2N, 3]``, the ids ``FluxKontextPipeline`` gives ``[target | context]``:
    ``_prepare_latent_image_ids`` twice, the context's first column set to 1 (``prepare_latents``)."""
    from diffusers import FluxKontextPipeline

    for h_tok, w_tok in ((3, 5), (4, 4)):
        target = FluxKontextPipeline._prepare_latent_image_ids(1, h_tok, w_tok, "cpu", torch.float32)  # [N, 3]
        context = target.clone()
        context[..., 0] = 1  # as prepare_latents marks the context image's ids
        expected = torch.cat([target, context], dim=0)  # [2N, 3], the pipeline's torch.cat([latent_ids, image_ids])
        got = _call("image_ids", fn, h_tok, w_tok)
        _compare("image_ids", f"the ids of a {h_tok} x {w_tok} grid", got, expected,
                 hint="Rows (type, row, col), row-major like the tokens: the target's N rows with type 0, then "
                      "the context's N rows with type 1 at the same (row, col).")
    return "(type, row, col) for [target | context], as FluxKontextPipeline builds them"


# ------------------------------------------------------------------------------------------- notebook 03: region, loss


@_checker("token_grid")
def check_token_grid(fn) -> str:
    """``fn(mask [B, 1, H, W], h_tok, w_tok, mode) -> [B, 1, H', W']`` for ``mode`` ``"area"`` and ``"max"``,
    against ``kh.mask_to_token_grid``."""
    g = _generator()
    mask = (torch.rand(2, 1, 48, 80, generator=g) > 0.8).float()  # [B, 1, H, W]: scattered pixels
    mask[0, :, 5:30, 7:45] = 1  # a box that is not aligned with the tokens
    for (h_tok, w_tok), mode in (((3, 5), "area"), ((6, 10), "area"), ((3, 5), "max")):
        expected = mask_to_token_grid(mask, h_tok, w_tok, mode=mode)  # [B, 1, H', W']
        got = _call("token_grid", fn, mask.clone(), h_tok, w_tok, mode)
        _compare("token_grid", f"mode {mode!r} on a {h_tok} x {w_tok} grid", got, expected, atol=1e-6,
                 hint='"area": the mean of each token\'s tile (its editable fraction); "max": 1 where any pixel '
                      "of the tile is editable. Tiles: reshape to [B, 1, H', H / H', W', W / W'].")
    return 'the editable fraction per token ("area") and any editable pixel ("max"), as kh.mask_to_token_grid'


@_checker("flow_matching")
def check_flow_matching(fn) -> str:
    """``fn(x0, noise [B, N, 4C], sigma [B]) -> (x_t, v)``: ``x_t`` against ``FlowMatchEulerDiscreteScheduler.
    scale_noise``, ``v`` against ``d x_t / d sigma`` taken from ``scale_noise`` at two sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()  # shift 1: its sigmas are the ones it is given
    scheduler.set_timesteps(sigmas=[0.9, 0.25])  # one sigma per sample, then the terminal 0
    sigma, g = scheduler.sigmas[:2], _generator()  # [B]
    x0, noise = torch.randn(2, 6, 64, generator=g), torch.randn(2, 6, 64, generator=g)  # [B, N, 4C]
    expected_xt = scheduler.scale_noise(x0, scheduler.timesteps, noise)  # [B, N, 4C]
    both = torch.cat([scheduler.timesteps[:1], scheduler.timesteps[:1]])  # sigma 0.9 for both samples
    lower = torch.cat([scheduler.timesteps[1:], scheduler.timesteps[1:]])  # sigma 0.25 for both
    step = float(sigma[0].double() - sigma[1].double())
    expected_v = (scheduler.scale_noise(x0.double(), both, noise.double())
                  - scheduler.scale_noise(x0.double(), lower, noise.double())) / step  # d x_t / d sigma
    got = _call("flow_matching", fn, x0.clone(), noise.clone(), sigma.clone())
    if not isinstance(got, tuple | list) or len(got) != 2:
        raise AssertionError(f"flow_matching: return the pair (x_t, v), got {_describe(got)}")
    _compare("flow_matching", "x_t at sigma (0.9, 0.25)", got[0], expected_xt, atol=1e-6,
             hint="x_t = (1 - sigma) x0 + sigma noise: sigma 1 is pure noise, 0 the clean latents; sigma is [B], "
                  "reshape it to [B, 1, 1].")
    _compare("flow_matching", "the velocity v", got[1], expected_v, atol=1e-5,
             hint="v = d x_t / d sigma: it points from the clean latents to the noise.")
    return "x_t as FlowMatchEulerDiscreteScheduler.scale_noise, v = d x_t / d sigma"


@_checker("masked_loss")
def check_masked_loss(fn) -> str:
    """``fn(pred_v, tgt, ctx, noise [B, N, 4C], mask_tok [B, 1, H', W']) -> (loss_in, loss_out)``, against the
    parts of ``kh.fm_masked_dual_loss_with_l2`` (without its L2 terms)."""
    g = _generator()
    pred, tgt, ctx, noise = (torch.randn(2, 12, 8, generator=g) for _ in range(4))  # [B, N, 4C] on a 3 x 4 grid
    binary = (torch.rand(2, 1, 3, 4, generator=g) > 0.6).float()  # [B, 1, H', W']
    binary[:, 0, 0, :] = 1.0  # every sample has tokens inside ...
    binary[:, 0, 2, :] = 0.0  # ... and outside the mask
    for what, mask in (("a mask of 0 and 1", binary), ("an area mask (fractions)", binary * 0.75 + 0.125)):
        _, parts = fm_masked_dual_loss_with_l2(pred, tgt, ctx, noise, mask, 3, 4, l2_region_lambda=0.0,
                                               l2_lora_lambda=0.0, return_parts=True)
        got = _call("masked_loss", fn, pred.clone(), tgt.clone(), ctx.clone(), noise.clone(), mask.clone())
        if not isinstance(got, tuple | list) or len(got) != 2:
            raise AssertionError(f"masked_loss: return the pair (loss_in, loss_out), got {_describe(got)}")
        _compare_number("masked_loss", f"loss_in with {what}", got[0], parts["loss_in"], rtol=1e-5,
                        hint="Inside: the squared error to the target velocity noise - tgt, weighted by the mask, "
                             "divided by sum(mask) * 4C (a mean over the masked tokens, all channels).")
        _compare_number("masked_loss", f"loss_out with {what}", got[1], parts["loss_out"], rtol=1e-5,
                        hint="Outside: the squared error to noise - ctx (the context's velocity), weighted by "
                             "1 - mask, divided by sum(1 - mask) * 4C. The mask goes [B, 1, H', W'] -> [B, N, 1].")
    return "the in-mask and out-of-mask terms of kh.fm_masked_dual_loss_with_l2"


# ------------------------------------------------------------------------------------------- notebook 04: training


@_checker("training_sigmas")
def check_training_sigmas(fn) -> str:
    """``fn(u [B] in [0, 1)) -> [B]`` training sigmas, against ``kh.sample_sigmas``: the same generator's draws
    from diffusers' ``compute_density_for_timestep_sampling`` (uniform and logit-normal) put through ``fn``."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    for mode in ("uniform", "logit_normal"):
        config = TrainConfig(timestep_sampling=mode)
        expected = sample_sigmas(4096, config, _generator(7))  # [B]
        u = compute_density_for_timestep_sampling(mode, 4096, config.logit_mean, config.logit_std,
                                                  generator=_generator(7))  # [B], the draws behind `expected`
        got = _call("training_sigmas", fn, u.clone())
        if isinstance(got, torch.Tensor) and got.shape == u.shape and (got == 0).any():
            i = int((got == 0).nonzero()[0, 0])
            raise AssertionError(f"training_sigmas: sigma 0 for u = {float(u[i]):.6f} (index {i}). At the terminal "
                                 "sigma 0 x_t is the clean target and holds no noise: train on k / 1000, k = 1..1000.")
        _compare("training_sigmas", f"the sigmas of {mode} draws", got, expected, atol=1e-6,
                 hint="u in [i / 1000, (i + 1) / 1000) falls in bin i and gets sigma (1000 - i) / 1000: u = 0 "
                      "-> 1.0, the largest u -> 0.001.")
    return "uniform and logit-normal draws land on k / 1000, k = 1..1000, as kh.sample_sigmas"


@_checker("clean_estimate")
def check_clean_estimate(fn) -> str:
    """``fn(x_t, v [B, N, 4C], sigma [B]) -> [B, N, 4C]``, against ``FlowMatchEulerDiscreteScheduler.step``
    from each sample's sigma to the terminal 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    g = _generator()
    x_t, v = torch.randn(2, 6, 64, generator=g), torch.randn(2, 6, 64, generator=g)  # [B, N, 4C]
    sigma = torch.tensor([0.8, 0.3])  # [B]
    expected = []
    for b in range(2):
        scheduler = FlowMatchEulerDiscreteScheduler()
        scheduler.set_timesteps(sigmas=[float(sigma[b])])  # sigmas [sigma_b, 0]
        expected.append(scheduler.step(v[b:b + 1], scheduler.timesteps[0], x_t[b:b + 1], return_dict=False)[0])
    got = _call("clean_estimate", fn, x_t.clone(), v.clone(), sigma.clone())
    _compare("clean_estimate", "the clean estimate at sigma (0.8, 0.3)", got, torch.cat(expected), atol=1e-6,
             hint="One Euler step from sigma to 0: x_t + (0 - sigma) v; sigma is [B], reshape it to [B, 1, 1].")
    return "x_t - sigma v, one FlowMatchEulerDiscreteScheduler.step to sigma 0"


@_checker("lora_mean_square")
def check_lora_mean_square(fn) -> str:
    """``fn(d_in, d_out, rank) -> float``, against ``kh.mean_square`` of PEFT's gaussian initialisation (what
    ``kh.add_lora`` asks for) on ``Linear(d_in -> d_out)``, measured; within 5 % (sampling noise)."""
    from peft import LoraConfig, inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):  # the notebook's own random state stays as it was
        torch.manual_seed(0)
        for d_in, d_out, rank in ((1024, 1024, 16), (2048, 512, 8), (512, 2048, 4)):
            config = LoraConfig(r=rank, target_modules=["proj"], init_lora_weights="gaussian")
            layer = inject_adapter_in_model(config, torch.nn.ModuleDict({"proj": torch.nn.Linear(d_in, d_out)}))
            measured = float(mean_square([p.detach() for n, p in layer.named_parameters() if "lora_" in n]))
            got = _call("lora_mean_square", fn, d_in, d_out, rank)
            _compare_number("lora_mean_square", f"Linear({d_in} -> {d_out}) at rank {rank}", got, measured,
                            rtol=0.05, measured="PEFT's gaussian initialisation measures", yours="your formula gives",
                            hint="A [r, d_in] is drawn with std 1 / r, B [d_out, r] is zero; the mean runs over "
                                 "the entries of both.")
    return "d_in / (r^2 (d_in + d_out)), as measured on PEFT's gaussian initialisation"


# ------------------------------------------------------------------------------------------- notebook 05: sampling


@_checker("shifted_sigmas")
def check_shifted_sigmas(fn, scheduler=None) -> str:
    """``fn(num_steps, image_seq_len, config) -> [num_steps + 1]``, against the scheduler's own sigmas after
    ``set_timesteps`` as ``FluxKontextPipeline`` calls it (``scheduler``: a pipeline's, default the tiny one's)."""
    scheduler = _scheduler(scheduler)
    for num_steps, seq_len in ((4, 256), (28, 4096), (8, 1024)):
        _set_sampling_sigmas(scheduler, num_steps, seq_len)
        got = _call("shifted_sigmas", fn, num_steps, seq_len, scheduler.config)
        _compare("shifted_sigmas", f"{num_steps} steps at {seq_len} tokens", got, scheduler.sigmas, atol=1e-6,
                 hint="linspace(1, 1/n, n); mu runs linearly from base_shift at base_image_seq_len to max_shift at "
                      "max_image_seq_len; sigma -> e^mu / (e^mu + (1 / sigma - 1)); then the terminal 0.")
    return "linspace(1, 1/n, n) shifted by mu, then 0: the scheduler's own sigmas"


@_checker("euler_sample")
def check_euler_sample(fn, scheduler=None) -> str:
    """``fn(velocity, x, sigmas) -> x`` at sigma 0, against ``FlowMatchEulerDiscreteScheduler.step`` over the
    pipeline's schedule, with a stand-in velocity ``velocity(x, sigma)`` (the transformer's place)."""
    scheduler, g = _scheduler(scheduler), _generator()
    _set_sampling_sigmas(scheduler, 6, 12)
    weight, anchor = torch.randn(64, 64, generator=g) * 0.1, torch.randn(1, 12, 64, generator=g)
    calls = []

    def velocity(x, sigma):  # any function of (x, sigma) shows the loop; the pipeline calls the transformer here
        calls.append(float(sigma))
        return x @ weight + float(sigma) * anchor  # [B, N, 4C]

    noise = torch.randn(1, 12, 64, generator=g)  # [B, N, 4C]
    expected = noise
    for t in scheduler.timesteps:  # the pipeline's loop: the transformer sees t / 1000, then one step
        expected = scheduler.step(velocity(expected, t / 1000), t, expected, return_dict=False)[0]
    calls.clear()
    got = _call("euler_sample", fn, velocity, noise.clone(), scheduler.sigmas.clone())
    if len(calls) != len(scheduler.timesteps):
        raise AssertionError(f"euler_sample: velocity was called {len(calls)} times for {len(scheduler.timesteps)} "
                             "steps: once per step, at its sigma, never at the terminal 0.")
    _compare("euler_sample", "x after 6 steps", got, expected, atol=1e-5,
             hint="Each step: v = velocity(x, sigma), then x + (sigma_next - sigma) v.")
    return "6 steps, one velocity call each, as FlowMatchEulerDiscreteScheduler.step"


@_checker("blend")
def check_blend(fn, scheduler=None) -> str:
    """``fn(latents, context_latents, noise, mask_tok [B, N, 4C], sigma_next) -> [B, N, 4C]`` after every step,
    against ``kh.blend_latents`` (``FluxKontextInpaintPipeline``'s blend, through ``scale_noise``)."""
    scheduler, g = _scheduler(scheduler), _generator()
    _set_sampling_sigmas(scheduler, 4, 12)
    context, noise = torch.randn(1, 12, 64, generator=g), torch.randn(1, 12, 64, generator=g)  # [B, N, 4C]
    mask_tok = (torch.rand(1, 12, 1, generator=g) > 0.5).float().expand(1, 12, 64)  # per token, every channel
    for step in range(4):
        latents = torch.randn(1, 12, 64, generator=g)  # what the Euler step gave
        expected = blend_latents(scheduler, latents, context, noise, mask_tok, scheduler.timesteps, step)
        sigma_next = scheduler.sigmas[step + 1]
        got = _call("blend", fn, latents.clone(), context.clone(), noise.clone(), mask_tok.clone(), sigma_next)
        _compare("blend", f"the latents after step {step} (sigma_next {float(sigma_next):.3f})", got, expected,
                 atol=1e-6, hint="Inside the mask (1) the sampled latents; outside, the context noised to "
                                 "sigma_next: (1 - sigma_next) context + sigma_next noise (the clean context at 0).")
    return "the sampled latents inside, the context noised to the next sigma outside, as kh.blend_latents"


@_checker("psnr_in_mask")
def check_psnr_in_mask(fn) -> str:
    """``fn(pred, target [3, H, W], mask [1, H, W]) -> float`` dB, against ``kh.edit_metrics``'s
    ``psnr_in_vs_target``."""
    g = _generator()
    target = torch.rand(3, 24, 32, generator=g)  # [3, H, W] in [0, 1]
    mask = torch.zeros(1, 24, 32)
    mask[:, 4:14, 6:20] = 1.0  # [1, H, W]
    pred = target.clone()
    pred[:, 2:16, 4:22] = (pred[:, 2:16, 4:22] + 0.1 * torch.randn(3, 14, 18, generator=g)).clamp(0, 1)  # spills out
    expected = edit_metrics(pred, target, target, mask, lpips=False)["psnr_in_vs_target"]
    got = _call("psnr_in_mask", fn, pred.clone(), target.clone(), mask.clone())
    _compare_number("psnr_in_mask", "the PSNR inside the mask (dB)", got, expected, rtol=1e-5,
                    hint="10 log10(1 / mse), the mse over the mask's pixels only (all three channels), not the "
                         "whole image.")
    return "10 log10(1 / mse) over the mask's pixels, as kh.edit_metrics"
