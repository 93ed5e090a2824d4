"""Session fixtures: tiny checkpoints and their bundles, built once per vision x text pair."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> Callable:
    """A function (vision, text) -> TinySetup, building each combination once per session."""
    from support import make_setup

    built = {}

    def get(vision: str, text: str):
        if (vision, text) not in built:
            built[vision, text] = make_setup(
                tmp_path_factory.mktemp(f"{vision}-{text}"), vision, text
            )
        return built[vision, text]

    return get
