"""The package's shape: modules in notebook order without cycles, short functions, exact public names."""

import ast
import glob
import os
import re
import subprocess
import sys

import pytest

import kontext_helpers as kh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "kontext_helpers")
# The documented order (kontext_helpers/__init__.py): each module imports only modules before it.
ORDER = ["images", "models", "figures", "tiny", "rehearsal", "pipeline", "labels", "buckets", "pair_files", "data",
         "scenes", "latents", "conditioning", "depth", "inference", "adapters", "config", "memory", "checkpoints",
         "draws", "cache", "training", "solutions", "exercises", "pretrain", "cli", "colab"]


def _tree(name):
    with open(os.path.join(PACKAGE, f"{name}.py"), encoding="utf-8") as f:
        return ast.parse(f.read())


def _relative_imports(name):
    found = set()
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # `from .x import y`, or `from . import x`
            found |= {node.module} if node.module else {alias.name for alias in node.names}
    return found


def test_the_documented_order_lists_every_module():
    found = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(PACKAGE, "*.py")))
    assert sorted(ORDER + ["__init__", "__main__"]) == found, f"modules and documented order differ: {found}"
    for name in ORDER:
        assert f"    {name} " in kh.__doc__, f"__init__'s docstring must list the module {name}"


@pytest.mark.parametrize("name", ORDER)
def test_each_module_imports_only_modules_before_it(name):
    allowed = set(ORDER[: ORDER.index(name)])
    later = _relative_imports(name) - allowed
    assert not later, f"kontext_helpers/{name}.py imports {sorted(later)}, which come after it (or itself)"


@pytest.mark.parametrize("name", ORDER)
def test_modules_and_functions_are_short(name):
    with open(os.path.join(PACKAGE, f"{name}.py"), encoding="utf-8") as f:
        lines = f.read().count("\n")
    assert lines <= 620, f"kontext_helpers/{name}.py has {lines} lines; split it (about 600 at most)"
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body[1:] if isinstance(node.body[0], ast.Expr) and isinstance(
                getattr(node.body[0], "value", None), ast.Constant) else node.body
            size = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            assert size <= 60, f"{name}.{node.name} has {size} lines of code; split it into named steps"


def test_all_lists_exactly_the_public_names_and_each_is_used():
    assert len(kh.__all__) == len(set(kh.__all__)), "__all__ lists a name twice"
    missing = [n for n in kh.__all__ if not hasattr(kh, n)]
    assert not missing, f"__all__ lists names the package does not define: {missing}"
    exported = {n for n in vars(kh) if not n.startswith("_") and not isinstance(getattr(kh, n), type(kh))}
    assert exported == set(kh.__all__), f"public names outside __all__: {sorted(exported - set(kh.__all__))}"
    users = ""
    for pattern in ("notebooks/*.py", "tests/test_*.py", "benchmarks/*.py", "scripts/*.py"):
        for path in glob.glob(os.path.join(REPO, pattern)):
            with open(path, encoding="utf-8") as f:
                users += f.read()
    unused = [n for n in kh.__all__ if not re.search(rf"\bkh\.{n}\b", users)]
    assert not unused, f"names in __all__ that no notebook, test or benchmark uses: {unused}"


def test_import_is_light_and_the_command_line_answers():
    code = ("import sys, kontext_helpers\n"
            "print(sorted(m for m in ('diffusers', 'transformers', 'peft', 'accelerate', 'matplotlib', 'torchvision')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()
    assert out == "[]", f"importing kontext_helpers must not import heavy libraries (no import-time work): {out}"
    proc = subprocess.run([sys.executable, "-m", "kontext_helpers", "train", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--rank" in proc.stdout, f"python -m kontext_helpers train --help: {proc.stderr}"
