"""Notebook 04: what a training run keeps in memory, counted before anything is downloaded.

The weights are exact: every component of FLUX.1 Kontext [dev] is built from its configuration on the meta
device (no memory, no download) and its parameters are counted, and so are the modules trained beside the LoRA
(the region module of ``config.region_kind``, the depth module of ``config.depth_kind``) and the depth signal the
training cache keeps on the GPU for every sample. Bytes per parameter follow the preset
(bf16 / fp16: 2, NF4: 4 bits plus one fp32 scale per 64 weights). What is not counted: activations, which
depend on resolution and gradient checkpointing and are measured by the benchmarks, and the libraries'
own overhead. So the totals are lower bounds, labelled as such.

:func:`estimate_peak` adds the activations: ``make bench`` measures one double and one single block at real
width (``benchmarks/real_width.py``) and writes ``block_calibration.json`` beside this module; the estimate
scales those figures to 19 + 38 blocks. The GPU presets' peak figures are this estimate, written into the
same file by the bench (``kh.GPU_PRESETS`` reads them there).
"""

from __future__ import annotations

import copy
import functools
import json

import torch

from .buckets import largest_bucket_tokens
from .conditioning import make_region_module
from .config import BLOCK_CALIBRATION_FILE, TrainConfig
from .depth import PATCH, make_depth_module
from .models import IP_ADAPTER_LORA_TARGETS, LORA_TARGET_PRESETS
from .rehearsal import REHEARSAL_CONFIG
from .tiny import tiny_ip_adapter_state_dict

# FLUX.1 Kontext [dev]'s layer counts (the rehearsal configuration keeps one of each).
REAL_LAYERS = {"transformer": {"num_layers": 19, "num_single_layers": 38}, "clip_text": {"num_hidden_layers": 12},
               "t5": {"num_layers": 24}, "clip_vision": {"num_hidden_layers": 24}}
NF4_BYTES = 0.5 + 4 / 64  # 4-bit weights plus bitsandbytes' fp32 absmax per block of 64
_GB = 1e9


def real_model_config() -> dict:
    """:data:`REHEARSAL_CONFIG` with the real model's layer counts: FLUX.1 Kontext [dev]'s own configurations."""
    config = copy.deepcopy(REHEARSAL_CONFIG)
    for part, layers in REAL_LAYERS.items():
        config[part].update(layers)
    return config


def _meta_transformer(config: dict):
    """The Flux transformer of ``config`` on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        return FluxTransformer2DModel(**config["transformer"])


def _meta_models(config: dict) -> dict:
    """Every component built on the meta device from ``config`` (no weights are allocated)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    with init_empty_weights():
        t5 = T5EncoderModel(T5Config(**config["t5"]))
        t5.set_input_embeddings(t5.shared)  # the encoder's embedding is the shared one, counted once
        return {
            "transformer": _meta_transformer(config),
            "t5": t5,
            "clip_text": CLIPTextModel(CLIPTextConfig(**config["clip_text"])),
            "vae": AutoencoderKL(in_channels=3, out_channels=3, **config["vae"]),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**config["clip_vision"])),
        }


@functools.lru_cache(maxsize=1)
def _real_meta_models() -> tuple[dict, dict]:
    """The real configuration and its models on the meta device, built once (they hold no memory)."""
    config = real_model_config()
    return config, _meta_models(config)


def _linear_split(model) -> tuple[int, int]:
    """``(parameters in Linear weights, all other parameters)``: NF4 quantizes the first kind only."""
    from torch import nn

    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return linear, sum(p.numel() for p in model.parameters()) - linear


def ip_adapter_parameters(config: dict, transformer=None) -> int:
    """The XLabs IP-Adapter: the image projection and ``to_k_ip`` / ``to_v_ip`` in every double block, counted
    from the file layout the tiny and rehearsal worlds write (:func:`tiny_ip_adapter_state_dict`), on meta."""
    transformer = transformer if transformer is not None else _meta_transformer(config)
    with torch.device("meta"):
        layout = tiny_ip_adapter_state_dict(transformer, config["clip_vision"]["projection_dim"],
                                            config["ip_adapter"]["num_tokens"])
    return sum(t.numel() for t in layout.values())


def lora_parameters(transformer, rank: int, targets: str | list[str], include_ip_adapter: bool = False) -> int:
    """Parameters a LoRA of ``rank`` adds: ``rank * (in + out)`` for every targeted Linear of ``transformer``."""
    from torch import nn

    suffixes = LORA_TARGET_PRESETS[targets] if isinstance(targets, str) else list(targets)
    suffixes = list(suffixes) + (IP_ADAPTER_LORA_TARGETS if include_ip_adapter else [])
    return sum(rank * (m.in_features + m.out_features) for name, m in transformer.named_modules()
               if isinstance(m, nn.Linear) and any(name.endswith(s) for s in suffixes))


def trained_module_parameters(config: TrainConfig, c_in: int | None = None) -> dict[str, int]:
    """``{"region": ..., "depth": ...}``: parameters of the modules ``kh.train`` trains beside the LoRA for
    ``config`` (its ``region_kind`` on the ``resolution / 16`` token grid, its ``depth_kind`` when ``use_depth``),
    built on the meta device for ``c_in``-channel tokens (default: the real transformer's ``in_channels``, 64).
    ``"none"``, ``"ip_adapter"`` (nothing trained: the IP-Adapter is frozen) and ``use_depth=False`` count 0."""
    c_in = c_in if c_in is not None else real_model_config()["transformer"]["in_channels"]
    grid = config.resolution // PATCH
    with torch.device("meta"):
        region = make_region_module(config.region_kind, grid, grid, c_in) if config.region_kind != "none" else None
        depth = make_depth_module(config.depth_kind, c_in) if config.use_depth else None
    return {name: sum(p.numel() for p in m.parameters()) if m is not None else 0
            for name, m in (("region", region), ("depth", depth))}


def depth_cache_bytes(config: TrainConfig, num_samples: int = 1, *, ip_embed_dim: int | None = None,
                      ip_embed_bytes: int = 2) -> int:
    """Bytes of the depth signal :func:`kh.build_train_cache` keeps for ``num_samples`` samples of ``config``:
    ``"tokens"``: ``depth_feat [1, N, 256]`` float32 per sample (``kh.depth_token_features`` computes in float32
    and the cache keeps it so), ``N`` the largest bucket's tokens (:func:`largest_bucket_tokens`, e.g. 4150 at
    1024 px against the square's 4096: a bound for every resize policy); ``"ip_adapter"``: the CLIP embedding
    ``[1, 1, E]``
    in the image encoder's dtype (16-bit on a GPU: ``ip_embed_bytes``), ``E`` the projection width (768);
    ``"none"`` or ``use_depth=False``: 0."""
    if not config.use_depth or config.depth_kind == "none":
        return 0
    if config.depth_kind == "tokens":
        return num_samples * largest_bucket_tokens(config.resolution) * PATCH * PATCH * 4
    dim = ip_embed_dim if ip_embed_dim is not None else real_model_config()["clip_vision"]["projection_dim"]
    return num_samples * dim * ip_embed_bytes


def _trained_modules_gb(config: TrainConfig, num_samples: int) -> dict[str, float]:
    """GB of the region and depth modules (fp32 weights, gradients, optimizer states, as the LoRA's) and of the
    cached depth signal of ``num_samples`` samples."""
    params = trained_module_parameters(config)
    per_param = 4 + 4 + 2 * (1 if config.optimizer == "adamw8bit" else 4)
    return {"region module, gradients, optimizer": params["region"] * per_param / _GB,
            "depth module, gradients, optimizer": params["depth"] * per_param / _GB,
            "cached depth signal": depth_cache_bytes(config, num_samples) / _GB}


def parameter_counts(config: dict | None = None) -> dict[str, tuple[int, int]]:
    """``{component: (Linear-weight parameters, other parameters)}`` of the real model (or of ``config``)."""
    models = _meta_models(config) if config is not None else _real_meta_models()[1]
    return {name: _linear_split(model) for name, model in models.items()}


def _training_gb(counts: dict, config: TrainConfig, lora: int, ip_adapter: int) -> dict[str, float]:
    """GPU weights and states of a training run (encoders offloaded after caching), in GB."""
    linear, other = counts["transformer"]
    base = linear * (NF4_BYTES if config.quantize_base == "nf4" else 2) + other * 2
    optimizer = 2 * (1 if config.optimizer == "adamw8bit" else 4)  # two moments per parameter
    return {"transformer weights": base / _GB, "IP-Adapter weights": ip_adapter * 2 / _GB,
            "LoRA weights, gradients, optimizer": lora * (4 + 4 + optimizer) / _GB}


def memory_plan(config: TrainConfig | None = None, *, num_samples: int = 1, verbose: bool = True) -> dict:
    """What FLUX.1 Kontext [dev] keeps in memory for a training run of ``config`` (default: this GPU's preset).

    Returns ``{"parameters": {component: count}, "gpu_gb": {...}, "gpu_weights_gb", "ram_gb": {...},
    "ram_weights_gb", "num_samples", "depth_cache_bytes"}``: the GPU holds the transformer, the IP-Adapter, the
    LoRA's, the region module's and the depth module's states, and the cached depth signal of ``num_samples``
    samples (:func:`depth_cache_bytes`) once the encoders are cached and offloaded; system RAM holds the encoders
    (16-bit) while they wait on the CPU. Both totals leave out activations, the rest of the cache (prompts,
    latents) and library overhead: they are lower bounds, not measurements.
    """
    config = config or TrainConfig.for_gpu("auto")
    real, models = _real_meta_models()
    counts = {name: _linear_split(model) for name, model in models.items()}
    ip_adapter = ip_adapter_parameters(real, models["transformer"])
    lora = lora_parameters(models["transformer"], config.rank, config.lora_targets, config.lora_ip_adapter)
    gpu = {**_training_gb(counts, config, lora, ip_adapter), **_trained_modules_gb(config, num_samples)}
    ram = {name: sum(counts[name]) * 2 / _GB for name in ("t5", "clip_text", "vae", "image_encoder")}
    plan = {"parameters": {**{k: sum(v) for k, v in counts.items()}, "ip_adapter": ip_adapter, "lora": lora,
                           **trained_module_parameters(config)},
            "gpu_gb": gpu, "gpu_weights_gb": sum(gpu.values()), "ram_gb": ram, "ram_weights_gb": sum(ram.values()),
            "num_samples": num_samples, "depth_cache_bytes": depth_cache_bytes(config, num_samples)}
    if verbose:
        _print_plan(plan, config)
    return plan


def _print_plan(plan: dict, config: TrainConfig) -> None:
    quant = "NF4" if config.quantize_base == "nf4" else "16-bit"
    print(f"memory plan for FLUX.1 Kontext [dev], rank {config.rank} '{config.lora_targets}' LoRA, {quant} "
          f"transformer, {config.optimizer} (weights and optimizer states counted; activations are not)")
    for name, count in plan["parameters"].items():
        print(f"  {name:<14} {count / 1e9:7.3f} B parameters" if count >= 1e6 else
              f"  {name:<14} {count:>11,} parameters")
    for title, key in (("GPU while training", "gpu_gb"), ("system RAM, offloaded encoders (16-bit)", "ram_gb")):
        print(f"  {title}:")
        for name, gb in plan[key].items():
            print(f"    {name:<36} {gb:6.2f} GB" if gb >= 0.01 else f"    {name:<36} {gb * 1e3:6.2f} MB")
        total = plan["gpu_weights_gb" if key == "gpu_gb" else "ram_weights_gb"]
        print(f"    {'at least':<36} {total:6.2f} GB (+ activations and overhead)")


# --- the activations, from per-block measurements (make bench writes the calibration file)

_MIB = 2**20


@functools.lru_cache(maxsize=4)
def load_calibration(path: str = BLOCK_CALIBRATION_FILE) -> dict:
    """The per-block figures ``make bench`` measured (``benchmarks/real_width.py``), read once."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line ``y = a + b x`` through ``points``."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0
    return my - b * mx, b


def block_activations_mb(calibration: dict, kind: str, checkpointing: bool, tokens: int) -> tuple[float, float]:
    """``(held, peak)`` MiB of one ``kind`` block (``"double"`` / ``"single"``) at ``tokens`` (text + image):
    what it holds between forward and backward, and its high-water mark, each a line in the token count fitted
    through the measured resolutions (activations grow linearly with the tokens under memory-efficient attention).
    """
    rows = [r for r in calibration["rows"] if r["kind"] == kind and r["checkpointing"] == checkpointing]
    held = _fit([(r["tokens"], r["saved_mb"]) for r in rows])
    peak = _fit([(r["tokens"], r["peak_mb"]) for r in rows])
    return max(held[0] + held[1] * tokens, 0.0), max(peak[0] + peak[1] * tokens, 0.0)


@functools.lru_cache(maxsize=8)
def _transformer_counts(num_layers: int, num_single_layers: int, rank: int, targets: str) -> tuple[int, int, int]:
    """``(Linear weights, other parameters, LoRA parameters)`` of the real-width transformer with these depths."""
    config = real_model_config()
    config["transformer"].update(num_layers=num_layers, num_single_layers=num_single_layers)
    transformer = _meta_transformer(config)
    return (*_linear_split(transformer), lora_parameters(transformer, rank, targets))


def estimate_peak(config: TrainConfig | None = None, *, layers: tuple[int, int] = (19, 38), ip_adapter: bool = True,
                  calibration: dict | None = None, num_samples: int = 1) -> dict:
    """Peak training memory of FLUX.1 Kontext [dev]'s transformer for ``config``, estimated from measured
    per-block figures: weights (16-bit or NF4) + IP-Adapter + LoRA weights, gradients and optimizer states
    (counted on the meta device) + the region and depth modules' states and the cached depth signal of
    ``num_samples`` samples (:func:`trained_module_parameters`, :func:`depth_cache_bytes`) + activations
    (:func:`block_activations_mb`: every block's held memory plus the largest extra one block needs while it
    runs backward). ``layers``: (double, single) blocks.

    Leaves out the CUDA context, the caching allocator's slack, the encoders (offloaded after caching) and the
    cached prompts and latents. Returns GB (1e9 bytes): ``{"weights_gb", "ip_adapter_gb", "lora_gb",
    "region_gb", "depth_gb", "activations_gb", "total_gb", ...}``.
    """
    config = config or TrainConfig.for_gpu("auto")
    calibration = calibration or load_calibration()
    n_double, n_single = layers
    linear, other, lora = _transformer_counts(n_double, n_single, config.rank, config.lora_targets)
    weights = linear * (NF4_BYTES if config.quantize_base == "nf4" else 2) + other * 2
    optimizer = 2 * (1 if config.optimizer == "adamw8bit" else 4)
    # [target | context | region] + T, at the bucket with the most tokens (the square's for "square" / "crop" is less)
    tokens = 2 * largest_bucket_tokens(config.resolution) + 1 + config.max_sequence_length
    (held_d, peak_d), (held_s, peak_s) = (
        block_activations_mb(calibration, kind, config.gradient_checkpointing, tokens) for kind in ("double", "single"))
    running = max(peak_d - held_d if n_double else 0.0, peak_s - held_s if n_single else 0.0)  # the block in backward
    activations = config.batch_size * _MIB * (n_double * held_d + n_single * held_s + running)
    real, models = _real_meta_models()
    ip = ip_adapter_parameters(real, models["transformer"]) * 2 if ip_adapter else 0
    modules = _trained_modules_gb(config, num_samples)
    parts = {"weights_gb": weights / _GB, "ip_adapter_gb": ip / _GB, "lora_gb": lora * (4 + 4 + optimizer) / _GB,
             "region_gb": modules["region module, gradients, optimizer"],
             "depth_gb": modules["depth module, gradients, optimizer"] + modules["cached depth signal"],
             "activations_gb": activations / _GB}
    return {**parts, "total_gb": sum(parts.values()), "tokens": tokens, "layers": [n_double, n_single]}
