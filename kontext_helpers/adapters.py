"""Notebook 05: saving and loading a trained adapter, and exporting it for ComfyUI.

An adapter folder holds the LoRA in diffusers' format (``pipe.load_lora_weights`` reads it), the region
module and the depth module in safetensors, and a JSON record of how it was trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings

import torch
from torch import nn

from .conditioning import REGION_KINDS, make_region_module
from .depth import DepthTokenEmbedding, check_depth_module
from .models import has_ip_adapter, load_lora_state_dict, lora_state_dict, read_safetensors

# Files of a saved adapter folder (save_adapter / load_adapter).
# diffusers' default LoRA file name: pipe.load_lora_weights(folder) finds it.
LORA_WEIGHT_FILE = "pytorch_lora_weights.safetensors"
REGION_WEIGHT_FILE = "region_token.safetensors"
DEPTH_WEIGHT_FILE = "depth_module.safetensors"  # the "tokens" depth module (absent without one)
ADAPTER_CONFIG_FILE = "adapter_config.json"
# What to do about a damaged file of an adapter folder (kontext_helpers.models.read_safetensors says what is wrong).
_ADAPTER_FIX = ("Copy the adapter folder again from where it was saved (or download it again), or save it again "
                "with kh.save_adapter from the training run.")


def _jsonable(value):
    """A training config (dataclass, ``to_dict()`` object, mapping or ``None``) as JSON-ready data."""

    if value is None:
        return None
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))  # sets, dtypes, paths... become strings or lists


def _library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "diffusers", "transformers", "peft", "safetensors", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _adapter_to_save(transformer, region, adapter_name: str | None) -> str:
    """The PEFT adapter :func:`save_adapter` writes; refuses a missing LoRA or a region of another model."""
    peft_config = dict(getattr(transformer, "peft_config", None) or {})
    if not peft_config:
        raise ValueError("the transformer carries no LoRA: attach one with add_lora(...) or train(...), "
                         "or load one with load_adapter(...), before save_adapter")
    if adapter_name is None:
        if len(peft_config) > 1:
            raise ValueError(f"the transformer has several LoRA adapters {sorted(peft_config)}: pass adapter_name=")
        adapter_name = next(iter(peft_config))
    elif adapter_name not in peft_config:
        raise ValueError(f"no adapter named {adapter_name!r}; the transformer has {sorted(peft_config)}")
    if region is not None and getattr(region, "kind", None) not in REGION_KINDS:
        raise TypeError(f"region must be a region module of kh.REGION_KINDS ({sorted(REGION_KINDS)}), "
                        f"got {type(region).__name__}")
    if region is not None and region.c_in != transformer.config.in_channels:
        raise ValueError(f"the region module was built for c_in={region.c_in} but this transformer takes "
                         f"{transformer.config.in_channels}-channel tokens: it does not belong to this LoRA's model")
    return adapter_name


def _save_region(region, path: str) -> dict | None:
    """Write ``region_token.safetensors`` (grid and ``c_in`` in its metadata); returns its record, or ``None``."""
    from safetensors.torch import save_file

    region_file = os.path.join(path, REGION_WEIGHT_FILE)
    if region is None:
        if os.path.exists(region_file):
            os.remove(region_file)  # a stale region module of an earlier save must not pair with this LoRA
        return None
    info = {"file": REGION_WEIGHT_FILE, "kind": region.kind, "h_tok": int(region.h_tok), "w_tok": int(region.w_tok),
            "c_in": int(region.c_in), "grid": f"{region.h_tok}x{region.w_tok}",
            "pixels_at_build_grid": f"{region.h_tok * 16}x{region.w_tok * 16}"}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in region.state_dict().items()}
    meta = {k: str(info[k]) for k in ("kind", "h_tok", "w_tok", "c_in")}
    save_file(tensors, region_file, metadata={"format": "pt", **meta})
    return info


def _save_depth(depth_module, path: str, source: str) -> dict | None:
    """Write ``depth_module.safetensors`` (kind, ``c_in``, patch, on_context and the depth source in its metadata);
    returns its record, or ``None`` (and removes a stale file of an earlier save) without a depth module."""
    from safetensors.torch import save_file

    depth_file = os.path.join(path, DEPTH_WEIGHT_FILE)
    if depth_module is None:
        if os.path.exists(depth_file):
            os.remove(depth_file)
        return None
    info = {"file": DEPTH_WEIGHT_FILE, "kind": depth_module.kind, "c_in": int(depth_module.c_in),
            "patch": int(depth_module.patch), "on_context": bool(depth_module.on_context), "source": source}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in depth_module.state_dict().items()}
    save_file(tensors, depth_file, metadata={"format": "pt", **{k: str(v) for k, v in info.items() if k != "file"}})
    return info


def _adapter_record(pipe, lora_config, adapter_name: str, num_tensors: int, region_info, config,
                    depth_info=None) -> dict:
    """What ``adapter_config.json`` holds: the LoRA's settings, the region grid, the model and the versions."""
    transformer = pipe.transformer
    targets = lora_config.target_modules
    return {
        "format": "kontext-region-lora",
        "format_version": 1,
        "lora": {
            "file": LORA_WEIGHT_FILE,
            "adapter_name": adapter_name,
            "rank": int(lora_config.r),
            "alpha": float(lora_config.lora_alpha),
            "use_rslora": bool(getattr(lora_config, "use_rslora", False)),
            "target_modules": [targets] if isinstance(targets, str) else sorted(targets or []),
            "num_tensors": num_tensors,
        },
        "region": region_info,
        "depth": depth_info,
        "transformer": {
            "in_channels": int(transformer.config.in_channels),
            "num_layers": int(transformer.config.num_layers),
            "num_single_layers": int(transformer.config.num_single_layers),
            "inner_dim": int(transformer.config.num_attention_heads * transformer.config.attention_head_dim),
            "ip_adapter": has_ip_adapter(transformer),
        },
        "base_model": getattr(getattr(pipe, "config", None), "_name_or_path", None) or None,
        "train_config": _jsonable(config),
        "versions": _library_versions(),
    }


def save_adapter(pipe, region: nn.Module | None, path: str, config=None, *, adapter_name: str | None = None,
                 depth_module: nn.Module | None = None) -> str:
    """Save the LoRA (diffusers' format), the region module and the depth module so that they load anywhere.

    Writes into the folder ``path``:

    * ``pytorch_lora_weights.safetensors``: ``FluxKontextPipeline.save_lora_weights`` output, keys
      ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``, with the PEFT ``LoraConfig`` (rank, alpha,
      targets) in the file's ``lora_adapter_metadata``. ``pipe.load_lora_weights(path)`` loads it alone.
    * ``region_token.safetensors``: the region module's ``proj.weight [c_in, H'*W']`` and ``proj.bias [c_in]``,
      its grid and ``c_in`` in the metadata (absent when ``region`` is ``None``).
    * ``depth_module.safetensors``: the ``"tokens"`` depth module's ``proj.weight [c_in, 256]`` and
      ``proj.bias [c_in]``, its kind, ``c_in``, patch, on_context and depth source (``config``'s
      ``depth_source``, default ``"context"``) in the metadata (absent when ``depth_module`` is ``None``).
    * ``adapter_config.json``: grid size, ``c_in``, LoRA rank / alpha / targets, the depth record, the training
      config and the library versions.

    Args:
        pipe: the pipeline whose ``transformer`` carries the trained LoRA.
        region: the trained :class:`MaskRegionToken`, or ``None`` for a LoRA alone.
        path: output folder (created; files of an earlier save are replaced).
        config: the training config (``TrainConfig``, a dataclass or a dict), stored for the record.
        adapter_name: which PEFT adapter to save; default: the only one.
        depth_module: the trained depth module (``train(...).depth``), or ``None``.
    Returns:
        ``path``.
    """
    from diffusers import FluxKontextPipeline

    transformer = pipe.transformer
    adapter_name = _adapter_to_save(transformer, region, adapter_name)
    if depth_module is not None:
        check_depth_module(depth_module, transformer.config.in_channels)
    lora_config = transformer.peft_config[adapter_name]
    state = lora_state_dict(transformer, adapter_name)  # "<module>.lora_A.weight", ...
    os.makedirs(path, exist_ok=True)
    FluxKontextPipeline.save_lora_weights(path, transformer_lora_layers=state, weight_name=LORA_WEIGHT_FILE,
                                          transformer_lora_adapter_metadata=lora_config.to_dict())
    region_info = _save_region(region, path)
    depth_info = _save_depth(depth_module, path, (_jsonable(config) or {}).get("depth_source", "context"))
    record = _adapter_record(pipe, lora_config, adapter_name, len(state), region_info, config, depth_info)
    with open(os.path.join(path, ADAPTER_CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=2, sort_keys=True)
    return path


def _read_region(region_file: str, in_channels: int) -> nn.Module | None:
    """The region module of an adapter folder (``None`` without one), checked before the pipeline is touched."""
    if not os.path.isfile(region_file):
        return None
    state, meta = read_safetensors(region_file, _ADAPTER_FIX)
    missing = [k for k in ("h_tok", "w_tok", "c_in") if k not in meta]
    if missing:
        raise ValueError(f"{region_file} lacks the metadata {missing}: it was not written by save_adapter")
    c_in = int(meta["c_in"])
    if c_in != in_channels:
        raise ValueError(f"the region module in {region_file} was built for c_in={c_in} but this transformer "
                         f"takes {in_channels}-channel tokens: it belongs to another model")
    kind = meta.get("kind", "linear")  # files written before the region kinds hold the linear token
    if kind not in REGION_KINDS:
        raise ValueError(f"{region_file} holds a region module of kind {kind!r}, which this version does not know "
                         f"({sorted(REGION_KINDS)}): upgrade kontext_helpers")
    region = make_region_module(kind, int(meta["h_tok"]), int(meta["w_tok"]), c_in)
    region.load_state_dict(state)
    return region


def load_depth_module(path: str, pipe=None, *, device=None) -> nn.Module | None:
    """The depth module of an adapter folder (eval mode, no gradients), or ``None`` when it holds none (folders
    written before depth modules, or trained with depth kind ``"ip_adapter"`` / ``"none"``).

    With ``pipe``, its ``c_in`` is checked against ``pipe.transformer`` and the module goes to the transformer's
    device (``device`` overrides; default without a pipeline: the CPU). Kept in float32. Pass it to
    ``kh.sample_edit(..., depth=depth_map, depth_module=module)`` or ``kh.RegionHook``. :func:`load_adapter` loads
    the LoRA and the region module.
    """
    depth_file = os.path.join(path, DEPTH_WEIGHT_FILE)
    if not os.path.isfile(depth_file):
        return None
    state, meta = read_safetensors(depth_file, _ADAPTER_FIX)
    if meta.get("kind") != DepthTokenEmbedding.kind or "c_in" not in meta:
        raise ValueError(f"{depth_file} holds no 'tokens' depth module written by save_adapter (metadata {meta}): "
                         "upgrade kontext_helpers, or save the adapter again")
    module = DepthTokenEmbedding(int(meta["c_in"]), patch=int(meta.get("patch", 16)),
                                 on_context=meta.get("on_context", "True") == "True")
    module.load_state_dict(state)
    if pipe is not None:
        check_depth_module(module, pipe.transformer.config.in_channels)
    target = device if device is not None else (pipe.transformer.device if pipe is not None else "cpu")
    return module.to(target).eval().requires_grad_(False)


def _lora_as_saved(transformer, saved: dict[str, torch.Tensor], lora_file: str, adapter_name: str) -> None:
    """Give the loaded LoRA the dtype and values of the file (fp32, as trained): ``load_lora_weights`` casts it
    to the base model's dtype (bf16 on a GPU), and a reloaded adapter would then differ from the trained one."""
    state = {k.removeprefix("transformer."): v for k, v in saved.items()}
    for name, param in transformer.named_parameters():
        if ".lora_" in name and f".{adapter_name}." in name:
            param.data = param.data.to(next(iter(state.values())).dtype)
    load_lora_state_dict(transformer, state, adapter_name=adapter_name, source=lora_file)


def load_adapter(pipe, path: str, *, adapter_name: str = "default", replace: bool = True, device=None):
    """Load a folder written by :func:`save_adapter`: the LoRA with diffusers' ``pipe.load_lora_weights``, and
    the region module rebuilt from its file.

    Adapters are never stacked silently: when the transformer already carries a LoRA (loaded before, or
    attached with :func:`add_lora`), it is unloaded first with a warning (``replace=True``), or a
    ``ValueError`` is raised (``replace=False``).

    Args:
        pipe: a ``FluxKontextPipeline`` of the model the adapter was trained on.
        path: the adapter folder.
        adapter_name: name of the loaded PEFT adapter.
        replace: unload an existing LoRA first (``True``) or refuse (``False``).
        device: where the region module goes; default: the transformer's device (kept in float32).

    The LoRA keeps the dtype it was saved in (float32, as trained) on a bf16 or fp16 base, so the reloaded
    adapter gives exactly the trained pipeline's results.

    Returns:
        the region module (its kind from the file) in eval mode, or ``None`` when the folder holds a LoRA alone.
        The depth module, when the folder has one, comes from :func:`load_depth_module`.

    Raises:
        ValueError: a damaged file in the folder (the message names it and what to do); every file is read
            before the pipeline changes, so it is left as it was.
    """

    lora_file = os.path.join(path, LORA_WEIGHT_FILE)
    if not os.path.isfile(lora_file):
        raise FileNotFoundError(f"{lora_file} does not exist: load_adapter expects a folder written by "
                                f"save_adapter (with {LORA_WEIGHT_FILE} and, optionally, {REGION_WEIGHT_FILE})")
    transformer = pipe.transformer
    saved, _ = read_safetensors(lora_file, _ADAPTER_FIX)  # every file is read before the pipeline changes
    region = _read_region(os.path.join(path, REGION_WEIGHT_FILE), transformer.config.in_channels)
    load_depth_module(path)  # a damaged depth file fails here too, not after the LoRA went in
    existing = sorted(getattr(transformer, "peft_config", None) or {})
    if existing:
        if not replace:
            raise ValueError(f"the transformer already carries LoRA adapter(s) {existing}; loading {path} would "
                             "stack a second one. Call pipe.unload_lora_weights() first, or pass replace=True")
        warnings.warn(f"the transformer already carried LoRA adapter(s) {existing}: they are unloaded before "
                      f"loading {path} (adapters are replaced, not stacked)", stacklevel=2)
        pipe.unload_lora_weights()
    pipe.load_lora_weights(path, weight_name=LORA_WEIGHT_FILE, adapter_name=adapter_name)
    _lora_as_saved(transformer, saved, lora_file, adapter_name)
    if region is None:
        return None
    return region.to(device if device is not None else transformer.device).eval().requires_grad_(False)


# ComfyUI's key layout for Flux LoRAs. ComfyUI (comfy/lora.py, model_lora_keys_unet) maps
# "lora_unet_<key>" for every key of its Flux model "diffusion_model.<key>.weight", i.e. the original
# Black Forest Labs layout, and converts diffusers names with comfy/utils.py flux_to_diffusers, where
# to_q / to_k / to_v are row slices of one fused "qkv" weight (and of "linear1" in single blocks, with
# proj_mlp after them). The weights are read with the "<x>.lora_up.weight" / "<x>.lora_down.weight" /
# "<x>.alpha" names, and a patch adds (alpha / rank) * up @ down to the weight (comfy/weight_adapter/lora.py).
# Entries: diffusers module suffix -> (BFL module suffix, slice) with slice = (offset, size, total) in units
# of the hidden size D for fused weights, None for a weight of its own.
_COMFY_FLUX_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", (0, 1, 3)),
    "attn.to_k": ("img_attn.qkv", (1, 1, 3)),
    "attn.to_v": ("img_attn.qkv", (2, 1, 3)),
    "attn.add_q_proj": ("txt_attn.qkv", (0, 1, 3)),
    "attn.add_k_proj": ("txt_attn.qkv", (1, 1, 3)),
    "attn.add_v_proj": ("txt_attn.qkv", (2, 1, 3)),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}


_COMFY_FLUX_SINGLE = {
    "attn.to_q": ("linear1", (0, 1, 7)),
    "attn.to_k": ("linear1", (1, 1, 7)),
    "attn.to_v": ("linear1", (2, 1, 7)),
    "proj_mlp": ("linear1", (3, 4, 7)),  # Flux's MLP ratio 4: linear1 = [q | k | v | mlp] = 7 D rows
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}


_COMFY_FLUX_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}


def _comfyui_flux_name(module: str) -> tuple[str, tuple[int, int, int] | None] | None:
    """ComfyUI's Flux module for a diffusers transformer module name, or ``None`` when it has none.

    ``"transformer_blocks.0.attn.to_k"`` -> ``("double_blocks.0.img_attn.qkv", (1, 1, 3))``: rows ``D..2D`` of
    a ``3D``-row weight. The LoRA key ComfyUI loads is ``"lora_unet_" + name.replace(".", "_")``.
    """

    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in _COMFY_FLUX_DOUBLE:
        name, sl = _COMFY_FLUX_DOUBLE[m.group(2)]
        return f"double_blocks.{m.group(1)}.{name}", sl
    m = re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", module)
    if m and m.group(2) in _COMFY_FLUX_SINGLE:
        name, sl = _COMFY_FLUX_SINGLE[m.group(2)]
        return f"single_blocks.{m.group(1)}.{name}", sl
    if module in _COMFY_FLUX_GLOBAL:
        return _COMFY_FLUX_GLOBAL[module], None
    return None


def _lora_scaling_from_metadata(meta: dict, path: str):
    """PEFT's scale rule from the LoRA file's metadata: ``rank -> alpha / rank`` (or ``alpha / sqrt(rank)``)."""

    raw = meta.get("lora_adapter_metadata")
    cfg = {}
    if raw:
        cfg = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    if not cfg or "lora_alpha" not in cfg:
        warnings.warn(f"{path} records no LoRA alpha: assuming alpha = rank (scale 1), what diffusers assumes",
                      stacklevel=3)
        return lambda r: 1.0
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank_pattern / alpha_pattern are not supported by export_comfyui")
    alpha = float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        return lambda r: alpha / math.sqrt(r)
    return lambda r: alpha / r


def _lora_modules(src: str, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{module: {"A": lora_A, "B": lora_B}}`` from a diffusers LoRA state dict."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"(?:transformer\.)?(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise ValueError(f"{src}: unexpected key {key!r} (only LoRA A/B weights of the transformer are exported)")
        modules.setdefault(m.group(1), {})[m.group(2)] = tensor
    for module, ab in modules.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{src}: module {module} lacks its lora_{'B' if 'A' in ab else 'A'} weight")
    return modules


def _comfyui_groups(src: str, modules: dict) -> dict[str, list]:
    """``{ComfyUI module: [(diffusers module, A, B, slice), ...]}``; layers ComfyUI lacks are left out (warned)."""
    groups: dict[str, list] = {}
    skipped = []
    for module, ab in sorted(modules.items()):
        target = _comfyui_flux_name(module)
        if target is None:
            skipped.append(module)
            continue
        name, sl = target
        groups.setdefault(name, []).append((module, ab["A"], ab["B"], sl))
    if skipped:
        warnings.warn(f"export_comfyui: {len(skipped)} LoRA layer(s) have no counterpart in ComfyUI's Flux model "
                      f"and are left out: {skipped}", stacklevel=3)
    if not groups:
        raise ValueError(f"{src}: no LoRA layer maps onto ComfyUI's Flux model")
    return groups


def _fused_lora(name: str, parts: list, scales: list[float]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(down, up, alpha)`` of LoRAs on row slices of one fused weight: the downs stacked, the ups placed
    block-diagonally, so the fused rank is the sum of theirs and the weight update is unchanged."""
    hidden = {b.shape[0] // sl[1] for _, _, b, sl in parts}
    if len(hidden) != 1:
        raise ValueError(f"{name}: its parts {[p[0] for p in parts]} disagree on the hidden size")
    d = hidden.pop()
    rank = sum(a.shape[0] for _, a, _, _ in parts)
    uniform = all(s == scales[0] for s in scales)
    down = torch.cat([a for _, a, _, _ in parts], dim=0)  # [sum r_i, in]
    up = torch.zeros(parts[0][3][2] * d, rank, dtype=parts[0][2].dtype)  # [total rows, sum r_i]
    col = 0
    for (_, a, b, (off, size, _)), s in zip(parts, scales):
        r = a.shape[0]
        up[off * d:(off + size) * d, col:col + r] = b if uniform else b * s  # [size*D, r_i] block
        col += r
    alpha = scales[0] * rank if uniform else float(rank)  # ComfyUI's alpha / rank equals PEFT's scale
    return down, up, alpha


def export_comfyui(path: str, out_file: str, *, dtype: torch.dtype | None = None) -> str:
    """Write the LoRA of an adapter folder as one safetensors file in the layout ComfyUI loads for Flux.

    Keys are ComfyUI's native Flux names ``lora_unet_<BFL module>.lora_down.weight`` ``[r, in]``,
    ``.lora_up.weight`` ``[out, r]`` and ``.alpha`` (a scalar; ComfyUI applies ``alpha / r * up @ down``).
    diffusers' separate ``to_q`` / ``to_k`` / ``to_v`` (and ``proj_mlp`` in single blocks) are fused exactly.
    Layers ComfyUI's Flux model does not have (the IP-Adapter's ``to_k_ip`` / ``to_v_ip``) are left out with a
    warning. The region module is **not** in this file: the custom node in ``comfyui/kontext_region/`` applies
    ``region_token.safetensors`` with a mask; without it the LoRA works as a plain Kontext LoRA.

    Args:
        path: an adapter folder from :func:`save_adapter` (or a diffusers LoRA ``.safetensors`` file).
        out_file: the ``.safetensors`` file to write (e.g. ``ComfyUI/models/loras/my_edit.safetensors``).
        dtype: store the weights in this dtype (e.g. ``torch.bfloat16``); default: as saved.
    Returns:
        ``out_file``.
    """
    from safetensors.torch import save_file

    src = path if os.path.isfile(path) else os.path.join(path, LORA_WEIGHT_FILE)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src} does not exist: pass a folder written by save_adapter or a LoRA file")
    state, meta = read_safetensors(src, _ADAPTER_FIX)
    scaling = _lora_scaling_from_metadata(meta, src)
    out: dict[str, torch.Tensor] = {}
    for name, parts in _comfyui_groups(src, _lora_modules(src, state)).items():
        scales = [scaling(a.shape[0]) for _, a, _, _ in parts]
        if parts[0][3] is None:  # a weight of its own: the LoRA as it is
            down, up, alpha = parts[0][1], parts[0][2], scales[0] * parts[0][1].shape[0]
        else:
            down, up, alpha = _fused_lora(name, parts, scales)
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down if dtype is None else down.to(dtype)
        out[f"{key}.lora_up.weight"] = up if dtype is None else up.to(dtype)
        out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, out_file, metadata={
        "format": "pt",
        "kontext_helpers.source": os.path.abspath(src),
        "kontext_helpers.note": "Flux Kontext LoRA only; the region and depth modules of this adapter are not "
                                "included (the custom nodes in comfyui/kontext_region/ apply them)",
    })
    return out_file


# The model card and the Hub push. The card says what the folder holds and how to load each part.
MODEL_CARD_FILE = "README.md"
DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.1-Kontext-dev"


def _card_text(record: dict, repo_id: str, prompts: list[str], images: list[str], base_model: str) -> str:
    """The model card's Markdown body (the metadata header comes from ``ModelCardData``)."""
    cfg, lora, region = record.get("train_config") or {}, record["lora"], record.get("region")
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"A LoRA for [{base_model}](https://huggingface.co/{base_model}) trained for mask-guided editing with "
             "kontext_helpers: the LoRA in diffusers' format, plus the region module that brings the edit mask into "
             "the model.", "",
             "| file | what | how to load |", "|---|---|---|",
             f"| `{LORA_WEIGHT_FILE}` | LoRA, rank {lora['rank']}, alpha {lora['alpha']:g} | "
             f"`pipe.load_lora_weights(\"{repo_id}\")` (diffusers), or `kh.load_adapter(pipe, folder)` |"]
    if region:
        lines.append(f"| `{REGION_WEIGHT_FILE}` | region module, kind `{region.get('kind', 'linear')}`, built on a "
                     f"{region['grid']} token grid | `region = kh.load_adapter(pipe, folder)`, then "
                     "`kh.sample_edit(pipe, image, prompt, mask=mask, region=region)` or `kh.RegionHook(pipe, "
                     "region, mask)` around `pipe(...)`; in ComfyUI the node in `comfyui/kontext_region/` |")
    depth = record.get("depth")
    if depth:
        lines.append(f"| `{DEPTH_WEIGHT_FILE}` | depth module, kind `{depth['kind']}` (each token's 16x16 depth patch, "
                     f"an offset on the target and context tokens), depth source `{depth.get('source', 'context')}` | "
                     "`depth_module = kh.load_depth_module(folder, pipe)`, then `kh.sample_edit(..., depth=depth_map, "
                     "depth_module=depth_module)` or `kh.RegionHook(pipe, region, mask, depth=depth_map, "
                     "depth_module=depth_module)` |")
    lines.append(f"| `{ADAPTER_CONFIG_FILE}` | how it was trained: settings, model, library versions | read it |")
    settings = ", ".join(f"{key} {cfg[key]}" for key in ("steps", "resolution", "learning_rate", "batch_size",
                                                           "mixed_precision", "quantize_base", "optimizer")
                         if key in cfg)
    lines += ["", "## Training", "",
              f"- settings (the full TrainConfig is in `{ADAPTER_CONFIG_FILE}`): {settings or 'not recorded'}",
              f"- region kind: `{cfg.get('region_kind', region.get('kind') if region else 'none')}`; "
              + _card_depth_line(record, cfg)]
    if prompts:
        lines += ["", "## Prompts it was trained with", ""] + [f"- `{p}`" for p in prompts]
    if images:
        lines += ["", "## Previews", ""] + [f"![preview]({img})" for img in images]
    return "\n".join(lines) + "\n"


def _card_depth_line(record: dict, cfg: dict) -> str:
    """How the adapter was trained with depth, and how to pass it, for the model card."""
    depth = record.get("depth")
    if depth:
        source = depth.get("source", "context")
        whose = "the context's depth map" if source == "context" else "the depth the result should have"
        return (f"depth kind `{depth['kind']}`, depth source `{source}`: pass {whose} (near = bright, any bit depth, "
                "framing the context) as `depth=` with `depth_module=`; without one it edits without depth "
                f"(trained with depth dropout {cfg.get('depth_dropout', 'not recorded')})")
    ip = cfg.get("use_depth", True) and cfg.get("depth_kind", "ip_adapter") == "ip_adapter" and record[
        "transformer"].get("ip_adapter")
    return (f"depth kind `{cfg.get('depth_kind', 'ip_adapter') if cfg.get('use_depth', True) else 'none'}`; depth "
            f"through the IP-Adapter: {'yes' if ip else 'no'} (give the same depth map as `depth=` / "
            "`ip_adapter_image=`)")


def write_model_card(path: str, repo_id: str, *, prompts=(), images=(), base_model: str | None = None) -> str:
    """Write ``README.md`` (a Hub model card) into the adapter folder ``path``; preview ``images`` are copied to
    ``path/images/``. Returns the card's path."""
    import shutil

    from huggingface_hub import ModelCard, ModelCardData

    record_file = os.path.join(path, ADAPTER_CONFIG_FILE)
    if not os.path.isfile(record_file):
        raise FileNotFoundError(f"{record_file} does not exist: write_model_card expects a folder from save_adapter")
    with open(record_file, encoding="utf-8") as fh:
        record = json.load(fh)
    base = base_model or record.get("base_model") or DEFAULT_BASE_MODEL
    copied = []
    for i, image in enumerate(images):
        os.makedirs(os.path.join(path, "images"), exist_ok=True)
        name = f"images/preview_{i:02d}{os.path.splitext(str(image))[1] or '.png'}"
        shutil.copyfile(image, os.path.join(path, name))
        copied.append(name)
    data = ModelCardData(base_model=base, library_name="diffusers", license="other",
                         tags=["lora", "flux", "flux-kontext", "image-editing", "kontext-region-lora"])
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + _card_text(record, repo_id, list(prompts), copied, base))
    card_path = os.path.join(path, MODEL_CARD_FILE)
    card.save(card_path)
    return card_path


def push_adapter(path: str, repo_id: str, *, prompts=(), images=(), private: bool = True, token: str | None = None,
                 base_model: str | None = None, api=None) -> str:
    """Write the model card and upload the adapter folder to the Hub repository ``repo_id``; returns its URL.

    ``token``: a Hub token (default: the logged-in one); it is passed on, never printed or written. ``api``: an
    object with ``HfApi``'s ``create_repo`` and ``upload_folder`` (default ``HfApi()``; tests pass a stand-in).
    """
    if not os.path.isfile(os.path.join(path, LORA_WEIGHT_FILE)):
        raise FileNotFoundError(f"{os.path.join(path, LORA_WEIGHT_FILE)} does not exist: push_adapter uploads a "
                                "folder written by save_adapter")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    write_model_card(path, repo_id, prompts=prompts, images=images, base_model=base_model)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, token=token)
    api.upload_folder(folder_path=path, repo_id=repo_id, token=token,
                      commit_message="kontext_helpers adapter: LoRA, region module and model card")
    return f"https://huggingface.co/{repo_id}"
