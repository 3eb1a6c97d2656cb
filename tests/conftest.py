from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (GlaS for development and CI, see its README); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """A test may set torch's thread count (timings, trainings); the tests after it get the machine's back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
