import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fisherstore  # noqa: E402

BACKENDS = ["ram", "zarr", "tensorstore"]
DISK_BACKENDS = ["zarr", "tensorstore"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=DISK_BACKENDS)
def disk_backend(request):
    return request.param


@pytest.fixture
def open_store(tmp_path):
    """open_store(backend, **kw) -> a new store in a fresh directory (closed at teardown)."""
    opened = []

    def _open(backend="zarr", mode="w", sub="store", **kw):
        s = fisherstore.open(tmp_path / sub, mode=mode, backend=backend, **kw)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        if not s.closed:
            s.close()
