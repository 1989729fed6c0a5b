"""Shared test settings: where ../shared lies, and small thread counts for a 2-core machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NIC_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
WSI = DATA / "wsi"
KERAS = SHARED / "weights" / "nic-keras"


def _limit_threads() -> None:
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass


_limit_threads()


@pytest.fixture(scope="session")
def shared() -> Path:
    """The read-only shared data folder (../shared beside the repository)."""
    if not DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED}; set NIC_SHARED to its path")
    return SHARED


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """torch on one thread during a test: tiny nets run ~10x faster than on 2 busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
