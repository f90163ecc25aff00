"""Memory plan: FLUX.1 Kontext [dev]'s parameters counted on the meta device, bytes by preset, lower bounds."""

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
