"""One training step on [target | context | region] with IP-Adapter depth embeddings and PEFT LoRA."""

import pytest
import torch
from PIL import Image

import kontext_helpers as kh


@pytest.fixture()
def lora_pipe():
    pipe = kh.load_pipeline("tiny", seed=0)  # a fresh pipeline: this test adds a LoRA to it
    return pipe


def _batch(pipe, size=64, b=2):
    g = torch.Generator().manual_seed(0)
    ctx = torch.rand(b, 3, size, size, generator=g)
    tgt = ctx.clone()
    tgt[:, 0, : size // 2, : size // 2] = 1.0  # edit: top-left quadrant turns red
    mask = torch.zeros(b, 1, size, size)
    mask[:, :, : size // 2, : size // 2] = 1
    depth = [Image.new("RGB", (size, size), (v, v, v)) for v in (60, 180)][:b]
    return ctx, tgt, mask, depth


def test_training_step_reaches_only_lora_and_region(lora_pipe):
    pipe = lora_pipe
    ctx, tgt, mask, depth = _batch(pipe)
    with torch.no_grad():
        ctx_tok, (h_tok, w_tok) = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(ctx), pipe.vae))
        tgt_tok, _ = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(tgt), pipe.vae))
    prompt_embeds, pooled, txt_ids = kh.encode_prompts(pipe, ["make it red"] * 2, max_sequence_length=32)
    ip_embeds = kh.encode_depth_for_ip_adapter(pipe, depth)
    for name, t in {"prompt": prompt_embeds, "pooled": pooled, "ip": ip_embeds[0], "ctx": ctx_tok}.items():
        assert not t.requires_grad and t.grad_fn is None, f"frozen encoder output '{name}' must carry no graph"
    assert ip_embeds[0].shape[:2] == (2, 1), "IP embeddings must be [B, 1, E]"

    lora = kh.add_lora(pipe.transformer, rank=4, targets="attn")
    region = kh.MaskRegionToken(h_tok, w_tok, pipe.transformer.config.in_channels)
    base_before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters() if "lora_" not in n}

    m_small = kh.mask_to_token_grid(mask, h_tok, w_tok)
    noise = torch.randn_like(tgt_tok)
    sigma = torch.tensor([0.3, 0.7])
    noisy = (1 - sigma[:, None, None]) * tgt_tok + sigma[:, None, None] * noise
    pred = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(m_small), sigma=sigma,
                              prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, txt_ids=txt_ids,
                              h_tok=h_tok, w_tok=w_tok, guidance=1.0, ip_adapter_image_embeds=ip_embeds)
    assert pred.shape == tgt_tok.shape, "prediction must cover exactly the target tokens"
    loss = kh.fm_masked_dual_loss_with_l2(pred, tgt_tok, ctx_tok, noise, m_small, h_tok, w_tok,
                                          region_token_module=region, lora_named_params=lora)
    loss.backward()
    # a second step through the same cached embeddings must also work (no graph kept through encoders)
    pred2 = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(m_small), sigma=sigma,
                               prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, txt_ids=txt_ids,
                               h_tok=h_tok, w_tok=w_tok, ip_adapter_image_embeds=ip_embeds)
    kh.fm_masked_dual_loss_with_l2(pred2, tgt_tok, ctx_tok, noise, m_small, h_tok, w_tok).backward()

    assert lora, "the LoRA must have trainable parameters"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora if "lora_B" in _), (
        "every lora_B must receive a gradient")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in region.parameters()), "region must get grads"
    for n, p in pipe.transformer.named_parameters():
        if "lora_" not in n:
            assert p.grad is None, f"base parameter {n} must not receive a gradient"
            assert torch.equal(p.detach(), base_before[n]), f"base parameter {n} changed"
    for name in ("text_encoder", "text_encoder_2", "vae", "image_encoder"):
        assert all(p.grad is None for p in getattr(pipe, name).parameters()), f"{name} must stay untouched"


def test_region_token_changes_the_prediction(lora_pipe):
    pipe = lora_pipe
    ctx, tgt, mask, depth = _batch(pipe, b=1)
    with torch.no_grad():
        ctx_tok, (h_tok, w_tok) = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(ctx), pipe.vae))
        pe, pooled, txt_ids = kh.encode_prompts(pipe, "make it red", max_sequence_length=32)
        noisy = torch.randn_like(ctx_tok)
        kw = dict(sigma=torch.tensor([0.5]), prompt_embeds=pe, pooled_prompt_embeds=pooled, txt_ids=txt_ids,
                  h_tok=h_tok, w_tok=w_tok, ip_adapter_image_embeds=kh.encode_depth_for_ip_adapter(pipe, depth))
        region = kh.MaskRegionToken(h_tok, w_tok, 64)
        a = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(mask[:, :, ::16, ::16]), **kw)
        b = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(torch.zeros(1, 1, h_tok, w_tok)), **kw)
        c = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, None, **kw)
    assert not torch.allclose(a, b), "a different mask must change the prediction through the region token"
    assert a.shape == c.shape, "the region token must not change the output length"


def test_add_lora_rejects_bad_settings(lora_pipe):
    with pytest.raises(ValueError, match="rank"):
        kh.add_lora(lora_pipe.transformer, rank=0)
    with pytest.raises(ValueError, match="preset"):
        kh.add_lora(lora_pipe.transformer, targets="everything")


def test_attn_ff_preset_adapts_every_listed_module_kind():
    pipe = kh.load_pipeline("tiny", seed=0)
    kh.add_lora(pipe.transformer, rank=2, targets="attn_ff")
    adapted = {name for name, _ in kh.collect_lora_named_params(pipe.transformer)}
    for suffix in kh.LORA_TARGET_PRESETS["attn_ff"]:
        assert any(f".{suffix}.lora_A" in name for name in adapted), f"preset module {suffix} has no LoRA"
    assert set(kh.LORA_TARGET_PRESETS["attn"]) < set(kh.LORA_TARGET_PRESETS["attn_ff"]), "attn_ff extends attn"


def test_lora_off_runs_the_base_model_and_restores_the_lora(lora_pipe):
    transformer = lora_pipe.transformer
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
        off = edit(lora_pipe)
    on = edit(lora_pipe)
    torch.testing.assert_close(off, base, msg="lora_off must give the base model's output")
    assert not torch.allclose(on, base), "after lora_off the LoRA is active again"
    assert all(p.requires_grad for _, p in kh.collect_lora_named_params(transformer)), "trainable flags restored"
    keys = set(kh.lora_state_dict(transformer))
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys), f"PEFT key format: {keys}"


def test_forward_without_depth_equals_zero_ip_scale(lora_pipe):
    pipe = lora_pipe
    ctx, _, _, depth = _batch(pipe, b=1)
    with torch.no_grad():
        ctx_tok, (h_tok, w_tok) = kh.pack_like_pipeline(kh.to_latents(kh.normalize_01_to_m11(ctx), pipe.vae))
        pe, pooled, txt_ids = kh.encode_prompts(pipe, "make it red", max_sequence_length=32)
        kw = dict(sigma=torch.tensor([0.5]), prompt_embeds=pe, pooled_prompt_embeds=pooled, txt_ids=txt_ids,
                  h_tok=h_tok, w_tok=w_tok)
        none = kh.kontext_forward(pipe.transformer, ctx_tok, ctx_tok, None, **kw)
        pipe.set_ip_adapter_scale(0.0)
        zero = kh.kontext_forward(pipe.transformer, ctx_tok, ctx_tok, None,
                                  ip_adapter_image_embeds=kh.encode_depth_for_ip_adapter(pipe, depth), **kw)
        pipe.set_ip_adapter_scale(1.0)
    torch.testing.assert_close(none, zero, msg="no depth must equal an IP-Adapter at scale 0")
