"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture
def data_dir() -> Path:
    """The offline data folder: $SAAP_EDGE_DATA_DIR, else /work/shared/data next to the repo."""
    env = os.environ.get("SAAP_EDGE_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
