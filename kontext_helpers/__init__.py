"""kontext_helpers: LoRA training for FLUX.1 Kontext with a region signal and depth on the tokens (or an IP-Adapter).

Every notebook imports it as ``kh``; each name below is also reachable as ``kh.<name>``. The modules follow
the notebooks, and each imports only the modules above it:

    images        shared   one converter per job: PIL / tensor / array, RGB, mask, depth (8/16-bit, float)
    models        shared   device and dtype, moving encoders, the LoRA and its on/off switch
    figures       shared   sliders, pair grids, loss curves, previews, edit metrics
    tiny          shared   the offline tiny Kontext pipeline
    rehearsal     shared   FLUX.1 Kontext [dev] at real width, random weights, few layers: Hub folder, transformer
    pipeline      shared   load_pipeline (tiny, Hub id, local folder), environment print
    labels        01       your own photos: an edit mask from the difference, depth from a monocular model
    buckets       01       aspect-ratio buckets: Kontext's preferred resolutions at the training area
    pair_files    01       writing a pair folder from your lists or a Hugging Face table, every row checked first
    data          01       KontextPairs: the dataset folder, checked; your own pairs, a datasets.Dataset
    scenes        shared   fresh random scenes and edits drawn with the sample renderer (the tiny model's data)
    latents       02       VAE latents, 2x2 packing, position ids
    conditioning  03       the region signal, depth through the IP-Adapter, the forward call, the loss
    depth         03       depth on the tokens: 16x16 depth patches per token, a zero-initialised offset module
    inference     05       sample_edit, compare_variants
    adapters      05       save / load an adapter, ComfyUI export
    config        04       TrainConfig and GPU presets
    memory        04       what a training run keeps in memory (counted before any download), its peak (estimated)
    checkpoints   04       atomic checkpoints, resume checks
    draws         04       what each update draws: a batch of one bucket, the sigmas (a function of seed and step)
    cache         04       constant work once per sample: the training cache
    training      04       the training loop: updates, checkpoints, previews, trackers
    solutions     01-05    one solution per graded exercise (look only after trying)
    exercises     01-05    ``kh.exercises.check_<name>(your_function)``: graded against diffusers and the package
    pretrain               ``python -m kontext_helpers pretrain-tiny``: the tiny model's shipped weights
    cli                    ``python -m kontext_helpers train`` (and ``pretrain-tiny``, ``memory-plan``)
    colab                  the notebooks' setup in Colab: Drive, Hub login, bitsandbytes when a preset needs it

Training comes last because its previews sample with ``inference``. No import-time work: heavy libraries
(diffusers, transformers, peft, accelerate, matplotlib) are imported inside the functions that use them.

Dimension legend (used in every shape comment)
    B        batch size
    C        VAE latent channels (16 for Flux)
    H, W     image height and width in pixels
    H_l, W_l latent height and width (H / 8, W / 8 for Flux's VAE)
    H', W'   token grid: latent grid after 2x2 packing (H_l / 2, W_l / 2); also written h_tok, w_tok
    N        number of image tokens of one image, H' * W'
    4C       channels of one packed token (64 for Flux: ``transformer.config.in_channels``), also c_in
    T        number of text tokens (T5 sequence length)
    D        transformer inner width (num_attention_heads * attention_head_dim)
    E        CLIP image embedding width (the IP-Adapter's input)
    256      depth values of one token's 16 x 16 pixel patch (``depth_token_features``: ``[B, N, 256]``)

The visual sequence the transformer sees during training and sampling is
``[noisy target tokens (N) | clean context tokens (N)]`` -> ``[B, 2N, 4C]`` with position ids ``[2N, 3]`` whose
first column says which part a token belongs to (0 target, 1 context), exactly as ``FluxKontextPipeline`` marks
its context tokens with 1. The default region signal (``"marked"``) and the ``"tokens"`` depth kind add
``[B, N, 4C]`` offsets to the target and the context tokens; the ``"cells"`` and ``"linear"`` region kinds append
``K`` tokens with the type 2 (``[B, 2N+K, 4C]``, ids ``[2N+K, 3]``; ``"linear"``: one token, id ``(2, 0, 0)``).
The design and the corrections to the original design are in ``docs/design.md``.
"""

from . import exercises as exercises  # kh.exercises.check_<name>(fn): the graded exercises
from .adapters import (
    ADAPTER_CONFIG_FILE,
    DEPTH_WEIGHT_FILE,
    LORA_WEIGHT_FILE,
    REGION_WEIGHT_FILE,
    export_comfyui,
    load_adapter,
    load_depth_module,
    push_adapter,
    save_adapter,
    write_model_card,
)
from .buckets import bucket_crop_box, bucket_shapes, nearest_bucket
from .cache import TrainCache, build_train_cache
from .checkpoints import (
    RESUME_MUST_MATCH,
    CheckpointWriteError,
    list_checkpoints,
    load_checkpoint,
    resume_config_changes,
    save_checkpoint,
)
from .colab import colab_session
from .conditioning import (
    DEFAULT_REGION_KIND,
    L2_FORMS,
    REGION_KINDS,
    MaskedContextEmbedding,
    MaskedTokenEmbedding,
    MaskRegionToken,
    RegionCellTokens,
    RegionInputs,
    apply_region,
    encode_depth_for_ip_adapter,
    encode_prompts,
    fm_masked_dual_loss_with_l2,
    kontext_forward,
    make_region_module,
    mask_to_token_grid,
    mean_square,
    region_inputs,
)
from .config import GPU_PRESETS, TrainConfig, detect_gpu_preset, quick_config
from .data import RESIZE_POLICIES, KontextPairs, crop_box, write_pair_folder
from .depth import (
    DEFAULT_DEPTH_KIND,
    DEPTH_KINDS,
    DepthTokenEmbedding,
    depth_inputs,
    depth_token_features,
    make_depth_module,
)
from .draws import batch_indices, sample_indices, sample_sigmas, step_generator
from .figures import (
    LiveLossPlot,
    denoising_figure,
    depth_precision_figure,
    edit_metrics,
    interactive_figure,
    metrics_table,
    packing_figure,
    preview_grid,
    show_pairs,
    show_token_grid,
    token_grid_lines,
)
from .images import (
    depth_to_array,
    depth_to_pil,
    image_to_rgb_tensor,
    mask_to_tensor,
    pil_to_depth_array,
    pil_to_rgb,
)
from .inference import Comparison, RegionHook, blend_latents, blend_mask_tokens, compare_variants, sample_edit
from .labels import estimate_depth, mask_from_difference
from .latents import (
    REGION_ID,
    img_ids_grid,
    kontext_img_ids,
    normalize_01_to_m11,
    pack_like_pipeline,
    region_token_id,
    to_latents,
    unpack_like_pipeline,
)
from .memory import estimate_peak, memory_plan
from .models import (
    LORA_TARGET_PRESETS,
    add_lora,
    collect_lora_named_params,
    ip_adapter_processors,
    lora_off,
    lora_state_dict,
)
from .pipeline import (
    add_transformer,
    default_dtype,
    default_model,
    describe_environment,
    free_text_encoders,
    load_pipeline,
    nf4_quantization_config,
)
from .pretrain import PretrainConfig, depth_embedding_spread, pretrain_tiny
from .rehearsal import REHEARSAL_CONFIG, build_rehearsal_model, build_rehearsal_transformer, depth_model_for
from .scenes import (
    DEPTH_FAMILIES,
    PHOTO_ASPECTS,
    AspectPairs,
    DepthPairs,
    DrawnPairs,
    TwinPairs,
    add_fog,
    crop_to_aspect,
    depth_followed,
    object_changed,
    random_edit_spec,
    render_depth_scene,
    render_training_pair,
    render_twin_scene,
    twin_edit_spec,
)
from .tiny import TINY_WEIGHTS_FILE, build_tiny_pipeline, load_tiny_weights, tiny_ip_adapter_state_dict
from .training import (
    TrainResult,
    checkpoint_to_resume,
    evaluation_loss,
    load_for_training,
    train,
    training_loss,
)

__all__ = [
    # images
    "depth_to_array",
    "depth_to_pil",
    "image_to_rgb_tensor",
    "mask_to_tensor",
    "pil_to_depth_array",
    "pil_to_rgb",
    # models
    "LORA_TARGET_PRESETS",
    "add_lora",
    "collect_lora_named_params",
    "ip_adapter_processors",
    "lora_off",
    "lora_state_dict",
    # figures
    "LiveLossPlot",
    "denoising_figure",
    "depth_precision_figure",
    "edit_metrics",
    "interactive_figure",
    "metrics_table",
    "packing_figure",
    "preview_grid",
    "show_pairs",
    "show_token_grid",
    "token_grid_lines",
    # tiny
    "TINY_WEIGHTS_FILE",
    "build_tiny_pipeline",
    "load_tiny_weights",
    "tiny_ip_adapter_state_dict",
    # rehearsal
    "REHEARSAL_CONFIG",
    "build_rehearsal_model",
    "build_rehearsal_transformer",
    "depth_model_for",
    # pipeline
    "add_transformer",
    "default_dtype",
    "default_model",
    "describe_environment",
    "free_text_encoders",
    "load_pipeline",
    "nf4_quantization_config",
    # buckets, data (01)
    "bucket_crop_box",
    "bucket_shapes",
    "nearest_bucket",
    "RESIZE_POLICIES",
    "crop_box",
    "KontextPairs",
    "estimate_depth",
    "mask_from_difference",
    "write_pair_folder",
    # scenes
    "random_edit_spec",
    "render_training_pair",
    "TwinPairs",
    "DrawnPairs",
    "AspectPairs",
    "PHOTO_ASPECTS",
    "crop_to_aspect",
    "object_changed",
    "render_twin_scene",
    "twin_edit_spec",
    "DEPTH_FAMILIES",
    "DepthPairs",
    "render_depth_scene",
    "depth_followed",
    "add_fog",
    # latents (02)
    "REGION_ID",
    "img_ids_grid",
    "kontext_img_ids",
    "normalize_01_to_m11",
    "pack_like_pipeline",
    "region_token_id",
    "to_latents",
    "unpack_like_pipeline",
    # conditioning (03)
    "DEFAULT_REGION_KIND",
    "L2_FORMS",
    "REGION_KINDS",
    "MaskRegionToken",
    "MaskedContextEmbedding",
    "MaskedTokenEmbedding",
    "RegionInputs",
    "region_inputs",
    "RegionCellTokens",
    "apply_region",
    "make_region_module",
    "encode_depth_for_ip_adapter",
    "encode_prompts",
    "fm_masked_dual_loss_with_l2",
    "kontext_forward",
    "mask_to_token_grid",
    "mean_square",
    # depth (03)
    "DEFAULT_DEPTH_KIND",
    "DEPTH_KINDS",
    "DepthTokenEmbedding",
    "depth_inputs",
    "depth_token_features",
    "make_depth_module",
    # inference (05)
    "Comparison",
    "RegionHook",
    "blend_latents",
    "blend_mask_tokens",
    "compare_variants",
    "sample_edit",
    # adapters (05)
    "ADAPTER_CONFIG_FILE",
    "DEPTH_WEIGHT_FILE",
    "LORA_WEIGHT_FILE",
    "REGION_WEIGHT_FILE",
    "export_comfyui",
    "load_adapter",
    "load_depth_module",
    "push_adapter",
    "save_adapter",
    "write_model_card",
    # config (04)
    "GPU_PRESETS",
    "TrainConfig",
    "detect_gpu_preset",
    "quick_config",
    # memory (04)
    "estimate_peak",
    "memory_plan",
    # colab
    "colab_session",
    # checkpoints (04)
    "RESUME_MUST_MATCH",
    "CheckpointWriteError",
    "list_checkpoints",
    "load_checkpoint",
    "resume_config_changes",
    "save_checkpoint",
    # cache (04)
    "TrainCache",
    "build_train_cache",
    # training (04)
    "TrainResult",
    "checkpoint_to_resume",
    "evaluation_loss",
    "load_for_training",
    "batch_indices",
    "sample_indices",
    "step_generator",
    "sample_sigmas",
    "train",
    "training_loss",
    # pretrain
    "PretrainConfig",
    "pretrain_tiny",
    "depth_embedding_spread",
]
