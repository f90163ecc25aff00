"""Memory plan and peak estimate: parameters counted on the meta device, activations from measured blocks."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import kontext_helpers as kh


@pytest.fixture(scope="module")
def plans():
    """The plans of the T4 preset (NF4, 8-bit AdamW, rank 8) and the A100 80 GB preset (bf16, AdamW, rank 32)."""
    return {name: kh.memory_plan(kh.TrainConfig.for_gpu(name), verbose=False) for name in ("t4", "a100-80")}


def test_the_real_models_parameters_are_counted(plans):
    params = plans["t4"]["parameters"]
    assert 11.8e9 < params["transformer"] < 12.0e9, f"FLUX.1's transformer has about 12 B parameters: {params}"
    assert 4.7e9 < params["t5"] < 4.8e9, f"the T5-XXL encoder has about 4.76 B parameters: {params}"
    assert params["lora"] * 4 == plans["a100-80"]["parameters"]["lora"], "LoRA parameters grow with the rank (8 -> 32)"


def test_nf4_and_8bit_adam_shrink_the_gpu_weights(plans):
    t4, a100 = plans["t4"]["gpu_gb"], plans["a100-80"]["gpu_gb"]
    ratio = t4["transformer weights"] / a100["transformer weights"]
    assert 0.25 < ratio < 0.32, f"NF4 keeps about 4.5 of 16 bits per Linear weight, got {ratio:.3f}"
    assert plans["t4"]["gpu_weights_gb"] < 15.0, f"the T4 preset's weights must fit 16 GB: {plans['t4']}"
    assert 9.0 < plans["t4"]["ram_gb"]["t5"] < 10.0, f"T5-XXL in 16 bits is about 9.5 GB: {plans['t4']['ram_gb']}"


def test_the_printed_plan_says_what_it_leaves_out(capsys):
    kh.memory_plan(kh.TrainConfig.for_gpu("l4"))
    out = capsys.readouterr().out
    assert "activations are not" in out and "at least" in out, f"the plan must say it is a lower bound: {out}"


REAL_WIDTH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "real_width.py")


@pytest.fixture(scope="module")
def measured_rss():
    """Peak RSS of one training step (AdamW on a rank-16 LoRA) of the rehearsal transformer at real width with 1
    and with 2 blocks of each kind, at 32 and 64 px with 32 text tokens, in a fresh process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.path.dirname(os.path.dirname(REAL_WIDTH))}
    proc = subprocess.run([sys.executable, REAL_WIDTH, "model", "--layers", "1", "2", "--resolutions", "32", "64",
                           "--text-tokens", "32"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, f"real_width.py model failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_estimate_is_within_15_percent_of_the_measured_peak(measured_rss):
    assert {(r["layers"], r["px"]) for r in measured_rss["rows"]} == {(1, 32), (1, 64), (2, 32), (2, 64)}, (
        f"two block counts at two resolutions: {measured_rss['rows']}")
    for row in measured_rss["rows"]:
        cfg = kh.TrainConfig(resolution=row["px"], max_sequence_length=measured_rss["text_tokens"], rank=16)
        estimate = kh.estimate_peak(cfg, layers=(row["layers"], row["layers"]), ip_adapter=False)["total_gb"]
        measured = row["peak_mb"] * 2**20 / 1e9
        assert abs(estimate - measured) < 0.15 * measured, (
            f"{row['layers']}+{row['layers']} blocks at {row['px']} px: estimated {estimate:.2f} GB, "
            f"measured {measured:.2f} GB")


def test_the_presets_peaks_are_the_estimate_from_the_calibration():
    for name, preset in kh.GPU_PRESETS.items():
        if name == "cpu":
            continue
        estimate = kh.estimate_peak(kh.TrainConfig.for_gpu(name))["total_gb"]
        assert preset["expected_peak_memory_gb"] == round(estimate, 1), (
            f"{name}: the preset says {preset['expected_peak_memory_gb']} GB, the estimate {estimate:.2f}; "
            "run `python benchmarks/bench.py --presets-only` after changing the estimator or the presets")
        assert preset["peak_memory_source"].startswith("estimated from measured per-block figures"), (
            f"{name}: the source must say how the figure was made: {preset['peak_memory_source']}")


def test_activations_grow_with_resolution_and_shrink_with_checkpointing():
    cfg = kh.TrainConfig.for_gpu("a100-80", gradient_checkpointing=False)
    full = kh.estimate_peak(cfg)
    smaller = kh.estimate_peak(dataclasses.replace(cfg, resolution=512))
    checkpointed = kh.estimate_peak(dataclasses.replace(cfg, gradient_checkpointing=True))
    assert smaller["activations_gb"] < full["activations_gb"], f"fewer tokens, fewer activations: {smaller} {full}"
    assert checkpointed["activations_gb"] < full["activations_gb"] / 4, (
        f"checkpointing keeps only the blocks' inputs: {checkpointed}")
    assert full["weights_gb"] == checkpointed["weights_gb"], "checkpointing does not change the weights"


# --------------------------------------------------------------------------------------------------
# the modules trained beside the LoRA and the cached depth signal
# --------------------------------------------------------------------------------------------------


def test_the_plan_counts_the_depth_and_region_modules_as_built(plans):
    cfg = kh.TrainConfig.for_gpu("a100-80")  # depth_kind "tokens", region_kind "marked"
    c_in = kh.memory.real_model_config()["transformer"]["in_channels"]
    depth = kh.make_depth_module("tokens", c_in)  # a real module, on the CPU
    region = kh.make_region_module("marked", cfg.resolution // 16, cfg.resolution // 16, c_in)
    params = plans["a100-80"]["parameters"]
    assert params["depth"] == sum(p.numel() for p in depth.parameters()) == 256 * 64 + 64, (
        f"the depth entry is Linear(256, 64)'s weight and bias: {params}")
    assert params["region"] == sum(p.numel() for p in region.parameters()), f"the marked region's embedding: {params}"
    states = plans["a100-80"]["gpu_gb"]["depth module, gradients, optimizer"]
    assert states * 1e9 == params["depth"] * (4 + 4 + 8), "fp32 weights and gradients, two fp32 AdamW moments"


def test_the_cached_depth_features_are_counted_as_the_cache_stores_them(tiny_pipe, one_pair):
    cfg = kh.TrainConfig(resolution=64, max_sequence_length=16)  # depth_kind "tokens": N = 16 tokens
    cache = kh.build_train_cache(tiny_pipe, one_pair(resolution=64, count=2), max_sequence_length=16,
                                 depth_kind="tokens", device="cpu", progress=False)
    stored = sum(s.depth_feat.numel() * s.depth_feat.element_size() for s in cache.samples)
    largest = max((w // 16) * (h // 16) for w, h in kh.bucket_shapes(cfg.resolution))  # 18 tokens at 48x96 px
    assert stored == 2 * 16 * 256 * 4, f"2 square samples x N x 256 float32 stored: {stored}"
    assert kh.memory.depth_cache_bytes(cfg, num_samples=2) == 2 * largest * 256 * 4 >= stored, (
        f"counted at the largest bucket ({largest} tokens): {kh.memory.depth_cache_bytes(cfg, 2)}, stored {stored}")
    at_1024 = kh.memory_plan(dataclasses.replace(cfg, resolution=1024), num_samples=10, verbose=False)
    assert at_1024["depth_cache_bytes"] == 10 * 4150 * 256 * 4, f"10 samples, 42x98 tokens: {at_1024}"
    assert at_1024["gpu_gb"]["cached depth signal"] * 1e9 == at_1024["depth_cache_bytes"]


def test_the_ip_adapter_kind_counts_its_embeddings_and_none_adds_nothing():
    cfg = kh.TrainConfig.for_gpu("a100-80")
    ip_kind, none = (dataclasses.replace(cfg, depth_kind=kind) for kind in ("ip_adapter", "none"))
    assert kh.memory.depth_cache_bytes(ip_kind, num_samples=3) == 3 * 768 * 2, "one 16-bit CLIP embedding a sample"
    assert kh.memory.trained_module_parameters(ip_kind)["depth"] == 0, "the IP-Adapter is frozen: no depth module"
    tokens_peak, none_peak = kh.estimate_peak(cfg, num_samples=4), kh.estimate_peak(none, num_samples=4)
    assert none_peak["depth_gb"] == 0.0 and tokens_peak["depth_gb"] > 0.0, f"{none_peak} {tokens_peak}"
    assert tokens_peak["total_gb"] - none_peak["total_gb"] == pytest.approx(
        (16448 * 16 + 4 * 4150 * 256 * 4) / 1e9), "depth module states and 4 samples' features at the largest bucket"
    none_plan = kh.memory_plan(none, num_samples=4, verbose=False)
    no_depth = kh.memory_plan(dataclasses.replace(cfg, use_depth=False), num_samples=4, verbose=False)
    for plan in (none_plan, no_depth):
        assert plan["parameters"]["depth"] == 0 and plan["depth_cache_bytes"] == 0, f"no depth, nothing: {plan}"
        assert plan["gpu_gb"]["depth module, gradients, optimizer"] == plan["gpu_gb"]["cached depth signal"] == 0.0
