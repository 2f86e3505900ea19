"""Session fixtures: one embedded local Ray and one set of tiny models for the whole test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Samples of public rated data that only the tests read (README "Data"); the demo's own samples, which some
# tests read too, are in pipelines/data/. Both ship in the repository, so a clone alone runs the suite.
TEST_DATA = Path(__file__).resolve().parent / "data"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """2 CPUs, a small object store: the shape of the CI machine."""
    import ray

    from pipelines.runtime.ray_start import init_ray

    init_ray(num_cpus=2, object_store_gb=1.0, progress=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Policy, tokenizer and reward models built once per session and loaded with real from_pretrained."""
    from pipelines.tools.tiny_models import build_tiny_models

    out = tmp_path_factory.mktemp("tiny_models")
    return build_tiny_models(out)


@pytest.fixture(scope="session")
def real_data() -> Path:
    return TEST_DATA
