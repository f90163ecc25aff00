"""Shared fixtures: the tiny pipeline is built once per test session (about a second)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import kontext_helpers as kh  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipe():
    """A shared tiny FluxKontextPipeline with IP-Adapter. Tests must not modify it; build a fresh one to do so."""
    return kh.load_pipeline("tiny", seed=0)


@pytest.fixture(scope="session", autouse=True)
def one_cpu_thread():
    """The tiny model's matrices are so small that thread start-up dominates, and two OpenMP threads on a
    busy 2-core machine can be tens of times slower than one. Subprocess tests set OMP_NUM_THREADS=1 too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
