"""`make demo`: an end-to-end smoke on the tiny model, offline, in a few seconds on a CPU.

Encodes one context/target pair, packs it, builds the sequence [target | context | region], runs one
forward and backward pass with a LoRA and IP-Adapter depth embeddings, and prints shapes and the loss.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import kontext_helpers as kh  # noqa: E402


def main() -> None:
    t0 = time.perf_counter()
    pipe = kh.load_pipeline("tiny", seed=0)
    print(f"tiny FluxKontextPipeline built in {time.perf_counter() - t0:.2f} s "
          f"(transformer: {sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.2f} M parameters)")
    size = 128
    g = torch.Generator().manual_seed(0)
    context = torch.rand(1, 3, size, size, generator=g)  # [B, 3, H, W] in [0, 1]
    target = context.clone()
    target[:, :, 32:96, 32:96] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # paint a red square
    mask = torch.zeros(1, 1, size, size)
    mask[:, :, 32:96, 32:96] = 1
    depth = Image.new("RGB", (size, size), (128, 128, 128))

    with torch.no_grad():
        ctx_lat = kh.to_latents(kh.normalize_01_to_m11(context), pipe.vae)
        tgt_lat = kh.to_latents(kh.normalize_01_to_m11(target), pipe.vae)
    ctx_tok, (h_tok, w_tok) = kh.pack_like_pipeline(ctx_lat)
    tgt_tok, _ = kh.pack_like_pipeline(tgt_lat)
    prompt_embeds, pooled, txt_ids = kh.encode_prompts(pipe, "paint a red square", max_sequence_length=64)
    ip_embeds = kh.encode_depth_for_ip_adapter(pipe, depth)
    lora = kh.add_lora(pipe.transformer, rank=8)
    region = kh.MaskRegionToken(h_tok, w_tok, pipe.transformer.config.in_channels)
    m_small = kh.mask_to_token_grid(mask, h_tok, w_tok)

    print(f"image      {tuple(context.shape)}  -> latents {tuple(ctx_lat.shape)}  -> tokens {tuple(ctx_tok.shape)}")
    print(f"token grid {h_tok}x{w_tok}, region token {tuple(region(m_small).shape)}, "
          f"ids {tuple(kh.kontext_img_ids(h_tok, w_tok).shape)}")
    print(f"text       prompt_embeds {tuple(prompt_embeds.shape)}, pooled {tuple(pooled.shape)}, "
          f"txt_ids {tuple(txt_ids.shape)}; IP embeds {tuple(ip_embeds[0].shape)}")

    noise = torch.randn(tgt_tok.shape, generator=g)
    sigma = torch.tensor([0.5])
    noisy = (1 - sigma) * tgt_tok + sigma * noise
    times = []
    for _ in range(3):  # the first pass pays one-off costs; report the last
        t1 = time.perf_counter()
        pred = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(m_small), sigma=sigma,
                                  prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, txt_ids=txt_ids,
                                  h_tok=h_tok, w_tok=w_tok, ip_adapter_image_embeds=ip_embeds)
        loss, parts = kh.fm_masked_dual_loss_with_l2(pred, tgt_tok, ctx_tok, noise, m_small, h_tok, w_tok,
                                                     region_token_module=region, lora_named_params=lora,
                                                     return_parts=True)
        loss.backward()
        times.append(time.perf_counter() - t1)
    step_s = times[-1]
    n_lora = sum(p.numel() for _, p in lora)
    print(f"forward+backward at {size} px: {step_s * 1000:.0f} ms; prediction {tuple(pred.shape)}")
    print(f"loss {loss.item():.4f} (in-mask {parts['loss_in']:.4f}, out-of-mask {parts['loss_out']:.4f}); "
          f"LoRA parameters {n_lora}, all with gradients: {all(p.grad is not None for _, p in lora)}")


if __name__ == "__main__":
    main()
