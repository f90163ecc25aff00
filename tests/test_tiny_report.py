"""scripts/tiny_editor_report.py: the script behind docs/tiny_model_figures.json runs and counts right."""

import json

import pytest


@pytest.fixture(scope="module")
def report(script_module):
    return script_module("tiny_editor_report")


def test_keep_gap_lines_count_the_samples_within_a_db_of_the_vae(report):
    rows = [{"pair": "a", "vae_db": 32.0, "empty_prompt_db": 31.5, "empty_prompt_db_by_seed": [31.5, 30.0]},
            {"pair": "b", "vae_db": 30.0, "empty_prompt_db": 28.5, "empty_prompt_db_by_seed": [28.5, 29.5]}]
    first, every = report.keep_gap_lines(rows)
    assert "1 of 2 within 1 dB" in first and "max 1.50 dB" in first, f"seed 0: gaps 0.5 and 1.5 -> {first!r}"
    assert "2 of 4 within 1 dB" in every and "max 2.00 dB (a)" in every, f"every seed: {every!r}"
    assert report.keep_gap_lines([]) == [], "no base figures, no lines"


def test_report_writes_the_vae_and_depth_figures_of_the_shipped_weights(report, tmp_path):
    out = tmp_path / "report.json"
    result = report.main(["--skip-base", "--skip-lora", "--json", str(out)])
    written = json.loads(out.read_text())
    assert len(written["vae_db"]) == 10 and min(written["vae_db"]) > 20, f"ten contexts: {written['vae_db']}"
    assert 0 < written["depth_embedding_spread"] <= 1, f"a fraction: {written['depth_embedding_spread']}"
    assert "base_keep" not in written and "lora" not in written, "--skip-base and --skip-lora leave them out"
    assert written["vae_db"] == result["vae_db"], "the file holds what main returns"
