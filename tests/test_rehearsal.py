"""The rehearsal world: FLUX.1 Kontext [dev]'s real widths down the real loading path, trained, sampled, exported."""

import filecmp
import gc
import os
import shutil

import pytest
import torch
from safetensors import safe_open

import kontext_helpers as kh

DTYPE = torch.bfloat16  # the dtype FLUX.1 Kontext [dev] is trained and run in on a GPU
RANK = 4
SIZE = 64  # px: a 4 x 4 token grid, N = 16
MAX_TOKENS = 16  # T5 tokens


@pytest.fixture(scope="module")
def rehearsal_folder(rehearsal_root):
    """The session's rehearsal model (tests/conftest.py)."""
    return rehearsal_root


@pytest.fixture(scope="module")
def rehearsal_kwargs(rehearsal_folder):
    """``build_rehearsal_model``'s answer for the existing folder: the arguments of ``load_pipeline``."""
    return kh.build_rehearsal_model(rehearsal_folder, progress=False)


@pytest.fixture(scope="module")
def rehearsal_pipe(rehearsal_kwargs):
    """The folder loaded as the Hub id would be (about 2.2 GB in bf16). The training fixture adds a LoRA to it."""
    pipe = kh.load_pipeline(**rehearsal_kwargs, device="cpu", dtype=DTYPE)
    yield pipe
    del pipe
    gc.collect()


@pytest.fixture(scope="module")
def rehearsal_run(rehearsal_pipe, one_pair, train_config, tmp_path_factory):
    """Two updates at 64 px with a checkpoint at step 2, then ``resume=True`` for a third: ``(first, resumed)``."""
    root = tmp_path_factory.mktemp("rehearsal_run")
    data = one_pair(resolution=SIZE)
    common = dict(rank=RANK, resolution=SIZE, max_sequence_length=MAX_TOKENS, checkpoint_every=2)
    first = kh.train(rehearsal_pipe, data, train_config(root, steps=2, **common), progress=False)
    resumed = kh.train(rehearsal_pipe, data, train_config(root, steps=3, resume=True, **common), progress=False)
    return first, resumed


@pytest.fixture(scope="module")
def rehearsal_adapter(rehearsal_pipe, rehearsal_run, tmp_path_factory):
    """The trained LoRA and region module saved with ``save_adapter``."""
    path = str(tmp_path_factory.mktemp("rehearsal_adapter") / "edit")
    return kh.save_adapter(rehearsal_pipe, rehearsal_run[1].region, path, config=rehearsal_run[1].config)


@pytest.fixture(scope="module")
def rehearsal_edit(edit_prompt, random_image, random_depth, quadrant_mask):
    """``rehearsal_edit(pipe, region)``: a 64 px edit with mask, region and depth, 2 steps, packed latents out."""

    def edit(pipe, region):
        return kh.sample_edit(pipe, random_image(SIZE, SIZE, 11), edit_prompt, mask=quadrant_mask(SIZE, SIZE),
                              region=region, depth=random_depth(SIZE, SIZE), height=SIZE, width=SIZE,
                              num_inference_steps=2, guidance_scale=2.5, generator=torch.Generator().manual_seed(0),
                              output_type="latent", max_sequence_length=MAX_TOKENS)

    return edit


# --------------------------------------------------------------------------------------------------
# the folder (first: a rebuild must not share the memory with a loaded pipeline)
# --------------------------------------------------------------------------------------------------


def weight_files(folder) -> list[str]:
    """Every ``.safetensors`` file under ``folder``, relative to it, sorted."""
    return sorted(os.path.relpath(os.path.join(root, n), folder) for root, _, names in os.walk(folder)
                  for n in names if n.endswith(".safetensors"))


def test_same_seed_same_weights_and_the_global_rng_is_untouched(rehearsal_kwargs, rehearsal_folder, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    try:
        kh.build_rehearsal_model(tmp_path / "again", seed=0, progress=False)
        torch.testing.assert_close(torch.rand(3), expected, msg="building must not consume the global torch RNG")
        files = weight_files(rehearsal_folder)
        assert len(files) == 7 and files == weight_files(tmp_path / "again"), f"the same weight files: {files}"
        for name in files:
            assert filecmp.cmp(rehearsal_folder / name, tmp_path / "again" / name, shallow=False), (
                f"{name} differs between two seed-0 builds")
    finally:
        shutil.rmtree(tmp_path / "again", ignore_errors=True)  # 2.2 GB


def test_folder_has_the_hub_layout_and_is_reused(rehearsal_kwargs, rehearsal_folder):
    pipeline_dir = rehearsal_kwargs["model"]
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert os.path.isdir(os.path.join(pipeline_dir, sub)), f"the pipeline folder must hold {sub}/"
    files = [f for _, _, names in os.walk(rehearsal_folder) for f in names]
    assert not [f for f in files if f.endswith((".bin", ".pt"))], f"safetensors only, found {files}"
    weights = os.path.join(pipeline_dir, "transformer", "diffusion_pytorch_model.safetensors")
    before = os.stat(weights).st_mtime_ns
    again = kh.build_rehearsal_model(rehearsal_folder, progress=False)
    assert again == rehearsal_kwargs, "a complete folder must give the same load_pipeline arguments"
    assert os.stat(weights).st_mtime_ns == before, "a complete folder must be reused, not rebuilt"
    assert not [n for n in os.listdir(rehearsal_folder.parent) if n.startswith(".")], "no temporary folder left"


def test_other_folders_are_refused_by_name(rehearsal_folder, tmp_path):
    half = tmp_path / "half-built"
    (half / "pipeline").mkdir(parents=True)
    with pytest.raises(ValueError, match="half-built.*not a complete rehearsal model"):
        kh.build_rehearsal_model(half, progress=False)
    with pytest.raises(ValueError, match="another seed"):
        kh.build_rehearsal_model(rehearsal_folder, seed=1, progress=False)


def test_an_interrupted_build_leaves_no_half_folder(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # as Colab's stop button does, after the image encoder was written

    monkeypatch.setattr("transformers.CLIPTextModel", interrupt)
    with pytest.raises(KeyboardInterrupt):
        kh.build_rehearsal_model(tmp_path / "model", progress=False)
    assert os.listdir(tmp_path) == [], f"neither the folder nor its temporary one may remain: {os.listdir(tmp_path)}"


def test_xlabs_ip_adapter_file_has_the_real_keys_and_shapes(rehearsal_kwargs):
    with safe_open(os.path.join(rehearsal_kwargs["ip_adapter"], "ip_adapter.safetensors"), framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    expected = {"ip_adapter_proj_model.proj.weight": (65536, 768), "ip_adapter_proj_model.proj.bias": (65536,),
                "ip_adapter_proj_model.norm.weight": (4096,), "ip_adapter_proj_model.norm.bias": (4096,)}
    for kv in ("k", "v"):
        prefix = f"double_blocks.0.processor.ip_adapter_double_stream_{kv}_proj"
        expected.update({f"{prefix}.weight": (3072, 4096), f"{prefix}.bias": (3072,)})
    assert shapes == expected, f"XLabs-AI/flux-ip-adapter-v2's keys and shapes expected, got {shapes}"


# --------------------------------------------------------------------------------------------------
# the loaded pipeline: configurations and dtypes
# --------------------------------------------------------------------------------------------------


def test_loaded_configs_have_flux_kontext_dev_real_widths(rehearsal_pipe):
    """Every width is FLUX.1 Kontext [dev]'s; only the layer counts are cut.

    What this world cannot cover on a CPU: NF4 (diffusers' bitsandbytes quantizer refuses to load without a GPU,
    so ``quantization_config=kh.nf4_quantization_config()`` and 8-bit AdamW stay GPU checks), fp16 / bf16
    autocast on CUDA, the memory and speed of 19 + 38 blocks, encoder offloading to a GPU, and edit quality
    (the weights are random).
    """
    t, real = rehearsal_pipe.transformer.config, kh.REHEARSAL_CONFIG
    assert t.num_attention_heads * t.attention_head_dim == 3072 == rehearsal_pipe.transformer.inner_dim, (
        "transformer inner width D must be 24 x 128 = 3072")
    assert (t.in_channels, t.joint_attention_dim, t.pooled_projection_dim) == (64, 4096, 768), (
        "4C = 64 input channels, 4096-wide T5 tokens, 768-wide pooled CLIP vector")
    assert tuple(t.axes_dims_rope) == (16, 56, 56) and t.guidance_embeds, "RoPE axes (16, 56, 56), guidance embeds"
    assert (t.num_layers, t.num_single_layers) == (real["transformer"]["num_layers"],
                                                   real["transformer"]["num_single_layers"]), "layer counts as built"
    t5, clip = rehearsal_pipe.text_encoder_2.config, rehearsal_pipe.text_encoder.config
    assert (t5.d_model, t5.d_ff, t5.num_heads, t5.d_kv, t5.vocab_size) == (4096, 10240, 64, 64, 32128), "T5-XXL widths"
    assert (clip.hidden_size, clip.intermediate_size, clip.vocab_size) == (768, 3072, 49408), "CLIP-L text widths"
    vision = rehearsal_pipe.image_encoder.config
    assert (vision.hidden_size, vision.projection_dim, vision.image_size, vision.patch_size) == (1024, 768, 224, 14), (
        "ViT-L/14 image encoder: 1024 wide, projected to E = 768, 224 px, 14 px patches")
    vae = rehearsal_pipe.vae.config
    assert tuple(vae.block_out_channels) == (128, 256, 512, 512) and vae.latent_channels == 16, "FLUX.1 VAE channels"
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159), "FLUX.1 VAE scale and shift"
    assert rehearsal_pipe.vae_scale_factor == 8, "the VAE downsamples 8x"


def test_loaded_configs_hold_every_value_of_rehearsal_config(rehearsal_pipe):
    pipe = rehearsal_pipe
    configs = {"transformer": pipe.transformer.config, "vae": pipe.vae.config, "clip_text": pipe.text_encoder.config,
               "t5": pipe.text_encoder_2.config, "clip_vision": pipe.image_encoder.config,
               "scheduler": pipe.scheduler.config}
    rewritten = {("t5", "tie_word_embeddings")}  # transformers 5 always ties T5; it keeps v1.1's False elsewhere
    for part, config in configs.items():
        for key, value in kh.REHEARSAL_CONFIG[part].items():
            loaded = config[key] if isinstance(config, dict) else getattr(config, key)
            loaded = tuple(loaded) if isinstance(loaded, list) else loaded
            assert (part, key) in rewritten or loaded == value, f"{part}.{key}: built {value!r}, loaded {loaded!r}"
    size = kh.REHEARSAL_CONFIG["image_processor"]["size"]
    assert pipe.feature_extractor.crop_size == {"height": size, "width": size}, "CLIP's 224 x 224 input"


def test_every_component_loads_in_the_requested_dtype(rehearsal_pipe):
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae", "image_encoder"):
        module = getattr(rehearsal_pipe, name)
        assert module.dtype == DTYPE, f"{name} must load in {DTYPE}, got {module.dtype}"
        assert not module.training, f"{name} must be in eval mode, as from_pretrained leaves it"
    t5 = rehearsal_pipe.text_encoder_2
    assert t5.encoder.embed_tokens.weight is t5.shared.weight, "T5's token embedding must stay tied to `shared`"


# --------------------------------------------------------------------------------------------------
# the IP-Adapter at real width
# --------------------------------------------------------------------------------------------------


def test_ip_adapter_attaches_16_image_tokens_at_real_width(rehearsal_pipe, random_depth):
    t = rehearsal_pipe.transformer
    projection = t.encoder_hid_proj.image_projection_layers[0]
    assert t.encoder_hid_proj.num_ip_adapters == 1, "the XLabs IP-Adapter must be attached"
    assert projection.num_image_text_embeds == 16, "65536 projection rows must be read as 16 image tokens of 4096"
    processors = kh.ip_adapter_processors(t)
    assert len(processors) == t.config.num_layers, "one IP-Adapter processor per double block"
    for proc in processors:
        for layer in (proc.to_k_ip[0], proc.to_v_ip[0]):
            assert tuple(layer.weight.shape) == (3072, 4096), f"to_k_ip / to_v_ip must be [3072, 4096]: {layer}"
            assert layer.weight.dtype == DTYPE, "the IP-Adapter weights must follow the pipeline's dtype"
    embeds = kh.encode_depth_for_ip_adapter(rehearsal_pipe, random_depth(SIZE, SIZE))
    assert len(embeds) == 1 and embeds[0].shape == (1, 1, 768), f"depth -> [B, 1, E = 768], got {embeds[0].shape}"
    assert torch.isfinite(embeds[0]).all(), "the depth embedding must be finite"


def test_plain_pipe_call_without_depth_equals_the_adapter_at_scale_zero(rehearsal_pipe, random_image, random_depth,
                                                                        edit_prompt):
    """``pipe(image=..., prompt=...)`` with the IP-Adapter attached and no ``ip_adapter_image`` runs at real width
    and equals diffusers' own adapter path with an image at scale 0 (it adds ``0 * attention``)."""
    def call(**extra):
        return rehearsal_pipe(image=random_image(SIZE, SIZE, 4), prompt=edit_prompt, height=SIZE, width=SIZE,
                              max_area=SIZE * SIZE, _auto_resize=False, num_inference_steps=2,
                              max_sequence_length=MAX_TOKENS, generator=torch.Generator().manual_seed(0),
                              output_type="latent", **extra).images

    plain = call()
    scales = [list(p.scale) for p in kh.ip_adapter_processors(rehearsal_pipe.transformer)]
    rehearsal_pipe.set_ip_adapter_scale(0.0)
    try:
        zero = call(ip_adapter_image=random_depth(SIZE, SIZE))
    finally:
        for proc, scale in zip(kh.ip_adapter_processors(rehearsal_pipe.transformer), scales):
            proc.scale = scale
    assert plain.shape == (1, 16, 64) and torch.isfinite(plain).all(), f"packed latents [1, N, 4C]: {plain.shape}"
    torch.testing.assert_close(plain, zero, rtol=0, atol=0,
                               msg=lambda m: f"no ip_adapter_image must equal the adapter at scale 0: {m}")


# --------------------------------------------------------------------------------------------------
# training, resume, sampling, adapters and the ComfyUI export
# --------------------------------------------------------------------------------------------------


def test_training_runs_at_real_width_with_a_float32_lora(rehearsal_pipe, rehearsal_run):
    first, _ = rehearsal_run
    assert [r["step"] for r in first.history] == [1, 2], "one history record per update"
    losses = torch.tensor([r["loss"] for r in first.history])
    assert torch.isfinite(losses).all(), f"losses must be finite at real width: {losses}"
    lora = kh.collect_lora_named_params(rehearsal_pipe.transformer)
    assert lora and all(p.dtype == torch.float32 for _, p in lora), "the LoRA must train in fp32 over a bf16 base"
    assert any(p.abs().max() > 0 for n, p in lora if "lora_B" in n), "training must move lora_B off zero"
    base = [p.dtype for n, p in rehearsal_pipe.transformer.named_parameters() if "lora_" not in n]
    assert set(base) == {DTYPE}, f"the base transformer must stay in {DTYPE}, got {set(base)}"
    assert [s for s, _ in kh.list_checkpoints(first.output_dir)][:1] == [2], "a checkpoint must be written at step 2"


def test_resume_continues_from_the_checkpoint(rehearsal_run):
    first, resumed = rehearsal_run
    assert resumed.resumed_from == 2, f"resume=True must continue from step 2, got {resumed.resumed_from}"
    assert [r["step"] for r in resumed.history] == [1, 2, 3], "the resumed history continues the saved one"
    assert resumed.history[:2] == first.history, "the saved history must come back unchanged"
    assert torch.isfinite(torch.tensor(resumed.history[-1]["loss"])), "the resumed update's loss must be finite"


def test_sample_edit_with_mask_region_and_depth_at_real_width(rehearsal_pipe, rehearsal_run, rehearsal_edit):
    latents = rehearsal_edit(rehearsal_pipe, rehearsal_run[1].region)
    assert latents.shape == (1, 16, 64), f"64 px -> N = 16 packed tokens of 4C = 64, got {tuple(latents.shape)}"
    assert torch.isfinite(latents).all(), "sampled latents must be finite"


def test_saved_adapter_reloads_into_a_second_load_with_identical_latents(
        rehearsal_pipe, rehearsal_kwargs, rehearsal_run, rehearsal_adapter, rehearsal_edit):
    """The LoRA trains in fp32 over the bf16 base; ``load_adapter`` keeps it in fp32 (diffusers' loader alone would
    round it to bf16), so the reloaded pipeline must give exactly the trained pipeline's latents."""
    trained_region = rehearsal_run[1].region
    trained_lora = kh.lora_state_dict(rehearsal_pipe.transformer)
    expected = rehearsal_edit(rehearsal_pipe, trained_region)
    second = kh.load_pipeline(**rehearsal_kwargs, device="cpu", dtype=DTYPE)  # two loaded at once, no more
    try:
        region = kh.load_adapter(second, rehearsal_adapter)
        assert region.kind == trained_region.kind, "the region module comes back as the kind it was trained as"
        for (name, got), want in zip(region.state_dict().items(), trained_region.state_dict().values()):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"the region module's {name} must round-trip")
        reloaded = kh.lora_state_dict(second.transformer)
        assert sorted(reloaded) == sorted(trained_lora), "the reloaded LoRA must adapt the same modules"
        for key, value in reloaded.items():
            torch.testing.assert_close(value, trained_lora[key], rtol=0, atol=0,
                                       msg=f"{key}: the reloaded LoRA must be the trained one, in fp32")
        torch.testing.assert_close(rehearsal_edit(second, region), expected, rtol=0, atol=0,
                                   msg=lambda m: f"the reloaded adapter must reproduce the trained pipeline: {m}")
    finally:
        del second
        gc.collect()


def test_comfyui_export_names_the_real_blocks_of_this_model(rehearsal_adapter, tmp_path):
    out = kh.export_comfyui(rehearsal_adapter, str(tmp_path / "comfy.safetensors"))
    with safe_open(out, framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert shapes[f"{qkv}.lora_down.weight"] == (3 * RANK, 3072), "q/k/v downs stacked: [3 rank, D]"
    assert shapes[f"{qkv}.lora_up.weight"] == (3 * 3072, 3 * RANK), "q/k/v ups block-diagonal: [3 D, 3 rank]"
    assert f"{qkv}.alpha" in shapes, "every ComfyUI LoRA carries its alpha"
    linear1 = "lora_unet_single_blocks_0_linear1"
    assert shapes[f"{linear1}.lora_up.weight"] == (7 * 3072, 3 * RANK), (
        "single-block attention is targeted: q/k/v rows of linear1 = [q | k | v | mlp], 7 D rows")
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in shapes}
    assert modules == {qkv, "lora_unet_double_blocks_0_txt_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
                       "lora_unet_double_blocks_0_txt_attn_proj", linear1}, (
        f"exactly the attention modules of the one double and one single block, got {sorted(modules)}")
    assert not [k for k in shapes if "blocks_1_" in k], "no key for blocks this model does not have"


def test_memory_plan_counts_the_rehearsal_models_parameters_exactly(rehearsal_pipe):
    """The memory plan counts parameters on the meta device; on the rehearsal configuration the counts must equal
    the loaded models' (the transformer carries the IP-Adapter once loaded; LoRA layers are left out)."""
    counts = {name: sum(split) for name, split in kh.memory.parameter_counts(kh.REHEARSAL_CONFIG).items()}
    loaded = {"transformer": rehearsal_pipe.transformer, "t5": rehearsal_pipe.text_encoder_2,
              "clip_text": rehearsal_pipe.text_encoder, "vae": rehearsal_pipe.vae,
              "image_encoder": rehearsal_pipe.image_encoder}
    for name, model in loaded.items():
        real = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        expected = counts[name] + (kh.memory.ip_adapter_parameters(kh.REHEARSAL_CONFIG) if name == "transformer" else 0)
        assert real == expected, f"{name}: the plan counts {expected:,} parameters, the loaded model has {real:,}"


# --------------------------------------------------------------------------------------------------
# loading in stages (the T4 / L4 presets): text encoders, cache, free them, then the transformer
# --------------------------------------------------------------------------------------------------


def test_loading_in_stages_caches_the_same_and_trains_without_text_encoders(rehearsal_pipe, rehearsal_folder,
                                                                             one_pair, train_config, tmp_path):
    """What this CPU cannot cover: the NF4 transformer (diffusers' bitsandbytes quantizer loads only onto a GPU)
    and the RAM it saves on Colab; the stages themselves, their order and their result are checked here."""
    data = one_pair(resolution=SIZE)
    cfg = train_config(tmp_path, steps=1, rank=kh.TrainConfig.rank, max_sequence_length=MAX_TOKENS,
                       load_in_stages=True)  # the default rank, targets and L2 lambdas
    pipe, cache = kh.load_for_training(str(rehearsal_folder), data, cfg, device="cpu", dtype=DTYPE, progress=False)
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None, "the text encoders must be freed after caching"
    assert kh.ip_adapter_processors(pipe.transformer), "the transformer must come with the IP-Adapter attached"
    whole = kh.build_train_cache(rehearsal_pipe, data, max_sequence_length=MAX_TOKENS, device="cpu", progress=False)
    for name in ("prompt_embeds", "pooled_prompt_embeds", "ctx_tok", "tgt_tok", "mask_small", "ip_embeds"):
        torch.testing.assert_close(getattr(cache.samples[0], name), getattr(whole.samples[0], name), rtol=0, atol=0,
                                   msg=f"{name}: the staged cache must equal the whole pipeline's")
    with pytest.raises(ValueError, match="no text encoders.*cache=cache"):
        kh.train(pipe, data, cfg, progress=False)
    result = kh.train(pipe, data, cfg, cache=cache, progress=False)
    first = result.history[0]  # computed at step 0, before the first update
    assert torch.isfinite(torch.tensor(first["loss"])), "a staged pipeline must train"
    assert cfg.l2_form == "decoupled" and first["l2_lora"] > 0, "the default L2 acts in the optimizer, not the loss"
    assert first["loss"] == pytest.approx(cfg.w_in * first["loss_in"] + cfg.w_out * first["loss_out"], rel=1e-6), (
        f"with the default config the logged loss is the flow-matching loss alone (no L2 term in it): {first}")
    del pipe, cache
    gc.collect()


def test_rehearsal_model_command_reuses_the_folder_and_prints_how_to_run_the_notebooks(rehearsal_folder, capsys):
    from kontext_helpers.cli import main  # what `python -m kontext_helpers rehearsal-model FOLDER` runs

    kwargs = main(["rehearsal-model", str(rehearsal_folder)])
    assert kwargs == kh.build_rehearsal_model(rehearsal_folder, progress=False), "the load_pipeline arguments"
    out = capsys.readouterr().out
    assert f"KONTEXT_MODEL={rehearsal_folder}" in out and "KONTEXT_QUICK=1 make demo" in out, (
        f"the command must say how to run the notebooks on the folder:\n{out}")


# --------------------------------------------------------------------------------------------------
# every notebook's real-model branch on the rehearsal model
# --------------------------------------------------------------------------------------------------


def test_notebooks_take_the_gpu_path_on_the_rehearsal_model(rehearsal_root, notebook_runner, repo_root, tmp_path,
                                                            monkeypatch):
    """Every notebook's real-model branch, at real width, in quick mode, with the T4 preset minus what a CPU cannot
    run: no NF4 (bitsandbytes loads 4-bit weights only onto a GPU) and bf16 autocast instead of fp16. What runs:
    loading in stages, gradient checkpointing, 8-bit AdamW, offloaded-encoder caching, checkpoints and resume."""
    from safetensors.torch import load_file

    out = tmp_path / "outputs"
    for name, value in {"KONTEXT_MODEL": str(rehearsal_root), "KONTEXT_PRESET": "t4", "KONTEXT_QUICK": "1",
                        "KONTEXT_OUTPUT_DIR": str(out), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    stdout = {}
    for source in sorted((repo_root / "notebooks").glob("[0-9][0-9]_*.py")):
        result = notebook_runner.run_notebook(str(source), str(tmp_path / "executed"))
        stdout[result["name"]] = result["stdout"]
        assert "quantize_base 'nf4' -> None" in result["stdout"], f"{result['name']} must run the quick T4 preset"
    assert "estimated depth:" in stdout["01_data_prep"], "notebook 01 must estimate depth with the folder's model"
    assert "text encoders still loaded: False" in stdout["04_training"], "notebook 04 must load in stages"
    assert "the first 3 records equal the original run's: True" in stdout["04_training"], "resume must continue"
    checkpoints = sorted((out / "run" / "checkpoints").glob("step-*"))
    optimizer = load_file(checkpoints[-1] / "optimizer.safetensors")
    assert any(v.dtype == torch.uint8 for v in optimizer.values()), "the T4 preset's 8-bit AdamW state must be saved"
    assert "lora_unet_double_blocks_0_img_attn_qkv" in stdout["05_inference_previews"], (
        "notebook 05 must export ComfyUI keys for the real block names")
