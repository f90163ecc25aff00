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
