"""Run the notebook series headless, in order, on the tiny model (what `make demo` does).

    .venv/bin/python scripts/run_notebooks.py [NOTEBOOK.py ...] [--out outputs/notebooks]

Each `notebooks/NN_*.py` (jupytext percent, the reviewed source) is executed top to bottom in a fresh kernel
with KONTEXT_MODEL=tiny and the Hub off. The kernel gets KONTEXT_FILL_SOLUTIONS=1 (unless it is set): the graded
exercises' checkers grade the solution in place of each empty stub, so every cell runs. The executed notebooks
(with their figures) are written to OUT/NN_*.ipynb and every figure to OUT/figures/NN_*-K.png, so you can look at
what a learner sees.
"""

from __future__ import annotations

import argparse
import base64
import glob
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")


def notebook_sources() -> list[str]:
    """The series in order: notebooks/NN_*.py."""
    return sorted(glob.glob(os.path.join(NOTEBOOKS, "[0-9][0-9]_*.py")))


def run_notebook(path: str, out_dir: str, *, timeout: int = 300) -> dict:
    """Execute one jupytext .py notebook; save the executed .ipynb and its figures under ``out_dir``."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    name = os.path.splitext(os.path.basename(path))[0]
    t0 = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(path)}})
    env = dict(os.environ)
    env.setdefault("KONTEXT_FILL_SOLUTIONS", "1")  # kontext_helpers.exercises: the solution fills each stub
    try:
        client.execute(env=env)
    finally:
        os.makedirs(os.path.join(out_dir, "figures"), exist_ok=True)
        nbformat.write(nb, os.path.join(out_dir, f"{name}.ipynb"))
    figures, text = 0, []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                figures += 1
                with open(os.path.join(out_dir, "figures", f"{name}-{figures:02d}.png"), "wb") as f:
                    f.write(base64.b64decode(data["image/png"]))
            if output.get("output_type") == "stream" and output.get("name") == "stdout":
                text.append(output["text"])
    return {"name": name, "seconds": time.perf_counter() - t0, "figures": figures, "stdout": "".join(text)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebook .py files (default: the whole series)")
    parser.add_argument("--out", default=os.path.join(REPO, "outputs", "notebooks"))
    args = parser.parse_args(argv)
    os.environ.setdefault("KONTEXT_MODEL", "tiny")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the tiny model is fastest on one thread
    os.environ.pop("MPLBACKEND", None)  # let the kernel use its inline backend so figures are captured
    paths = args.notebooks or notebook_sources()
    if not paths:
        print("no notebooks found in notebooks/", file=sys.stderr)
        return 1
    for path in paths:
        result = run_notebook(path, args.out)
        tail = [line for line in result["stdout"].strip().splitlines() if line.strip()][-3:]
        print(f"{result['name']}: ran in {result['seconds']:.1f} s, {result['figures']} figures")
        for line in tail:
            print(f"    {line}")
    print(f"executed notebooks and figures -> {os.path.relpath(args.out, REPO)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
