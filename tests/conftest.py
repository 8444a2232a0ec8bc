"""Shared test helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OFFICIAL_FIXTURE = SHARED / "fixtures" / "official_hermes_resunet_b8.pt"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def official_fixture():
    if not OFFICIAL_FIXTURE.exists():
        pytest.skip(f"official fixture not found at {OFFICIAL_FIXTURE} (present in CI)")
    return torch.load(OFFICIAL_FIXTURE, map_location="cpu", weights_only=False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
