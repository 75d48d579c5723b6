"""What fisherstore ships for testing: the conformance suite every storage backend passes.

Like zarr-python's ``zarr.testing.StoreTests``: :class:`BackendTests` is a pytest class
that tests the :class:`~fisherstore.backends.ArrayBackend` contract (documents, arrays,
raw per-sample arrays, the tree, capacity, read-only refusal, reopening) through the
interface alone. A backend's test module subclasses it once and says how to open one;
fisherstore's own ``tests/test_backends.py`` runs it on RAM, zarr and TensorStore, on a
local directory and on ``s3://`` (a moto server). Needs pytest.

Usage::

    class TestMyBackend(BackendTests):
        @pytest.fixture
        def open_backend(self, tmp_path):
            return lambda read_only=False: MyBackend(str(tmp_path / "s"), read_only=read_only)
"""

from .backends import BackendTests

__all__ = ["BackendTests"]
