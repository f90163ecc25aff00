"""`make demo`: the whole product end to end on the tiny model, offline, in about a minute on a CPU.

1. the sample dataset: validation and a grid figure (context | target | mask overlay | depth);
2. one training step by hand: shapes of every tensor of the sequence [target | context | region];
3. a short training run with checkpoints and a loss figure;
4. the trained adapter saved, loaded into a fresh pipeline and sampled: a preview grid and edit metrics.

Figures go to outputs/demo/. Replace "tiny" by "black-forest-labs/FLUX.1-Kontext-dev" on a GPU for the real thing.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import kontext_helpers as kh  # noqa: E402

OUT = os.path.join(REPO, "outputs", "demo")
DATA = os.path.join(REPO, "data_samples")


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def data_stage(resolution: int) -> kh.KontextPairs:
    section("1. data")
    dataset = kh.KontextPairs(DATA, resolution=resolution)
    print(dataset)
    item = dataset[0]
    print(f"item '{item['name']}': " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in item.items() if torch.is_tensor(v))
          + f", prompt {item['prompt']!r}")
    fig = kh.KontextPairs(DATA, resolution=256)
    path = os.path.join(OUT, "sample_grid.png")
    kh.show_pairs(fig, max_pairs=4).savefig(path, dpi=80)
    print(f"sample grid -> {os.path.relpath(path, REPO)}")
    return dataset


def one_step_stage(pipe, dataset) -> None:
    section("2. one training step by hand")
    item = dataset[0]
    with torch.no_grad():
        pair = torch.stack([item["context"], item["target"]])  # [2, 3, H, W]
        lat = kh.to_latents(kh.normalize_01_to_m11(pair), pipe.vae)  # [2, C, H_l, W_l]
    tok, (h_tok, w_tok) = kh.pack_like_pipeline(lat)  # [2, N, 4C]
    ctx_tok, tgt_tok = tok[:1], tok[1:]
    prompt_embeds, pooled, txt_ids = kh.encode_prompts(pipe, item["prompt"], max_sequence_length=64)
    ip_embeds = kh.encode_depth_for_ip_adapter(pipe, kh.depth_to_pil(item["depth"]))
    m_small = kh.mask_to_token_grid(item["mask"][None], h_tok, w_tok)
    region = kh.MaskRegionToken(h_tok, w_tok, pipe.transformer.config.in_channels)
    print(f"image {tuple(pair.shape)} -> latents {tuple(lat.shape)} -> tokens {tuple(tok.shape)} "
          f"(grid {h_tok}x{w_tok})")
    print(f"mask {tuple(item['mask'].shape)} -> token grid {tuple(m_small.shape)} -> region token "
          f"{tuple(region(m_small).shape)}; ids {tuple(kh.kontext_img_ids(h_tok, w_tok).shape)}")
    print(f"text: prompt_embeds {tuple(prompt_embeds.shape)}, pooled {tuple(pooled.shape)}, txt_ids "
          f"{tuple(txt_ids.shape)}; depth -> IP-Adapter embeds {tuple(ip_embeds[0].shape)}")
    noise = torch.randn(tgt_tok.shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5])
    noisy = (1 - sigma) * tgt_tok + sigma * noise
    pred = kh.kontext_forward(pipe.transformer, noisy, ctx_tok, region(m_small), sigma=sigma,
                              prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, txt_ids=txt_ids,
                              h_tok=h_tok, w_tok=w_tok, ip_adapter_image_embeds=ip_embeds)
    loss, parts = kh.fm_masked_dual_loss_with_l2(pred, tgt_tok, ctx_tok, noise, m_small, h_tok, w_tok,
                                                 region_token_module=region, return_parts=True)
    loss.backward()
    print(f"prediction {tuple(pred.shape)}; loss {loss.item():.4f} (in-mask {parts['loss_in']:.4f}, "
          f"out-of-mask {parts['loss_out']:.4f}); region grad norm {region.proj.weight.grad.norm():.3e}")


def train_stage(pipe, dataset, config: kh.TrainConfig) -> kh.TrainResult:
    section("3. training")
    plot = kh.LiveLossPlot(every=10**9)  # collect only; a notebook redraws it live
    t0 = time.perf_counter()
    result = kh.train(pipe, dataset, config, callback=plot)
    seconds = time.perf_counter() - t0
    first, last = result.history[0], result.history[-1]
    print(f"{len(result.history)} steps in {seconds:.1f} s; loss {first['loss']:.3f} -> {last['loss']:.3f}; "
          f"checkpoints: {[s for s, _ in kh.list_checkpoints(config.output_dir)]}")
    path = os.path.join(OUT, "loss.png")
    plot.figure().savefig(path, dpi=80)
    print(f"loss curves -> {os.path.relpath(path, REPO)}")
    return result


def adapter_stage(pipe, result: kh.TrainResult, dataset, config: kh.TrainConfig) -> None:
    section("4. adapter, sampling and previews")
    from torchvision.transforms.functional import to_pil_image

    path = kh.save_adapter(pipe, result.region, os.path.join(OUT, "adapter"), config=config)
    print(f"adapter -> {os.path.relpath(path, REPO)}: {sorted(os.listdir(path))}")
    fresh = kh.load_pipeline("tiny", seed=0)
    region = kh.load_adapter(fresh, path)
    item = dataset[0]
    context, depth = to_pil_image(item["context"]), kh.depth_to_pil(item["depth"])
    kw = dict(height=config.resolution, width=config.resolution, num_inference_steps=8,
              max_sequence_length=config.max_sequence_length)
    a = kh.sample_edit(pipe, context, item["prompt"], mask=item["mask"], depth=depth, region=result.region,
                       generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
    b = kh.sample_edit(fresh, context, item["prompt"], mask=item["mask"], depth=depth, region=region,
                       generator=torch.Generator().manual_seed(0), output_type="latent", **kw)
    print(f"reloaded adapter reproduces the trained pipeline: max |diff| = {(a - b).abs().max().item():.2e}")
    pred = kh.sample_edit(fresh, context, item["prompt"], mask=item["mask"], depth=depth, region=region,
                          generator=torch.Generator().manual_seed(0), **kw)
    fig = kh.preview_grid(item["context"], item["mask"], item["depth"], item["target"], pred, prompt=item["prompt"])
    fig.savefig(os.path.join(OUT, "preview.png"), dpi=80)
    comparison = kh.compare_variants(fresh, context, item["prompt"], item["mask"], region=region, depth=depth,
                                     target=item["target"], seed=0, **kw)
    comparison.figure.savefig(os.path.join(OUT, "comparison.png"), dpi=80)
    print(kh.metrics_table(comparison.metrics))
    comfy = kh.export_comfyui(path, os.path.join(OUT, "comfyui_lora.safetensors"))
    print(f"preview -> outputs/demo/preview.png, comparison -> outputs/demo/comparison.png, "
          f"ComfyUI LoRA -> {os.path.relpath(comfy, REPO)}")
    print("(a tiny random model after 150 steps: the numbers show the mechanics, not a good edit)")


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    resolution = 128
    dataset = data_stage(resolution)
    t0 = time.perf_counter()
    pipe = kh.load_pipeline("tiny", seed=0)
    print(f"\ntiny FluxKontextPipeline built in {time.perf_counter() - t0:.2f} s "
          f"(transformer {sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.2f} M parameters)")
    one_step_stage(kh.load_pipeline("tiny", seed=0), dataset)
    config = kh.TrainConfig(resolution=resolution, steps=150, rank=16, lora_targets="attn_ff", learning_rate=3e-3,
                            region_learning_rate=1e-2, max_sequence_length=64, checkpoint_every=50,
                            output_dir=os.path.join(OUT, "run"))
    result = train_stage(pipe, dataset, config)
    adapter_stage(pipe, result, dataset, config)
    print("\ndemo finished")


if __name__ == "__main__":
    main()
