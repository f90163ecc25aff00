"""The notebook series: .py and .ipynb in sync, committed without outputs, and every notebook runs headless."""

import glob
import json
import os

import jupytext
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(REPO, "notebooks", "[0-9][0-9]_*.py")))
EXPECTED = ["01_data_prep", "02_latents_packing_and_ids", "03_region_token_and_depth_ip_adapter", "04_training",
            "05_inference_previews"]


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
    for needle in ("kh.describe_environment(", "CONFIG", "## Exercises", "## Recap", "## Next"):
        assert needle in text, f"{source}: missing {needle!r}"
    graded = text.count("kh.exercises.check_")
    assert graded >= 3, f"{source}: at least three graded exercises (tests/test_exercises.py), found {graded}"


def test_notebooks_run_headless_in_order(notebook_runner, tmp_path, monkeypatch):
    monkeypatch.setenv("KONTEXT_MODEL", "tiny")
    monkeypatch.setenv("KONTEXT_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    stdout = {}
    for source in SOURCES:  # in order: 05 uses the adapter 04 trains
        result = notebook_runner.run_notebook(source, str(tmp_path / "executed"))
        stdout[result["name"]] = result["stdout"]
        assert result["figures"] >= 2, f"{result['name']} must teach with pictures, got {result['figures']} figures"
    assert "hand-written step == kh.training_loss: same loss and same gradients" in stdout["04_training"], (
        "notebook 04 must check its hand-written training step against the module's")


def test_notebook_04_writes_out_every_training_setting():
    import dataclasses

    import kontext_helpers as kh

    source = os.path.join(REPO, "notebooks", "04_training.py")
    table = "\n".join(c.source for c in jupytext.read(source).cells if c.cell_type == "markdown")
    missing = [f.name for f in dataclasses.fields(kh.TrainConfig) if f"| `{f.name}` |" not in table]
    assert not missing, f"notebook 04's settings table must list every TrainConfig field; missing {missing}"
