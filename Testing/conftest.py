"""Shared fixtures: where the real CT volumes and the bundled model live."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__import__("os").environ.get("MAXQUERY_SHARED", REPO.parent / "shared"))
REAL = SHARED / "data" / "real"


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not REAL.is_dir():
        pytest.fail(f"the real CT volumes are expected in {REAL} (set MAXQUERY_SHARED to the shared folder)")
    return REAL
