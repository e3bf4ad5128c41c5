import os
import socket
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import plugins_for_tests  # noqa: E402,F401  (registers the test plugins)

torch.set_num_threads(min(2, torch.get_num_threads()))

# Every pipeline family the README lists (DiT, PixArt, SD3, FLUX, Wan, Qwen-Image, HunyuanVideo), the two other
# video pipelines the tiny builders cover, and the two trained zoo models (when their weights are in the package).
FAMILIES = ["dit", "pixart-sigma", "sd3", "flux", "wan", "cogvideox", "ltx", "qwen-image", "hunyuan-video",
            "zoo:dit", "zoo:mmdit"]


def zoo_weights_present(name: str) -> bool:
    from dit_accel.pipelines.zoo.pipelines import WEIGHTS

    return (WEIGHTS / name.split(":")[1] / "model.safetensors").is_file()


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
