"""Adapters: save_adapter / load_adapter round trips, diffusers' own loader, and the ComfyUI export."""

import json
import os
import shutil

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import kontext_helpers as kh


@pytest.fixture(scope="module")
def all_targets(attn_targets):
    """Every Linear the Flux blocks have: the attention projections, the feed-forward and single-block MLP layers."""
    return attn_targets + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                           "proj_out"]


# --------------------------------------------------------------------------------------------------
# save, load
# --------------------------------------------------------------------------------------------------


def test_save_adapter_writes_diffusers_lora_region_and_config(trained):
    pipe, region, path = trained
    assert sorted(os.listdir(path)) == sorted([kh.LORA_WEIGHT_FILE, kh.REGION_WEIGHT_FILE, kh.ADAPTER_CONFIG_FILE]), (
        f"unexpected files {os.listdir(path)}")
    with safe_open(os.path.join(path, kh.LORA_WEIGHT_FILE), framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys), (
        f"LoRA keys must be diffusers' transformer.*lora_A/B*, got e.g. {keys[:3]}")
    lora_meta = json.loads(meta["lora_adapter_metadata"])
    assert lora_meta["transformer.lora_alpha"] == 8 and lora_meta["transformer.r"] == 4, (
        "alpha and rank must be recorded in the file's metadata")
    cfg = json.load(open(os.path.join(path, kh.ADAPTER_CONFIG_FILE)))
    assert cfg["region"]["h_tok"] == 4 and cfg["region"]["c_in"] == 64, f"region grid / c_in missing: {cfg['region']}"
    assert cfg["train_config"]["steps"] == 3, "the training config must be stored"
    assert cfg["versions"]["diffusers"] and cfg["versions"]["torch"], "library versions must be stored"


def test_round_trip_gives_the_same_latents(trained, edit_latents):
    pipe, region, path = trained
    fresh = kh.load_pipeline("tiny")
    loaded = kh.load_adapter(fresh, path)
    assert isinstance(loaded, kh.MaskRegionToken) and loaded.c_in == 64, "load_adapter must rebuild the region module"
    torch.testing.assert_close(loaded.proj.weight, region.proj.weight, msg="region weights must round-trip")
    torch.testing.assert_close(edit_latents(fresh, loaded), edit_latents(pipe, region),
                               msg=lambda m: f"loaded adapter must reproduce the trained pipeline: {m}")
    assert (edit_latents(fresh, loaded) - edit_latents(kh.load_pipeline("tiny"), None)).abs().max() > 1e-4, (
        "the loaded LoRA + region must change the base model's result")


@pytest.mark.parametrize("kind", ["marked", "marked_context", "cells", "linear"])
def test_every_region_kind_round_trips_through_an_adapter_folder(attn_targets, edit_latents, tmp_path, kind):
    pipe = kh.load_pipeline("tiny")
    kh.add_lora(pipe.transformer, rank=2, targets=attn_targets)
    region = kh.make_region_module(kind, 4, 4, 64)
    with torch.no_grad():
        for p in region.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    path = kh.save_adapter(pipe, region.eval(), str(tmp_path / kind))
    with safe_open(os.path.join(path, kh.REGION_WEIGHT_FILE), framework="pt") as fh:
        assert fh.metadata()["kind"] == kind, "the region file records its kind"
    assert json.load(open(os.path.join(path, kh.ADAPTER_CONFIG_FILE)))["region"]["kind"] == kind, (
        "adapter_config.json records the region kind")
    loaded = kh.load_adapter(kh.load_pipeline("tiny"), path)
    assert loaded.kind == kind, f"load_adapter must rebuild a {kind!r} module, got {loaded.kind!r}"
    for (name, a), b in zip(region.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(b, a, msg=f"{kind}: {name} must round-trip")


def test_a_region_file_without_kind_loads_as_the_linear_token(trained, tmp_path):
    pipe, region, path = trained
    old = str(tmp_path / "old")
    kh.save_adapter(pipe, region, old)
    save_file({k: v.contiguous() for k, v in region.state_dict().items()}, os.path.join(old, kh.REGION_WEIGHT_FILE),
              metadata={"h_tok": "4", "w_tok": "4", "c_in": "64"})  # written before the region kinds
    loaded = kh.load_adapter(kh.load_pipeline("tiny"), old)
    assert isinstance(loaded, kh.MaskRegionToken), "a file without 'kind' holds the original linear token"
    torch.testing.assert_close(loaded.proj.weight, region.proj.weight, msg="its weights load")


def test_diffusers_load_lora_weights_alone_loads_the_lora(trained, edit_latents, monkeypatch):
    pipe, _, path = trained
    fresh = kh.load_pipeline("tiny")
    fresh.load_lora_weights(path, weight_name=kh.LORA_WEIGHT_FILE)
    torch.testing.assert_close(edit_latents(fresh), edit_latents(pipe),
                               msg=lambda m: f"pipe.load_lora_weights must load the LoRA: {m}")
    # with the Hub reachable diffusers also finds the file in the folder by itself (the lookup stays local)
    monkeypatch.setattr("diffusers.loaders.lora_base.HF_HUB_OFFLINE", False)
    other = kh.load_pipeline("tiny")
    other.load_lora_weights(path)
    torch.testing.assert_close(edit_latents(other), edit_latents(pipe),
                               msg="pipe.load_lora_weights(folder) must find the weights")


def test_loading_twice_or_over_an_adapter_replaces_instead_of_stacking(trained, edit_latents, attn_targets):
    pipe, region, path = trained
    fresh = kh.load_pipeline("tiny")
    kh.add_lora(fresh.transformer, rank=2, targets=attn_targets)  # an unrelated adapter already attached
    with pytest.raises(ValueError, match="stack"):
        kh.load_adapter(fresh, path, replace=False)
    with pytest.warns(UserWarning, match="replaced, not stacked"):
        kh.load_adapter(fresh, path)
    with pytest.warns(UserWarning, match="replaced, not stacked"):
        loaded = kh.load_adapter(fresh, path)
    assert list(fresh.transformer.peft_config) == ["default"], "exactly one adapter must remain"
    torch.testing.assert_close(edit_latents(fresh, loaded), edit_latents(pipe, region),
                               msg=lambda m: f"loading twice must equal loading once: {m}")


def test_load_adapter_rejects_missing_files_and_foreign_region(trained, attn_targets, tmp_path):
    _, _, path = trained
    with pytest.raises(FileNotFoundError, match="save_adapter"):
        kh.load_adapter(kh.load_pipeline("tiny"), str(tmp_path / "nothing"))
    pipe = kh.load_pipeline("tiny")
    kh.add_lora(pipe.transformer, rank=2, targets=attn_targets)
    with pytest.raises(ValueError, match="c_in=32"):
        kh.save_adapter(pipe, kh.MaskRegionToken(4, 4, 32), str(tmp_path / "bad"))
    foreign = kh.save_adapter(pipe, kh.MaskRegionToken(4, 4, 64), str(tmp_path / "foreign"))
    small = kh.MaskRegionToken(4, 4, 32)  # as if trained for a model with 32-channel tokens
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, os.path.join(foreign, kh.REGION_WEIGHT_FILE),
              metadata={"h_tok": "4", "w_tok": "4", "c_in": "32"})
    fresh = kh.load_pipeline("tiny")
    with pytest.raises(ValueError, match="c_in=32"):
        kh.load_adapter(fresh, foreign)
    assert not getattr(fresh.transformer, "peft_config", None), "a refused adapter must leave the pipeline untouched"


# --------------------------------------------------------------------------------------------------
# damaged files
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_adapter(trained, tmp_path_factory):
    """``trained``'s adapter saved with a depth module too: a LoRA, a region and a depth file (read-only)."""
    pipe, region, _ = trained
    depth = kh.make_depth_module("tokens", 64)
    torch.nn.init.normal_(depth.proj.weight, generator=torch.Generator().manual_seed(0))
    return kh.save_adapter(pipe, region, str(tmp_path_factory.mktemp("full") / "edit"), depth_module=depth)


@pytest.fixture(scope="module")
def loaded_pipe(full_adapter):
    """A tiny pipeline with ``full_adapter`` loaded: a failed load over it must leave it as it is."""
    pipe = kh.load_pipeline("tiny")
    kh.load_adapter(pipe, full_adapter)
    return pipe


def _damaged_copy(folder, name, tmp_path, damage_file):
    """A copy of the adapter ``folder`` whose file ``name`` is damaged: ``(copy, damaged file)``."""
    copy = shutil.copytree(folder, tmp_path / "copy")
    return str(copy), str(damage_file(copy / name))


def _says_damaged_and_what_to_do(err, file):
    msg = str(err.value)
    assert f"{file} is damaged" in msg, f"the error must name the damaged file {file}: {msg}"
    assert "Copy the adapter folder again" in msg and "kh.save_adapter" in msg, f"the error must say what to do: {msg}"
    assert isinstance(err.value.__cause__, SafetensorError), "safetensors' own error stays attached as the cause"


@pytest.mark.parametrize("name", [kh.LORA_WEIGHT_FILE, kh.REGION_WEIGHT_FILE, kh.DEPTH_WEIGHT_FILE])
def test_a_damaged_adapter_file_is_named_and_the_pipeline_stays_as_it_was(full_adapter, loaded_pipe, damage_file,
                                                                          tmp_path, name):
    folder, file = _damaged_copy(full_adapter, name, tmp_path, damage_file)
    transformer = loaded_pipe.transformer
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    adapters = {k: v.to_dict() for k, v in transformer.peft_config.items()}
    with pytest.raises(ValueError) as err:
        kh.load_adapter(loaded_pipe, folder)
    _says_damaged_and_what_to_do(err, file)
    assert {k: v.to_dict() for k, v in transformer.peft_config.items()} == adapters, "the LoRA adapters changed"
    after = transformer.state_dict()
    assert after.keys() == before.keys(), "a failed load must add or remove no weight"
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=f"a failed load changed {key}")
    if name == kh.DEPTH_WEIGHT_FILE:
        with pytest.raises(ValueError) as err:
            kh.load_depth_module(folder, loaded_pipe)
        _says_damaged_and_what_to_do(err, file)


def test_export_comfyui_names_a_damaged_lora_and_writes_nothing(full_adapter, damage_file, tmp_path):
    folder, file = _damaged_copy(full_adapter, kh.LORA_WEIGHT_FILE, tmp_path, damage_file)
    out = tmp_path / "comfy.safetensors"
    for source in (folder, file):  # the folder, or the LoRA file itself
        with pytest.raises(ValueError) as err:
            kh.export_comfyui(source, str(out))
        _says_damaged_and_what_to_do(err, file)
    assert not out.exists(), "nothing may be written from a damaged LoRA"


# --------------------------------------------------------------------------------------------------
# the ComfyUI export
# --------------------------------------------------------------------------------------------------


# ComfyUI loads a Flux LoRA key "lora_unet_<k>" for every key "diffusion_model.<k>.weight" of its Flux model
# (comfy/lora.py, model_lora_keys_unet), i.e. Black Forest Labs names; comfy/utils.py flux_to_diffusers maps
# diffusers' transformer_blocks.i.attn.to_q/to_k/to_v onto rows [0, D), [D, 2D), [2D, 3D) of
# double_blocks.i.img_attn.qkv (add_*_proj onto txt_attn.qkv), to_out.0 -> img_attn.proj, to_add_out ->
# txt_attn.proj, ff.net.0.proj / ff.net.2 -> img_mlp.0 / img_mlp.2, ff_context.* -> txt_mlp.*; in
# single_transformer_blocks.i to_q/to_k/to_v/proj_mlp onto rows [0, D), [D, 2D), [2D, 3D), [3D, 7D) of
# single_blocks.i.linear1 and proj_out -> single_blocks.i.linear2; the final proj_out -> final_layer.linear.
# The tiny model has 3 double and 4 single blocks, D = 128.
EXPECTED_ATTN = [
    "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_txt_attn_qkv",
    "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_txt_attn_proj",
    "lora_unet_double_blocks_1_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_qkv",
    "lora_unet_double_blocks_1_img_attn_proj", "lora_unet_double_blocks_1_txt_attn_proj",
    "lora_unet_double_blocks_2_img_attn_qkv", "lora_unet_double_blocks_2_txt_attn_qkv",
    "lora_unet_double_blocks_2_img_attn_proj", "lora_unet_double_blocks_2_txt_attn_proj",
    "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_1_linear1",
    "lora_unet_single_blocks_2_linear1", "lora_unet_single_blocks_3_linear1",
]
EXPECTED_BEYOND_ATTN = [
    "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_img_mlp_2",
    "lora_unet_double_blocks_0_txt_mlp_0", "lora_unet_double_blocks_0_txt_mlp_2",
    "lora_unet_double_blocks_1_img_mlp_0", "lora_unet_double_blocks_1_img_mlp_2",
    "lora_unet_double_blocks_1_txt_mlp_0", "lora_unet_double_blocks_1_txt_mlp_2",
    "lora_unet_double_blocks_2_img_mlp_0", "lora_unet_double_blocks_2_img_mlp_2",
    "lora_unet_double_blocks_2_txt_mlp_0", "lora_unet_double_blocks_2_txt_mlp_2",
    "lora_unet_single_blocks_0_linear2", "lora_unet_single_blocks_1_linear2",
    "lora_unet_single_blocks_2_linear2", "lora_unet_single_blocks_3_linear2",
    "lora_unet_final_layer_linear",
]
# diffusers module -> (ComfyUI layer, first row, rows) as flux_to_diffusers states it, D = 128
_D = 128
_COMFY_ROWS = {
    "attn.to_q": ("img_attn_qkv", 0, _D), "attn.to_k": ("img_attn_qkv", _D, _D),
    "attn.to_v": ("img_attn_qkv", 2 * _D, _D),
    "attn.add_q_proj": ("txt_attn_qkv", 0, _D), "attn.add_k_proj": ("txt_attn_qkv", _D, _D),
    "attn.add_v_proj": ("txt_attn_qkv", 2 * _D, _D), "attn.to_out.0": ("img_attn_proj", 0, None),
    "attn.to_add_out": ("txt_attn_proj", 0, None), "ff.net.0.proj": ("img_mlp_0", 0, None),
    "ff.net.2": ("img_mlp_2", 0, None), "ff_context.net.0.proj": ("txt_mlp_0", 0, None),
    "ff_context.net.2": ("txt_mlp_2", 0, None),
}
_COMFY_SINGLE_ROWS = {"attn.to_q": ("linear1", 0, _D), "attn.to_k": ("linear1", _D, _D),
                      "attn.to_v": ("linear1", 2 * _D, _D), "proj_mlp": ("linear1", 3 * _D, 4 * _D),
                      "proj_out": ("linear2", 0, None)}


def _comfy_deltas(out_file):
    """Weight updates as ComfyUI computes them (comfy/weight_adapter/lora.py): alpha / rank * up @ down."""
    with safe_open(out_file, framework="pt") as fh:
        sd = {k: fh.get_tensor(k) for k in fh.keys()}
    layers = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd})
    deltas = {}
    for layer in layers:
        up, down = sd[f"{layer}.lora_up.weight"].float(), sd[f"{layer}.lora_down.weight"].float()
        deltas[layer] = sd[f"{layer}.alpha"].item() / down.shape[0] * (up @ down)
    return sd, deltas


def _expected_comfy_deltas(transformer):
    """The same updates built from PEFT's own per-module deltas, placed where ComfyUI's mapping puts them."""
    from peft.tuners.lora import LoraLayer

    expected = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, LoraLayer) or "processor" in name:
            continue
        delta = module.get_delta_weight("default").float()  # [out, in]
        if name == "proj_out":
            key, row, rows, total = "lora_unet_final_layer_linear", 0, None, delta.shape[0]
        else:
            block, index, rest = name.split(".", 2)
            if block == "transformer_blocks":
                layer, row, rows = _COMFY_ROWS[rest]
                key, total = f"lora_unet_double_blocks_{index}_{layer}", 3 * _D
            else:
                layer, row, rows = _COMFY_SINGLE_ROWS[rest]
                key, total = f"lora_unet_single_blocks_{index}_{layer}", 7 * _D
            total = total if rows else delta.shape[0]
        full = expected.setdefault(key, torch.zeros(total, delta.shape[1]))
        full[row:row + (rows or delta.shape[0])] += delta
    return expected


def test_comfyui_export_keys_and_updates_match_comfyui_mapping(trained, tmp_path):
    pipe, _, path = trained
    out = kh.export_comfyui(path, str(tmp_path / "comfy" / "my_edit.safetensors"))
    sd, deltas = _comfy_deltas(out)
    expected_keys = sorted(f"{layer}.{part}" for layer in EXPECTED_ATTN
                           for part in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert sorted(sd) == expected_keys, (
        f"keys differ from ComfyUI's Flux mapping: {sorted(set(sd) ^ set(expected_keys))}")
    expected = _expected_comfy_deltas(pipe.transformer)
    assert sorted(expected) == sorted(deltas), "every trained layer must be exported"
    for layer, delta in deltas.items():
        torch.testing.assert_close(delta, expected[layer], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, layer=layer: f"{layer}: ComfyUI's update differs from PEFT's: {m}")
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * _D, 12), (
        "single-block q, k, v must be fused into linear1 [q | k | v | mlp] with the ranks summed")


def test_comfyui_export_with_feed_forward_and_ip_adapter_layers(fresh_pipe, all_targets, tmp_path):
    pipe = fresh_pipe
    lora = kh.add_lora(pipe.transformer, rank=3, alpha=6, targets=all_targets, include_ip_adapter=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lora:
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = kh.save_adapter(pipe, None, str(tmp_path / "ff"))
    assert not os.path.exists(os.path.join(path, kh.REGION_WEIGHT_FILE)), "no region file for a LoRA alone"
    with pytest.warns(UserWarning, match="to_k_ip"):
        out = kh.export_comfyui(path, str(tmp_path / "ff.safetensors"))
    sd, deltas = _comfy_deltas(out)
    expected_layers = EXPECTED_ATTN + EXPECTED_BEYOND_ATTN
    assert sorted(deltas) == sorted(expected_layers), (
        f"attention + feed-forward layers, no IP-Adapter ones: {sorted(set(deltas) ^ set(expected_layers))}")
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * _D, 12), (
        "single-block q, k, v and proj_mlp must share linear1 with their ranks summed")
    expected = _expected_comfy_deltas(pipe.transformer)
    for layer, delta in deltas.items():
        torch.testing.assert_close(delta, expected[layer], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, layer=layer: f"{layer}: ComfyUI's update differs from PEFT's: {m}")
    with pytest.warns(UserWarning, match="to_k_ip"):
        half = kh.export_comfyui(path, str(tmp_path / "ff_bf16.safetensors"), dtype=torch.bfloat16)
    with safe_open(half, framework="pt") as fh:
        for key in fh.keys():
            t = fh.get_tensor(key)
            if key.endswith(".alpha"):
                assert t.dtype == torch.float32 and t.item() == sd[key].item(), f"{key}: alpha must stay exact"
            else:
                assert t.dtype == torch.bfloat16, f"{key}: dtype= must apply"
                torch.testing.assert_close(t, sd[key].to(torch.bfloat16), msg=f"{key}: bf16 export must round only")


# --------------------------------------------------------------------------------------------------
# the model card and the Hub push, against a local stand-in of the Hub API
# --------------------------------------------------------------------------------------------------


class _HubStandIn:
    """Records what ``HfApi.create_repo`` / ``upload_folder`` receive, and copies the folder as an upload would."""

    def __init__(self, root):
        self.root, self.calls = root, []

    def create_repo(self, *, repo_id, private, exist_ok, token):
        self.calls.append(("create_repo", repo_id, private, exist_ok, token))

    def upload_folder(self, *, folder_path, repo_id, token, commit_message):
        import shutil

        self.calls.append(("upload_folder", repo_id, token))
        shutil.copytree(folder_path, os.path.join(self.root, repo_id), dirs_exist_ok=True)


def test_push_adapter_uploads_the_folder_with_a_model_card(trained, tmp_path):
    import shutil

    from huggingface_hub import ModelCard
    from PIL import Image

    _, _, path = trained
    folder = str(tmp_path / "to_push")
    shutil.copytree(path, folder)
    preview = str(tmp_path / "preview.png")
    Image.new("RGB", (8, 8), "red").save(preview)
    hub = _HubStandIn(str(tmp_path / "hub"))
    url = kh.push_adapter(folder, "me/my-edit", prompts=["make the cube red"], images=[preview], token="hf_secret",
                          api=hub)
    assert url == "https://huggingface.co/me/my-edit", url
    assert hub.calls[0] == ("create_repo", "me/my-edit", True, True, "hf_secret"), "a private repo, created once"
    assert hub.calls[1] == ("upload_folder", "me/my-edit", "hf_secret"), "then the folder is uploaded"
    uploaded = tmp_path / "hub" / "me" / "my-edit"
    for name in (kh.LORA_WEIGHT_FILE, kh.REGION_WEIGHT_FILE, kh.ADAPTER_CONFIG_FILE, "README.md",
                 "images/preview_00.png"):
        assert (uploaded / name).is_file(), f"{name} must be uploaded"
    card = ModelCard.load(str(uploaded / "README.md"))
    assert card.data.base_model == "black-forest-labs/FLUX.1-Kontext-dev" and "lora" in card.data.tags, card.data
    for needle in ("make the cube red", "pipe.load_lora_weights", "kh.load_adapter", kh.REGION_WEIGHT_FILE,
                   "kind `linear`", "images/preview_00.png", "steps 3"):
        assert needle in card.text, f"the card must mention {needle!r}"
    everything = "".join(p.read_text(errors="ignore") for p in uploaded.rglob("*") if p.suffix in (".md", ".json"))
    assert "hf_secret" not in everything, "the token is never written"


def test_push_adapter_refuses_a_folder_without_a_lora(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_adapter"):
        kh.push_adapter(str(tmp_path), "me/x", api=_HubStandIn(str(tmp_path / "hub")))
