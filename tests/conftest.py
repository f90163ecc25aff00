"""Shared fixtures: the tiny pipeline is built once per test session (about a second)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import kontext_helpers as kh  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    """A shared tiny FluxKontextPipeline with IP-Adapter. Tests must not modify it; build a fresh one to do so."""
    return kh.load_pipeline("tiny", seed=0)
