import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import plugins_for_tests  # noqa: E402,F401  (registers the test plugins)

torch.set_num_threads(min(2, torch.get_num_threads()))

# The five families the foundation must support, plus the two video pipelines the tiny builders also cover.
FAMILIES = ["dit", "pixart-sigma", "sd3", "flux", "wan", "cogvideox", "ltx"]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
