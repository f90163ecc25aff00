"""Notebook 04: what each training update draws, as a pure function of the seed and the update's number.

The samples of a batch (:func:`batch_indices`: every batch from one aspect-ratio bucket, each sample once an epoch)
and the sigmas (:func:`sample_sigmas`), so that a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import torch

from .config import TrainConfig


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """The CPU generator of one draw of a run: keys ``(1, epoch)`` order the samples (:func:`sample_indices`),
    ``(3, epoch, bucket)`` and ``(4, epoch)`` the bucketed batches (:func:`batch_indices`); ``(2, step, micro_batch,
    process)`` draw an update's noise, then its sigmas, then its depth dropout."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + sum(k * 7919**i for i, k in enumerate(keys, 1))) % (2**63))
    return g


def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Sample indices ``start .. start+count-1`` of an endless stream of epochs, each a fresh permutation."""
    out = []
    for j in range(start, start + count):
        epoch, pos = divmod(j, n)
        out.append(int(torch.randperm(n, generator=step_generator(seed, 1, epoch))[pos]))
    return out


def batch_indices(groups: list[list[int]], seed: int, number: int, size: int) -> list[int]:
    """The sample indices of batch ``number`` of an endless stream of epochs; every batch from one group (bucket).

    One group, or ``size == 1``: :func:`sample_indices` (each epoch a fresh permutation of all samples). Several
    groups: each epoch permutes every group, cuts it into batches of ``size`` (the last filled up from the group's
    start) and shuffles those batches, so each sample comes at least once per epoch.
    """
    n = sum(len(g) for g in groups)
    if len(groups) == 1 or size == 1:
        flat = sorted(i for g in groups for i in g)  # the samples, in index order
        return [flat[k] for k in sample_indices(n, seed, number * size, size)]
    epoch_batches = sum(-(-len(g) // size) for g in groups)
    epoch, pos = divmod(number, epoch_batches)
    batches = []
    for k, group in enumerate(groups):
        order = [group[int(i)] for i in torch.randperm(len(group), generator=step_generator(seed, 3, epoch, k))]
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            batches.append(chunk + (order * size)[: size - len(chunk)])
    return batches[int(torch.randperm(len(batches), generator=step_generator(seed, 4, epoch))[pos])]


def sample_sigmas(batch: int, config: TrainConfig, generator: torch.Generator, num_train_timesteps: int = 1000):
    """``[B]`` training sigmas in ``(0, 1]``, never the terminal 0 (docs/design.md, correction 5).

    ``uniform``: one of the scheduler's ``num_train_timesteps`` training sigmas ``k / 1000``, ``k = 1..1000``,
    uniformly (the original design's choice). ``logit_normal``: diffusers' ``compute_density_for_timestep_sampling``
    mapped onto the same table, as diffusers' Kontext script does.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheme = "logit_normal" if config.timestep_sampling == "logit_normal" else "uniform"
    u = compute_density_for_timestep_sampling(scheme, batch, config.logit_mean, config.logit_std,
                                              generator=generator)  # [B] in (0, 1)
    k = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)  # [B] in 0..999
    return (num_train_timesteps - k).float() / num_train_timesteps  # [B] in {0.001, ..., 1.0}
