"""Notebook 04: what a training run keeps in memory, counted before anything is downloaded.

The weights are exact: every component of FLUX.1 Kontext [dev] is built from its configuration on the meta
device (no memory, no download) and its parameters are counted. Bytes per parameter follow the preset
(bf16 / fp16: 2, NF4: 4 bits plus one fp32 scale per 64 weights). What is not counted: activations, which
depend on resolution and gradient checkpointing and are measured by the benchmarks, and the libraries'
own overhead. So the totals are lower bounds, labelled as such.
"""

from __future__ import annotations

import copy
import functools

import torch

from .config import TrainConfig
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


def memory_plan(config: TrainConfig | None = None, *, verbose: bool = True) -> dict:
    """What FLUX.1 Kontext [dev] keeps in memory for a training run of ``config`` (default: this GPU's preset).

    Returns ``{"parameters": {component: count}, "gpu_gb": {...}, "gpu_weights_gb", "ram_gb": {...},
    "ram_weights_gb"}``: the GPU holds the transformer, the IP-Adapter and the LoRA's states once the encoders
    are cached and offloaded; system RAM holds the encoders (16-bit) while they wait on the CPU. Both totals
    leave out activations and library overhead: they are lower bounds, not measurements.
    """
    config = config or TrainConfig.for_gpu("auto")
    real, models = _real_meta_models()
    counts = {name: _linear_split(model) for name, model in models.items()}
    ip_adapter = ip_adapter_parameters(real, models["transformer"])
    lora = lora_parameters(models["transformer"], config.rank, config.lora_targets, config.lora_ip_adapter)
    gpu = _training_gb(counts, config, lora, ip_adapter)
    ram = {name: sum(counts[name]) * 2 / _GB for name in ("t5", "clip_text", "vae", "image_encoder")}
    plan = {"parameters": {**{k: sum(v) for k, v in counts.items()}, "ip_adapter": ip_adapter, "lora": lora},
            "gpu_gb": gpu, "gpu_weights_gb": sum(gpu.values()), "ram_gb": ram, "ram_weights_gb": sum(ram.values())}
    if verbose:
        _print_plan(plan, config)
    return plan


def _print_plan(plan: dict, config: TrainConfig) -> None:
    quant = "NF4" if config.quantize_base == "nf4" else "16-bit"
    print(f"memory plan for FLUX.1 Kontext [dev], rank {config.rank} '{config.lora_targets}' LoRA, {quant} "
          f"transformer, {config.optimizer} (weights and optimizer states counted; activations are not)")
    for name, count in plan["parameters"].items():
        print(f"  {name:<14} {count / 1e9:7.3f} B parameters")
    for title, key in (("GPU while training", "gpu_gb"), ("system RAM, offloaded encoders (16-bit)", "ram_gb")):
        print(f"  {title}:")
        for name, gb in plan[key].items():
            print(f"    {name:<36} {gb:6.2f} GB")
        total = plan["gpu_weights_gb" if key == "gpu_gb" else "ram_weights_gb"]
        print(f"    {'at least':<36} {total:6.2f} GB (+ activations and overhead)")
