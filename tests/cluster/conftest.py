"""One uninterrupted local run of the rated curation, the reference that cluster and fault runs must equal."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.helpers import RATED_CONFIG, RATED_OVERRIDES


@pytest.fixture(scope="session")
def rated_reference(ray_local, tmp_path_factory) -> Path:
    from pipelines import curate
    from pipelines.runtime.config import CurateConfig, load_config

    out = tmp_path_factory.mktemp("rated_reference")
    cfg = load_config(CurateConfig, RATED_CONFIG, [*RATED_OVERRIDES, f"output.dir={out}"])
    curate.main(cfg)
    return out
