"""The notebook series: .py and .ipynb in sync, committed without outputs, and every notebook runs headless."""

import glob
import importlib.util
import json
import os

import jupytext
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(REPO, "notebooks", "[0-9][0-9]_*.py")))
EXPECTED = ["01_data_prep", "02_latents_packing_and_ids", "03_region_token_and_depth_ip_adapter", "04_training",
            "05_inference_previews"]


def _runner():
    spec = importlib.util.spec_from_file_location("run_notebooks", os.path.join(REPO, "scripts", "run_notebooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_series_is_complete():
    names = [os.path.splitext(os.path.basename(p))[0] for p in SOURCES]
    assert names == EXPECTED, f"notebooks/ must hold the five notebooks in order, found {names}"


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_py_and_ipynb_are_paired_and_clean(source):
    ipynb = source[:-3] + ".ipynb"
    assert os.path.isfile(ipynb), f"{source} has no paired {ipynb}: run `make sync-notebooks`"
    cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert cells(jupytext.read(source)) == cells(jupytext.read(ipynb)), (
        f"{source} and {ipynb} differ: run `make sync-notebooks`")
    with open(ipynb) as f:
        raw = json.load(f)
    with_outputs = [i for i, c in enumerate(raw["cells"]) if c.get("outputs") or c.get("execution_count")]
    assert not with_outputs, f"{ipynb} carries outputs in cells {with_outputs}: commit it without outputs"


@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_notebook_follows_the_house_style(source):
    nb = jupytext.read(source)
    first = nb.cells[0].source
    assert nb.cells[0].cell_type == "markdown" and first.startswith("# "), f"{source}: start with a title"
    assert "colab.research.google.com" in first, f"{source}: the first cell needs the Colab badge"
    assert "What you will learn" in first, f"{source}: the first cell says what you will learn"
    text = "\n".join(c.source for c in nb.cells)
    for needle in ("kh.describe_environment(", "CONFIG", "## Recap", "## Next"):
        assert needle in text, f"{source}: missing {needle!r}"


@pytest.mark.xdist_group("notebooks-tiny")  # under -n: beside the rehearsal run, not behind it
def test_notebooks_run_headless_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("KONTEXT_MODEL", "tiny")
    monkeypatch.setenv("KONTEXT_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    runner = _runner()
    for source in SOURCES:  # in order: 05 uses the adapter 04 trains
        result = runner.run_notebook(source, str(tmp_path / "executed"))
        assert result["figures"] >= 2, f"{result['name']} must teach with pictures, got {result['figures']} figures"


@pytest.mark.xdist_group("rehearsal")  # under -n: in the process that holds the rehearsal model
def test_notebooks_take_the_gpu_path_on_the_rehearsal_model(rehearsal_root, tmp_path, monkeypatch):
    """Every notebook's real-model branch, at real width, in quick mode, with the T4 preset minus what a CPU cannot
    run: no NF4 (bitsandbytes loads 4-bit weights only onto a GPU) and bf16 autocast instead of fp16. What runs:
    loading in stages, gradient checkpointing, 8-bit AdamW, offloaded-encoder caching, checkpoints and resume."""
    from safetensors.torch import load_file

    out = tmp_path / "outputs"
    for name, value in {"KONTEXT_MODEL": str(rehearsal_root), "KONTEXT_PRESET": "t4", "KONTEXT_QUICK": "1",
                        "KONTEXT_OUTPUT_DIR": str(out), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    runner = _runner()
    stdout = {}
    for source in SOURCES:
        result = runner.run_notebook(source, str(tmp_path / "executed"))
        stdout[result["name"]] = result["stdout"]
        assert "quantize_base 'nf4' -> None" in result["stdout"], f"{result['name']} must run the quick T4 preset"
    assert "text encoders still loaded: False" in stdout["04_training"], "notebook 04 must load in stages"
    assert "the first 3 records equal the original run's: True" in stdout["04_training"], "resume must continue"
    checkpoints = sorted((out / "run" / "checkpoints").glob("step-*"))
    optimizer = load_file(checkpoints[-1] / "optimizer.safetensors")
    assert any(v.dtype == torch.uint8 for v in optimizer.values()), "the T4 preset's 8-bit AdamW state must be saved"
    assert "lora_unet_double_blocks_0_img_attn_qkv" in stdout["05_inference_previews"], (
        "notebook 05 must export ComfyUI keys for the real block names")
