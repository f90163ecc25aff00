"""Loading a pipeline in any of the worlds, and the notebooks' first-cell helpers.

``load_pipeline("tiny")`` builds the offline tiny model; a Hub id or a local folder loads the real
FLUX.1 Kontext [dev] (or anything saved in its layout) with an image encoder and an IP-Adapter.
"""

from __future__ import annotations

import os

import torch

from .models import default_device, default_dtype, dtype_argument, pipeline_modules
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


def _load_kontext(model: str, dtype, quantization_config, vae_only: bool):
    """``FluxKontextPipeline.from_pretrained``: whole, with an NF4 transformer, or the VAE (and scheduler) alone."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    kwargs = dtype_argument("diffusers", dtype)
    if vae_only:  # components passed as None are not loaded: about 170 MB instead of the 12B transformer and T5
        kwargs.update(transformer=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    try:
        if quantization_config is not None and not vae_only:
            kwargs["transformer"] = FluxTransformer2DModel.from_pretrained(
                model, subfolder="transformer", quantization_config=quantization_config,
                **dtype_argument("diffusers", dtype))
        return FluxKontextPipeline.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as err:  # huggingface_hub's errors derive from OSError
        raise _hub_help("FLUX.1 Kontext", model, err) from err


def _attach_ip_adapter(pipe, ip_adapter: str, weight_name: str, image_encoder: str, dtype) -> None:
    """The CLIP image encoder the IP-Adapter was trained with, then the XLabs file through ``load_ip_adapter``."""
    from transformers import CLIPVisionModelWithProjection

    try:
        pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            image_encoder, **dtype_argument("transformers", dtype))
        pipe.register_modules(image_encoder=pipe.image_encoder)
        pipe.load_ip_adapter(ip_adapter, weight_name=weight_name, image_encoder_pretrained_model_name_or_path=None)
    except (OSError, ValueError) as err:
        raise _hub_help("the IP-Adapter / CLIP image encoder", ip_adapter, err) from err


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
    pretrained: bool = True,
):
    """A ready ``FluxKontextPipeline`` with image encoder and IP-Adapter attached.

    Args:
        model: ``"tiny"`` builds the offline tiny pipeline (:func:`build_tiny_pipeline`) with the pretrained
            weights shipped in the package (CPU previews show real edits); anything else is a Hub id
            (``"black-forest-labs/FLUX.1-Kontext-dev"``) or a local folder saved with ``save_pretrained``,
            loaded with ``FluxKontextPipeline.from_pretrained``.
        seed: weights of the random tiny pipeline (ignored for a pretrained or real model).
        device: where the pipeline goes; default CUDA when available, else CPU (tiny: CPU).
        dtype: default bf16 on a recent GPU, fp16 on a T4, fp32 on a CPU (tiny: fp32).
        ip_adapter: an XLabs Flux IP-Adapter repo or folder (``None`` skips it).
        image_encoder: the CLIP vision encoder the IP-Adapter was trained with (ViT-L/14).
        quantization_config: optional diffusers ``BitsAndBytesConfig`` for the transformer (NF4 on small GPUs).
        vae_only: load the VAE and the scheduler alone (the transformer, text encoders and IP-Adapter are
            ``None``): what notebook 02 needs. The tiny pipeline is always complete.
        pretrained: tiny only: ``False`` gives the same architecture with random weights from ``seed``, which
            needs no file (tests that only check plumbing use it).
    """
    if model == "tiny":
        return build_tiny_pipeline(seed, with_ip_adapter=ip_adapter is not None, device=device,
                                   weights=TINY_WEIGHTS_FILE if pretrained else None, dtype=dtype or torch.float32)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    _check_model_name(model)
    pipe = _load_kontext(model, dtype, quantization_config, vae_only)
    if ip_adapter is not None and not vae_only:
        _attach_ip_adapter(pipe, ip_adapter, ip_adapter_weight_name, image_encoder, dtype)
    for module in pipeline_modules(pipe):
        module.eval().requires_grad_(False)
    if quantization_config is None or vae_only:
        pipe.to(device)
    else:
        # a 4-bit transformer is placed on the GPU when loaded; the encoders (T5-XXL alone is 9.5 GB in
        # 16 bit) visit the GPU only while they run, diffusers' documented route for small GPUs
        pipe.enable_model_cpu_offload(device=device)
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
