"""Session fixtures: tiny checkpoints and their bundles, built once per vision x text pair."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Property tests run 100 examples each; VLMGUARD_FUZZ=1 selects the long fuzz run (5,000 each,
# or VLMGUARD_FUZZ_EXAMPLES). No deadlines: the CPU may be shared.
settings.register_profile("vlmguard", deadline=None, max_examples=100)
settings.register_profile(
    "fuzz",
    deadline=None,
    max_examples=int(os.environ.get("VLMGUARD_FUZZ_EXAMPLES", "5000")),
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("fuzz" if os.environ.get("VLMGUARD_FUZZ") else "vlmguard")


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


@pytest.fixture(scope="session")
def detector_bundle(tiny_setup: Callable, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny clip-llama model with every in-model guard and the default safety detector."""
    from vlmguard.export.exporter import export_bundle

    out = tmp_path_factory.mktemp("clip-llama-detector") / "bundle"
    return export_bundle(tiny_setup("clip", "llama").source, out, detector="default")
