"""The notebooks' setup cell in a stand-in Colab: the repository placeholder, the install line, Drive and the token."""

import os
import subprocess
import sys
import types

import jupytext
import pytest

import kontext_helpers as kh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(os.path.join(REPO, "notebooks", n) for n in os.listdir(os.path.join(REPO, "notebooks"))
                   if n[:2].isdigit() and n.endswith(".py"))
TOKEN = "hf_secret_token_never_shown_123"
WANDB_KEY = "wandb_secret_key_never_shown_456"
DEV_TOOLS = ("torch", "ipykernel", "pytest", "ruff", "nbclient", "jupytext", "[dev]", "requirements")


def _setup_cell(path: str = NOTEBOOKS[0]) -> str:
    return next(c.source for c in jupytext.read(path).cells if c.cell_type == "code")


@pytest.fixture()
def colab(monkeypatch, tmp_path):
    """A stand-in ``google.colab`` (Drive, secrets), recorded shell commands and Hub logins, a scratch cwd."""
    record = {"run": [], "mount": [], "login": []}
    module = types.ModuleType("google.colab")
    module.drive = types.SimpleNamespace(mount=lambda path: record["mount"].append(path))
    secrets = {"HF_TOKEN": TOKEN, "WANDB_API_KEY": WANDB_KEY}
    module.userdata = types.SimpleNamespace(get=lambda name: secrets.get(name))
    google = types.ModuleType("google")
    google.colab = module
    monkeypatch.setitem(sys.modules, "google", google)
    monkeypatch.setitem(sys.modules, "google.colab", module)

    def run(cmd, check=False, **kwargs):
        record["run"].append(list(cmd))
        if cmd[:2] == ["git", "clone"]:
            os.symlink(REPO, cmd[-1])  # the clone: the project itself
        return subprocess.CompletedProcess(cmd, 0)

    import huggingface_hub

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(huggingface_hub, "login", lambda token=None, **kw: record["login"].append(token))
    monkeypatch.setattr(huggingface_hub, "notebook_login", lambda **kw: record["login"].append("widget"))
    monkeypatch.setattr(kh.colab, "DRIVE_FOLDER", str(tmp_path / "drive"))
    monkeypatch.setattr(kh.colab, "detect_gpu_preset", lambda: "t4")  # a T4 runtime: its preset needs bitsandbytes
    monkeypatch.setenv("KONTEXT_PROJECT", str(tmp_path / "kontext-region-lora"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("KONTEXT_OUTPUT_DIR", "HF_HOME"):
        monkeypatch.setenv(name, "restored-after-the-test")
    monkeypatch.chdir(tmp_path)
    return record


def _run(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, "setup cell", "exec"), namespace)
    return namespace


def test_every_notebook_has_the_same_setup_cell():
    cells = {os.path.basename(p): _setup_cell(p) for p in NOTEBOOKS}
    assert len(set(cells.values())) == 1, f"the setup cells differ: {sorted(cells)}"
    assert _setup_cell().count("REPO_URL = ") == 1, "the repository is set in one place"


def test_the_placeholder_says_how_to_set_the_repository(colab):
    with pytest.raises(RuntimeError) as err:
        _run(_setup_cell())
    message = str(err.value)
    assert "Set REPO_URL" in message and "upload the project folder" in message, f"unclear message: {message}"
    assert colab["run"] == [], f"nothing may be cloned or installed from a placeholder: {colab['run']}"


def test_the_install_names_no_torch_ipykernel_or_dev_tool_and_the_token_stays_hidden(colab, capsys):
    source = _setup_cell().replace("https://github.com/OWNER/kontext-region-lora", "https://example.org/kr.git")
    _run(source)
    commands = colab["run"]
    assert commands[0][:2] == ["git", "clone"], f"the project is cloned first: {commands}"
    installs = [c for c in commands if "pip" in c]
    assert installs[0][-2:] == ["-q", "."], f"the package is installed from the clone: {installs}"
    for cmd in installs:
        named = [arg for arg in cmd[cmd.index("install") + 1:] if any(tool in arg for tool in DEV_TOOLS)]
        assert not named, f"the install line must not name torch, ipykernel or a dev tool: {cmd}"
    assert installs[-1][-1] == "bitsandbytes", f"a T4 preset (NF4, 8-bit AdamW) needs bitsandbytes: {installs}"
    assert colab["login"] == [TOKEN], "the HF_TOKEN secret logs in to the Hub"
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err, "the Hub token must never be printed"
    assert os.environ.get("WANDB_API_KEY") == WANDB_KEY, "the WANDB_API_KEY secret reaches wandb's variable"
    assert WANDB_KEY not in out.out + out.err, "the wandb key must never be printed"
    assert colab["mount"] == ["/content/drive"], "Drive is mounted by default"
    assert os.environ["HF_HOME"].startswith(kh.colab.DRIVE_FOLDER), "the Hub cache is on Drive by default"
    assert os.environ["KONTEXT_OUTPUT_DIR"].startswith(kh.colab.DRIVE_FOLDER), "outputs are on Drive by default"


def test_use_drive_false_keeps_the_runtime_disk_and_an_a100_needs_no_bitsandbytes(colab, monkeypatch):
    monkeypatch.setattr(kh.colab, "detect_gpu_preset", lambda: "a100-80")
    source = _setup_cell().replace("https://github.com/OWNER/kontext-region-lora", "https://example.org/kr.git")
    _run(source.replace("USE_DRIVE = True", "USE_DRIVE = False"))
    assert colab["mount"] == [], "USE_DRIVE = False must not mount Drive"
    assert os.environ["HF_HOME"] == "restored-after-the-test", "the Hub cache stays where it was"
    assert not any("bitsandbytes" in c for c in colab["run"]), "an A100 preset needs no bitsandbytes"


def test_outside_colab_the_setup_cell_installs_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.chdir(os.path.join(REPO, "notebooks"))
    namespace = _run(_setup_cell())
    assert calls == [], f"locally the setup cell must not install anything: {calls}"
    assert namespace["ROOT"] == REPO, "locally the setup cell finds the project folder"
    assert kh.colab_session() == {}, "colab_session does nothing outside Colab"
