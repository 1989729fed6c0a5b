"""Shared test settings: the shared data as fixtures, the ``gpu`` marker's skip rule, and small
thread counts for a 2-core machine.

The read-only shared folder (slides, patch datasets, the published Keras weights) lies
beside the repository (``../shared``) or where ``NIC_SHARED`` points.  Tests reach it only
through the fixtures below, never by importing this module, so a checkout without it
collects every test and skips the ones that need it, each with the path it looked for.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]
_SHARED = Path(os.environ.get("NIC_SHARED", _REPO.parent / "shared"))


def _limit_threads() -> None:
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass


_limit_threads()


def _need(path: Path, what: str) -> Path:
    """``path``, or skip the test: the shared folder is an optional part of a checkout."""
    if not path.exists():
        pytest.skip(f"{what} not found at {path}; set NIC_SHARED to the shared folder (with data/ and weights/)")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    """The read-only shared folder (``../shared`` or ``$NIC_SHARED``); skips the test without it."""
    _need(_SHARED / "data", "shared data")
    return _SHARED


@pytest.fixture(scope="session")
def shared_data(shared: Path) -> Path:
    """``shared/data``: slides, patch datasets and tiles."""
    return shared / "data"


@pytest.fixture(scope="session")
def wsi_dir(shared: Path) -> Path:
    """``shared/data/wsi``: the real slides (CMU-1-Small-Region.svs, a pyramidal TIFF, a DICOM)."""
    return _need(shared / "data" / "wsi", "shared slides")


@pytest.fixture(scope="session")
def keras_dir(shared: Path) -> Path:
    """``shared/weights/nic-keras``: the published NIC Keras encoders and their reference codes."""
    return _need(shared / "weights" / "nic-keras", "published Keras weights")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip, with the reason, where torch sees no CUDA device."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """nic-cnn with seed-0 random weights, saved in the project's format (read-only)."""
    import torch

    import nic

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("encoder") / "nic-cnn-seed0"
    nic.save_encoder(nic.create_encoder("nic-cnn"), d)
    return d


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """torch on one thread during a test: tiny nets run ~10x faster than on 2 busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
