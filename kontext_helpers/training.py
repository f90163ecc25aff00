"""Notebook 04: the training loop: cache once, then forward, loss, backward and step, with checkpoints.

:func:`train` reads as its steps: check the config (and a checkpoint's, when resuming) before any model
work; cache every sample once (docs/design.md, correction 2); attach the LoRA; build the region and depth
modules, the optimizer and the schedule; restore a checkpoint; then run the updates through ``accelerate``.
One update is written out in :func:`training_loss` (noisy target, forward, the two loss terms).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from .cache import TrainCache, build_train_cache, depth_map_of
from .checkpoints import (
    check_checkpoint_files,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint_config,
    resume_config_changes,
    save_checkpoint,
)
from .conditioning import fm_masked_dual_loss_with_l2, kontext_forward, make_region_module, region_inputs
from .config import TrainConfig
from .depth import add_offsets, depth_inputs, make_depth_module
from .draws import batch_indices, sample_sigmas, step_generator
from .figures import preview_grid
from .images import image_to_pil_rgb
from .inference import sample_edit
from .models import (
    add_lora,
    collect_lora_named_params,
    has_ip_adapter,
    is_quantized,
    load_lora_state_dict,
    lora_adapter_name,
    lora_off,
    lora_state_dict,
)
from .pipeline import add_transformer, free_text_encoders, load_pipeline, nf4_quantization_config


def training_loss(transformer, region_module, batch: dict, txt_ids: torch.Tensor, h_tok: int, w_tok: int,
                  noise: torch.Tensor, sigma: torch.Tensor, config: TrainConfig, lora_named_params=None,
                  depth_module=None):
    """Loss of one batch with given noise ``[B, N, 4C]`` and sigmas ``[B]``; returns ``(loss, parts)``.

    ``depth_module`` (depth_kind ``"tokens"``): its offset from ``batch["depth_feat"]`` is added to the noisy target
    tokens (with a ``"marked"`` region's) and to the context tokens; ``batch["depth_keep"]`` (``[B]``, optional) marks
    the samples depth dropout keeps, and ``parts["depth_kept"]`` is their share. The L2 terms leave it alone (it is
    zero-initialised; dropout regularises it). The prior-preservation reference is the base model: LoRA off, no
    region, no depth module."""
    tgt, ctx = batch["tgt_tok"], batch["ctx_tok"]
    s = sigma.to(tgt.dtype)[:, None, None]  # [B] -> [B, 1, 1]
    noisy = (1.0 - s) * tgt + s * noise  # x_t = (1 - s) x_0 + s e
    n = ctx.shape[1]
    region = region_inputs(region_module, ctx, batch["mask_small"], h_tok, w_tok)  # context [B, N(+K), 4C]
    ctx_in, region_tok, region_ids = region.context[:, :n], region.context[:, n:], region.ids
    region_tok = region_tok if region_ids is not None else None
    depth_target, depth_context = _batch_depth(depth_module, batch, ctx)  # [B, N, 4C] each, or None
    target_offset = add_offsets(region.target_offset, depth_target)  # "marked" region and depth
    noisy_in = noisy + target_offset if target_offset is not None else noisy
    ctx_in = ctx_in + depth_context if depth_context is not None else ctx_in
    ip = [batch["ip_embeds"]] if batch.get("ip_embeds") is not None else None
    kw = dict(sigma=sigma, prompt_embeds=batch["prompt_embeds"], pooled_prompt_embeds=batch["pooled_prompt_embeds"],
              txt_ids=txt_ids, h_tok=h_tok, w_tok=w_tok, guidance=config.guidance, ip_adapter_image_embeds=ip)
    pred = kontext_forward(transformer, noisy_in, ctx_in, region_tok, region_ids=region_ids, **kw)
    outside_ref = ctx
    if config.preservation == "prior":
        # inverted_mask_prior: outside the mask, match the base model (LoRA off, no region signal or depth offsets).
        # With ctx := e - v_prior the loss's outside term is exactly MSE(v_pred, v_prior).
        base = getattr(transformer, "module", transformer)
        with torch.no_grad(), lora_off(base):
            prior_v = kontext_forward(transformer, noisy, ctx, None, **kw).float()
        outside_ref = noise.float() - prior_v
    loss, parts = fm_masked_dual_loss_with_l2(
        pred, tgt, outside_ref, noise, batch["mask_small"], h_tok, w_tok, w_in=config.w_in, w_out=config.w_out,
        l2_region_lambda=config.l2_region_lambda, l2_lora_lambda=config.l2_lora_lambda, l2_form=config.l2_form,
        region_token_module=getattr(region_module, "module", region_module), lora_named_params=lora_named_params,
        return_parts=True)
    if depth_module is not None:
        keep = batch.get("depth_keep")
        parts["depth_kept"] = 1.0 if keep is None else float(keep.float().mean())
    return loss, parts


def _batch_depth(depth_module, batch: dict, like: torch.Tensor):
    """:func:`depth_inputs` of the batch's cached depth features, as ``like``'s dtype and device."""
    if depth_module is None:
        return None, None
    if batch.get("depth_feat") is None:
        raise ValueError("a depth module needs the cached depth features: build the cache with use_depth=True and "
                         "depth_kind='tokens' (build_train_cache / load_for_training with the run's config)")
    offsets = depth_inputs(depth_module, batch["depth_feat"], keep=batch.get("depth_keep"))
    return tuple(None if t is None else t.to(like) for t in offsets)  # [B, N, 4C] each


@torch.no_grad()
def evaluation_loss(pipe, region_module, cache: TrainCache, *, index: int = 0,
                    sigmas: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8), seed: int = 1234,
                    guidance: float = 1.0, depth_module=None) -> dict[str, float]:
    """A fixed yardstick: the same pair, fixed noise, fixed sigmas; mean of loss, ``err_in`` and ``err_out``.
    ``depth_module``: a trained depth module (``TrainResult.depth``), fed the cached depth features.

    ``err_in`` is the in-mask velocity error to the target, ``err_out`` the out-of-mask error to the context.
    """
    cfg = TrainConfig(guidance=guidance, l2_region_lambda=0.0, l2_lora_lambda=0.0)
    device = pipe.transformer.device
    batch = cache.batch([index], device=device)
    h_tok, w_tok = cache.grid_of(index)
    g = torch.Generator().manual_seed(seed)
    totals = {"loss": 0.0, "err_in": 0.0, "err_out": 0.0}
    for s in sigmas:
        noise = torch.randn(batch["tgt_tok"].shape, generator=g).to(batch["tgt_tok"])
        loss, parts = training_loss(pipe.transformer, region_module, batch, cache.txt_ids.to(device), h_tok, w_tok,
                                    noise, torch.tensor([s], device=device), cfg,
                                    depth_module=depth_module)
        totals["loss"] += float(loss) / len(sigmas)
        totals["err_in"] += parts["loss_in"] / len(sigmas)
        totals["err_out"] += parts["loss_out"] / len(sigmas)
    return totals


@dataclass
class TrainResult:
    """What :func:`train` returns. The LoRA stays on ``pipe.transformer``."""

    history: list[dict]  # one record per logged update: step, loss (the total), loss_in, loss_out, l2_lora and
    #   l2_region (mean squares, before their lambdas), lr, seconds
    region: nn.Module | None  # the trained region module of config.region_kind (unwrapped, on the training
    #   device); None for region_kind="none"
    output_dir: str
    config: TrainConfig
    resumed_from: int | None = None  # step of the checkpoint the run continued from
    depth: nn.Module | None = None  # the trained depth module of depth_kind "tokens" (unwrapped, eval); None for
    #   "ip_adapter", "none" and use_depth=False


def _make_accelerator(config: TrainConfig):
    """An ``accelerate.Accelerator`` for the config's precision and accumulation."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    state = AcceleratorState._shared_state
    if state.get("_mixed_precision", config.mixed_precision) != config.mixed_precision and \
            PartialState().num_processes == 1:
        # a second train() in the same notebook with another precision: accelerate's state is a
        # process-wide singleton that refuses the change; in a single process it is safe to reset.
        AcceleratorState._reset_state()
    from accelerate.utils import ProjectConfiguration

    logs = ProjectConfiguration(project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs"))
    return Accelerator(mixed_precision=config.mixed_precision,
                       gradient_accumulation_steps=config.gradient_accumulation_steps,
                       cpu=not torch.cuda.is_available(), project_config=logs,
                       log_with=None if config.report_to == "none" else config.report_to)


def _check_tracker(config: TrainConfig, accelerator=None) -> None:
    """``config.report_to``'s package is installed and a given accelerator logs with it, before any model work."""
    if config.report_to == "none":
        return
    from accelerate.tracking import GeneralTracker
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[config.report_to]():
        raise ImportError(f"report_to={config.report_to!r} needs the {config.report_to} package: "
                          f"`pip install {config.report_to}`, or set report_to='none'")
    # log_with holds accelerate's LoggerType names and custom GeneralTracker objects (with their own ``name``)
    names = [t.name if isinstance(t, GeneralTracker) else str(t) for t in getattr(accelerator, "log_with", [])]
    if accelerator is not None and config.report_to not in names:
        raise ValueError(f"report_to={config.report_to!r}, but the accelerator passed to train() logs with "
                         f"{names}: make it with Accelerator(log_with={config.report_to!r}, project_dir=...), "
                         "or let train() make it")


def _start_tracker(accelerator, config: TrainConfig) -> bool:
    """Start ``config.report_to``'s tracker (``init_trackers``) unless the accelerator runs one already; True when
    this call started it (and :func:`train` finishes it)."""
    if config.report_to == "none" or accelerator.trackers:
        return False
    settings = {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in config.to_dict().items()}
    accelerator.init_trackers(config.tracker_project, config=settings)  # TensorBoard: its hparams tab
    return True


def _tracker_scalars(record: dict) -> dict[str, float]:
    """One history record as tracker scalars, grouped under ``loss/`` (the L2 parts before their lambdas)."""
    names = {"loss": "loss/total", "loss_in": "loss/in_mask", "loss_out": "loss/outside", "l2_lora": "loss/l2_lora",
             "l2_region": "loss/l2_region", "lr": "lr"}
    return {tag: float(record[key]) for key, tag in names.items()}


def _log_preview(accelerator, path: str, step: int) -> None:
    """Send a saved preview image to every tracker (TensorBoard's image tab, wandb's media panel)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))  # [H, W, 3] uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"preview": pixels[None]}, step=step, dataformats="NHWC")  # [1, H, W, 3]
        else:
            tracker.log_images({"preview": [pixels]}, step=step)


def checkpoint_to_resume(config: TrainConfig, *, verbose: bool = True) -> str | None:
    """The newest complete checkpoint to resume from (``None``: start fresh), checked against ``config``.

    Raises a ``ValueError`` naming every field that shapes the weights and differs (rank, alpha, LoRA
    targets, IP-Adapter LoRA, resolution, optimizer); other changes (steps, learning rates, checkpoint
    spacing, ...) are accepted and printed. Reads ``state.json`` and checks the weight files (no tensor read).
    """
    found = list_checkpoints(config.output_dir) if config.resume else []
    if not found:
        return None
    path = found[-1][1]
    blocking, accepted = resume_config_changes(read_checkpoint_config(path), config.to_dict())
    if blocking:
        raise ValueError(f"cannot resume from {path}: it was trained with other settings that shape the saved "
                         "weights:\n  - " + "\n  - ".join(blocking) + "\nUse the checkpoint's values, or start a "
                         "new run in another output_dir (or with resume=False).")
    check_checkpoint_files(path)  # a damaged part fails here, naming the checkpoint before it
    if accepted and verbose:
        print(f"resuming from {path} with changed settings (used from now on): " + "; ".join(accepted))
    return path


def _attach_lora(transformer, config: TrainConfig) -> list[tuple[str, nn.Parameter]]:
    """The LoRA to train: the one already attached (a notebook re-running the cell), or a new one whose random
    init depends on the seed only; trainable weights in fp32 (diffusers' ``cast_training_params``)."""
    from diffusers.training_utils import cast_training_params

    if getattr(transformer, "peft_config", None):
        lora = collect_lora_named_params(transformer)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            lora = add_lora(transformer, rank=config.rank, alpha=config.alpha, targets=config.lora_targets,
                            include_ip_adapter=config.lora_ip_adapter)
    cast_training_params(transformer, dtype=torch.float32)
    return lora


def _new_region_module(transformer, config: TrainConfig, device) -> nn.Module | None:
    """The ``config.region_kind`` module for the square token grid of ``config.resolution`` (every kind serves any
    bucket's grid; ``None`` for ``"none"``: a LoRA alone, the mask only weighting the loss); its random init
    depends on the seed only."""
    if config.region_kind == "none":
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        side = config.resolution // 16  # tokens per side of the square bucket
        region = make_region_module(config.region_kind, side, side, transformer.config.in_channels)
    return region.to(device)


def _new_depth_module(transformer, config: TrainConfig, device) -> nn.Module | None:
    """The ``config.depth_kind`` module (zero-initialised), or ``None`` without depth or for ``"ip_adapter"``."""
    if not config.use_depth:
        return None
    depth = make_depth_module(config.depth_kind, transformer.config.in_channels)
    return None if depth is None else depth.to(device)


def _group_lrs(config: TrainConfig, region, depth) -> list[float]:
    """The learning rate of each parameter group, in :func:`_make_optimizer`'s order: LoRA, region, depth."""
    return ([config.learning_rate] + ([config.region_learning_rate] if region is not None else [])
            + ([config.depth_learning_rate] if depth is not None else []))


def _make_optimizer(config: TrainConfig, lora_params: list[nn.Parameter], region, depth=None):
    """AdamW (or bitsandbytes' 8-bit AdamW) with the LoRA, the region module and the depth module (each when
    present) as parameter groups of their own learning rates."""
    params = [lora_params] + [list(m.parameters()) for m in (region, depth) if m is not None]
    decays = config.weight_decays(region is not None, depth is not None)  # with the L2 lambdas when "decoupled"
    groups = [{"params": p, "lr": lr, "weight_decay": wd}
              for p, lr, wd in zip(params, _group_lrs(config, region, depth), decays)]
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("optimizer='adamw8bit' needs bitsandbytes: `pip install bitsandbytes`, "
                              "or use optimizer='adamw'") from err
        return bnb.optim.AdamW8bit(groups, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def _make_lr_scheduler(config: TrainConfig, optimizer, num_processes: int):
    """diffusers' ``get_scheduler`` with the config's schedule, counted in updates of every process."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer=optimizer,
                         num_warmup_steps=config.lr_warmup_steps * num_processes,
                         num_training_steps=max(config.steps, 1) * num_processes)


def _restore_checkpoint(path: str, transformer, region, optimizer, lr_scheduler, config: TrainConfig, depth=None):
    """Load a checkpoint into the fresh LoRA, region, depth, optimizer and schedule; returns ``(step, history)``.

    The learning rates and weight decays of ``config`` replace the saved ones, so a resumed run may change them.
    """
    ckpt = load_checkpoint(path)
    load_lora_state_dict(transformer, ckpt["lora"], adapter_name=lora_adapter_name(transformer),
                         source=os.path.join(path, "lora.safetensors"))
    if region is not None:
        region.load_state_dict(ckpt["region"]["state_dict"])
    if depth is not None:
        depth.load_state_dict(ckpt["depth"]["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, decay in zip(optimizer.param_groups, config.weight_decays(region is not None, depth is not None)):
        group["weight_decay"] = decay  # a resumed run may change weight_decay, l2_form or the lambdas
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    if hasattr(lr_scheduler, "lr_lambdas"):  # every diffusers schedule is a LambdaLR
        lr_scheduler.base_lrs = _group_lrs(config, region, depth)
        for group, base, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * factor(lr_scheduler.last_epoch)
    return ckpt["step"], ckpt["history"]


@dataclass
class _Run:
    """What every update of one :func:`train` call shares."""

    pipe: object
    dataset: object
    config: TrainConfig
    accelerator: object
    cache: TrainCache
    model: nn.Module  # the transformer as accelerate prepared it
    region: nn.Module | None  # the region module as accelerate prepared it (None: a LoRA alone)
    depth: nn.Module | None  # the depth module as accelerate prepared it (None: no "tokens" depth)
    optimizer: object
    lr_scheduler: object
    lora: list
    last_good: str | None = None  # the newest complete checkpoint
    preview_pair: dict | None = None  # the pair the previews edit (default: the dataset's first)
    tracking: bool = False  # config.report_to's tracker is running: log losses, lr and previews to it


def _one_update(run: _Run, step: int) -> dict[str, float]:
    """One optimizer update (``gradient_accumulation_steps`` micro-batches); returns the mean loss parts."""
    acc, cfg, cache = run.accelerator, run.config, run.cache
    accum, procs, b, device = cfg.gradient_accumulation_steps, acc.num_processes, cfg.batch_size, acc.device
    trained_modules = [m for m in (run.model, run.region, run.depth) if m is not None]
    trainable = [p for _, p in run.lora] + [p for m in trained_modules[1:] for p in m.parameters()]
    totals = {"loss": 0.0, "loss_in": 0.0, "loss_out": 0.0, "l2_lora": 0.0, "l2_region": 0.0}
    groups = cache.groups()  # one per bucket
    for micro in range(accum):
        idx = batch_indices(groups, cfg.seed, (step * accum + micro) * procs + acc.process_index, b)
        h_tok, w_tok = cache.grid_of(idx[0])
        g = step_generator(cfg.seed, 2, step, micro, acc.process_index)
        batch = cache.batch(idx, device=device)
        noise = torch.randn(batch["tgt_tok"].shape, generator=g).to(device=device, dtype=batch["tgt_tok"].dtype)
        sigma = sample_sigmas(b, cfg, g).to(device)
        if run.depth is not None and cfg.depth_dropout > 0:  # drawn last: noise and sigmas are as without depth
            batch["depth_keep"] = (torch.rand(b, generator=g) >= cfg.depth_dropout).float().to(device)  # [B]
        with acc.accumulate(*trained_modules), acc.autocast():
            loss, parts = training_loss(run.model, run.region, batch, cache.txt_ids.to(device), h_tok, w_tok,
                                        noise, sigma, cfg, lora_named_params=run.lora,
                                        depth_module=run.depth)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {float(loss.detach())} at step {step + 1} (batch "
                    f"{[cache.samples[i].name for i in idx]}). Training stopped; the last good checkpoint is "
                    f"{run.last_good or 'none (no checkpoint yet)'}. Lower learning_rate, use bf16 instead of "
                    "fp16, or check the data.")
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        for key, value in {"loss": float(loss.detach()), **parts}.items():  # the L2 parts unweighted (mean squares)
            totals[key] = totals.get(key, 0.0) + value / accum  # + depth_kept with a depth module
    if procs > 1:
        reduced = acc.reduce(torch.tensor(list(totals.values()), device=device), reduction="mean")
        totals = dict(zip(totals, reduced.tolist()))
    return totals


def _after_update(run: _Run, done: int, history: list[dict], callback) -> None:
    """Report, checkpoint and preview after update ``done``, each at its own spacing."""
    acc, cfg = run.accelerator, run.config
    if acc.is_main_process and (done % cfg.log_every == 0 or done == cfg.steps):
        if callback is not None:
            callback(history[-1])
        if run.tracking:
            acc.log(_tracker_scalars(history[-1]), step=done)
    if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
        acc.wait_for_everyone()
        if acc.is_main_process:
            transformer = run.pipe.transformer
            run.last_good = save_checkpoint(
                cfg.output_dir, done, lora_state=lora_state_dict(transformer, lora_adapter_name(transformer)),
                region_module=_unwrapped(acc, run.region), optimizer=run.optimizer, lr_scheduler=run.lr_scheduler,
                history=history, config=cfg, keep=cfg.keep_checkpoints, depth_module=_unwrapped(acc, run.depth))
    if cfg.preview_every and done % cfg.preview_every == 0 and acc.is_main_process:
        item = run.preview_pair if run.preview_pair is not None else run.dataset[0]
        path = _training_preview(run.pipe, _unwrapped(acc, run.region), item, cfg, done, _unwrapped(acc, run.depth))
        if run.tracking:
            _log_preview(acc, path, done)
        if callback is not None:
            callback({"step": done, "preview": path})


def _prepare_run(pipe, dataset, config: TrainConfig, accelerator, cache, progress: bool):
    """Everything before the first update: cache, LoRA, region, depth, optimizer, schedule."""
    device = accelerator.device
    if cache is None:
        cache = build_train_cache(pipe, dataset, max_sequence_length=config.max_sequence_length,
                                  use_depth=config.use_depth, depth_kind=config.depth_kind,
                                  depth_source=config.depth_source, device=device,
                                  offload=config.offload_encoders and device.type == "cuda",
                                  progress=progress and accelerator.is_main_process)
    transformer = pipe.transformer
    if not is_quantized(transformer):  # a bitsandbytes model is placed when it is loaded
        transformer.to(device)
    pipe.vae.to(device)  # previews decode latents
    lora = _attach_lora(transformer, config)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()  # no dropout in Flux; LoRA dropout is 0
    region = _new_region_module(transformer, config, device)
    depth = _new_depth_module(transformer, config, device)
    if depth is not None and cache.samples[0].depth_feat is None:
        raise ValueError("depth_kind='tokens' needs the cache's depth features: build it with use_depth=True and "
                         "depth_kind='tokens' (load_for_training does, from the config)")
    optimizer = _make_optimizer(config, [p for _, p in lora], region, depth)
    lr_scheduler = _make_lr_scheduler(config, optimizer, accelerator.num_processes)
    return cache, lora, region, depth, optimizer, lr_scheduler


def _check_text_encoders(pipe, config: TrainConfig, cache) -> None:
    """A pipeline whose text encoders were freed after caching needs the cache, and makes no previews."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return
    if cache is None:
        raise ValueError("this pipeline has no text encoders (freed after caching, see load_for_training): pass "
                         "the cache, train(..., cache=cache)")
    if config.preview_every:
        raise ValueError(f"preview_every={config.preview_every}: previews encode a prompt, and this pipeline's "
                         "text encoders were freed after caching; set preview_every=0 and sample afterwards")


def load_for_training(model: str, dataset, config: TrainConfig, *, device=None, dtype: torch.dtype | None = None,
                      progress: bool = True):
    """The pipeline and the cache of a run on ``model``, loaded the way ``config`` says: ``(pipe, cache)``.

    With ``config.load_in_stages`` (T4, L4): everything but the transformer, the cache, the text encoders freed,
    then the transformer (NF4 when ``config.quantize_base == "nf4"``), so that T5-XXL and the transformer are
    never in system RAM together. Otherwise the whole pipeline, then the cache. Pass both to :func:`train`.
    """
    nf4 = nf4_quantization_config() if config.quantize_base == "nf4" else None
    staged = config.load_in_stages and model != "tiny"
    pipe = load_pipeline(model, seed=config.seed, device=device, dtype=dtype, encoders_only=staged,
                         quantization_config=None if staged else nf4)
    cache = build_train_cache(pipe, dataset, max_sequence_length=config.max_sequence_length,
                              use_depth=config.use_depth, depth_kind=config.depth_kind,
                              depth_source=config.depth_source, device=pipe._execution_device,
                              offload=config.offload_encoders and pipe._execution_device.type == "cuda",
                              progress=progress)
    if staged:
        free_text_encoders(pipe)
        add_transformer(pipe, model, device=device, dtype=dtype, quantization_config=nf4)
    return pipe, cache


def train(pipe, dataset, config: TrainConfig, *, callback=None, accelerator=None, progress: bool = True,
          cache: TrainCache | None = None, preview_pair: dict | None = None) -> TrainResult:
    """Train a LoRA on ``pipe.transformer``, a region module and a depth module on ``dataset``.

    Steps: validate the config (and, with ``config.resume``, the newest checkpoint's config); cache every
    sample once (:func:`build_train_cache`); attach the LoRA; restore the checkpoint; then ``config.steps``
    updates through ``accelerate`` (device placement, mixed precision, gradient accumulation, several
    processes under ``accelerate launch``), with atomic checkpoints every ``config.checkpoint_every`` updates,
    previews every ``config.preview_every``, and the losses, lr and previews sent to ``config.report_to``'s tracker.

    Args:
        callback: called with each history record (a dict) on the main process, e.g. a live loss plot;
            preview records carry ``"preview"`` (an image path).
        accelerator: an ``accelerate.Accelerator`` to use (one is made from the config otherwise).
        cache: a ready :class:`TrainCache` (skips encoding).
        preview_pair: the pair previews edit, e.g. a held-out one (``kh.DrawnPairs(7, 1, resolution)[0]``; an item
            of the dataset's layout); default: the dataset's first pair.
    Raises:
        ValueError: a bad config, a dataset of another resolution, or a checkpoint trained with settings that
            shape the weights differently, before any model work.
        FloatingPointError: a NaN/inf loss; the last good checkpoint is kept.
        CheckpointWriteError: a checkpoint could not be written; the message names the one to resume from.
    """
    from tqdm.auto import tqdm

    config.validate(dataset)
    _check_text_encoders(pipe, config, cache)
    _check_tracker(config, accelerator)
    accelerator = accelerator or _make_accelerator(config)
    resume_path = checkpoint_to_resume(config, verbose=accelerator.is_main_process)
    cache, lora, region, depth, optimizer, lr_scheduler = _prepare_run(pipe, dataset, config, accelerator, cache,
                                                                       progress)
    start, history = 0, []
    if resume_path is not None:
        start, history = _restore_checkpoint(resume_path, pipe.transformer, region, optimizer, lr_scheduler, config,
                                             depth)
        if accelerator.is_main_process:
            print(f"resumed from {resume_path} (step {start})")
    model, region_p, depth_p, optimizer, lr_scheduler = _accelerate(accelerator, pipe.transformer, region, depth,
                                                                    optimizer, lr_scheduler)
    started_tracker = _start_tracker(accelerator, config)
    run = _Run(pipe, dataset, config, accelerator, cache, model, region_p, depth_p, optimizer, lr_scheduler, lora,
               last_good=resume_path, preview_pair=preview_pair, tracking=config.report_to != "none")
    bar = tqdm(total=config.steps, initial=start, desc="training", mininterval=0.5,
               disable=not (progress and accelerator.is_main_process))
    t_start = time.perf_counter()
    try:
        with bar:
            for step in range(start, config.steps):
                parts = _one_update(run, step)
                history.append({"step": step + 1, **parts, "lr": optimizer.param_groups[0]["lr"],
                                "seconds": time.perf_counter() - t_start})
                bar.update(1)
                bar.set_postfix(loss=f"{parts['loss']:.4f}", lr=f"{history[-1]['lr']:.1e}", refresh=False)
                _after_update(run, step + 1, history, callback)
        accelerator.wait_for_everyone()
    finally:
        region, depth = _unwrap_after_training(accelerator, model, region_p, depth_p)
        if started_tracker:
            _finish_trackers(accelerator)
    return TrainResult(history=history, region=region, output_dir=config.output_dir, config=config,
                       resumed_from=start if resume_path is not None else None, depth=depth)


def _accelerate(accelerator, transformer, region, depth, optimizer, lr_scheduler):
    """``accelerator.prepare`` of the transformer, the region and depth modules (those present), the optimizer and
    the schedule -> ``(model, region, depth, optimizer, lr_scheduler)`` (``None`` for an absent module)."""
    present = [m for m in (region, depth) if m is not None]
    model, *modules, optimizer, lr_scheduler = accelerator.prepare(transformer, *present, optimizer, lr_scheduler)
    prepared = iter(modules)
    region_p = next(prepared) if region is not None else None
    depth_p = next(prepared) if depth is not None else None
    return model, region_p, depth_p, optimizer, lr_scheduler


def _finish_trackers(accelerator) -> None:
    """Close the trackers :func:`train` started (files flushed, the wandb run ended) so a next run starts fresh."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()


def _unwrapped(accelerator, module):
    """``accelerator.unwrap_model`` that passes ``None`` (no region module) through."""
    return None if module is None else accelerator.unwrap_model(module)


def _unwrap_after_training(accelerator, model, region_p, depth_p):
    """Undo ``accelerator.prepare``: its mixed-precision wrapper leaves ``forward`` (``keep_fp32_wrapper=False``),
    so the pipeline afterwards behaves exactly like a fresh one with the same adapter; eval mode for all.
    Returns ``(region, depth)``, each ``None`` when absent."""
    accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    return tuple(None if m is None else accelerator.unwrap_model(m, keep_fp32_wrapper=False).eval()
                 for m in (region_p, depth_p))


def _training_preview(pipe, region, item: dict, config: TrainConfig, step: int, depth_module=None) -> str:
    """Edit ``item`` with the current LoRA + region + depth (seed ``config.seed``) and save
    ``previews/step-NNNNNN.png``: context, mask, depth, target, result and its change, with the edit metrics
    (:func:`preview_grid`). Depth: ``config.depth_source``'s map, through the depth module or the IP-Adapter.

    ``sample_edit`` brings encoders that the cache offloaded to the device for their step and back.
    """
    was_training = pipe.transformer.training
    pipe.transformer.eval()
    use_depth = depth_module is not None or (config.use_depth and config.depth_kind == "ip_adapter"
                                             and has_ip_adapter(pipe.transformer))
    depth = depth_map_of(item, config.depth_source) if use_depth else None
    try:
        image = sample_edit(
            pipe, image_to_pil_rgb(item["context"]), item["prompt"], mask=item["mask"] if region is not None else None,
            depth=depth, region=region, depth_module=depth_module, height=item["context"].shape[-2],
            width=item["context"].shape[-1], num_inference_steps=config.preview_steps, guidance_scale=2.5,
            generator=torch.Generator().manual_seed(config.seed), max_sequence_length=config.max_sequence_length)
    finally:
        pipe.transformer.train(was_training)
    folder = os.path.join(config.output_dir, "previews")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:06d}.png")
    fig = preview_grid(item["context"], item["mask"], depth, item.get("target"),
                       image, prompt=f"{item['prompt']} ({item.get('name', 'preview pair')}, step {step})")
    fig.savefig(path, dpi=80)
    return path
