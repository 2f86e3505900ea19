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


# `scripts/test.sh` runs the suite on two pytest-xdist workers, a file at a time (--dist loadfile). The files
# with the longest module fixtures go first, so that neither worker is left running one of them alone at the
# end. Order only: the set of tests and what each asserts do not depend on it.
LONG_FILES_FIRST = (
    "tests/benchmarks/test_run_all.py",
    "tests/pipelines/test_ablate.py",
    "tests/pipelines/test_curate_adaptive.py",
    "tests/cluster/test_faults.py",
    "tests/pipelines/test_train_dpo.py",
    "tests/operators/test_generate.py",
    "tests/pipelines/test_bad_input.py",
)


def _file_rank(item) -> int:
    path = item.nodeid.split("::", 1)[0]
    return LONG_FILES_FIRST.index(path) if path in LONG_FILES_FIRST else len(LONG_FILES_FIRST)


def pytest_collection_modifyitems(config, items):
    import torch

    items.sort(key=_file_rank)  # stable: within a file, and among the other files, collection order stays
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

    try:
        init_ray(num_cpus=2, object_store_gb=1.0, progress=False)
    except Exception as e:  # Ray raises a bare Exception for this; only its start-up timeout is retried
        if "timed out during startup" not in str(e):
            raise
        # Ray gives its node 30 s to come up. With the suite on two workers beside other jobs on 2 cores, the
        # dashboard agent can take longer to import; one more try, after the first attempt's processes are gone.
        ray.shutdown()
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
