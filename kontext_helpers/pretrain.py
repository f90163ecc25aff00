"""Pretraining the tiny model: ``python -m kontext_helpers pretrain-tiny`` writes the weights it ships with.

Four phases on freshly drawn scenes (:mod:`kontext_helpers.scenes`, never the ``data_samples`` pairs):

1. the VAE on 64 px crops, then on whole images (L1 + MSE), after which the latents' mean and spread set
   the VAE's ``shift_factor`` and ``scaling_factor``;
2. the image encoder alone, with a fixed linear probe (training only) that must redraw the depth map from
   its embedding, so that different depth maps give different embeddings; then the encoder is frozen;
3. the base transformer with its IP-Adapter: flow matching from the context and the prompt to the target,
   guidance drawn from ``[1, 4]``, a "keep" or empty prompt copying the context, depth through the
   IP-Adapter in half of the batches;
4. the VAE's decoder alone on whole images: the encoder is frozen, so the base's latents do not change.

Every random draw of a step derives from ``(seed, phase, step)``; the run state is one safetensors file
written to a temporary name and moved into place (``os.replace``), so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

from .checkpoints import _optimizer_to_files, optimizer_state_from_files
from .conditioning import kontext_forward
from .images import depth_to_pil
from .latents import normalize_01_to_m11, pack_like_pipeline
from .scenes import KEEP_PROMPTS, random_edit_spec, render_training_pair
from .tiny import TINY_WEIGHTS_FILE, build_tiny_pipeline, save_tiny_weights

_COMPONENTS = ("vae", "transformer", "image_encoder")


@dataclasses.dataclass
class PretrainConfig:
    """The settings of ``pretrain-tiny``; the defaults are the run that made the shipped weights."""

    seed: int = 0
    pairs: int = 3000  # drawn scenes, rendered once (with 2 workers) and kept in the run folder
    resolution: int = 128  # the CPU resolution of the course
    vae_batch_size: int = 4  # on 64 px crops (small batches: more updates per minute learned faster, measured)
    vae_full_batch_size: int = 2  # on whole images, in the whole-image and decoder phases
    vae_crop_steps: int = 4000  # VAE updates on 64 px crops (fast)
    vae_full_steps: int = 1000  # VAE updates on whole images
    vae_lr: float = 1e-3
    probe_steps: int = 4000  # the image encoder alone: its embedding must let a fixed linear probe redraw depth
    probe_lr: float = 3e-3
    base_steps: int = 10000  # transformer + IP-Adapter updates (the image encoder stays as the probe left it)
    decoder_steps: int = 8000  # then the VAE's decoder alone on whole images (the latents, and so the base, stay)
    base_lr: float = 8e-4
    batch_size: int = 8  # of the base phase
    long_text_fraction: float = 0.2  # batches with 512 T5 tokens (sample_edit's default), the others 32
    depth_fraction: float = 0.5  # batches that see the depth map through the IP-Adapter
    keep_fraction: float = 0.3  # samples turned into copies (empty or "keep" prompt), besides the drawn ones
    edit_weight: float = 3.0  # extra loss weight on the tokens an edit changes
    checkpoint_every: int = 50
    workers: int = 2
    threads: int = 1  # one thread: on a shared 2-core machine two OpenMP threads ran 7x slower (measured)


def _render_chunk(args):
    seed, start, stop, size = args
    out = []
    for i in range(start, stop):
        kind, spec = random_edit_spec(seed, i)
        pair = render_training_pair(spec, size)
        out.append((kind, pair))
    return out


class _InProcess:
    """``ProcessPoolExecutor``'s ``map`` in this process (one worker: no process to start)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    map = staticmethod(map)


def render_training_set(cfg: PretrainConfig, folder: str, progress: bool = True) -> dict:
    """The drawn scenes at ``cfg.resolution``: uint8 ``context`` / ``target`` ``[P, 3, H, W]``, depth
    ``[P, 1, H, W]`` float16, ``prompts``, ``kinds``; rendered once and kept in ``folder/scenes.safetensors``."""
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    path = os.path.join(folder, f"scenes-{cfg.seed}-{cfg.pairs}-{cfg.resolution}.safetensors")
    if os.path.isfile(path):
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            meta = json.loads(f.metadata()["scenes"])
        return {**load_file(path), **meta}
    chunk = 50
    jobs = [(cfg.seed, s, min(s + chunk, cfg.pairs), cfg.resolution) for s in range(0, cfg.pairs, chunk)]
    pairs = []
    with ProcessPoolExecutor(max_workers=cfg.workers) if cfg.workers > 1 else _InProcess() as pool, \
            tqdm(total=cfg.pairs, desc="rendering scenes", disable=not progress) as bar:
        for part in pool.map(_render_chunk, jobs):
            pairs.extend(part)
            bar.update(len(part))
    to_u8 = lambda key: (torch.stack([p[key] for _, p in pairs]) * 255).round().to(torch.uint8)  # noqa: E731
    tensors = {"context": to_u8("context"), "target": to_u8("target"),  # [P, 3, H, W]
               "depth": torch.stack([p["depth"] for _, p in pairs]).half()}  # [P, 1, H, W]
    meta = {"prompts": [p["prompt"] for _, p in pairs], "kinds": [k for k, _ in pairs]}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"scenes": json.dumps(meta)})
    os.replace(tmp, path)
    return {**tensors, **meta}


def _step_generator(seed: int, phase: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + phase * 100_003 + step)


def _lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then a cosine down to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t))))


# ------------------------------------------------------------------------------------------------
# the run state: one file, replaced atomically
# ------------------------------------------------------------------------------------------------


def _state_path(folder: str) -> str:
    return os.path.join(folder, "pretrain_state.safetensors")


def save_run_state(folder: str, pipe, optimizer, state: dict) -> None:
    """Models, optimizer and progress in ``folder/pretrain_state.safetensors`` (temp file, then ``os.replace``)."""
    from safetensors.torch import save_file

    tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
               for name in _COMPONENTS for k, v in getattr(pipe, name).state_dict().items()}
    meta = {"state": json.dumps(state)}
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_to_files(optimizer)
        tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
        meta["optimizer"] = json.dumps(opt_meta)
    path = _state_path(folder)
    save_file(tensors, path + ".tmp", metadata=meta)
    os.replace(path + ".tmp", path)


def load_run_state(folder: str, pipe) -> tuple[dict, dict | None]:
    """Load the saved models into ``pipe``; returns ``(state, optimizer_state_dict or None)``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = _state_path(folder)
    tensors = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    state = json.loads(meta["state"])
    for name in _COMPONENTS:
        module = getattr(pipe, name)
        prefix = name + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    _set_latent_stats(pipe.vae, state.get("latent_stats"))
    opt = None
    if "optimizer" in meta:
        opt_tensors = {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")}
        opt = optimizer_state_from_files(opt_tensors, json.loads(meta["optimizer"]))
    return state, opt


def _set_latent_stats(vae, stats) -> None:
    if stats:
        vae.register_to_config(shift_factor=stats["shift_factor"], scaling_factor=stats["scaling_factor"])


# ------------------------------------------------------------------------------------------------
# phase 1: the VAE
# ------------------------------------------------------------------------------------------------


def _vae_batch(data: dict, g: torch.Generator, batch: int, crop: int | None) -> torch.Tensor:
    """Random contexts or targets ``[B, 3, S, S]`` in ``[-1, 1]``, cropped to ``crop`` px when given."""
    n = data["context"].shape[0]
    idx = torch.randint(0, n, (batch,), generator=g)
    which = torch.rand(batch, generator=g) < 0.5
    imgs = torch.where(which[:, None, None, None], data["context"][idx], data["target"][idx]).float() / 255.0
    if crop is not None:
        size = imgs.shape[-1]
        ys, xs = (torch.randint(0, (size - crop) // 8 + 1, (2,), generator=g) * 8).tolist()
        imgs = imgs[:, :, ys:ys + crop, xs:xs + crop]  # [B, 3, H, W] -> [B, 3, crop, crop]
    return normalize_01_to_m11(imgs)


def _vae_loss(vae, x: torch.Tensor) -> torch.Tensor:
    z = vae.encode(x).latent_dist.mean  # [B, C, H_l, W_l]
    rec = vae.decode(z).sample  # [B, 3, H, W]
    return F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-5 * z.pow(2).mean()


def _run_phase(name: str, phase: int, steps: int, lr: float, params, loss_fn, ctx: dict) -> None:
    """The updates ``state[name] .. steps`` of one phase, with checkpoints; ``loss_fn(g, step)`` -> loss."""
    from tqdm.auto import tqdm

    cfg, pipe, state, folder = ctx["cfg"], ctx["pipe"], ctx["state"], ctx["folder"]
    start = state.get(name, 0)
    if start >= steps:
        return
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if ctx.get("optimizer_state") is not None and state.get("phase") == name:
        optimizer.load_state_dict(ctx.pop("optimizer_state"))
    state["phase"] = name
    t0 = time.perf_counter() - state.get(f"{name}_seconds", 0.0)
    with tqdm(total=steps, initial=start, desc=name, mininterval=1.0, disable=not ctx["progress"]) as bar:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, lr)
            loss = loss_fn(_step_generator(cfg.seed, phase, step), step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
            state[name], state[f"{name}_seconds"] = step + 1, time.perf_counter() - t0
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
                save_run_state(folder, pipe, optimizer, state)


def train_vae(ctx: dict, data: dict) -> None:
    """Phase 1: 64 px crops, then whole images; the VAE alone is trainable."""
    cfg, vae = ctx["cfg"], ctx["pipe"].vae
    vae.train().requires_grad_(True)
    params = list(vae.parameters())
    crop = min(64, cfg.resolution)
    _run_phase("vae_crop", 1, cfg.vae_crop_steps, cfg.vae_lr, params,
               lambda g, step: _vae_loss(vae, _vae_batch(data, g, cfg.vae_batch_size, crop)), ctx)
    _run_phase("vae_full", 2, cfg.vae_full_steps, cfg.vae_lr / 2, params,
               lambda g, step: _vae_loss(vae, _vae_batch(data, g, cfg.vae_full_batch_size, None)), ctx)
    vae.eval().requires_grad_(False)


def _decoder_loss(vae, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean  # [B, C, H_l, W_l], the encoder is frozen
    rec = vae.decode(z).sample  # [B, 3, H, W]
    return F.l1_loss(rec, x) + F.mse_loss(rec, x)


def train_decoder(ctx: dict, data: dict) -> None:
    """Phase 4: the VAE's decoder alone on whole images; the encoder, and so every latent, is unchanged."""
    cfg, vae = ctx["cfg"], ctx["pipe"].vae
    vae.decoder.train().requires_grad_(True)
    params = list(vae.decoder.parameters())
    _run_phase("vae_decoder", 4, cfg.decoder_steps, cfg.vae_lr / 2, params,
               lambda g, step: _decoder_loss(vae, _vae_batch(data, g, cfg.vae_full_batch_size, None)), ctx)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_stats(vae, data: dict, count: int = 256) -> dict:
    """``shift_factor`` (mean) and ``scaling_factor`` (1 / std) of the latents of ``count`` contexts."""
    x = normalize_01_to_m11(data["context"][:count].float() / 255.0)
    z = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in x.split(32)])  # [count, C, H_l, W_l]
    return {"shift_factor": float(z.mean()), "scaling_factor": float(1.0 / z.std())}


# ------------------------------------------------------------------------------------------------
# the tokens and depth pixels of every pair, shared by phases 2 and 3
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def _tokens(vae, images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images ``[P, 3, H, W]`` -> packed latents ``[P, N, 4C]`` (``to_latents``' shift and scale)."""
    from .latents import to_latents

    out = []
    for chunk in images_u8.split(64):
        lat = to_latents(normalize_01_to_m11(chunk.float() / 255.0), vae)  # [b, C, H_l, W_l]
        out.append(pack_like_pipeline(lat)[0])  # -> [b, N, 4C]
    return torch.cat(out)


@torch.no_grad()
def build_base_cache(pipe, data: dict) -> dict:
    """Constant per pair: context / target tokens ``[P, N, 4C]``, edited tokens ``[P, N, 1]``, the depth maps as
    the image encoder's ``pixel_values`` ``[P, 3, S, S]``."""
    ctx_tok, tgt_tok = _tokens(pipe.vae, data["context"]), _tokens(pipe.vae, data["target"])
    changed = (data["context"].int() - data["target"].int()).abs().amax(1, keepdim=True) > 6  # [P, 1, H, W]
    h_tok = data["context"].shape[-1] // 16
    edited = F.adaptive_max_pool2d(changed.float(), (h_tok, h_tok))  # [P, 1, H', W']
    pixels = [pipe.feature_extractor([depth_to_pil(d.float()) for d in chunk], return_tensors="pt").pixel_values
              for chunk in data["depth"].split(256)]
    return {"ctx_tok": ctx_tok, "tgt_tok": tgt_tok, "edited": edited.flatten(1)[:, :, None],  # -> [P, N, 1]
            "pixels": torch.cat(pixels).half(), "h_tok": h_tok,
            "prompts": data["prompts"]}


def _shared_cache(ctx: dict, data: dict) -> dict:
    if "cache" not in ctx:
        ctx["cache"] = build_base_cache(ctx["pipe"], data)
    return ctx["cache"]


# ------------------------------------------------------------------------------------------------
# phase 2: the image encoder must tell depth maps apart (before the base learns to read its embedding)
# ------------------------------------------------------------------------------------------------


def _depth_probe(seed: int, embed_dim: int) -> torch.Tensor:
    """A fixed linear probe ``[64, E]`` with orthonormal columns (``image_embeds [B, E] -> depth at 8 x 8 [B, 64]``,
    no bias), for training only: the embedding itself must carry the depth map, centred."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(64, embed_dim, generator=g))[0]  # [64, E]


@torch.no_grad()
def depth_embedding_spread(pipe, depth_maps) -> float:
    """How far the image embeddings of ``depth_maps`` (PIL images) lie from their mean, relative to their length:
    near 0 when the image encoder maps every depth map to the same vector."""
    pixels = pipe.feature_extractor(list(depth_maps), return_tensors="pt").pixel_values  # [P, 3, S, S]
    embeds = pipe.image_encoder(pixels.to(pipe.image_encoder.device, pipe.image_encoder.dtype)).image_embeds
    return float((embeds - embeds.mean(0)).norm(dim=1).mean() / embeds.norm(dim=1).mean())  # embeds: [P, E]


def _depth_8x8(pixels: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(pixels[:, :1].float(), 8).flatten(1)  # [B, 3, S, S] -> [B, 64]


def _probe_loss(pipe, cache: dict, probe: torch.Tensor, mean_depth: torch.Tensor, g: torch.Generator,
                batch: int = 32) -> torch.Tensor:
    """The depth map at 8 x 8, minus the mean map, redrawn from the image embedding by the fixed probe (MSE)."""
    idx = torch.randint(0, cache["pixels"].shape[0], (batch,), generator=g)
    pixels = cache["pixels"][idx].float()  # [B, 3, S, S]
    embeds = pipe.image_encoder(pixels).image_embeds  # [B, E]
    return F.mse_loss(embeds @ probe.T, _depth_8x8(pixels) - mean_depth)  # [B, E] -> [B, 64]


def train_probe(ctx: dict, data: dict) -> None:
    """Phase 2: the image encoder alone, its embedding through a fixed linear probe must give the centred depth
    map; the encoder then stays frozen, so the base learns to read an embedding that differs between maps."""
    cfg, pipe = ctx["cfg"], ctx["pipe"]
    if ctx["state"].get("probe", 0) >= cfg.probe_steps:
        return
    cache = _shared_cache(ctx, data)
    encoder = pipe.image_encoder.train().requires_grad_(True)
    probe = _depth_probe(cfg.seed, encoder.config.projection_dim)  # [64, E]
    mean_depth = _depth_8x8(cache["pixels"]).mean(0)  # [64]
    _run_phase("probe", 5, cfg.probe_steps, cfg.probe_lr, list(encoder.parameters()),
               lambda g, step: _probe_loss(pipe, cache, probe, mean_depth, g), ctx)
    encoder.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# phase 3: the base transformer with its IP-Adapter
# ------------------------------------------------------------------------------------------------


def _sigmas(g: torch.Generator, batch: int, shift: float = 1.6) -> torch.Tensor:
    """``[B]`` flow-matching times: logit-normal, shifted towards noise as the sampler's schedule is."""
    u = torch.sigmoid(torch.randn(batch, generator=g))
    return (shift * u / (1 + (shift - 1) * u)).clamp(1e-3, 1.0)


def _base_batch(cache: dict, cfg: PretrainConfig, g: torch.Generator) -> dict:
    """One batch: indices, prompts, tokens, loss weights, and whether it sees depth."""
    b = cfg.batch_size
    idx = torch.randint(0, cache["ctx_tok"].shape[0], (b,), generator=g)
    ctx, tgt = cache["ctx_tok"][idx].clone(), cache["tgt_tok"][idx].clone()
    weight = 1.0 + cfg.edit_weight * cache["edited"][idx]  # [B, N, 1]
    prompts = [cache["prompts"][i] for i in idx.tolist()]
    long_text = bool(torch.rand(1, generator=g) < cfg.long_text_fraction)
    use_depth = bool(torch.rand(1, generator=g) < cfg.depth_fraction)
    keep = torch.rand(b, generator=g) < cfg.keep_fraction
    keep_prompt = torch.randint(0, len(KEEP_PROMPTS), (b,), generator=g).tolist()
    if keep.any():  # more copies: the context is the target, with an empty or "keep" prompt
        tgt[keep], weight[keep] = ctx[keep], 1.0
        prompts = [KEEP_PROMPTS[k] if c else p for c, k, p in zip(keep.tolist(), keep_prompt, prompts)]
    return {"idx": idx, "ctx": ctx, "tgt": tgt, "weight": weight, "prompts": prompts,
            "max_sequence_length": 512 if long_text else 32, "use_depth": use_depth,
            "sigma": _sigmas(g, b), "noise": torch.randn(tgt.shape, generator=g),
            "guidance": 1.0 + 3.0 * torch.rand(b, generator=g)}


def _base_loss(pipe, cache: dict, cfg: PretrainConfig, g: torch.Generator) -> torch.Tensor:
    """Weighted flow-matching loss of one batch (velocity ``noise - target``)."""
    batch = _base_batch(cache, cfg, g)
    with torch.no_grad():
        embeds, pooled, txt_ids = pipe.encode_prompt(prompt=batch["prompts"], prompt_2=None, device="cpu",
                                                     max_sequence_length=batch["max_sequence_length"])
    ip = None
    if batch["use_depth"]:
        pixels = cache["pixels"][batch["idx"]].float()  # [B, 3, S, S]
        ip = [pipe.image_encoder(pixels).image_embeds[:, None, :]]  # [B, E] -> [B, 1, E]
    s = batch["sigma"][:, None, None]  # [B] -> [B, 1, 1]
    noisy = (1.0 - s) * batch["tgt"] + s * batch["noise"]
    h_tok = cache["h_tok"]
    pred = kontext_forward(pipe.transformer, noisy, batch["ctx"], None, sigma=batch["sigma"], prompt_embeds=embeds,
                           pooled_prompt_embeds=pooled, txt_ids=txt_ids, h_tok=h_tok, w_tok=h_tok,
                           guidance=batch["guidance"], ip_adapter_image_embeds=ip)
    se = (pred.float() - (batch["noise"] - batch["tgt"])) ** 2 * batch["weight"]  # [B, N, 4C]
    return se.mean() / batch["weight"].mean()


def train_base(ctx: dict, data: dict) -> None:
    """Phase 3: the transformer with its IP-Adapter; the text encoders, the VAE and the image encoder frozen."""
    cfg, pipe = ctx["cfg"], ctx["pipe"]
    if ctx["state"].get("base", 0) >= cfg.base_steps:
        return
    cache = _shared_cache(ctx, data)
    pipe.transformer.train().requires_grad_(True)
    params = list(pipe.transformer.parameters())
    _run_phase("base", 3, cfg.base_steps, cfg.base_lr, params, lambda g, step: _base_loss(pipe, cache, cfg, g), ctx)
    pipe.transformer.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------

_MUST_MATCH = ("seed", "pairs", "resolution", "batch_size", "vae_batch_size", "vae_full_batch_size")
_PHASES = ("vae_crop", "vae_full", "probe", "base", "vae_decoder")


def _phase_seconds(state: dict) -> dict:
    return {k: round(state.get(f"{k}_seconds", 0.0), 1) for k in _PHASES}


def _resume_state(folder: str, pipe, cfg: PretrainConfig) -> tuple[dict, dict | None]:
    """The saved run in ``folder`` (or a fresh state), refused when it was made with other data or batch."""
    if not os.path.isfile(_state_path(folder)):
        return {"config": dataclasses.asdict(cfg)}, None
    state, opt = load_run_state(folder, pipe)
    saved = state.get("config", {})
    differ = [f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in _MUST_MATCH if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise ValueError(f"{_state_path(folder)} belongs to a run with other settings ({'; '.join(differ)}): use "
                         "them, or another --out folder")
    print(f"resuming from {_state_path(folder)}: " + ", ".join(f"{k} {state[k]}" for k in _PHASES if k in state))
    state["config"] = dataclasses.asdict(cfg)
    return state, opt


def export_run_state(out_dir: str, weights_path: str | None = None, decoder_from: str | None = None) -> str:
    """Write the weights of a run's last saved state (e.g. of an interrupted run) as the tiny weights file.

    ``decoder_from``: another run folder of the same run whose VAE decoder replaces this one's (the decoder
    phase changes no latent, so it may run beside the base phase, from a copy of the state after the VAE).
    """
    for folder in (out_dir, decoder_from):
        if folder is not None and not os.path.isfile(_state_path(folder)):
            raise FileNotFoundError(f"{_state_path(folder)} does not exist: run pretrain-tiny with --out {folder}")
    pipe = build_tiny_pipeline(0)
    state, _ = load_run_state(out_dir, pipe)
    config = dict(state.get("config") or {})
    if decoder_from is not None:
        other = build_tiny_pipeline(0)
        other_state, _ = load_run_state(decoder_from, other)
        if other_state.get("latent_stats") != state.get("latent_stats"):
            raise ValueError(f"{decoder_from} and {out_dir} have other VAE latents: not two parts of one run")
        pipe.vae.decoder.load_state_dict(other.vae.decoder.state_dict())
        for key in ("vae_decoder", "vae_decoder_seconds"):
            state[key] = other_state.get(key, 0)
        config["decoder_steps"] = other_state.get("config", {}).get("decoder_steps", state["vae_decoder"])
    progress = {k: state.get(k, 0) for k in _PHASES}
    seconds = _phase_seconds(state)
    weights_path = weights_path or TINY_WEIGHTS_FILE
    save_tiny_weights(pipe, weights_path, {"config": config, "steps_done": progress, "train_seconds": seconds})
    print(f"wrote {weights_path} from {_state_path(out_dir)} (updates done: {progress})")
    return weights_path


def pretrain_tiny(cfg: PretrainConfig, out_dir: str, weights_path: str | None = None, *,
                  progress: bool = True) -> str:
    """Run (or resume) the whole pretraining in ``out_dir``; write the fp16 weights to ``weights_path``
    (default: the package's :data:`TINY_WEIGHTS_FILE`). Returns that path."""
    torch.set_num_threads(cfg.threads)
    os.makedirs(out_dir, exist_ok=True)
    weights_path = weights_path or TINY_WEIGHTS_FILE
    t0 = time.perf_counter()
    data = render_training_set(cfg, out_dir, progress)
    pipe = build_tiny_pipeline(cfg.seed)
    state, opt = _resume_state(out_dir, pipe, cfg)
    ctx = {"cfg": cfg, "pipe": pipe, "state": state, "folder": out_dir, "optimizer_state": opt, "progress": progress}
    train_vae(ctx, data)
    if "latent_stats" not in state:
        state["latent_stats"] = latent_stats(pipe.vae, data)
        _set_latent_stats(pipe.vae, state["latent_stats"])
        save_run_state(out_dir, pipe, None, state)
    train_probe(ctx, data)
    train_base(ctx, data)
    train_decoder(ctx, data)
    seconds = _phase_seconds(state)
    info = {"config": dataclasses.asdict(cfg), "train_seconds": seconds, "torch": torch.__version__}
    save_tiny_weights(pipe, weights_path, info)
    print(f"wrote {weights_path} ({os.path.getsize(weights_path) / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - t0:.0f} s in this run; phase seconds {seconds}")
    return weights_path
