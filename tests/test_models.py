"""Models: adding a LoRA (settings, target presets), its state dict, and switching it off and on again."""

import pytest
import torch

import kontext_helpers as kh


def test_add_lora_rejects_bad_settings(fresh_pipe):
    with pytest.raises(ValueError, match="rank"):
        kh.add_lora(fresh_pipe.transformer, rank=0)
    with pytest.raises(ValueError, match="preset"):
        kh.add_lora(fresh_pipe.transformer, targets="everything")


def test_attn_ff_preset_adapts_every_listed_module_kind(fresh_pipe):
    kh.add_lora(fresh_pipe.transformer, rank=2, targets="attn_ff")
    adapted = {name for name, _ in kh.collect_lora_named_params(fresh_pipe.transformer)}
    for suffix in kh.LORA_TARGET_PRESETS["attn_ff"]:
        assert any(f".{suffix}.lora_A" in name for name in adapted), f"preset module {suffix} has no LoRA"
    assert set(kh.LORA_TARGET_PRESETS["attn"]) < set(kh.LORA_TARGET_PRESETS["attn_ff"]), "attn_ff extends attn"


def test_lora_off_runs_the_base_model_and_restores_the_lora(fresh_pipe):
    transformer = fresh_pipe.transformer
    kh.add_lora(transformer, rank=4)
    with torch.no_grad():
        for _, p in kh.collect_lora_named_params(transformer):
            p.add_(0.05)  # make the LoRA change the output (lora_B starts at zero)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))

    def edit(pipe):
        return kh.sample_edit(pipe, image, "make it blue", num_inference_steps=2, output_type="latent",
                              generator=torch.Generator().manual_seed(0), max_sequence_length=16)

    base = edit(kh.load_pipeline("tiny", seed=0))
    with kh.lora_off(transformer):
        off = edit(fresh_pipe)
    on = edit(fresh_pipe)
    torch.testing.assert_close(off, base, msg="lora_off must give the base model's output")
    assert not torch.allclose(on, base), "after lora_off the LoRA is active again"
    assert all(p.requires_grad for _, p in kh.collect_lora_named_params(transformer)), "trainable flags restored"
    keys = set(kh.lora_state_dict(transformer))
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys), f"PEFT key format: {keys}"
