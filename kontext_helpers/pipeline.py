"""Loading a pipeline in any of the worlds, and the notebooks' first-cell helpers.

``load_pipeline("tiny")`` builds the offline tiny model; a Hub id or a local folder loads the real
FLUX.1 Kontext [dev] (or anything saved in its layout) with an image encoder and an IP-Adapter.
"""

from __future__ import annotations

import os

import torch

from .models import (
    accept_calls_without_ip_image,
    default_device,
    default_dtype,
    dtype_argument,
    is_quantized,
    pipeline_modules,
)
from .rehearsal import _load_arguments, is_rehearsal_folder
from .tiny import TINY_WEIGHTS_FILE, build_tiny_pipeline


def describe_environment(model: str | None = None) -> None:
    """Print the versions and the device a notebook runs on: the first cell's sanity check."""
    import importlib.metadata as md
    import platform
    import sys

    info = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        bf16 = torch.cuda.is_bf16_supported()
        info["device"] = f"cuda: {props.name}, {props.total_memory / 2**30:.1f} GiB, bf16 {bf16}"
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores): use the tiny model here"
    info["colab"] = str("google.colab" in sys.modules)
    info["hub"] = "offline (HF_HUB_OFFLINE)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") else "online"
    if model is not None:
        info["model"] = model
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:>{width}}: {value}")


def default_model() -> str:
    """The model a notebook uses by default: ``$KONTEXT_MODEL`` if set, else the real model on a GPU, else tiny."""
    return os.environ.get("KONTEXT_MODEL") or (KONTEXT_DEV if torch.cuda.is_available() else "tiny")


# Defaults of the real world.
KONTEXT_DEV = "black-forest-labs/FLUX.1-Kontext-dev"


IP_ADAPTER_REPO = "XLabs-AI/flux-ip-adapter-v2"


IP_ADAPTER_WEIGHT = "ip_adapter.safetensors"


IMAGE_ENCODER_REPO = "openai/clip-vit-large-patch14"


def _hub_help(what: str, repo: str, err: Exception) -> RuntimeError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    first_line = str(err).splitlines()[0] if str(err) else ""
    lines = [f"Could not load {what} from '{repo}': {type(err).__name__}: {first_line}"]
    if offline:
        lines.append("HF_HUB_OFFLINE is set, so only the local cache is used. Unset it "
                     "(os.environ.pop('HF_HUB_OFFLINE')) to download, or use load_pipeline('tiny') to work offline.")
    lines += [
        f"If the model is gated: open https://huggingface.co/{repo}, accept the licence with your account,",
        "then log in: in Colab `from huggingface_hub import notebook_login; notebook_login()`, in a terminal "
        "`huggingface-cli login` (or set the HF_TOKEN secret in Colab's key icon).",
        "No network? Download once elsewhere with `huggingface-cli download <repo>` and pass the local folder.",
    ]
    return RuntimeError("\n".join(lines))


def _check_model_name(model: str) -> None:
    """A path-like name that is not a folder is a typo, not a Hub id: say so before anything is downloaded."""
    if not os.path.isdir(model) and (model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1]):
        raise FileNotFoundError(f"load_pipeline: local folder '{model}' does not exist. Pass 'tiny', a Hub id such "
                                f"as '{KONTEXT_DEV}', or a folder written by pipe.save_pretrained().")


def _load_kontext(model: str, dtype, quantization_config, parts: str):
    """``FluxKontextPipeline.from_pretrained``: whole (an NF4 transformer first), the VAE alone, or the encoders."""
    from diffusers import FluxKontextPipeline

    kwargs = dtype_argument("diffusers", dtype)
    if parts != "all":  # components passed as None are not loaded
        kwargs["transformer"] = None
    if parts == "vae":  # about 170 MB instead of the 12B transformer and T5-XXL
        kwargs.update(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    try:
        if quantization_config is not None and parts == "all":  # on the GPU before T5 comes into system RAM
            kwargs["transformer"] = _load_transformer(model, dtype, quantization_config)
        return FluxKontextPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as err:  # huggingface_hub's errors derive from OSError
        raise _hub_help("FLUX.1 Kontext", model, err) from err


def _load_transformer(model: str, dtype, quantization_config):
    """``FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")``, quantized when asked."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(model, subfolder="transformer",
                                                  quantization_config=quantization_config,
                                                  **dtype_argument("diffusers", dtype))


def _load_image_encoder(pipe, image_encoder: str, dtype) -> None:
    """The CLIP image encoder the IP-Adapter was trained with, and its processor, registered on the pipeline.

    The processor is the one ``FluxIPAdapterMixin.load_ip_adapter`` creates when the pipeline has none.
    """
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(image_encoder, **dtype_argument("transformers", dtype))
    except (OSError, ValueError) as err:
        raise _hub_help("the CLIP image encoder", image_encoder, err) from err
    pipe.register_modules(image_encoder=encoder)
    if getattr(pipe, "feature_extractor", None) is None:
        size = encoder.config.image_size
        pipe.register_modules(feature_extractor=CLIPImageProcessor(size=size, crop_size=size))


def _load_ip_adapter(pipe, ip_adapter: str, weight_name: str) -> None:
    """The XLabs file through diffusers' ``load_ip_adapter`` (the image encoder is already on the pipeline)."""
    try:
        pipe.load_ip_adapter(ip_adapter, weight_name=weight_name, image_encoder_pretrained_model_name_or_path=None)
    except (OSError, ValueError) as err:
        raise _hub_help("the IP-Adapter", ip_adapter, err) from err
    accept_calls_without_ip_image(pipe.transformer)  # pipe(...) without ip_adapter_image runs, the adapter adds zero


def _resolve_sources(model: str, ip_adapter: str | None, image_encoder: str) -> tuple[str, str | None, str]:
    """A rehearsal folder stands for all three sources; the defaults of the others are the Hub's repos."""
    if model == "tiny" or not is_rehearsal_folder(model):
        return model, ip_adapter, image_encoder
    parts = _load_arguments(os.path.abspath(model))
    return (parts["model"], parts["ip_adapter"] if ip_adapter == IP_ADAPTER_REPO else ip_adapter,
            parts["image_encoder"] if image_encoder == IMAGE_ENCODER_REPO else image_encoder)


def _place(pipe, device, quantized: bool) -> None:
    """Freeze every module; move the pipeline to ``device``, or offload it around an NF4 transformer."""
    for module in pipeline_modules(pipe):
        module.eval().requires_grad_(False)
    if not quantized:
        pipe.to(device)
    else:
        # a 4-bit transformer is placed on the GPU when loaded; the encoders (T5-XXL alone is 9.5 GB in
        # 16 bit) visit the GPU only while they run, diffusers' documented route for small GPUs
        pipe.enable_model_cpu_offload(device=device)


def load_pipeline(
    model: str = "tiny",
    *,
    seed: int = 0,
    device=None,
    dtype: torch.dtype | None = None,
    ip_adapter: str | None = IP_ADAPTER_REPO,
    ip_adapter_weight_name: str = IP_ADAPTER_WEIGHT,
    image_encoder: str = IMAGE_ENCODER_REPO,
    quantization_config=None,
    vae_only: bool = False,
    encoders_only: bool = False,
    pretrained: bool = True,
):
    """A ready ``FluxKontextPipeline`` with image encoder and IP-Adapter attached.

    Args:
        model: ``"tiny"`` builds the offline tiny pipeline (:func:`build_tiny_pipeline`) with the pretrained
            weights shipped in the package (CPU previews show real edits); anything else is a Hub id
            (``"black-forest-labs/FLUX.1-Kontext-dev"``), a local folder saved with ``save_pretrained``, or a
            folder written by :func:`build_rehearsal_model` (its pipeline, IP-Adapter and image encoder), loaded
            with ``FluxKontextPipeline.from_pretrained``.
        seed: weights of the random tiny pipeline (ignored for a pretrained or real model).
        device: where the pipeline goes; default CUDA when available, else CPU (tiny: CPU).
        dtype: default bf16 on a recent GPU, fp16 on a T4, fp32 on a CPU (tiny: fp32).
        ip_adapter: an XLabs Flux IP-Adapter repo or folder (``None`` skips it).
        image_encoder: the CLIP vision encoder the IP-Adapter was trained with (ViT-L/14).
        quantization_config: optional diffusers ``BitsAndBytesConfig`` for the transformer (NF4 on small GPUs).
        vae_only: load the VAE and the scheduler alone (the transformer, text encoders and IP-Adapter are
            ``None``): what notebook 02 needs. The tiny pipeline is always complete.
        encoders_only: everything but the transformer (text encoders, VAE, image encoder): what
            :func:`build_train_cache` needs. Then :func:`free_text_encoders` and :func:`add_transformer`:
            the way to train on a GPU whose system RAM cannot hold T5-XXL beside the transformer (T4, L4).
        pretrained: tiny only: ``False`` gives the same architecture with random weights from ``seed``, which
            needs no file (tests that only check plumbing use it).
    """
    if model == "tiny":
        if encoders_only:
            raise ValueError("encoders_only is for the real model's staged loading; the tiny pipeline is built whole")
        return build_tiny_pipeline(seed, with_ip_adapter=ip_adapter is not None, device=device,
                                   weights=TINY_WEIGHTS_FILE if pretrained else None, dtype=dtype or torch.float32)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    _check_model_name(model)
    model, ip_adapter, image_encoder = _resolve_sources(model, ip_adapter, image_encoder)
    parts = "vae" if vae_only else "encoders" if encoders_only else "all"
    pipe = _load_kontext(model, dtype, quantization_config, parts)
    if ip_adapter is not None and parts != "vae":
        _load_image_encoder(pipe, image_encoder, dtype)
        if parts == "all":
            _load_ip_adapter(pipe, ip_adapter, ip_adapter_weight_name)
    _place(pipe, device, quantization_config is not None and parts == "all")
    return pipe


def free_text_encoders(pipe) -> None:
    """Drop T5 and the CLIP text encoder (about 9.7 GB in 16 bits) once the prompts are cached; tokenizers stay."""
    from diffusers.training_utils import free_memory

    pipe.register_modules(text_encoder=None, text_encoder_2=None)
    free_memory()  # gc, then the CUDA cache gives their memory back


def add_transformer(pipe, model: str, *, device=None, dtype: torch.dtype | None = None,
                    ip_adapter: str | None = IP_ADAPTER_REPO, ip_adapter_weight_name: str = IP_ADAPTER_WEIGHT,
                    quantization_config=None):
    """Load ``model``'s transformer into ``pipe`` (replacing any), attach the IP-Adapter, freeze and place it.

    The second stage after ``load_pipeline(model, encoders_only=True)``; also gives a fresh base transformer
    (no LoRA) to a pipeline that already has one. The IP-Adapter needs the pipeline's image encoder.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    model, ip_adapter, _ = _resolve_sources(model, ip_adapter, IMAGE_ENCODER_REPO)
    if getattr(pipe, "transformer", None) is not None:  # free the old one before the new one comes in
        from diffusers.training_utils import free_memory

        pipe.register_modules(transformer=None)
        free_memory()
    try:
        transformer = _load_transformer(model, dtype, quantization_config)
    except (OSError, ValueError) as err:
        raise _hub_help("the FLUX.1 Kontext transformer", model, err) from err
    pipe.register_modules(transformer=transformer)
    if ip_adapter is not None and getattr(pipe, "image_encoder", None) is not None:
        _load_ip_adapter(pipe, ip_adapter, ip_adapter_weight_name)
    _place(pipe, device, is_quantized(transformer))
    return pipe


def nf4_quantization_config(compute_dtype: torch.dtype | None = None):
    """diffusers' ``BitsAndBytesConfig`` for an NF4 base transformer (pass to ``load_pipeline``).

    ``compute_dtype`` defaults to :func:`default_dtype` (bf16 on recent GPUs, fp16 on a T4).
    """
    from diffusers import BitsAndBytesConfig

    try:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=compute_dtype or default_dtype())
    except ImportError as err:  # diffusers looks up bitsandbytes' package metadata here
        raise RuntimeError(f"NF4 needs bitsandbytes ({type(err).__name__}: {err}): `pip install bitsandbytes` on a "
                           "CUDA GPU (in Colab the setup cell installs it when the GPU's preset uses NF4), or load "
                           "without quantization_config") from err
