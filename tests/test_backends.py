"""The backend conformance suite (:class:`fisherstore.testing.BackendTests`) on every backend fisherstore has.

RAM, zarr and TensorStore, on a local directory, and zarr and TensorStore on ``s3://``
(a real moto server): one class each, the same tests.
"""

from __future__ import annotations

import pytest

from fisherstore.backends import make_backend
from fisherstore.testing import BackendTests


class TestRamBackend(BackendTests):
    @pytest.fixture
    def open_backend(self):
        return lambda read_only=False: make_backend("ram", None, read_only=read_only)


class TestZarrBackend(BackendTests):
    @pytest.fixture
    def open_backend(self, tmp_path):
        return lambda read_only=False: make_backend("zarr", str(tmp_path / "store"), read_only=read_only)


class TestTensorStoreBackend(BackendTests):
    @pytest.fixture
    def open_backend(self, tmp_path):
        return lambda read_only=False: make_backend("tensorstore", str(tmp_path / "store"), read_only=read_only)


class TestZarrBackendOnS3(BackendTests):
    @pytest.fixture
    def open_backend(self, s3):
        url = s3()
        return lambda read_only=False: make_backend("zarr", url, read_only=read_only)


class TestTensorStoreBackendOnS3(BackendTests):
    @pytest.fixture
    def open_backend(self, s3):
        url = s3()
        return lambda read_only=False: make_backend("tensorstore", url, read_only=read_only)
