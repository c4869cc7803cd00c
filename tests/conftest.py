"""Shared fixtures: a small synthetic cohort (no data needed) and the real data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = (REPO / ".." / "shared" / "data" / "pet2023").resolve()


def pytest_configure(config):
    # keep synthetic cohorts of the tests out of the user's cache
    os.environ.setdefault("PETMONAI_CACHE", str(Path(config.rootpath) / ".pytest_cache" / "petmonai"))


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    """The shared challenge data; tests using it skip only where it is absent (CI has it)."""
    if not (REAL_DATA / "Train").is_dir():
        pytest.skip(f"real data not present at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """6 NC + 6 MCI training scans and 3 test scans of the synthetic phantom, made once per session."""
    from petmonai.data import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("cohort") / "pet", n_nc=6, n_mci=6, n_test=3, seed=3)


@pytest.fixture(scope="session")
def fast_config() -> list[str]:
    """Overrides that make a training run take seconds: small volumes, 2 folds, 2 epochs."""
    return [
        "spacing=[8.0, 8.0, 8.0]", "spatial_size=[24, 28, 24]", "crop_size=[20, 24, 20]",
        "cv.folds=2", "train.max_epochs=2", "train.batch_size=4", "train.progress_bar=false",
    ]


@pytest.fixture(autouse=True)
def _petmonai_logs_reach_caplog(monkeypatch):
    """A command run earlier in the session (``setup_logging``) stops the ``petmonai`` logger from
    propagating; tests that read its messages with ``caplog`` need them to reach the root logger."""
    import logging

    monkeypatch.setattr(logging.getLogger("petmonai"), "propagate", True)
