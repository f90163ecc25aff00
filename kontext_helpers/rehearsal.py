"""The rehearsal world: FLUX.1 Kontext [dev] at its real widths, random weights, one block of each kind.

:func:`build_rehearsal_model` writes a local folder in the Hub's layout (a ``save_pretrained`` pipeline, a
CLIP ViT-L/14 image encoder with its processor, an XLabs ``ip_adapter.safetensors``) and returns the arguments
for ``load_pipeline``. ``kh.load_pipeline(**kwargs)`` then goes down exactly the path of the Hub id
``black-forest-labs/FLUX.1-Kontext-dev`` (``FluxKontextPipeline.from_pretrained``,
``CLIPVisionModelWithProjection.from_pretrained``, ``pipe.load_ip_adapter`` of an XLabs file) with the same
arguments, at the real widths (D = 3072, T5-XXL's 4096, CLIP-L's 768, ViT-L/14's 1024 -> 768, 16 IP tokens):
a CPU proves that loading, training, resuming, sampling, saving and exporting run at real width before a GPU
is paid for. It does not edit well: the weights are random. About 1.1 billion parameters (2.2 GB in bf16),
built in seconds: the weights are drawn straight into place, not by each layer's own initialiser.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
import torch

from .tiny import tiny_clip_tokenizer, tiny_ip_adapter_state_dict, tiny_t5_tokenizer

# FLUX.1 Kontext [dev]'s own configurations (model_index.json and each component's config on the Hub), every
# width real; only the number of layers is cut ("real: ..." says how many the real model has).
REHEARSAL_CONFIG = {
    "transformer": {  # FluxTransformer2DModel, transformer/config.json
        "patch_size": 1,  # tokens are already 2x2-packed latents
        "in_channels": 64,  # 4C: 16 latent channels x 2x2 packing
        "num_layers": 1,  # double-stream blocks; real: 19
        "num_single_layers": 1,  # single-stream blocks; real: 38
        "attention_head_dim": 128,  # real
        "num_attention_heads": 24,  # real: D = 24 x 128 = 3072
        "joint_attention_dim": 4096,  # T5-XXL's d_model: the text tokens' width
        "pooled_projection_dim": 768,  # CLIP-L's pooled text vector
        "guidance_embeds": True,  # [dev] is guidance-distilled
        "axes_dims_rope": (16, 56, 56),  # RoPE over the id columns (part, row, column); sums to the head dim 128
    },
    "vae": {  # AutoencoderKL, vae/config.json (FLUX.1's)
        "block_out_channels": (128, 256, 512, 512),  # real
        "down_block_types": ("DownEncoderBlock2D",) * 4,  # real
        "up_block_types": ("UpDecoderBlock2D",) * 4,  # real
        "layers_per_block": 2,  # real
        "latent_channels": 16,  # C
        "norm_num_groups": 32,  # real
        "scaling_factor": 0.3611,  # real: latents = (z - shift) * scale
        "shift_factor": 0.1159,  # real
        "use_quant_conv": False,  # real
        "use_post_quant_conv": False,  # real
    },
    "clip_text": {  # CLIPTextModel, text_encoder/config.json (CLIP ViT-L/14's text tower)
        "hidden_size": 768,  # real: the pooled vector's width
        "intermediate_size": 3072,  # real
        "num_attention_heads": 12,  # real
        "num_hidden_layers": 1,  # real: 12
        "vocab_size": 49408,  # real (the tiny tokenizer's ids stay far below it)
        "max_position_embeddings": 77,  # real: CLIP's 77 tokens
        "projection_dim": 768,  # real
        "hidden_act": "quick_gelu",  # real
    },
    "t5": {  # T5EncoderModel, text_encoder_2/config.json (T5 v1.1 XXL)
        "d_model": 4096,  # real: the text tokens' width
        "d_ff": 10240,  # real
        "d_kv": 64,  # real
        "num_heads": 64,  # real
        "num_layers": 1,  # real: 24
        "vocab_size": 32128,  # real (the tiny tokenizer's ids stay far below it)
        "feed_forward_proj": "gated-gelu",  # real (v1.1)
        "relative_attention_num_buckets": 32,  # real
        "tie_word_embeddings": False,  # real (v1.1's flag; transformers 5 always ties T5 and keeps it elsewhere)
    },
    "clip_vision": {  # CLIPVisionModelWithProjection (openai/clip-vit-large-patch14's vision tower)
        "hidden_size": 1024,  # real
        "intermediate_size": 4096,  # real
        "num_attention_heads": 16,  # real
        "num_hidden_layers": 1,  # real: 24
        "image_size": 224,  # real
        "patch_size": 14,  # real: 16 x 16 patches + 1 class token
        "projection_dim": 768,  # real: E, the IP-Adapter's input
        "hidden_act": "quick_gelu",  # real
    },
    "image_processor": {"size": 224},  # CLIPImageProcessor: shortest edge 224, centre crop 224 x 224
    "scheduler": {  # FlowMatchEulerDiscreteScheduler, scheduler/scheduler_config.json (as the tiny world's)
        "shift": 3.0,  # real
        "use_dynamic_shifting": True,  # real: mu from the image sequence length
        "base_shift": 0.5,  # real
        "max_shift": 1.15,  # real
        "base_image_seq_len": 256,  # real
        "max_image_seq_len": 4096,  # real
    },
    "ip_adapter": {"num_tokens": 16},  # XLabs-AI/flux-ip-adapter-v2: proj [16 x 4096, 768] -> 16 image tokens
    "depth": {  # DepthAnythingForDepthEstimation: depth-anything/Depth-Anything-V2-Small-hf, for estimate_depth
        "backbone": {"hidden_size": 384, "num_attention_heads": 6, "mlp_ratio": 4, "image_size": 518,  # real
                     "patch_size": 14, "layerscale_value": 1.0,  # real
                     "num_hidden_layers": 4},  # real: 12; 4 is the fewest that feed the neck's four stages
        "neck_hidden_sizes": [48, 96, 192, 384], "reassemble_factors": [4, 2, 1, 0.5],  # real
        "reassemble_hidden_size": 384, "fusion_hidden_size": 64, "head_hidden_size": 32,  # real
        "processor_size": 518,  # DPTImageProcessor: 518 x 518, aspect kept, sides a multiple of 14
    },
}


# The folder's parts, and the record written last (its presence means the build finished).
PIPELINE_DIR, IMAGE_ENCODER_DIR, IP_ADAPTER_DIR, DEPTH_DIR = "pipeline", "image_encoder", "ip_adapter", "depth"
IP_ADAPTER_FILE = "ip_adapter.safetensors"  # XLabs' file name, load_pipeline's default weight name
RECORD_FILE = "rehearsal.json"
_REQUIRED_FILES = (
    RECORD_FILE, f"{PIPELINE_DIR}/model_index.json", f"{PIPELINE_DIR}/scheduler/scheduler_config.json",
    f"{PIPELINE_DIR}/tokenizer/tokenizer_config.json", f"{PIPELINE_DIR}/tokenizer_2/tokenizer_config.json",
    f"{IMAGE_ENCODER_DIR}/config.json", f"{IMAGE_ENCODER_DIR}/preprocessor_config.json",
    f"{IP_ADAPTER_DIR}/{IP_ADAPTER_FILE}", f"{DEPTH_DIR}/config.json", f"{DEPTH_DIR}/preprocessor_config.json",
)
_MODEL_DIRS = tuple(f"{PIPELINE_DIR}/{n}" for n in ("transformer", "vae", "text_encoder", "text_encoder_2")) + (
    IMAGE_ENCODER_DIR, DEPTH_DIR)


def _draw_seed(seed: int, key: str) -> int:
    """A seed for one tensor from ``(seed, key)``: each weight is fixed by its name, not by the order of draws."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def _random_tensor(shape: torch.Size, name: str, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """One weight: biases 0, norm scales 1, everything else uniform in +-1/sqrt(fan_in) (torch's Linear bound)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and leaf == "weight":  # LayerNorm / RMSNorm / GroupNorm scale
        return torch.ones(shape, dtype=dtype)
    fan_in = shape[1:].numel() if len(shape) > 1 else shape.numel()  # Linear [out, in], Conv [out, in, k, k]
    # uniform on a grid of 2**16 steps: numpy's PCG64 draws 16-bit integers several times faster than
    # torch's uniform_ draws floats, and the build spends most of its time here (1.1 billion weights)
    ints = np.random.default_rng(_draw_seed(seed, name)).integers(-(2**15), 2**15, size=tuple(shape), dtype=np.int16)
    return torch.from_numpy(ints).to(dtype).mul_(fan_in**-0.5 / 2**15)


def _fill_random(model: torch.nn.Module, part: str, seed: int, dtype: torch.dtype) -> torch.nn.Module:
    """Give every parameter of a model built on the meta device (buffers real) a random value of its own.

    Tied parameters (T5's shared embedding) stay tied. Several threads draw at once: each tensor has its own
    generator, seeded from its name, so the result does not depend on the scheduling.
    """
    from concurrent.futures import ThreadPoolExecutor

    slots, names = [], {}
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            names.setdefault(id(param), f"{part}.{mod_name}.{p_name}".replace("..", "."))
            slots.append((module, p_name, param))
    unique = {id(p): (names[id(p)], p.shape) for _, _, p in slots}
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        drawn = dict(zip(unique, pool.map(lambda item: _random_tensor(item[1], item[0], seed, dtype),
                                          unique.values())))
    new = {key: torch.nn.Parameter(t, requires_grad=False) for key, t in drawn.items()}
    for module, p_name, param in slots:
        module._parameters[p_name] = new[id(param)]
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"rehearsal {part}: tensors left on the meta device: {left[:5]}")
    return model.eval()


@contextlib.contextmanager
def _on_meta():
    """Build models without running their initialisers (parameters on the meta device, buffers real).

    Some constructors still draw on the CPU before the parameter moves to the meta device (CLIP's
    ``class_embedding = torch.randn(...)``): the global RNG is forked, so the caller's stays untouched.
    """
    from accelerate import init_empty_weights

    with torch.random.fork_rng(devices=[]), init_empty_weights(include_buffers=False):
        yield


def _rehearsal_text_encoders(tokenizer, tokenizer_2, seed: int, dtype: torch.dtype):
    """CLIP-L text encoder ``[B, 77] -> pooled [B, 768]`` and T5-XXL encoder ``[B, T] -> [B, T, 4096]``.

    The special-token ids follow the (tiny) tokenizers: CLIP pools the hidden state at the ``eos`` id.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_cfg = CLIPTextConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **REHEARSAL_CONFIG["clip_text"])
    t5_cfg = T5Config(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **REHEARSAL_CONFIG["t5"])
    with _on_meta():
        clip, t5 = CLIPTextModel(clip_cfg), T5EncoderModel(t5_cfg)
    t5.tie_weights()  # encoder.embed_tokens IS shared (a meta-device build unties them)
    return _fill_random(clip, "text_encoder", seed, dtype), _fill_random(t5, "text_encoder_2", seed, dtype)


def _rehearsal_vae(seed: int, dtype: torch.dtype):
    """FLUX.1's VAE: ``[B, 3, H, W] -> [B, 16, H/8, W/8]``."""
    from diffusers import AutoencoderKL

    with _on_meta():
        vae = AutoencoderKL(in_channels=3, out_channels=3, **REHEARSAL_CONFIG["vae"])
    return _fill_random(vae, "vae", seed, dtype)


def _rehearsal_transformer(seed: int, dtype: torch.dtype):
    """``FluxTransformer2DModel`` at D = 3072 with one double and one single block."""
    from diffusers import FluxTransformer2DModel

    with _on_meta():
        transformer = FluxTransformer2DModel(**REHEARSAL_CONFIG["transformer"])
    return _fill_random(transformer, "transformer", seed, dtype)


def build_rehearsal_transformer(num_layers: int = 1, num_single_layers: int = 1, *, seed: int = 0,
                                dtype: torch.dtype = torch.bfloat16, device="cpu", overrides: dict | None = None):
    """``FluxTransformer2DModel`` at FLUX.1 Kontext [dev]'s width (D = 3072) with ``num_layers`` double and
    ``num_single_layers`` single blocks (real: 19 and 38), random weights, built in memory on ``device``.
    ``overrides`` replace configuration entries (e.g. ``{"num_attention_heads": 2}`` for a smoke test).

    Built on the meta device, then drawn on ``device`` (biases 0, norm scales 1, other weights uniform in
    +-1/sqrt(fan_in)): on the CPU as :func:`build_rehearsal_model` draws them (several threads), elsewhere with
    torch's generator on the device itself, seconds even at full depth on a GPU. No folder, no Hub: for
    benchmarks and memory measurements; :func:`build_rehearsal_model` writes the loadable folder.
    """
    from diffusers import FluxTransformer2DModel

    config = dict(REHEARSAL_CONFIG["transformer"], num_layers=num_layers, num_single_layers=num_single_layers,
                  **(overrides or {}))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters made in their final dtype: allocated once, no cast afterwards
    try:
        with _on_meta():
            transformer = FluxTransformer2DModel(**config)
    finally:
        torch.set_default_dtype(default)
    if torch.device(device).type == "cpu":
        return _fill_random(transformer, "transformer", seed, dtype)
    transformer.to_empty(device=device)  # the model has no buffers to keep
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                param.zero_()
            elif param.ndim == 1:  # LayerNorm / RMSNorm scale
                param.fill_(1.0)
            else:
                bound = param.shape[1:].numel() ** -0.5  # torch's Linear bound, 1/sqrt(fan_in)
                param.uniform_(-bound, bound, generator=generator)
    return transformer.requires_grad_(False).eval()


def _rehearsal_image_encoder(seed: int, dtype: torch.dtype):
    """CLIP ViT-L/14's vision tower with projection (``[B, 3, 224, 224] -> [B, 768]``) and its processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    size = REHEARSAL_CONFIG["image_processor"]["size"]
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    with _on_meta():
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**REHEARSAL_CONFIG["clip_vision"]))
    return _fill_random(encoder, "image_encoder", seed, dtype), processor


def _write_depth_model(seed: int, folder: str) -> None:
    """Depth Anything V2 Small's widths with 4 layers, in fp32 (about 40 MB), and its ``DPTImageProcessor``."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    cfg = REHEARSAL_CONFIG["depth"]
    layers = cfg["backbone"]["num_hidden_layers"]
    backbone = Dinov2Config(**cfg["backbone"], out_features=[f"stage{i}" for i in range(1, layers + 1)],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=cfg["backbone"]["patch_size"],
                                 **{k: v for k, v in cfg.items() if k not in ("backbone", "processor_size")})
    with _on_meta():
        model = DepthAnythingForDepthEstimation(config)
    _fill_random(model, "depth", seed, torch.float32).save_pretrained(folder, safe_serialization=True)
    size = cfg["processor_size"]
    DPTImageProcessor(size={"height": size, "width": size}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      resample=3, do_pad=False).save_pretrained(folder)


def _rehearsal_ip_adapter(transformer, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """XLabs-AI/flux-ip-adapter-v2's keys and shapes: ``ip_adapter_proj_model.proj`` ``[16 x 4096, 768]`` (diffusers
    reads 65536 rows as 16 image tokens), ``.norm`` ``[4096]``, and per double block ``i``
    ``double_blocks.i.processor.ip_adapter_double_stream_{k,v}_proj`` ``[3072, 4096]``.

    The layout comes from the tiny world's :func:`tiny_ip_adapter_state_dict`, run on the meta device (shapes
    only); the values are drawn like every other weight here.
    """
    embed_dim = REHEARSAL_CONFIG["clip_vision"]["projection_dim"]  # E = 768
    with torch.device("meta"):
        layout = tiny_ip_adapter_state_dict(transformer, embed_dim, REHEARSAL_CONFIG["ip_adapter"]["num_tokens"])
    return {k: _random_tensor(v.shape, f"ip_adapter.{k}", seed, dtype) for k, v in layout.items()}


def _write_pipeline(parts: dict, folder: str) -> None:
    """``FluxKontextPipeline(...).save_pretrained``: model_index.json and one subfolder per component, safetensors.

    No image encoder or feature extractor in the pipeline, as on the Hub: ``load_pipeline`` adds them.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**REHEARSAL_CONFIG["scheduler"]), vae=parts["vae"],
        text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], text_encoder_2=parts["text_encoder_2"],
        tokenizer_2=parts["tokenizer_2"], transformer=parts["transformer"], image_encoder=None,
        feature_extractor=None)
    pipe.save_pretrained(folder, safe_serialization=True)


def _write_ip_adapter(state: dict[str, torch.Tensor], folder: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, IP_ADAPTER_FILE), metadata={"format": "pt"})


def _build_steps(seed: int, dtype: torch.dtype, tmp: str):
    """The build in named steps ``(name, step(parts))``; each step adds to or writes from ``parts``."""

    def tokenizers(parts):
        parts["tokenizer"], parts["tokenizer_2"] = tiny_clip_tokenizer(), tiny_t5_tokenizer()

    def text_encoders(parts):
        parts["text_encoder"], parts["text_encoder_2"] = _rehearsal_text_encoders(
            parts["tokenizer"], parts["tokenizer_2"], seed, dtype)

    def image_encoder(parts):
        encoder, processor = _rehearsal_image_encoder(seed, dtype)
        encoder.save_pretrained(os.path.join(tmp, IMAGE_ENCODER_DIR), safe_serialization=True)
        processor.save_pretrained(os.path.join(tmp, IMAGE_ENCODER_DIR))

    return [
        ("tokenizers", tokenizers),
        ("CLIP ViT-L/14 image encoder", image_encoder),
        ("CLIP-L + T5-XXL text encoders", text_encoders),
        ("VAE", lambda parts: parts.update(vae=_rehearsal_vae(seed, dtype))),
        ("transformer", lambda parts: parts.update(transformer=_rehearsal_transformer(seed, dtype))),
        ("IP-Adapter", lambda parts: _write_ip_adapter(_rehearsal_ip_adapter(parts["transformer"], seed, dtype),
                                                       os.path.join(tmp, IP_ADAPTER_DIR))),
        ("writing the pipeline", lambda parts: _write_pipeline(parts, os.path.join(tmp, PIPELINE_DIR))),
        ("Depth Anything V2 Small", lambda parts: _write_depth_model(seed, os.path.join(tmp, DEPTH_DIR))),
    ]


@contextlib.contextmanager
def _library_bars(show: bool):
    """transformers' own "Writing model shards" bars shown or hidden with ours; its setting comes back after."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if show else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if was else logging.disable_progress_bar)()


def _record(seed: int, dtype: torch.dtype) -> dict:
    """What ``rehearsal.json`` holds: how the folder was built (read back to decide whether to reuse it)."""
    from importlib.metadata import version

    return {"format": "kontext-rehearsal", "format_version": 2, "seed": int(seed), "dtype": str(dtype),
            "config": json.loads(json.dumps(REHEARSAL_CONFIG)),
            "versions": {n: version(n) for n in ("torch", "diffusers", "transformers")}}


def is_rehearsal_folder(folder) -> bool:
    """True for a folder written by :func:`build_rehearsal_model` (it holds ``rehearsal.json``)."""
    return os.path.isfile(os.path.join(os.fspath(folder), RECORD_FILE))


def depth_model_for(model: str) -> str:
    """The depth model of :func:`estimate_depth` for ``model``: a rehearsal folder's stand-in, else Depth Anything
    V2 Small from the Hub (``"depth-anything/Depth-Anything-V2-Small-hf"``)."""
    if model != "tiny" and is_rehearsal_folder(model):
        return os.path.join(os.path.abspath(model), DEPTH_DIR)
    return "depth-anything/Depth-Anything-V2-Small-hf"


def _load_arguments(folder: str) -> dict:
    """The keyword arguments of ``load_pipeline`` for a rehearsal folder."""
    return {"model": os.path.join(folder, PIPELINE_DIR), "ip_adapter": os.path.join(folder, IP_ADAPTER_DIR),
            "image_encoder": os.path.join(folder, IMAGE_ENCODER_DIR)}


def _check_existing(folder: str, seed: int, dtype: torch.dtype) -> None:
    """Accept a complete rehearsal folder built with this seed and dtype; raise a ``ValueError`` naming it otherwise."""
    missing = [f for f in _REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
    missing += [f"{d}/*.safetensors" for d in _MODEL_DIRS if not os.path.isdir(os.path.join(folder, d))
                or not any(n.endswith(".safetensors") for n in os.listdir(os.path.join(folder, d)))]
    if missing:
        raise ValueError(f"'{folder}' exists but is not a complete rehearsal model (missing {missing[:4]}): "
                         "remove it or pass another folder to build_rehearsal_model")
    with open(os.path.join(folder, RECORD_FILE), encoding="utf-8") as fh:
        saved = json.load(fh)
    wanted = _record(seed, dtype)
    changed = [k for k in ("seed", "dtype", "config") if saved.get(k) != wanted[k]]
    if changed:
        raise ValueError(f"'{folder}' holds a rehearsal model built with another {', '.join(changed)} "
                         f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed if k != 'config')}): "
                         "remove it, pass the same arguments, or use another folder")


def build_rehearsal_model(folder, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                          progress: bool = True) -> dict:
    """Write FLUX.1 Kontext [dev] at real width with random weights (:data:`REHEARSAL_CONFIG`) to ``folder``.

    ``folder/pipeline/`` (``model_index.json`` and one subfolder per component, safetensors only),
    ``folder/image_encoder/`` (CLIP ViT-L/14 vision tower + ``CLIPImageProcessor``) and
    ``folder/ip_adapter/ip_adapter.safetensors`` (XLabs format, 16 image tokens), plus ``rehearsal.json``.
    It is built in a temporary folder beside ``folder`` and renamed into place at the end, so an interrupted
    build leaves no half folder. A complete folder built with the same seed and dtype is reused, not rebuilt;
    any other existing ``folder`` is refused with a ``ValueError`` naming it. Same seed, same weights; the
    global torch RNG is left untouched. About 10 s and 2.2 GB of disk in bf16 on a 2-core CPU; memory peaks at
    about the weights' size above what the libraries take (3.1 GB resident in all).

    Returns:
        ``{"model": ..., "ip_adapter": ..., "image_encoder": ...}``: pass it on,
        ``kh.load_pipeline(**kwargs, device="cpu", dtype=torch.bfloat16)``.
    """
    from tqdm.auto import tqdm

    folder = os.path.abspath(os.fspath(folder))
    if os.path.exists(folder):
        _check_existing(folder, seed, dtype)
        return _load_arguments(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.building-", dir=parent)
    try:
        parts: dict = {}
        steps = _build_steps(seed, dtype, tmp)
        with tqdm(steps, desc="rehearsal model", disable=not progress) as bar, _library_bars(progress):
            for name, step in bar:
                bar.set_postfix_str(name, refresh=True)
                step(parts)
        parts.clear()
        with open(os.path.join(tmp, RECORD_FILE), "w", encoding="utf-8") as fh:
            json.dump(_record(seed, dtype), fh, indent=2)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load_arguments(folder)
