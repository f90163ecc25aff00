"""Per-block cost of FLUX.1 Kontext [dev] at its real width, on this CPU: time and peak RSS of one block's
forward + backward with a LoRA, the numbers ``kontext_helpers/block_calibration.json`` keeps.

    .venv/bin/python benchmarks/real_width.py blocks [--resolutions 256 512 1024] [--threads 2]
    .venv/bin/python benchmarks/real_width.py model --layers 1 2 --resolutions 64 128 [--text-tokens 512]

``blocks``: one double block (``FluxTransformerBlock``) and one single block (``FluxSingleTransformerBlock``)
of the rehearsal transformer (D = 3072, random weights, bf16, ``kh.build_rehearsal_transformer``), a rank-16
``attn`` LoRA in fp32 as training keeps it, run under bf16 autocast as ``train`` runs with
``mixed_precision="bf16"``. The block's inputs are the hidden states of ``[target (N) | context (N) |
region (1)]``, N = (px / 16)^2, and 512 T5 tokens; they need a gradient, as any block past the first does.
For each resolution, with and without gradient checkpointing (``torch.utils.checkpoint``, non-reentrant, as
diffusers' ``enable_gradient_checkpointing``), one forward + backward is timed and its RSS recorded:
``saved_mb`` (held between forward and backward) and ``peak_mb`` (the high-water mark), both above the RSS
with the model and the inputs in place. ``model``: the rehearsal transformer with ``--layers`` blocks of
each kind (several counts: one model after the other), one full training step (``kh.kontext_forward``,
velocity MSE, backward, AdamW) per resolution, peak RSS above the RSS before the model was built: what
``kh.estimate_peak`` predicts (``tests/test_memory.py`` holds it within 15%). ``--quick``: blocks at
D = 256 with 16 text tokens, a test of the code, not a measurement.

Run it in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` (``bench.py`` does): large tensors then
live in their own mappings and go back to the system when freed, so RSS follows the tensors.
Prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's kontext_helpers, whichever copy is installed

import torch  # noqa: E402

import kontext_helpers as kh  # noqa: E402

TEXT_TOKENS = 512  # Kontext's max_sequence_length
QUICK_WIDTH = {"num_attention_heads": 2}  # --quick: D = 256, the code path in seconds (no real-width figures)
RANK = 16  # the LoRA of every preset but T4 (8) and the 80 GB cards (32); its memory is counted apart


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its high-water mark (``VmHWM``), in MB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Start a new RSS high-water mark (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def image_tokens(px: int) -> int:
    """``2N + 1``: target and context tokens of a ``px`` square image, and the region token."""
    return 2 * (px // 16) ** 2 + 1


def rotary(transformer, px: int, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ``(cos, sin)`` ``[T + 2N + 1, 128]`` for the text tokens and ``[target | context | region]``."""
    txt_ids = torch.zeros(text_tokens, 3)  # [T, 3], as FluxKontextPipeline's text ids
    img_ids = kh.kontext_img_ids(px // 16, px // 16, with_region=True)  # [2N + 1, 3]
    return transformer.pos_embed(torch.cat([txt_ids, img_ids]))


def lora_transformer(layers: int, rank: int = RANK, overrides: dict | None = None):
    """The rehearsal transformer with ``layers`` blocks of each kind and a LoRA kept in fp32 (as ``train`` does)."""
    from diffusers.training_utils import cast_training_params

    transformer = kh.build_rehearsal_transformer(layers, layers, dtype=torch.bfloat16, overrides=overrides)
    kh.add_lora(transformer, rank=rank, targets="attn")
    cast_training_params(transformer, dtype=torch.float32)
    return transformer


def _block_once(block, inputs: dict, grads: tuple, checkpointing: bool) -> dict:
    """One forward + backward of ``block``: seconds, RSS held after the forward, and the peak, in MB."""
    args = (inputs["hidden"], inputs["encoder"], inputs["temb"], inputs["rotary"], None)
    reset_peak()
    base = rss_mb()
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if checkpointing:
            out = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        else:
            out = block(*args)
    forward = time.perf_counter() - t0
    saved = rss_mb() - base
    torch.autograd.backward(out, grads)  # the gradient of the block after it
    seconds = time.perf_counter() - t0
    peak = rss_mb("VmHWM") - base
    del out
    for tensor in (inputs["hidden"], inputs["encoder"], *block.parameters()):
        tensor.grad = None
    return {"seconds": seconds, "forward_seconds": forward, "saved_mb": saved, "peak_mb": peak, "derived": False}


def _derived_checkpointing(plain: dict, inputs: dict) -> dict:
    """The checkpointed run from the plain one: one more forward; the same peak (the backward recomputes the
    block's activations); between forward and backward only the inputs are held."""
    held = sum(t.numel() * t.element_size() for t in (inputs["hidden"], inputs["encoder"])) / 2**20
    return {"seconds": plain["seconds"] + plain["forward_seconds"], "forward_seconds": plain["forward_seconds"],
            "saved_mb": held, "peak_mb": plain["peak_mb"], "derived": True}


def _block_inputs(transformer, px: int, text_tokens: int) -> tuple[dict, tuple]:
    """Inputs ``hidden [1, 2N+1, D]``, ``encoder [1, T, D]`` (both needing a gradient), ``temb [1, D]``, RoPE,
    and the output gradients ``(encoder, hidden)`` that the next block would send back."""
    dim = transformer.inner_dim
    g = torch.Generator().manual_seed(px)
    hidden = torch.randn(1, image_tokens(px), dim, generator=g).to(torch.bfloat16).requires_grad_(True)
    encoder = torch.randn(1, text_tokens, dim, generator=g).to(torch.bfloat16).requires_grad_(True)
    inputs = {"hidden": hidden, "encoder": encoder, "temb": torch.randn(1, dim, generator=g).to(torch.bfloat16),
              "rotary": rotary(transformer, px, text_tokens)}
    return inputs, (torch.randn_like(encoder), torch.randn_like(hidden))


def measure_blocks(resolutions: list[int], threads: int, derive=(), quick: bool = False) -> dict:
    """Both block kinds at every resolution, without and with gradient checkpointing (one run each); at the
    ``derive`` resolutions the checkpointed figures come from the plain run (:func:`_derived_checkpointing`).
    ``quick``: D = 256 and 16 text tokens, to test the code, not to measure."""
    torch.set_num_threads(threads)
    text_tokens = 16 if quick else TEXT_TOKENS
    transformer = lora_transformer(1, overrides=QUICK_WIDTH if quick else None)
    blocks = {"double": transformer.transformer_blocks[0], "single": transformer.single_transformer_blocks[0]}
    rows = []
    for kind, block in blocks.items():
        warm, warm_grads = _block_inputs(transformer, 32, text_tokens)
        _block_once(block, warm, warm_grads, False)  # one-time kernel set-up, not measured
        for px in resolutions:
            inputs, grads = _block_inputs(transformer, px, text_tokens)
            plain = _block_once(block, inputs, grads, False)
            ckpt = _derived_checkpointing(plain, inputs) if px in derive else _block_once(block, inputs, grads, True)
            for checkpointing, row in ((False, plain), (True, ckpt)):
                rows.append({"kind": kind, "px": px, "tokens": image_tokens(px) + text_tokens,
                             "checkpointing": checkpointing, **row})
            del inputs, grads
    params = {kind: sum(p.numel() for p in block.parameters() if not p.requires_grad) for kind, block in blocks.items()}
    return {"rows": rows, "block_parameters": params, "dtype": "bf16 weights, fp32 LoRA, bf16 autocast",
            "threads": threads, "rank": RANK, "text_tokens": text_tokens, "width": transformer.inner_dim}


def _model_step(transformer, optimizer, px: int, text_tokens: int) -> None:
    """One training step of the whole transformer at ``px``: velocity MSE on the target tokens, AdamW."""
    h = w = px // 16
    g = torch.Generator().manual_seed(px)
    c_in = transformer.config.in_channels
    noisy, ctx, region = (torch.randn(1, n, c_in, generator=g) for n in (h * w, h * w, 1))  # [1, N, 4C], [1, 1, 4C]
    prompt = torch.randn(1, text_tokens, transformer.config.joint_attention_dim, generator=g)  # [1, T, 4096]
    pooled = torch.randn(1, transformer.config.pooled_projection_dim, generator=g)  # [1, 768]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = kh.kontext_forward(transformer, noisy, ctx, region, sigma=torch.tensor([0.5]), prompt_embeds=prompt,
                                  pooled_prompt_embeds=pooled, txt_ids=torch.zeros(text_tokens, 3), h_tok=h, w_tok=w)
    loss = torch.nn.functional.mse_loss(pred.float(), noisy - ctx)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_model(layer_counts: list[int], resolutions: list[int], threads: int, checkpointing: bool,
                  text_tokens: int = TEXT_TOKENS) -> dict:
    """Peak RSS of a training step of the rehearsal transformer with each of ``layer_counts`` blocks of each kind
    (AdamW on the LoRA), in MB above the RSS before that model was built (the previous one freed), per resolution
    (the high-water mark reset in between)."""
    import diffusers.models.transformers.transformer_flux  # noqa: F401  (the libraries' code is in the floor)
    import peft  # noqa: F401

    torch.set_num_threads(threads)
    rows = []
    for layers in layer_counts:
        reset_peak()
        floor = rss_mb()
        transformer = lora_transformer(layers)
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        optimizer = torch.optim.AdamW([p for p in transformer.parameters() if p.requires_grad], lr=1e-4)
        for px in resolutions:
            reset_peak()
            t0 = time.perf_counter()
            _model_step(transformer, optimizer, px, text_tokens)
            rows.append({"layers": layers, "px": px, "peak_mb": rss_mb("VmHWM") - floor,
                         "seconds": time.perf_counter() - t0})
        del transformer, optimizer
    return {"checkpointing": checkpointing, "rank": RANK, "threads": threads, "text_tokens": text_tokens,
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["blocks", "model"])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--derive", type=int, nargs="*", default=[],
                        help="resolutions whose checkpointed run is derived from the plain one, not run")
    parser.add_argument("--layers", type=int, nargs="+", default=[1], help="model: blocks of each kind, per model")
    parser.add_argument("--quick", action="store_true", help="blocks at D = 256 with 16 text tokens (a code test)")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text-tokens", type=int, default=TEXT_TOKENS, help="model: T5 tokens of the step")
    args = parser.parse_args()
    if args.what == "blocks":
        result = measure_blocks(args.resolutions, args.threads, tuple(args.derive), args.quick)
    else:
        result = measure_model(args.layers, args.resolutions, args.threads, args.checkpointing, args.text_tokens)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
