import os
import socket
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import plugins_for_tests  # noqa: E402,F401  (registers the test plugins)

torch.set_num_threads(min(2, torch.get_num_threads()))

from pipelines_for_tests import FAMILIES, zoo_weights_present  # noqa: E402


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    if request.param.startswith("zoo:") and not zoo_weights_present(request.param):
        pytest.skip("zoo weights not exported yet (test_zoo.py::test_weights_are_shipped fails loudly)")
    return request.param


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton kernels run in its CPU interpreter (read at launch: see dit_accel/kernels/jit.py)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs offline: hub flags set, and any socket connection attempt fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse_connection(*args: Any, **kwargs: Any) -> None:
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse_connection)
    monkeypatch.setattr(socket, "create_connection", refuse_connection)
