"""One solution to each graded exercise of the notebooks (:mod:`kontext_helpers.exercises` grades them).

Look here only after trying: ``kh.exercises.show_solution(name)`` prints one, ``kh.exercises.solution(name)``
returns it. Each is written from first principles, the way a learner would, with plain torch: the checkers compare
it (and your own code) with diffusers' functions and the package's, never with this file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------- notebook 01


def binarize_mask(grey: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[H, W]`` grey mask in ``[0, 1]`` -> ``[H, W]`` float in {0, 1}: editable where ``grey >= threshold``."""
    return (grey >= threshold).float()


def depth_near_one(distance: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` distances (far = large) -> ``[H, W]`` in ``[0, 1]`` with the nearest pixel 1, the farthest 0.

    A constant map holds no depth information: zeros, as the package gives (not ``0 / 0``).
    """
    near, far = distance.min(), distance.max()
    if not far > near:
        return torch.zeros_like(distance)
    return (far - distance) / (far - near)


def mask_from_difference(context: torch.Tensor, target: torch.Tensor, threshold: float, dilate: int) -> torch.Tensor:
    """``[3, H, W]`` pair -> ``[1, H, W]`` in {0, 1}: largest channel difference above ``threshold``, grown.

    The largest, not the mean: a change in one channel alone (red to magenta) would be diluted by the mean of three.
    """
    changed = (context - target).abs().amax(dim=0) > threshold  # [3, H, W] -> [H, W]
    mask = changed.float()[None, None]  # -> [1, 1, H, W]
    if dilate:
        mask = F.max_pool2d(mask, kernel_size=2 * dilate + 1, stride=1, padding=dilate)  # a square margin
    return mask[0]  # [1, 1, H, W] -> [1, H, W]


# ---------------------------------------------------------------------------------------------------- notebook 02


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H_l, W_l]`` -> ``[B, N, 4C]``: each 2x2 patch one token, channel-major, tokens row by row."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2)  # [B, C, H_l, W_l] -> [B, C, H', 2, W', 2]
    x = x.permute(0, 2, 4, 1, 3, 5)  # -> [B, H', W', C, 2, 2]: a token's C x 2 x 2 values together
    return x.reshape(b, (h // 2) * (w // 2), c * 4)  # -> [B, N, 4C]


def unpack(tokens: torch.Tensor, h_tok: int, w_tok: int) -> torch.Tensor:
    """``[B, N, 4C]`` on an ``h_tok x w_tok`` grid -> ``[B, C, 2 h_tok, 2 w_tok]``: :func:`pack` backwards."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h_tok, w_tok, c4 // 4, 2, 2)  # [B, N, 4C] -> [B, H', W', C, 2, 2]
    x = x.permute(0, 3, 1, 4, 2, 5)  # -> [B, C, H', 2, W', 2]
    return x.reshape(b, c4 // 4, h_tok * 2, w_tok * 2)  # -> [B, C, H_l, W_l]


def image_ids(h_tok: int, w_tok: int) -> torch.Tensor:
    """Ids ``(type, row, col)`` of ``[target | context]`` -> ``[2N, 3]``: type 0 then 1, the same rows and columns."""
    rows = torch.arange(h_tok)[:, None].expand(h_tok, w_tok).reshape(-1)  # [H', W'] -> [N]
    cols = torch.arange(w_tok)[None, :].expand(h_tok, w_tok).reshape(-1)  # [H', W'] -> [N]
    grid = torch.stack([torch.zeros(h_tok * w_tok), rows.float(), cols.float()], dim=1)  # [N, 3]
    context = grid.clone()
    context[:, 0] = 1.0  # the context's type
    return torch.cat([grid, context], dim=0)  # -> [2N, 3]


# ---------------------------------------------------------------------------------------------------- notebook 03


def token_grid(mask: torch.Tensor, h_tok: int, w_tok: int, mode: str) -> torch.Tensor:
    """``[B, 1, H, W]`` -> ``[B, 1, H', W']``: per token the editable fraction (``"area"``) or any (``"max"``)."""
    b, _, h, w = mask.shape
    tiles = mask.float().reshape(b, 1, h_tok, h // h_tok, w_tok, w // w_tok)  # -> [B, 1, H', 16, W', 16]
    return tiles.mean(dim=(3, 5)) if mode == "area" else tiles.amax(dim=(3, 5))  # -> [B, 1, H', W']


def flow_matching(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t = (1 - sigma) x0 + sigma noise`` and the velocity ``d x_t / d sigma = noise - x0``, ``[B, N, 4C]``."""
    s = sigma.reshape(-1, 1, 1)  # [B] -> [B, 1, 1]
    return (1 - s) * x0 + s * noise, noise - x0


def masked_loss(pred_v, tgt, ctx, noise, mask_tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared velocity error to the target inside the mask, to the context outside -> ``(in, out)``."""
    b, n, c = pred_v.shape
    m = mask_tok.reshape(b, n, 1)  # [B, 1, H', W'] -> [B, N, 1], the tokens' row-major order
    err_in = (pred_v - (noise - tgt)) ** 2 * m  # [B, N, 4C]
    err_out = (pred_v - (noise - ctx)) ** 2 * (1 - m)  # [B, N, 4C]
    return err_in.sum() / (m.sum() * c), err_out.sum() / ((1 - m).sum() * c)


# ---------------------------------------------------------------------------------------------------- notebook 04


def training_sigmas(u: torch.Tensor) -> torch.Tensor:
    """Draws ``u`` in ``[0, 1)`` -> the training sigmas ``k / 1000``, ``k = 1..1000`` (``u = 0`` -> 1, never 0).

    Never 0: at sigma 0, ``x_t`` is the clean target and holds no trace of the noise, so the velocity
    ``noise - x_0`` cannot be predicted from it.
    """
    k = (u * 1000).long().clamp(0, 999)  # which of the 1000 equal bins u falls in
    return (1000 - k).float() / 1000


def clean_estimate(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """One Euler step from ``sigma`` to 0: the clean latents the velocity points at, ``x_t - sigma v``.

    An error ``dv`` in the velocity moves this estimate by ``sigma * dv``: nine times more at 0.9 than at 0.1.
    """
    return x_t - sigma.reshape(-1, 1, 1) * v  # [B] -> [B, 1, 1]


def lora_mean_square(d_in: int, d_out: int, rank: int) -> float:
    """Mean of ``p**2`` over a fresh LoRA's ``A [r, d_in]`` (std ``1/r``) and ``B [d_out, r]`` (zeros).

    ``A``'s sum of squares is about ``r * d_in / r**2``; the mean divides by all ``r * (d_in + d_out)`` entries:
    ``d_in / (r**2 (d_in + d_out))``, ``1 / 512`` for FLUX.1's 3072-wide layers at rank 16.
    """
    return (rank * d_in / rank**2) / (rank * d_in + d_out * rank)


# ---------------------------------------------------------------------------------------------------- notebook 05


def shifted_sigmas(num_steps: int, image_seq_len: int, config) -> torch.Tensor:
    """The pipeline's sampling sigmas: ``linspace(1, 1/n, n)`` shifted by ``mu`` (from the sequence length), then 0."""
    slope = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    mu = config["base_shift"] + slope * (image_seq_len - config["base_image_seq_len"])
    sigmas = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float64)])  # [n + 1]: the terminal 0 last


def euler_sample(velocity, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """From noise ``x`` at ``sigmas[0]`` down to ``sigmas[-1] = 0``: one velocity call and one Euler step each."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * velocity(x, sigma)
    return x


def blend(latents, context_latents, noise, mask_tok, sigma_next) -> torch.Tensor:
    """Inside the mask the sampled latents; outside, the context noised to ``sigma_next`` (clean at 0)."""
    proper = (1 - sigma_next) * context_latents + sigma_next * noise
    return mask_tok * latents + (1 - mask_tok) * proper


def psnr_in_mask(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR (dB, images in ``[0, 1]``) over the mask's pixels, all three channels."""
    inside = mask[0] > 0.5  # [1, H, W] -> [H, W]
    mse = ((pred - target) ** 2)[:, inside].mean()  # [3, H, W] -> [3, n] -> mean
    return float(10 * torch.log10(1 / mse))
