"""The benchmarks run and write what they promise: make bench's quick mode, the GPU script's CPU paths."""

import contextlib
import hashlib
import importlib
import io
import json
import os
import sys

import pytest
import torch

import kontext_helpers as kh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")


def _script(name):
    """A benchmark script imported as a module (run here, not in a new process: the libraries are loaded)."""
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return importlib.import_module(name)


def _digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """``benchmarks/bench.py --quick``'s JSON (64 px, 3 rounds, blocks at 64 px), and whether it left the
    committed calibration alone."""
    bench = _script("bench")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    before = _digest(kh.config.BLOCK_CALIBRATION_FILE)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench.print_table(bench.run(quick=True, out=str(out)))
    with open(out, encoding="utf-8") as fh:
        return json.load(fh), printed.getvalue(), before == _digest(kh.config.BLOCK_CALIBRATION_FILE)


def test_quick_bench_times_every_variant_as_a_ratio(quick_bench):
    result, printed, _ = quick_bench
    for key in ("machine", "steps", "steps_setup", "rss", "blocks", "presets", "bench_seconds"):
        assert key in result, f"bench.json lacks {key!r}: {sorted(result)}"
    steps = result["steps"]
    wanted = {"reference", "project", "project_bucket", "project_no_depth", "project_no_region", "project_ip_adapter",
              "original"}
    assert set(steps) == wanted, f"every step variant is timed: {sorted(steps)}"
    assert steps["reference"]["median_ratio"] == 1.0, f"the plain step is the reference: {steps['reference']}"
    for name, row in steps.items():
        assert {"median_ratio", "paired_ratio", "min_ratio", "median_ms", "min_ms"} <= set(row), (
            f"{name} lacks ratios: {row}")
    assert result["rss"]["project"]["net_mb"] > 0, f"peak RSS above the import floor: {result['rss']}"
    assert "x" in printed and "reference" in printed, f"the table is printed: {printed[-2000:]}"
    bucket = result["bucket_cost"]
    assert bucket["median_ratio"] == steps["project_bucket"]["median_ms"] / steps["project"]["median_ms"], (
        f"the non-square bucket's step over the square step: {bucket}")
    assert bucket["bucket"][0] != bucket["bucket"][1] and "non-square bucket" in printed, f"reported: {bucket}"


def test_quick_bench_reports_the_depth_steps_cost_against_the_plain_step(quick_bench):
    result, printed, _ = quick_bench
    cost, steps = result["depth_cost"], result["steps"]
    assert (cost["depth_kind"], cost["region_kind"], cost["variant"]) == ("tokens", "marked", "project"), (
        f"the default depth kind and region, the project's step: {cost}")
    assert cost["limit"] == 1.10 and isinstance(cost["within_limit"], bool), f"the requirement and its verdict: {cost}"
    assert cost["tiny_median_ratio"] == steps["project"]["median_ratio"] > 0, f"the tiny model's ratio: {cost}"
    assert cost["tiny_paired_ratio"] == steps["project"]["paired_ratio"] > 0, f"the per-round ratio: {cost}"
    assert cost["real_width"] and all(r["ratio"] >= 1.0 and r["signal_ms"] > 0 for r in cost["real_width"]), (
        f"the region and depth work beside the blocks, at each block resolution: {cost['real_width']}")
    assert "depth kind 'tokens'" in printed and "limit 1.10x" in printed, f"the ratio is printed: {printed[-2000:]}"


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
def test_gpu_script_without_cuda_says_so(capsys, tmp_path):
    code = _script("gpu_real_width").main(["--out", str(tmp_path / "gpu.json")])
    err = capsys.readouterr().err
    assert code == 2 and "needs a CUDA GPU" in err, f"exit status {code}, message: {err}"
    assert not (tmp_path / "gpu.json").exists(), "without CUDA nothing is written"


def test_gpu_script_dry_run_writes_its_json(tmp_path):
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    code = _script("gpu_real_width").main(["--dry-run", "--out", str(out)])
    torch.set_num_threads(threads)
    assert code == 0, "the dry run must succeed"
    with open(out, encoding="utf-8") as fh:
        result = json.load(fh)
    assert result["dry_run"] and result["runs"], f"the dry run records its runs: {result}"
    for row in result["runs"]:
        assert row["seconds_per_step"] > 0 and row["model_tflops_per_step"] > 0, f"a run measured nothing: {row}"
