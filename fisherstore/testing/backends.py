"""The :class:`~fisherstore.backends.ArrayBackend` conformance suite (see :mod:`fisherstore.testing`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from ..backends import ArrayBackend
from ..spec.codecs import CodecSpec
from ..spec.regions import chunk_region, full_region, iter_grid

__all__ = ["BackendTests"]

OpenBackend = Callable[..., ArrayBackend]
_ATTRS = {"fisherstore_param": {"name": "w", "layout": None}}


class BackendTests:
    """Every :class:`~fisherstore.backends.ArrayBackend` behaves the same through the interface.

    Subclasses provide the fixture ``open_backend``: a callable ``open_backend(read_only=False)``
    that opens the backend under test at one fresh location per test (each call the same
    location, so a second call sees what the first wrote, where the backend is persistent).
    """

    @pytest.fixture
    def open_backend(self) -> OpenBackend:  # pragma: no cover - every subclass defines it
        raise NotImplementedError("subclass BackendTests and define the open_backend fixture")

    @pytest.fixture
    def backend(self, open_backend: OpenBackend) -> Any:
        be = open_backend()
        be.ensure_root()
        yield be
        be.close()

    # -- documents ------------------------------------------------------------------------
    def test_a_document_reads_back_as_written_and_an_absent_one_is_none(self, backend: ArrayBackend) -> None:
        assert backend.read_json("t/zarr.json") is None
        doc = {"zarr_format": 3, "node_type": "group", "attributes": {"a": [1, 2.5, "x", None, {"b": True}]}}
        backend.write_json("t/zarr.json", doc)
        assert backend.read_json("t/zarr.json") == doc
        backend.write_json("t/zarr.json", {"replaced": 1}, durable=False)
        assert backend.read_json("t/zarr.json") == {"replaced": 1}

    def test_a_read_document_is_a_copy(self, backend: ArrayBackend) -> None:
        backend.write_json("zarr.json", {"a": {"b": 1}})
        got = backend.read_json("zarr.json")
        got["a"]["b"] = 2
        assert backend.read_json("zarr.json") == {"a": {"b": 1}}

    def test_the_version_of_a_document_changes_when_it_is_replaced(self, backend: ArrayBackend) -> None:
        backend.write_json("zarr.json", {"v": 1})
        first = backend.version("zarr.json")
        backend.write_json("zarr.json", {"v": 2})
        if backend.persistent:  # readers of a store on a medium notice a new commit by its version
            assert first is not None and backend.version("zarr.json") != first
            assert backend.version("nothing.json") is None
        else:  # one process's arrays: nothing else can replace them, so nothing is tracked
            assert first is None and backend.version("zarr.json") is None
        assert backend.exists()

    # -- arrays -------------------------------------------------------------------------------
    def test_an_array_reads_exactly_what_each_region_wrote(self, backend: ArrayBackend) -> None:
        shape, chunks = (10, 7), (4, 7)  # a partial last chunk
        backend.create_array("t/w/g00000001", shape, chunks, _ATTRS, CodecSpec())
        want = np.random.default_rng(0).random(shape, dtype=np.float32)
        for start in range(0, 10, 4):  # chunk-aligned slabs, as the write path writes them
            region = (slice(start, min(start + 4, 10)), slice(0, 7))
            backend.write("t/w/g00000001", region, want[region])
        got = backend.read("t/w/g00000001", full_region(shape))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(backend.read("t/w/g00000001", (slice(3, 9), slice(2, 5))), want[3:9, 2:5])
        np.testing.assert_array_equal(backend.read("t/w/g00000001", (slice(1, 10, 3), slice(0, 7, 2))),
                                      want[1:10:3, 0:7:2])

    def test_an_array_header_says_its_type_shape_and_chunks(self, backend: ArrayBackend) -> None:
        assert backend.array_meta("t/w/g00000001") is None
        backend.create_array("t/w/g00000001", (8, 3), (2, 3), _ATTRS, CodecSpec())
        meta = backend.array_meta("t/w/g00000001")
        assert (meta["data_type"], tuple(meta["shape"]), tuple(meta["chunks"])) == ("float32", (8, 3), (2, 3))

    def test_every_chunk_of_a_written_array_is_stored(self, backend: ArrayBackend) -> None:
        shape, chunks = (6, 4), (2, 4)
        backend.create_array("t/w/g00000001", shape, chunks, _ATTRS, CodecSpec())
        backend.write("t/w/g00000001", full_region(shape), np.zeros(shape, np.float32))  # zeros too
        assert backend.list_chunks("t/w/g00000001") == set(iter_grid(shape, chunks))
        assert backend.nbytes("t/w", chunks_only=True) >= 4 * 6 * 4

    def test_set_attributes_replaces_an_array_headers_attributes(self, backend: ArrayBackend) -> None:
        backend.create_array("t/w/g00000001", (2, 2), (1, 2), {"fisherstore_param": {"pending": True}}, CodecSpec())
        backend.set_attributes("t/w/g00000001", _ATTRS)
        assert backend.read_json("t/w/g00000001/zarr.json")["attributes"] == _ATTRS

    @pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
    def test_a_raw_array_holds_each_chunk_written_in_its_own_dtype(self, backend: ArrayBackend, dtype: str) -> None:
        import torch

        from ..backends.base import CARRIERS
        from ..spec.samples import TORCH_DTYPES, to_carrier

        shape, chunks = (3, 4, 6), (1, 2, 6)  # [samples, rows, cols], one sample by one head block
        backend.create_raw_array("t/w/s00000001", shape, chunks, dtype, _ATTRS, CodecSpec().json_codecs())
        values = to_carrier(torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(TORCH_DTYPES[dtype]))
        for coords in iter_grid(shape, chunks):
            backend.write_chunk("t/w/s00000001", coords, values[chunk_region(coords, shape, chunks)])
        got = backend.read_stored("t/w/s00000001", full_region(shape))
        assert got.dtype == np.dtype(CARRIERS[dtype])
        np.testing.assert_array_equal(got, values)  # bit for bit, bfloat16 by its bits
        np.testing.assert_array_equal(backend.read_stored("t/w/s00000001", (slice(1, 3), slice(2, 4), slice(0, 6))),
                                      values[1:3, 2:4])
        assert backend.array_meta("t/w/s00000001")["data_type"] == dtype

    # -- the tree ---------------------------------------------------------------------------
    def test_listing_shows_child_nodes_and_deleting_removes_a_subtree(self, backend: ArrayBackend) -> None:
        backend.write_json("zarr.json", {"root": True})
        backend.write_json("a/zarr.json", {})
        backend.create_array("a/w/g00000001", (2,), (2,), _ATTRS, CodecSpec())
        backend.create_array("a/v/g00000001", (2,), (2,), _ATTRS, CodecSpec())
        backend.write_json("b/zarr.json", {})
        assert backend.list("") == ["a", "b"]
        assert backend.list("a") == ["v", "w"]
        assert "g00000001" in backend.entries("a/w")
        backend.delete("a/w")
        assert backend.list("a") == ["v"] and backend.array_meta("a/w/g00000001") is None
        backend.delete("a/nothing")  # absent: no error
        backend.delete("a")
        assert backend.list("") == ["b"] and backend.read_json("zarr.json") == {"root": True}

    def test_a_clean_store_has_no_temp_files(self, backend: ArrayBackend) -> None:
        backend.write_json("zarr.json", {})
        backend.write_json("t/zarr.json", {})
        assert backend.temp_files() == []
        assert not backend.is_temp("zarr.json") and not backend.is_temp("t")

    def test_durability_calls_and_messages_work_on_any_backend(self, backend: ArrayBackend) -> None:
        backend.write_json("zarr.json", {})
        backend.sync()
        assert "t/w" in backend.url("t/w")
        assert isinstance(backend.io_counters(), dict)
        free = backend.free_bytes()
        assert free is None or free > 0

    # -- read-only, and reopening ---------------------------------------------------------------
    def test_a_read_only_backend_refuses_every_write(self, open_backend: OpenBackend,
                                                     backend: ArrayBackend) -> None:
        backend.write_json("zarr.json", {"v": 1})
        backend.create_array("t/w/g00000001", (2, 2), (1, 2), _ATTRS, CodecSpec())
        backend.sync()
        reader = open_backend(read_only=True)
        try:
            writes = [lambda: reader.write_json("zarr.json", {"v": 2}),
                      lambda: reader.create_array("t/x/g00000001", (2,), (2,), _ATTRS, CodecSpec()),
                      lambda: reader.create_raw_array("t/w/s00000001", (1, 2), (1, 2), "float32", _ATTRS,
                                                      CodecSpec().json_codecs()),
                      lambda: reader.delete("t")]
            if backend.persistent:  # a reader of a medium sees the array the writer made
                writes.append(lambda: reader.write("t/w/g00000001", full_region((2, 2)), np.ones((2, 2), np.float32)))
            for write in writes:
                with pytest.raises(PermissionError):
                    write()
            if backend.persistent:
                assert reader.read_json("zarr.json") == {"v": 1} and reader.array_meta("t/w/g00000001") is not None
        finally:
            reader.close()
        assert backend.read_json("zarr.json") == {"v": 1}  # the refused writes changed nothing

    def test_a_reopened_backend_sees_what_was_written_if_it_persists(self, open_backend: OpenBackend,
                                                                     backend: ArrayBackend) -> None:
        backend.write_json("zarr.json", {"v": 1})
        backend.create_array("t/w/g00000001", (4,), (2,), _ATTRS, CodecSpec())
        backend.write("t/w/g00000001", (slice(0, 4),), np.arange(4, dtype=np.float32))
        backend.sync()
        again = open_backend(read_only=True)
        try:
            if backend.persistent:
                assert again.read_json("zarr.json") == {"v": 1}
                np.testing.assert_array_equal(again.read("t/w/g00000001", (slice(0, 4),)), np.arange(4))
            else:  # nothing survives the object that held it
                assert again.read_json("zarr.json") is None and again.list("") == []
        finally:
            again.close()
