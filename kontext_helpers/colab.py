"""Colab: what the notebooks' setup cell does after installing the package.

:func:`colab_session` keeps outputs and the Hugging Face cache on Google Drive (the real model is about
35 GB: downloaded once, not once per notebook), logs in to the Hub from the ``HF_TOKEN`` secret (or with
``notebook_login()``) without printing the token, passes a ``WANDB_API_KEY`` secret on to wandb (for
``report_to="wandb"``), and installs bitsandbytes only on a GPU whose preset
needs it (NF4 or 8-bit AdamW). Outside Colab nothing here runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .config import GPU_PRESETS, detect_gpu_preset

DRIVE_FOLDER = "/content/drive/MyDrive/kontext-region-lora"  # outputs/ and hf-cache/ live here in Colab


def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules


def _use_drive(folder: str) -> dict[str, str]:
    """Mount Drive; outputs and the Hub cache go to ``folder`` (set before the Hub library is imported)."""
    from google.colab import drive

    drive.mount("/content/drive")
    paths = {"KONTEXT_OUTPUT_DIR": os.path.join(folder, "outputs"), "HF_HOME": os.path.join(folder, "hf-cache")}
    for name, path in paths.items():
        os.makedirs(path, exist_ok=True)
        os.environ[name] = path
    return paths


def _hub_login() -> str:
    """Log in with the Colab secret ``HF_TOKEN`` when it exists, else with ``notebook_login()``; never prints it."""
    import huggingface_hub

    token = _colab_secret("HF_TOKEN")
    if token:
        huggingface_hub.login(token=token, add_to_git_credential=False)
        return "logged in with the HF_TOKEN secret"
    huggingface_hub.notebook_login()
    return "log in with the widget above (or add an HF_TOKEN secret under the key icon)"


def _colab_secret(name: str) -> str | None:
    """The Colab secret ``name``, or ``None`` (no such secret, or the notebook has no access to it)."""
    try:
        from google.colab import userdata

        return userdata.get(name)
    except Exception:  # userdata raises its own errors for a missing or refused secret
        return None


def _wandb_key() -> str:
    """Put the Colab secret ``WANDB_API_KEY`` where wandb reads it (the environment); never prints it."""
    key = _colab_secret("WANDB_API_KEY")
    if not key:
        return "no WANDB_API_KEY secret (only report_to='wandb' needs one)"
    os.environ["WANDB_API_KEY"] = key
    return "WANDB_API_KEY set from the secret (report_to='wandb' logs in with it)"


def _bitsandbytes_if_needed(preset: str) -> str:
    """``pip install bitsandbytes`` on CUDA when the preset quantizes the base (NF4) or uses 8-bit AdamW."""
    settings = GPU_PRESETS[preset]
    if settings.get("quantize_base") != "nf4" and settings.get("optimizer") != "adamw8bit":
        return "not needed"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "bitsandbytes"], check=True)
    return "installed (NF4 / 8-bit AdamW)"


def colab_session(*, use_drive: bool = True, login: bool = True, drive_folder: str | None = None) -> dict:
    """Prepare a Colab runtime for the course; returns (and prints) what it did. Does nothing outside Colab.

    Args:
        use_drive: keep outputs and the Hub cache on Google Drive (``False``: the runtime's own disk, lost
            when it ends, and the real model is downloaded again in every session).
        login: log in to the Hub (FLUX.1 Kontext [dev] is gated: accept its licence on the Hub first).
        drive_folder: the Drive folder for ``outputs/`` and ``hf-cache/`` (default :data:`DRIVE_FOLDER`).
    """
    if not in_colab():
        return {}
    preset = detect_gpu_preset()
    done = {"gpu preset": preset}
    if use_drive:
        done.update(_use_drive(drive_folder or DRIVE_FOLDER))
    if login:
        done["hub"] = _hub_login()
    done["wandb"] = _wandb_key()
    done["bitsandbytes"] = _bitsandbytes_if_needed(preset)
    for key, value in done.items():
        print(f"{key:>18}: {value}")
    return done
