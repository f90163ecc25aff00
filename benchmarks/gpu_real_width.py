"""FLUX.1 Kontext [dev]'s transformer at full width and depth on one CUDA GPU: peak VRAM, s/step and MFU.

    .venv/bin/python benchmarks/gpu_real_width.py [--resolutions 512 1024] [--steps 3] [--out outputs/bench/gpu.json]
    .venv/bin/python benchmarks/gpu_real_width.py --dry-run      # CPU smoke test at a tiny width, no CUDA needed

The transformer is built from FLUX.1 Kontext [dev]'s own configuration (``kh.REHEARSAL_CONFIG`` with 19 double
and 38 single blocks, ``kh.build_rehearsal_transformer``), random weights drawn on the GPU: no Hub, no download,
seconds. A rank-16 ``attn`` LoRA (``kh.add_lora``, kept in fp32 as ``kh.train`` does) is trained on random cached
inputs (``[noisy target | context | region]``, 512 T5 tokens) with ``kh.kontext_forward``, bf16 autocast and a
velocity MSE, in three modes:

- ``bf16_ckpt``: bf16 weights, gradient checkpointing, torch AdamW (the A100 40 GB preset's way);
- ``bf16``: the same without checkpointing (the 80 GB presets' way; it may not fit: an OOM is recorded);
- ``nf4_ckpt_adamw8bit``: every ``nn.Linear`` as bitsandbytes' NF4 ``Linear4bit`` with bf16 compute (the layer
  diffusers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` puts there, quantized in place
  because random weights have no file to load), gradient checkpointing, bitsandbytes' 8-bit AdamW (T4 / L4).

Per mode and resolution: one warm-up step, then ``--steps`` timed steps; ``peak_gb`` is
``torch.cuda.max_memory_allocated`` over those steps (weights included, the CUDA context not), beside
``kh.estimate_peak`` for the same settings. MFU = model FLOPs per step / seconds / the GPU's peak dense bf16
FLOP/s (``--peak-tflops``, default from the device name: H100 / H200 SXM 989, A100 312, L4 121, T4 65 fp16).
Model FLOPs, with L = text + image tokens, P = the blocks' Linear weights, R = the LoRA's parameters,
D = 3072 and B = 57 blocks: ``4 P L`` (forward, and backward to the activations only: the base is frozen)
``+ 6 R L`` (the LoRA's forward, input and weight gradients) ``+ 12 B L^2 D`` (attention scores and values,
forward 4 L^2 D per block, backward twice that); checkpointing's recomputed forward is not counted (the usual
MFU convention), the embedders and the output layer are left out (under 0.1 %).

Needs torch, diffusers, peft, transformers and bitsandbytes only; nothing from the network. For a machine
without network, carry the wheels: ``pip download bitsandbytes -d wheels/`` here, then
``pip install --no-index --find-links wheels/ bitsandbytes`` there. Sized for well under 10 minutes on one
H100 / H200: 24 steps in all (three modes, two resolutions, one warm-up and three timed steps each), about
575 model TFLOP for a 1024 px step, so a few seconds each at 30-40 % MFU, plus three builds of seconds each
(an estimate: this script has not yet run on a GPU). Without CUDA it exits with a message and status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's kontext_helpers, whichever copy is installed

import torch  # noqa: E402

PEAK_TFLOPS = {"h200": 989.0, "h100": 989.0, "a100": 312.0, "l4": 121.0, "t4": 65.0}
MODES = ("bf16_ckpt", "bf16", "nf4_ckpt_adamw8bit")
TEXT_TOKENS = 512
DRY_RUN_WIDTH = {"num_attention_heads": 2}  # D = 2 x 128 = 256: the code path at a tiny width


def model_flops(linear_params: int, lora_params: int, blocks: int, tokens: int, dim: int) -> float:
    """Model FLOPs of one LoRA training step (see the module docstring): ``4PL + 6RL + 12 B L^2 D``."""
    return 4 * linear_params * tokens + 6 * lora_params * tokens + 12 * blocks * tokens**2 * dim


def quantize_nf4(transformer, device) -> None:
    """Every ``nn.Linear`` replaced by bitsandbytes' NF4 ``Linear4bit`` (bf16 compute), quantized on ``device``."""
    import bitsandbytes as bnb

    for module in list(transformer.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, name, q.to(device))  # moving a Params4bit quantizes it; the bf16 weight is freed


def build(mode: str, layers: tuple[int, int], device, overrides: dict | None):
    """The transformer for ``mode`` with its LoRA and optimizer: ``(transformer, lora, optimizer)``."""
    from diffusers.training_utils import cast_training_params

    import kontext_helpers as kh

    nf4 = mode.startswith("nf4")
    transformer = kh.build_rehearsal_transformer(*layers, dtype=torch.bfloat16, device=device, overrides=overrides)
    if nf4:
        quantize_nf4(transformer, device)
    lora = kh.add_lora(transformer, rank=16, targets="attn")
    cast_training_params(transformer, dtype=torch.float32)
    if "ckpt" in mode:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for _, p in lora]
    if "adamw8bit" in mode:
        import bitsandbytes as bnb

        return transformer, lora, bnb.optim.AdamW8bit(params, lr=1e-4)
    return transformer, lora, torch.optim.AdamW(params, lr=1e-4)


def step(transformer, optimizer, px: int, device, text_tokens: int) -> None:
    """One LoRA training step on random cached inputs at ``px`` (bf16 autocast, velocity MSE)."""
    import kontext_helpers as kh

    h = w = px // 16
    c_in = transformer.config.in_channels
    noisy, ctx, region = (torch.randn(1, n, c_in, device=device) for n in (h * w, h * w, 1))  # [1, N, 4C], [1, 1, 4C]
    prompt = torch.randn(1, text_tokens, transformer.config.joint_attention_dim, device=device)  # [1, T, 4096]
    pooled = torch.randn(1, transformer.config.pooled_projection_dim, device=device)  # [1, 768]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        pred = kh.kontext_forward(transformer, noisy, ctx, region, sigma=torch.tensor([0.5], device=device),
                                  prompt_embeds=prompt, pooled_prompt_embeds=pooled,
                                  txt_ids=torch.zeros(text_tokens, 3, device=device), h_tok=h, w_tok=w)
    torch.nn.functional.mse_loss(pred.float(), noisy - ctx).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(transformer, optimizer, px: int, device, steps: int, text_tokens: int) -> dict:
    """One warm-up step, then ``steps`` timed ones; seconds per step and peak allocated GB (CUDA)."""
    step(transformer, optimizer, px, device, text_tokens)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(transformer, optimizer, px, device, text_tokens)
    _sync(device)
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return {"seconds_per_step": seconds, "peak_gb": peak}


def _counts(transformer, lora) -> tuple[int, int]:
    """``(P, R)``: parameters of the blocks' Linear weights (NF4 ones counted unpacked) and of the LoRA."""
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    linear = sum(m.in_features * m.out_features for b in blocks for n, m in b.named_modules()
                 if hasattr(m, "in_features") and "lora_" not in n and not hasattr(m, "base_layer"))
    return linear, sum(p.numel() for _, p in lora)


def run_mode(mode: str, args, device, layers, overrides, peak_tflops: float | None) -> list[dict]:
    """Every resolution of one mode; an out-of-memory run is recorded, not raised."""
    import kontext_helpers as kh

    transformer, lora, optimizer = build(mode, layers, device, overrides)
    linear, lora_params = _counts(transformer, lora)
    rows = []
    for px in args.resolutions:
        tokens = 2 * (px // 16) ** 2 + 1 + args.text_tokens
        row = {"mode": mode, "px": px, "tokens": tokens}
        try:
            row.update(measure(transformer, optimizer, px, device, args.steps, args.text_tokens))
        except torch.cuda.OutOfMemoryError:
            row.update(seconds_per_step=None, peak_gb=None, oom=True)
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        flops = model_flops(linear, lora_params, sum(layers), tokens, transformer.inner_dim)
        row["model_tflops_per_step"] = flops / 1e12
        if row.get("seconds_per_step") and peak_tflops:
            row["mfu"] = flops / row["seconds_per_step"] / (peak_tflops * 1e12)
        cfg = kh.TrainConfig(resolution=px, rank=16, gradient_checkpointing="ckpt" in mode,
                             max_sequence_length=args.text_tokens,
                             quantize_base="nf4" if mode.startswith("nf4") else None,
                             optimizer="adamw8bit" if "adamw8bit" in mode else "adamw")
        # the estimate from the CPU's per-block figures, at real width only (not for the dry run's tiny width)
        row["estimated_gb"] = None if overrides else kh.estimate_peak(cfg, layers=layers, ip_adapter=False)["total_gb"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    del transformer, lora, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((v for k, v in PEAK_TFLOPS.items() if k in name.lower()), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help="default: all three (the dry run: the bf16 ones; its NF4 run takes minutes on a CPU)")
    parser.add_argument("--text-tokens", type=int, default=TEXT_TOKENS)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s")
    parser.add_argument("--dry-run", action="store_true", help="CPU, D = 256, 1 + 1 blocks, 32 px, 16 text tokens")
    parser.add_argument("--out", default=os.path.join(REPO, "outputs", "bench", "gpu.json"))
    args = parser.parse_args(argv)
    if args.dry_run:
        device, layers, overrides, name = torch.device("cpu"), (1, 1), DRY_RUN_WIDTH, "cpu (dry run)"
        args.resolutions, args.steps, args.text_tokens = [32], 1, 16
        args.modes = args.modes or [m for m in MODES if not m.startswith("nf4")]
    elif not torch.cuda.is_available():
        print("gpu_real_width.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "use --dry-run for the CPU smoke test", file=sys.stderr)
        return 2
    else:
        device, layers, overrides = torch.device("cuda"), (19, 38), None
        name = torch.cuda.get_device_name(device)
    args.modes = args.modes or list(MODES)
    peak_tflops = _peak_tflops(name, args.peak_tflops)
    t0 = time.perf_counter()
    rows = [row for mode in args.modes for row in run_mode(mode, args, device, layers, overrides, peak_tflops)]
    result = {"machine": {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                          "peak_tflops": peak_tflops}, "dry_run": args.dry_run, "layers": list(layers),
              "flops_formula": "4*P*L + 6*R*L + 12*blocks*L^2*D (no recompute, no embedders)", "runs": rows,
              "seconds": time.perf_counter() - t0}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(f"written: {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
