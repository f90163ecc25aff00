"""The tiny world: a complete ``FluxKontextPipeline`` built offline in about a second, for CPUs and tests.

Flux's architecture at a small width (tokenizers, CLIP and T5 text encoders, VAE, transformer, CLIP image
encoder and an XLabs-format IP-Adapter), randomly initialised from a seed, or with the pretrained weights shipped
in ``tiny_weights/`` (what ``load_pipeline("tiny")`` loads).
"""

from __future__ import annotations

import json
import os

import torch

from .models import accept_calls_without_ip_image, pipeline_modules

# The pretrained weights shipped with the package (written by ``python -m kontext_helpers pretrain-tiny``).
TINY_WEIGHTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_weights", "tiny_kontext.safetensors")
TINY_COMPONENTS = ("vae", "transformer", "text_encoder", "text_encoder_2", "image_encoder")

# Words the tiny tokenizers know as whole tokens: the vocabulary of editing prompts. Unknown words still
# tokenize (byte-level BPE for CLIP, character fallback for T5), just into more pieces.
_TINY_WORDS = (
    "a an the of to in on at and or with without into onto from by for is are be make turn change "
    "replace remove add put move keep swap paint colour color recolour recolor it its this that "
    "red green blue yellow orange purple pink white black grey gray brown gold silver cyan magenta "
    "sphere ball box cube cylinder cone object objects thing floor wall sky light shadow background "
    "left right top bottom middle centre center front behind next near far small large big tall short "
    "shiny matte metal metallic glossy wooden glass plastic stone rough smooth bright dark "
    "photo picture image scene style cat dog person face hat car tree house flower sunset snow "
    "one two three new other same only edit region mask depth please now"
).split()


def tiny_clip_tokenizer():
    """A CLIP-style byte-level BPE tokenizer (``CLIPTokenizerFast``) whose vocabulary is :data:`_TINY_WORDS`.

    Vocabulary and merges are written out, not trained (the BPE trainer breaks frequency ties differently
    in every process): every byte, every byte + ``</w>``, and for each word the left-to-right merges that
    build it, so each known word is one token and any other text still tokenizes byte by byte.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPTokenizerFast

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {bos: 0, eos: 1}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(_TINY_WORDS):  # ordered, unique
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while True:  # apply the merges so far, as BPE will (lowest rank first)
            pairs = [(ranks[p], i) for i, p in enumerate(zip(pieces, pieces[1:])) if p in ranks]
            if not pairs:
                break
            _, i = min(pairs)
            pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
        while len(pieces) > 1:  # then join what is left, left to right, with new (higher-rank) merges
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces[0:2] = [pair[0] + pair[1]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=eos, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    # the same split pattern as CLIP's tokenizer.json
    split = Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=split, behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.post_processor = processors.RobertaProcessing((eos, 1), (bos, 0), add_prefix_space=False, trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    return CLIPTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=eos, pad_token=eos, model_max_length=77
    )


def tiny_t5_tokenizer():
    """A T5-style Unigram tokenizer (``T5TokenizerFast``: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2).

    Pieces are written out, not trained: each word of :data:`_TINY_WORDS` as ``"▁word"``, then single
    characters (lower scores) so unknown words fall back to characters.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = list(dict.fromkeys(_TINY_WORDS))
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in chars] + [("▁" + c, -4.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0, model_max_length=512
    )


# Sizes of the tiny world. The transformer is Flux's architecture at a small width: in_channels 64
# (16 latent channels x 2x2 packing), guidance embeddings, 3-axis RoPE whose axes sum to the head dim.
TINY_CONFIG = {
    "clip_text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "projection_dim": 32, "max_position_embeddings": 77},
    "t5": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
           "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu"},
    "vae": {"block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8,
            "latent_channels": 16, "shift_factor": 0.1159, "scaling_factor": 0.3611},
    "transformer": {"num_layers": 3, "num_single_layers": 4, "attention_head_dim": 32, "num_attention_heads": 4,
                    "axes_dims_rope": (8, 12, 12)},
    "clip_vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "image_size": 64, "patch_size": 16, "projection_dim": 32},
}


def tiny_ip_adapter_state_dict(transformer, image_embed_dim: int, num_tokens: int = 4) -> dict[str, torch.Tensor]:
    """Random weights in the XLabs Flux IP-Adapter layout (the file format diffusers' loader converts).

    ``ip_adapter_proj_model.proj`` maps the CLIP image embedding ``[B, E]`` to ``num_tokens`` tokens of the
    text width; each double block ``i`` has ``double_blocks.i.processor.ip_adapter_double_stream_{k,v}_proj``.
    """
    text_dim = transformer.config.joint_attention_dim
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    sd = {
        "ip_adapter_proj_model.proj.weight": torch.randn(num_tokens * text_dim, image_embed_dim)
        * image_embed_dim**-0.5,
        "ip_adapter_proj_model.proj.bias": torch.zeros(num_tokens * text_dim),
        "ip_adapter_proj_model.norm.weight": torch.ones(text_dim),
        "ip_adapter_proj_model.norm.bias": torch.zeros(text_dim),
    }
    for i in range(transformer.config.num_layers):
        for kv in ("k", "v"):
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            sd[f"{prefix}.weight"] = torch.randn(inner, text_dim) * text_dim**-0.5
            sd[f"{prefix}.bias"] = torch.zeros(inner)
    return sd


def attach_ip_adapter(pipe, state_dict: dict[str, torch.Tensor], folder: str) -> None:
    """Write an XLabs-format ``state_dict`` to ``folder/ip_adapter.safetensors``; load it with ``pipe.load_ip_adapter``.

    Going through the file keeps the tiny model on diffusers' own XLabs loading and key conversion.
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "ip_adapter.safetensors")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    pipe.load_ip_adapter(folder, weight_name="ip_adapter.safetensors", image_encoder_pretrained_model_name_or_path=None)
    accept_calls_without_ip_image(pipe.transformer)  # pipe(...) without ip_adapter_image runs, the adapter adds zero


def _tiny_text_encoders(tokenizer, tokenizer_2):
    """CLIP text encoder (pooled vector) and T5 encoder (sequence) at the tiny width."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TINY_CONFIG["clip_text"]))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0, **TINY_CONFIG["t5"]))
    return clip, t5


def _tiny_vae():
    """Flux's VAE layout (16 latent channels, shift and scale) at the tiny width."""
    from diffusers import AutoencoderKL

    vae_cfg = dict(TINY_CONFIG["vae"])
    n_blocks = len(vae_cfg["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n_blocks,
                         up_block_types=("UpDecoderBlock2D",) * n_blocks, use_quant_conv=False,
                         use_post_quant_conv=False, **vae_cfg)


def _tiny_transformer():
    """``FluxTransformer2DModel`` with guidance embeddings; 64 input channels (16 latent channels x 2x2)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * TINY_CONFIG["vae"]["latent_channels"], guidance_embeds=True,
        joint_attention_dim=TINY_CONFIG["t5"]["d_model"], pooled_projection_dim=TINY_CONFIG["clip_text"]["hidden_size"],
        **TINY_CONFIG["transformer"])


def _tiny_image_encoder():
    """A CLIP vision encoder with projection and its image processor, for the IP-Adapter."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    vcfg = TINY_CONFIG["clip_vision"]
    processor = CLIPImageProcessor(size={"shortest_edge": vcfg["image_size"]},
                                   crop_size={"height": vcfg["image_size"], "width": vcfg["image_size"]})
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**vcfg)), processor


def build_tiny_pipeline(
    seed: int = 0, *, with_ip_adapter: bool = True, weights: str | None = None, device=None,
    dtype: torch.dtype = torch.float32
):
    """A complete ``FluxKontextPipeline`` built offline (about a second on a CPU): random weights from ``seed``,
    or, with ``weights`` (a file of :func:`save_tiny_weights`, e.g. :data:`TINY_WEIGHTS_FILE`), pretrained ones.

    Same seed, same weights, on every call; the global torch RNG is left untouched. Every component is
    in eval mode (as ``from_pretrained`` leaves it), so two identical ``pipe(...)`` calls give identical
    outputs. With ``with_ip_adapter`` a tiny CLIP image encoder, its ``CLIPImageProcessor`` and an
    XLabs-format IP-Adapter are attached through diffusers' ``load_ip_adapter``.
    """
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    image_encoder = feature_extractor = None
    with torch.random.fork_rng(devices=[]):  # the order of the draws below fixes the weights
        torch.manual_seed(seed)
        text_encoder, text_encoder_2 = _tiny_text_encoders(tokenizer, tokenizer_2)
        vae = _tiny_vae()
        transformer = _tiny_transformer()
        if with_ip_adapter:
            image_encoder, feature_extractor = _tiny_image_encoder()
            ip_sd = tiny_ip_adapter_state_dict(transformer, TINY_CONFIG["clip_vision"]["projection_dim"])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxKontextPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer, image_encoder=image_encoder,
        feature_extractor=feature_extractor)
    if with_ip_adapter:
        with tempfile.TemporaryDirectory(prefix="tiny_ip_adapter_") as folder:
            attach_ip_adapter(pipe, ip_sd, folder)
    if weights is not None:
        load_tiny_weights(pipe, weights)
    for module in pipeline_modules(pipe):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype) if (device is not None or dtype != torch.float32) else pipe


def save_tiny_weights(pipe, path: str, info: dict | None = None) -> None:
    """Every trained component of a tiny pipeline as one fp16 safetensors file (temp file, then ``os.replace``).

    Keys are ``<component>.<parameter>``; the metadata holds the VAE's ``shift_factor`` / ``scaling_factor``
    and ``info`` (how the weights were made).
    """
    from safetensors.torch import save_file

    tensors = {f"{name}.{k}": v.detach().to("cpu", torch.float16).contiguous()
               for name in TINY_COMPONENTS for k, v in getattr(pipe, name).state_dict().items()}
    vae = {"shift_factor": pipe.vae.config.shift_factor, "scaling_factor": pipe.vae.config.scaling_factor}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path + ".tmp", metadata={"vae": json.dumps(vae), "info": json.dumps(info or {})})
    os.replace(path + ".tmp", path)


def _read_tiny_weights(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a tiny weights file, with an error that names the file and the fix."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    fix = ("reinstall the package (pip install -e .) or rebuild the file with `python -m kontext_helpers "
           "pretrain-tiny`; load_pipeline('tiny', pretrained=False) builds the random-weight model without it")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the tiny model's weights {path} are missing: {fix}")
    try:
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        return tensors, meta
    except Exception as err:  # a truncated or corrupt file: safetensors raises its own error types
        raise RuntimeError(f"the tiny model's weights {path} cannot be read ({type(err).__name__}: {err}): "
                           f"{fix}") from err


def load_tiny_weights(pipe, path: str = TINY_WEIGHTS_FILE) -> None:
    """Load :func:`save_tiny_weights`' file into a tiny pipeline built by :func:`build_tiny_pipeline` (in place).

    Raises a ``FileNotFoundError`` / ``RuntimeError`` naming the file and the fix when it is missing, corrupt
    or made for another architecture.
    """
    tensors, meta = _read_tiny_weights(path)
    for name in TINY_COMPONENTS:
        module = getattr(pipe, name)
        if module is None:  # built without the image encoder (and IP-Adapter)
            continue
        prefix = name + "."
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        own = module.state_dict()
        if name == "transformer" and pipe.image_encoder is None:  # the IP-Adapter's keys are not there
            part = {k: v for k, v in part.items() if "encoder_hid_proj" not in k and ".processor." not in k}
        if set(part) != set(own) or any(part[k].shape != own[k].shape for k in own):
            raise RuntimeError(f"{path} does not fit the tiny {name} (other keys or shapes): it was written for "
                               "another architecture; rebuild it with `python -m kontext_helpers pretrain-tiny`")
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in part.items()})
    if "vae" in meta:
        pipe.vae.register_to_config(**json.loads(meta["vae"]))
