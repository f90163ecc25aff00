"""The benchmarks run and write what they promise: make bench's quick mode, the GPU script's CPU paths."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

import kontext_helpers as kh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
ENV = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}


def _digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """``benchmarks/bench.py --quick``'s JSON (64 px, 3 rounds, blocks at 64 px), and whether it left the
    committed calibration alone."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    before = _digest(kh.config.BLOCK_CALIBRATION_FILE)
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO)
    assert proc.returncode == 0, f"bench.py --quick failed:\n{proc.stderr[-3000:]}"
    with open(out, encoding="utf-8") as fh:
        return json.load(fh), proc.stdout, before == _digest(kh.config.BLOCK_CALIBRATION_FILE)


def test_quick_bench_times_every_variant_as_a_ratio(quick_bench):
    result, printed, _ = quick_bench
    for key in ("machine", "steps", "steps_setup", "rss", "blocks", "presets", "bench_seconds"):
        assert key in result, f"bench.json lacks {key!r}: {sorted(result)}"
    steps = result["steps"]
    wanted = {"reference", "project", "project_no_depth", "project_no_region", "original"}
    assert set(steps) == wanted, f"every step variant is timed: {sorted(steps)}"
    assert steps["reference"]["median_ratio"] == 1.0, f"the plain step is the reference: {steps['reference']}"
    for name, row in steps.items():
        assert {"median_ratio", "min_ratio", "median_ms", "min_ms"} <= set(row), f"{name} lacks ratios: {row}"
    assert result["rss"]["project"]["net_mb"] > 0, f"peak RSS above the import floor: {result['rss']}"
    assert "x" in printed and "reference" in printed, f"the table is printed: {printed[-2000:]}"


def test_quick_bench_measures_both_blocks_and_estimates_every_gpu_preset(quick_bench):
    result, _, calibration_unchanged = quick_bench
    kinds = {(r["kind"], r["checkpointing"]) for r in result["blocks"]["rows"]}
    assert kinds == {("double", False), ("double", True), ("single", False), ("single", True)}, f"{kinds}"
    for row in result["blocks"]["rows"]:
        assert row["peak_mb"] > 0 and row["seconds"] > 0, f"a block run measured nothing: {row}"
    presets = set(kh.GPU_PRESETS) - {"cpu"}
    assert set(result["presets"]) == presets, f"every GPU preset is estimated: {sorted(result['presets'])}"
    assert calibration_unchanged, "--quick must not overwrite kontext_helpers/block_calibration.json"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_gpu_script_without_cuda_says_so():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_real_width.py")], capture_output=True,
                          text=True, timeout=300, env=ENV, cwd=REPO)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr, f"{proc.returncode}: {proc.stderr[-800:]}"


def test_gpu_script_dry_run_writes_its_json(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "gpu_real_width.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO)
    assert proc.returncode == 0, f"the dry run failed:\n{proc.stderr[-3000:]}"
    with open(out, encoding="utf-8") as fh:
        result = json.load(fh)
    assert result["dry_run"] and result["runs"], f"the dry run records its runs: {result}"
    for row in result["runs"]:
        assert row["seconds_per_step"] > 0 and row["model_tflops_per_step"] > 0, f"a run measured nothing: {row}"
