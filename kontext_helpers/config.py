"""Notebook 04: every setting of a training run, and presets for the GPUs our users train on.

:class:`TrainConfig` is validated before any model work; ``TrainConfig.for_gpu("t4")`` (or ``"auto"``)
picks precision, quantisation, optimizer, resolution and rank for one GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field

import torch

from .conditioning import L2_FORMS, REGION_KINDS
from .depth import DEPTH_KINDS
from .models import LORA_TARGET_PRESETS


@dataclass
class TrainConfig:
    """Every setting of :func:`train`, with its default and why.

    The names ``steps``, ``resolution``, ``batch_size``, ``learning_rate``, ``seed``, ``output_dir``,
    ``checkpoint_every`` and ``resume`` are fixed: scripts outside the module use them.
    """

    # --- data and schedule
    resolution: int = 512  # side in pixels, a multiple of 16 (VAE 8x, 2x2 packing); must equal the dataset's
    steps: int = 1000  # optimizer updates (each of batch_size * gradient_accumulation_steps samples per process)
    batch_size: int = 1  # samples per forward pass per process; 1 fits every Colab GPU at 512 px
    gradient_accumulation_steps: int = 1  # micro-batches summed per update: a larger effective batch at no memory cost
    max_sequence_length: int = 512  # T5 tokens; 512 is Kontext's default, shorter prompts are padded to it
    # --- optimisation
    learning_rate: float = 1e-4  # LoRA learning rate, the value diffusers' Kontext script uses
    region_learning_rate: float = 1e-3  # region module: a few fresh weights (default: one vector), faster than the LoRA
    optimizer: str = "adamw"  # "adamw" (torch) or "adamw8bit" (bitsandbytes, saves optimizer memory on GPUs)
    weight_decay: float = 0.0  # AdamW decay of every group; the L2 settings below add the LoRA's and the region's
    lr_scheduler: str = "constant"  # any diffusers.optimization.get_scheduler name ("cosine", "linear", ...)
    lr_warmup_steps: int = 0  # warm-up updates for the scheduler
    max_grad_norm: float = 1.0  # gradient clipping of LoRA + region parameters (0 disables)
    # --- LoRA
    rank: int = 16  # LoRA rank: 16 is a common editing-LoRA size; 4-8 for tiny datasets
    alpha: float | None = None  # LoRA alpha; None means alpha = rank (scale 1)
    lora_targets: str = "attn"  # "attn" (attention only) or "attn_ff" (+ feed-forward, proj_mlp and proj_out)
    lora_ip_adapter: bool = False  # also adapt the IP-Adapter's to_k_ip / to_v_ip (lets the LoRA re-learn depth use)
    # --- loss
    w_in: float = 1.0  # weight of the in-mask velocity term (learn the edit)
    w_out: float = 1.0  # weight of the out-of-mask term (keep the rest of the image)
    l2_region_lambda: float = 1e-4  # L2 on the region module, the original design's stabiliser (not on the depth
    #   module: it starts at zero and depth_dropout regularises it); in the decoupled form lr * 1e-4 per update: little
    l2_lora_lambda: float = 1.0  # L2 on the LoRA weights; decoupled: each update shrinks them by lr * lambda (1e-4 of
    #   themselves at lr 1e-4), the setting with the lowest held-out evaluation loss on docs/l2_forms.json
    l2_form: str = "decoupled"  # how both lambdas act (kh.L2_FORMS, docs/design.md note 9): "decoupled" (no loss
    #   term: AdamW's weight decay of lambda on the LoRA's and the region module's parameter groups), "sum" (lambda *
    #   sum(p^2) in the loss, the original design's) or "mean_square" (lambda * mean(p^2): below AdamW's eps at size)
    preservation: str = "identity"  # outside the mask: "identity" (flow to the context, the original design) or "prior"
    #   ("prior" is ai-toolkit's inverted_mask_prior: match the base model's own prediction, LoRA off)
    # --- noise schedule and conditioning
    timestep_sampling: str = "uniform"  # "uniform" over the 1000 training sigmas (never 0) or "logit_normal"
    logit_mean: float = 0.0  # logit-normal location (SD3 / diffusers' default)
    logit_std: float = 1.0  # logit-normal scale
    guidance: float = 1.0  # distilled guidance fed while training (SimpleTuner: 1.0; diffusers' Kontext script: 3.5)
    use_depth: bool = True  # use the depth maps at all (False: no depth, whatever depth_kind says)
    depth_kind: str = "tokens"  # how depth reaches the model (kh.DEPTH_KINDS): "tokens" (position-aware: each token's
    #   16x16 depth patch through a zero-initialised linear layer, added to the target and context tokens; the only
    #   kind that placed anything on scripts/depth_heldout.py), "ip_adapter" (the original design's path: a CLIP
    #   embedding of the whole map through the IP-Adapter) or "none"
    depth_source: str = "context"  # whose depth map: "context" (the context's, item["depth"]) or "target" (the
    #   desired result's, item["target_depth"], for geometry control; estimated with kh.estimate_depth when missing)
    depth_dropout: float = 0.1  # share of samples trained without depth, so the adapter also works without a map
    #   (the "tokens" module only; the IP-Adapter kind always gets its embedding)
    depth_learning_rate: float = 1e-3  # the depth module: a fresh linear layer that starts at zero
    region_kind: str = "marked"  # how the mask reaches the model (kh.REGION_KINDS): "marked" (a learned embedding on
    #   the masked target and context tokens; the best on scripts/region_heldout.py), "marked_context" (context only),
    #   "cells" (coarse-grid tokens at their own positions), "linear" (the original design's single token) or "none"
    #   (a LoRA alone: the mask only weights the loss, as other trainers do)
    # --- hardware
    mixed_precision: str = "no"  # "no", "fp16" (T4) or "bf16" (L4, A100, H100)
    gradient_checkpointing: bool = False  # trade compute for activation memory on big models
    quantize_base: str | None = None  # "nf4": load the transformer 4-bit (bitsandbytes) via load_pipeline
    offload_encoders: bool = True  # on a GPU, each encoder visits the GPU only while it caches, then goes to the CPU
    load_in_stages: bool = False  # notebooks: text encoders first, for the cache, freed before the transformer loads
    #   (system RAM: a free Colab T4 runtime has about 12.7 GB, T5-XXL alone is 9.5 GB in 16 bits)
    # --- bookkeeping
    seed: int = 0  # every random draw of a step derives from (seed, step): runs are reproducible and resumable
    output_dir: str = "outputs/kontext-lora"  # checkpoints/, previews/ and the final adapter go here (Drive works)
    checkpoint_every: int = 250  # updates between checkpoints (0: only the final one)
    keep_checkpoints: int = 3  # newest complete checkpoints kept on disk
    resume: bool = False  # continue from the newest complete checkpoint under output_dir/checkpoints
    preview_every: int = 0  # updates between previews (context | mask | depth | target | result; 0: none)
    preview_steps: int = 8  # denoising steps of a preview
    log_every: int = 1  # updates between progress-bar / callback / tracker updates
    report_to: str = "none"  # experiment tracker, through accelerate: "tensorboard" (event files in output_dir/logs),
    #   "wandb" (needs `pip install wandb` and a login) or "none"; logs the losses, the lr and every preview
    tracker_project: str = "kontext-lora"  # the tracker's project: the wandb project, or the TensorBoard run folder
    expected_peak_memory_gb: float | None = field(default=None, repr=False)  # set by presets, informative only
    peak_memory_source: str = field(default="", repr=False)  # where the figure comes from, set by presets

    def validate(self, dataset=None) -> None:
        """Raise one ``ValueError`` listing every bad setting, before any model work."""
        problems = []
        if self.resolution <= 0 or self.resolution % 16:
            problems.append(f"resolution={self.resolution}: must be a positive multiple of 16 (VAE 8x, 2x2 packing)")
        if self.steps < 0:
            problems.append(f"steps={self.steps}: must be >= 0")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            problems.append("batch_size and gradient_accumulation_steps must be >= 1")
        if self.rank < 1:
            problems.append(f"rank={self.rank}: LoRA rank must be >= 1")
        if self.lora_targets not in LORA_TARGET_PRESETS:
            problems.append(f"lora_targets={self.lora_targets!r}: choose one of {sorted(LORA_TARGET_PRESETS)}")
        for name, allowed in (("preservation", ("identity", "prior")),
                              ("region_kind", (*REGION_KINDS, "none")),
                              ("depth_kind", (*DEPTH_KINDS, "none")),
                              ("depth_source", ("context", "target")),
                              ("timestep_sampling", ("uniform", "logit_normal")),
                              ("l2_form", L2_FORMS),
                              ("mixed_precision", ("no", "fp16", "bf16")),
                              ("optimizer", ("adamw", "adamw8bit")),
                              ("quantize_base", (None, "nf4")),
                              ("report_to", ("none", "tensorboard", "wandb"))):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
        if self.learning_rate <= 0 or self.region_learning_rate < 0 or self.depth_learning_rate < 0:
            problems.append("learning_rate must be > 0, region_learning_rate and depth_learning_rate >= 0")
        if not 0.0 <= self.depth_dropout < 1.0:
            problems.append(f"depth_dropout={self.depth_dropout}: a share of samples in [0, 1) (1: never depth)")
        if not self.tracker_project or "/" in self.tracker_project or "\\" in self.tracker_project:
            problems.append(f"tracker_project={self.tracker_project!r}: a non-empty name without '/' (a folder name)")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            problems.append("checkpoint_every must be >= 0 and keep_checkpoints >= 1")
        if dataset is not None:
            ds_res = getattr(dataset, "resolution", None)
            if ds_res is not None and ds_res != self.resolution:
                problems.append(f"the dataset was opened at resolution {ds_res} but the config says {self.resolution}: "
                                f"open it with KontextPairs(root, resolution={self.resolution})")
            if len(dataset) == 0:
                problems.append("the dataset is empty")
        if problems:
            raise ValueError("invalid TrainConfig:\n  - " + "\n  - ".join(problems))

    def weight_decays(self, region: bool = True, depth: bool = True) -> list[float]:
        """AdamW's decoupled decay of each parameter group, in the optimizer's order (the LoRA, then the region and
        the depth module when present): ``weight_decay``, plus the L2 lambdas with ``l2_form="decoupled"`` (the depth
        module has no L2 term)."""
        extra = self.l2_form == "decoupled"
        return ([self.weight_decay + extra * self.l2_lora_lambda]
                + [self.weight_decay + extra * self.l2_region_lambda] * region + [self.weight_decay] * depth)

    @classmethod
    def for_gpu(cls, name: str = "auto", **overrides) -> TrainConfig:
        """A config tuned for a GPU: ``"auto"`` (detect), or one of :data:`GPU_PRESETS` (``"t4"``, ``"l4"``,
        ``"a100-40"``, ``"a100-80"``, ``"h100"``, ``"cpu"``). ``overrides`` replace any field."""
        key = detect_gpu_preset() if name == "auto" else name.lower()
        if key not in GPU_PRESETS:
            raise ValueError(f"unknown GPU preset {name!r}; choose 'auto' or one of {sorted(GPU_PRESETS)}")
        preset = GPU_PRESETS[key]
        settings = {k: v for k, v in preset.items() if k not in ("label", "note")}
        settings.update({k: preset[k] for k in _ESTIMATED})  # read from the calibration file on first use
        settings.update(overrides)
        return cls(**settings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Where ``make bench`` writes the per-block figures measured at real width and the preset peaks estimated from
# them (``kh.memory.estimate_peak``); the presets read their peak-memory figures from it, on first use.
BLOCK_CALIBRATION_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "block_calibration.json")
_ESTIMATED = ("expected_peak_memory_gb", "peak_memory_source")


@functools.lru_cache(maxsize=1)
def _estimated_peaks() -> dict:
    """``{preset: {"total_gb": ...}}`` and where they come from, as the last full ``make bench`` wrote them."""
    try:
        with open(BLOCK_CALIBRATION_FILE, encoding="utf-8") as fh:
            saved = json.load(fh)
    except FileNotFoundError:
        return {"presets": {}, "machine": {}}
    return saved


class _Preset(dict):
    """One GPU preset (a dict); ``expected_peak_memory_gb`` and ``peak_memory_source`` are filled on first
    use from :data:`BLOCK_CALIBRATION_FILE` (no work at import time)."""

    def __init__(self, key: str, **fields):
        super().__init__(**fields)
        self.key = key

    def __missing__(self, name: str):
        if name not in _ESTIMATED:
            raise KeyError(name)
        saved = _estimated_peaks()
        entry = saved["presets"].get(self.key)
        if entry is None:
            self.update(expected_peak_memory_gb=None, peak_memory_source="not estimated yet: run `make bench`")
        else:
            where = saved["machine"].get("cpu", "a CPU")
            self.update(expected_peak_memory_gb=round(entry["total_gb"], 1),
                        peak_memory_source=f"estimated from measured per-block figures (make bench on {where}; "
                                           "weights, LoRA states and activations, not the CUDA context)")
        return self[name]

    def get(self, name: str, default=None):
        return self[name] if name in self or name in _ESTIMATED else default


# FLUX.1 Kontext [dev] (12B transformer) with a LoRA of the given rank at the given resolution, batch 1,
# encoders offloaded after caching. The GPU presets' peaks are estimates from per-block measurements (above);
# none was measured on that GPU.
GPU_PRESETS: dict[str, dict] = {
    # the pretrained tiny model on one data_samples pair at 128 px: 800 updates took 46-49 s on one thread of a
    # shared 2-core machine (scripts/tiny_editor_report.py)
    "cpu": _Preset("cpu", label="CPU (tiny model)", mixed_precision="no", gradient_checkpointing=False,
                   optimizer="adamw", quantize_base=None, resolution=128, steps=800, learning_rate=3e-3,
                   region_learning_rate=1e-2, rank=8, lora_targets="attn_ff",
                   max_sequence_length=32,
                   checkpoint_every=200, expected_peak_memory_gb=None,
                   peak_memory_source="not applicable: the tiny model needs well under 1 GB"),
    "t4": _Preset("t4", label="T4 16 GB", mixed_precision="fp16", gradient_checkpointing=True, optimizer="adamw8bit",
                  quantize_base="nf4", load_in_stages=True, resolution=512, rank=8,
                  note="no bf16 on T4: fp16 autocast, LoRA weights kept in fp32"),
    "l4": _Preset("l4", label="L4 24 GB", mixed_precision="bf16", gradient_checkpointing=True, optimizer="adamw8bit",
                  quantize_base="nf4", load_in_stages=True, resolution=768, rank=16),
    "a100-40": _Preset("a100-40", label="A100 40 GB", mixed_precision="bf16", gradient_checkpointing=True,
                       optimizer="adamw", quantize_base=None, resolution=768, rank=16),
    "a100-80": _Preset("a100-80", label="A100 80 GB", mixed_precision="bf16", gradient_checkpointing=True,
                       optimizer="adamw", quantize_base=None, resolution=1024, rank=32),
    "h100": _Preset("h100", label="H100 80 GB", mixed_precision="bf16", gradient_checkpointing=True,
                    optimizer="adamw", quantize_base=None, resolution=1024, rank=32),
}


def detect_gpu_preset() -> str:
    """The :data:`GPU_PRESETS` key for this machine's first CUDA device (``"cpu"`` without one)."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    mem_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    if "t4" in name or mem_gb < 20:
        return "t4"
    if "l4" in name or mem_gb < 30:
        return "l4"
    if "h100" in name or "h200" in name:
        return "h100"
    return "a100-40" if mem_gb < 60 else "a100-80"


QUICK_SETTINGS = dict(steps=3, resolution=64, rank=4, max_sequence_length=16, checkpoint_every=2, preview_steps=2)


def quick_config(config: TrainConfig, *, verbose: bool = True) -> TrainConfig:
    """``config`` as a smoke test of its code path: :data:`QUICK_SETTINGS` (3 updates at 64 px, rank 4).

    Without CUDA, what a CPU cannot run gives way, each change printed: NF4 is dropped (diffusers'
    bitsandbytes quantizer loads only onto a GPU) and fp16 autocast becomes bf16. Everything else of the
    preset (gradient checkpointing, 8-bit AdamW, loading in stages, offloaded encoders) stays.
    """
    changes = dict(QUICK_SETTINGS)
    if not torch.cuda.is_available():
        if config.quantize_base is not None:
            changes["quantize_base"] = None
        if config.mixed_precision == "fp16":
            changes["mixed_precision"] = "bf16"
    if verbose:
        cpu = {k: (getattr(config, k), v) for k, v in changes.items() if k in ("quantize_base", "mixed_precision")}
        print("quick run: " + ", ".join(f"{k}={v}" for k, v in QUICK_SETTINGS.items())
              + "".join(f"; {k} {old!r} -> {new!r} (no GPU here)" for k, (old, new) in cpu.items()))
    return dataclasses.replace(config, **changes)
