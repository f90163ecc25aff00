"""Pipeline: load_pipeline's errors, loading from local folders, and the default dtype."""

import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from safetensors.torch import save_file

import kontext_helpers as kh


def test_default_dtype_is_float32_on_a_cpu():
    assert kh.default_dtype("cpu") == torch.float32, "the CPU world computes in float32"


def test_real_model_offline_error_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError) as info:
        kh.load_pipeline("black-forest-labs/FLUX.1-Kontext-dev", device="cpu")
    msg = str(info.value)
    assert "HF_HUB_OFFLINE" in msg and "accept the licence" in msg and "login" in msg, f"unhelpful error: {msg}"


def test_missing_local_folder_is_named():
    with pytest.raises(FileNotFoundError, match="./no/such/folder"):
        kh.load_pipeline("./no/such/folder")


def test_real_loading_path_from_local_folders(tmp_path, pipe_call):
    """The Hub path of load_pipeline, run offline on folders: from_pretrained + CLIP image encoder + XLabs file."""
    saved = kh.build_tiny_pipeline(0, with_ip_adapter=False)
    saved.save_pretrained(tmp_path / "kontext")
    donor = kh.build_tiny_pipeline(0)
    donor.image_encoder.save_pretrained(tmp_path / "clip")
    (tmp_path / "ip").mkdir()
    save_file(kh.tiny_ip_adapter_state_dict(donor.transformer, 32), tmp_path / "ip" / "ip_adapter.safetensors")

    pipe = kh.load_pipeline(str(tmp_path / "kontext"), device="cpu", dtype=torch.float32,
                            ip_adapter=str(tmp_path / "ip"), image_encoder=str(tmp_path / "clip"))
    assert isinstance(pipe, FluxKontextPipeline), "a local folder must load as a FluxKontextPipeline"
    assert pipe.transformer.encoder_hid_proj.num_ip_adapters == 1, "the XLabs IP-Adapter file must be attached"
    for name in ("text_encoder", "text_encoder_2", "vae", "transformer", "image_encoder"):
        module = getattr(pipe, name)
        assert not module.training and not any(p.requires_grad for p in module.parameters()), f"{name} frozen, eval"
    ref = saved.transformer.state_dict()
    for key, value in pipe.transformer.state_dict().items():
        if key in ref:
            torch.testing.assert_close(value, ref[key], rtol=0, atol=0,
                                       msg=f"transformer weight {key} changed on the way through the folder")
    img = Image.new("RGB", (64, 64), (10, 200, 10))
    out = pipe_call(pipe, img, ip_adapter_image=img)
    assert out.shape == (1, 16, 64) and torch.isfinite(out).all(), "the loaded pipeline must sample with depth"
    plain = pipe_call(pipe, img)  # no ip_adapter_image: the attached adapter adds zero
    pipe.unload_ip_adapter()
    torch.testing.assert_close(plain, pipe_call(pipe, img), rtol=0, atol=0,
                               msg="pipe(...) without ip_adapter_image must equal the pipeline, adapter unloaded")


def test_loading_in_bf16_raises_no_dtype_deprecation_from_our_calls(tmp_path, capfd):
    """dtype= where the installed diffusers / transformers take it: no deprecation warning, bf16 weights."""
    import warnings

    kh.build_tiny_pipeline(0, with_ip_adapter=False).save_pretrained(tmp_path / "kontext")
    donor = kh.build_tiny_pipeline(0)
    donor.image_encoder.save_pretrained(tmp_path / "clip")
    (tmp_path / "ip").mkdir()
    save_file(kh.tiny_ip_adapter_state_dict(donor.transformer, 32), tmp_path / "ip" / "ip_adapter.safetensors")
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = kh.load_pipeline(str(tmp_path / "kontext"), device="cpu", dtype=torch.bfloat16,
                                ip_adapter=str(tmp_path / "ip"), image_encoder=str(tmp_path / "clip"))
    deprecations = [str(w.message) for w in caught if issubclass(w.category, FutureWarning | DeprecationWarning)
                    and "dtype" in str(w.message)]
    assert not deprecations, f"load_pipeline must pass the dtype argument the libraries expect: {deprecations}"
    logged = capfd.readouterr()
    assert "torch_dtype" not in logged.out + logged.err, "no torch_dtype deprecation may be logged"
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae", "image_encoder"):
        assert getattr(pipe, name).dtype == torch.bfloat16, f"{name} must load in bf16"


def test_vae_only_loads_the_vae_and_nothing_else(tmp_path):
    saved = kh.build_tiny_pipeline(0, with_ip_adapter=False)
    saved.save_pretrained(tmp_path / "kontext")
    pipe = kh.load_pipeline(str(tmp_path / "kontext"), device="cpu", dtype=torch.float32, vae_only=True)
    for name in ("transformer", "text_encoder", "text_encoder_2", "image_encoder"):
        assert getattr(pipe, name, None) is None, f"vae_only must not load the {name}"
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(kh.to_latents(x, pipe.vae), kh.to_latents(x, saved.vae), rtol=0, atol=0,
                                   msg="the VAE alone must be the saved VAE")


def test_nf4_without_bitsandbytes_says_what_to_install(monkeypatch):
    import importlib.metadata

    real_version = importlib.metadata.version

    def version(name):  # as on a machine without bitsandbytes
        if name == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(RuntimeError, match=r"NF4 needs bitsandbytes.*pip install bitsandbytes"):
        kh.nf4_quantization_config(torch.float32)
