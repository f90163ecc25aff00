"""Model plumbing shared by every notebook: device and dtype, moving encoders, the LoRA and its on/off switch.

Nothing here knows about the course's tensors; it wraps what diffusers and PEFT already provide
(``diffusers.training_utils.offload_models`` / ``free_memory``, ``transformer.add_adapter``, PEFT's
``get_peft_model_state_dict`` / ``set_peft_model_state_dict``).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

# The first releases whose from_pretrained takes dtype= (torch_dtype= is deprecated there).
_DTYPE_ARGUMENT_SINCE = {"diffusers": "0.40.0", "transformers": "4.56.0"}


def dtype_argument(library: str, dtype: torch.dtype) -> dict:
    """``{"dtype": dtype}`` for ``from_pretrained`` of the installed ``library`` ("diffusers" or "transformers")
    when it takes that name, else ``{"torch_dtype": dtype}`` (older releases know only the old name)."""
    from importlib.metadata import version

    from packaging.version import Version

    new = Version(version(library)) >= Version(_DTYPE_ARGUMENT_SINCE[library])
    return {"dtype" if new else "torch_dtype": dtype}


def read_safetensors(path: str, fix: str, *, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a whole safetensors file on the CPU: the package's one reader of weight files.

    A damaged file (cut short by a failed copy, a full disk or a Drive sync; empty; or not a safetensors file at
    all) raises a ``ValueError`` that names the file, its size, safetensors' own complaint, and ``fix``: what to
    do about it. A missing file raises ``FileNotFoundError`` as it is. Nothing is read lazily, so a caller that
    reads every file before it changes a model leaves the model as it was. ``tensors=False`` checks the file
    without reading a tensor (safetensors checks, when it opens a file, that its header covers the file's length
    exactly) and returns ``({}, metadata)``.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else {}
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError) as err:  # safetensors' header and length checks; a storage read failing
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        raise ValueError(f"{path} is damaged: it is not a complete safetensors file ({size} bytes; safetensors "
                         f"says: {err}). A copy cut short, a full disk or an unfinished sync leaves such a file. "
                         f"{fix}") from err
    return state, meta


def collect_lora_named_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable LoRA ``(name, parameter)`` pairs of a PEFT-wrapped module (names containing ``lora_``)."""
    return [(n, p) for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


def pipeline_modules(pipe) -> list[nn.Module]:
    """The pipeline's models: text encoders, VAE, transformer and image encoder (those present)."""
    names = ("text_encoder", "text_encoder_2", "vae", "transformer", "image_encoder")
    return [m for m in (getattr(pipe, n, None) for n in names) if isinstance(m, nn.Module)]


def default_dtype(device=None) -> torch.dtype:
    """bf16 on a GPU that supports it, fp16 on older GPUs (T4), fp32 on a CPU."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# LoRA target presets. "attn" adapts every attention projection; "attn_ff" adds the feed-forward layers of the
# double blocks and the single blocks' proj_mlp (as in the list of diffusers' train_dreambooth_lora_flux_kontext.py)
# and also "proj_out": the single blocks' output projections and the transformer's final one, which that list omits.
LORA_TARGET_PRESETS = {
    "attn": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
             "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"],
    "attn_ff": ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"],
}


IP_ADAPTER_LORA_TARGETS = ["to_k_ip.0", "to_v_ip.0"]


def add_lora(
    transformer,
    *,
    rank: int = 16,
    alpha: float | None = None,
    targets: str | list[str] = "attn",
    include_ip_adapter: bool = False,
    adapter_name: str = "default",
    init_lora_weights: str | bool = "gaussian",
) -> list[tuple[str, nn.Parameter]]:
    """Attach a PEFT LoRA to the Flux transformer with ``transformer.add_adapter`` and return its parameters.

    Args:
        rank, alpha: LoRA rank and alpha (``alpha=None`` means ``alpha = rank``, a scale of 1).
        targets: a preset name from :data:`LORA_TARGET_PRESETS` or a list of module-name suffixes.
        include_ip_adapter: also adapt the IP-Adapter's ``to_k_ip`` / ``to_v_ip`` projections.
    Returns:
        the trainable LoRA ``(name, parameter)`` pairs (:func:`collect_lora_named_params`).
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if isinstance(targets, str):
        if targets not in LORA_TARGET_PRESETS:
            raise ValueError(f"unknown LoRA target preset {targets!r}; choose one of {sorted(LORA_TARGET_PRESETS)}")
        targets = LORA_TARGET_PRESETS[targets]
    targets = list(targets)
    if include_ip_adapter:
        if not has_ip_adapter(transformer):
            raise ValueError("include_ip_adapter=True but the transformer has no IP-Adapter loaded")
        targets += IP_ADAPTER_LORA_TARGETS
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        init_lora_weights=init_lora_weights, target_modules=targets)
    transformer.add_adapter(config, adapter_name=adapter_name)
    transformer.set_adapter(adapter_name)
    return collect_lora_named_params(transformer)


def movable_modules(modules) -> list[nn.Module]:
    """The modules that ``.to(device)`` may move: present, with parameters, not bitsandbytes-quantized."""
    return [m for m in modules if isinstance(m, nn.Module) and not is_quantized(m)
            and next(m.parameters(), None) is not None]


def move_modules(modules, device) -> None:
    """Move every movable module (:func:`movable_modules`) to ``device``."""
    for m in movable_modules(modules):
        m.to(device)


@contextlib.contextmanager
def modules_visiting(device, modules):
    """Bring ``modules`` to ``device`` for a block, then back to where each one was.

    diffusers' ``training_utils.offload_models`` does the moving; ``free_memory`` then releases the
    accelerator's cache. An encoder that lives on the CPU (offloaded) visits the GPU only while it works.
    """
    from diffusers.training_utils import free_memory, offload_models

    movable = movable_modules(modules)
    with offload_models(*movable, device=device, offload=bool(movable)):
        yield
    if torch.device(device).type != "cpu":
        free_memory()


def is_quantized(module) -> bool:
    """True for a bitsandbytes-quantized model (it is placed when loaded and cannot be moved with ``.to``)."""
    return bool(getattr(module, "is_quantized", False) or getattr(module, "quantization_config", None))


def has_ip_adapter(transformer) -> bool:
    """True when an IP-Adapter is attached (diffusers' ``load_ip_adapter`` sets ``encoder_hid_proj``)."""
    return getattr(transformer, "encoder_hid_proj", None) is not None


def without_ip_image(module, kwargs: dict) -> dict:
    """The keyword arguments of a transformer call, with ``ip_hidden_states=[]`` in ``joint_attention_kwargs`` when
    an IP-Adapter is attached and the call brings no image (neither ``ip_adapter_image_embeds`` nor tokens).

    diffusers' ``FluxIPAdapterAttnProcessor.__call__`` loops ``zip(ip_hidden_states, self.scale, ...)`` and adds
    the sum to ``torch.zeros_like(hidden_states)``: ``None`` (no image) stops it with a ``TypeError``, ``[]`` adds
    exactly zero, as if no IP-Adapter were loaded. A fresh dict: the caller's is left as it was.
    """
    attn = kwargs.get("joint_attention_kwargs") or {}
    if has_ip_adapter(module) and "ip_adapter_image_embeds" not in attn and "ip_hidden_states" not in attn:
        return {**kwargs, "joint_attention_kwargs": {**attn, "ip_hidden_states": []}}
    return kwargs


# joint_attention_kwargs is the 8th parameter of FluxTransformer2DModel.forward: a call that passes it by position
# is left alone (diffusers' pipelines and this package pass every argument by keyword)
_JOINT_ATTENTION_POSITION = 7


def _no_ip_image_hook(module, args, kwargs):
    """Forward pre-hook of :func:`accept_calls_without_ip_image`."""
    if len(args) > _JOINT_ATTENTION_POSITION:
        return None
    return args, without_ip_image(module, kwargs)


def accept_calls_without_ip_image(transformer) -> None:
    """Let ``pipe(image=..., prompt=...)`` run without ``ip_adapter_image`` on a transformer with an IP-Adapter.

    A forward pre-hook applies :func:`without_ip_image` to every call: the IP-Adapter then adds exactly zero, and
    the result equals the pipeline with the adapter unloaded. Registered once per transformer (``load_pipeline``
    and the tiny pipeline do it when they attach the adapter); after ``pipe.unload_ip_adapter()`` it does nothing.
    """
    if not getattr(transformer, "_accepts_calls_without_ip_image", False):
        transformer.register_forward_pre_hook(_no_ip_image_hook, with_kwargs=True)
        transformer._accepts_calls_without_ip_image = True


def ip_adapter_processors(transformer) -> list:
    """The transformer's IP-Adapter attention processors (those with a per-adapter ``scale`` list)."""
    return [p for p in transformer.attn_processors.values() if isinstance(getattr(p, "scale", None), list)]


def lora_layers(transformer) -> list:
    """PEFT's LoRA layers inside ``transformer`` (``BaseTunerLayer`` instances)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def lora_off(transformer):
    """Run the base model: LoRA layers disabled inside the block; their state and ``requires_grad`` restored after
    (PEFT's ``enable_adapters`` also switches gradients, which must not leak into a training run)."""
    layers = lora_layers(transformer)
    was_disabled = [layer.disable_adapters for layer in layers]
    grads = [(p, p.requires_grad) for n, p in transformer.named_parameters() if "lora_" in n]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for param, flag in grads:
            param.requires_grad_(flag)


def lora_adapter_name(transformer) -> str:
    """The name of the transformer's active LoRA adapter (``"default"`` unless it was loaded under another)."""
    names = list(getattr(transformer, "peft_config", None) or {})
    if not names:
        raise ValueError("the transformer carries no LoRA: attach one with add_lora(...) first")
    active = getattr(transformer, "active_adapters", None)
    active = active() if callable(active) else []
    return active[0] if active else names[0]


def lora_state_dict(transformer, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA weights of one adapter with PEFT's ``get_peft_model_state_dict``: keys like
    ``transformer_blocks.0.attn.to_q.lora_A.weight``, the one key format of checkpoints and saved adapters."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_lora_state_dict(transformer, state: dict[str, torch.Tensor], *, adapter_name: str = "default",
                         source: str = "the state dict") -> None:
    """Copy LoRA weights in :func:`lora_state_dict`'s format into an attached adapter (PEFT's
    ``set_peft_model_state_dict``); every key must match, or a ``ValueError`` names what differs."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    expected = set(get_peft_model_state_dict(transformer, adapter_name=adapter_name))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{source} does not match this LoRA: missing {missing[:3]}, unexpected {unexpected[:3]} "
                         f"({len(missing)} and {len(unexpected)} keys): was it trained with other LoRA targets?")
    with torch.no_grad():
        set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
