"""LazyFisher: a tensor-like view of one stored Fisher EMA that reads slices on demand.

Slicing returns a float32 ``torch.Tensor`` and reads only the chunks the slice touches,
so ``lazy[h*d:(h+1)*d, :]`` on a head-chunked array reads one chunk. ``.detach()``,
``.to(...)``, ``.float()`` and ``.cpu()`` return lazy views too, so code written for
tensors (TensorScope's Phase 6 casts before it slices) runs unchanged.

Usage::

    F = store.fisher("taskA", "model.layers.0.self_attn.q_proj.weight")
    F.head(5, "Q")            # rows 5*d:(5+1)*d, one chunk read
    F[640:768][:, :128]       # the same rows, then columns in memory

Other libraries take it as an array (docs/views.md). Lazily, chunk by chunk:
``da.from_array(F)`` (Dask reads through :meth:`LazyFisher.copy`, a numpy-flavoured lazy
view). By loading the whole tensor (as ``F.load()`` does): ``np.asarray(F)`` and numpy
functions (``__array__``, ``__array_function__``), ``torch.as_tensor(F)`` (``__dlpack__``),
``torch.sum(F)`` and tensor methods (``__torch_function__``) and arithmetic (``F * 2``).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import HeadIndexError, InvalidArgumentError
from ..spec.indexing import plan_index
from ..spec.layout import ParamLayout

__all__ = ["LazyFisher", "LazyArray", "FisherSource"]


class _ParamInfo(Protocol):
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    layout: ParamLayout | None


class FisherSource(Protocol):
    """What a LazyFisher reads from: :class:`~fisherstore.store.FisherStore` is one."""

    backend_name: str

    def param(self, task: str, name: str) -> _ParamInfo: ...

    def read(self, task: str, name: str, region: tuple[slice, ...] | None = None, *,
             bias_corrected: bool = True) -> torch.Tensor: ...

    def step(self, task: str) -> int: ...

    def revision(self, task: str) -> Hashable: ...

    def iter_heads(self, task: str, names: Sequence[str] | None = None, block: str | None = None,
                   workers: int = 4, *, bias_corrected: bool = True) -> Iterator[tuple[str, int, str, torch.Tensor]]: ...


class LazyFisher:
    """A lazily read Fisher tensor. Get one from :meth:`FisherStore.fisher`."""

    __slots__ = ("_source", "task", "name", "bias_corrected", "_dtype", "_device")

    def __init__(
        self,
        source: FisherSource,
        task: str,
        name: str,
        *,
        bias_corrected: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self._source = source
        self.task = task
        self.name = name
        self.bias_corrected = bias_corrected
        self._dtype = dtype
        self._device = torch.device(device)

    # -- tensor-like attributes ---------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._source.param(self.task, self.name).shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def layout(self) -> ParamLayout | None:
        """The parameter's head layout (None for a tensor without heads)."""
        return self._source.param(self.task, self.name).layout

    @property
    def chunks(self) -> tuple[int, ...]:
        return self._source.param(self.task, self.name).chunks

    @property
    def cache_key(self) -> Hashable:
        """Equal for two views that read the same values (same store, task, tensor, step and view)."""
        return (self._source.revision(self.task), self.task, self.name, self.bias_corrected)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.ndim

    def numel(self) -> int:
        return self.shape.numel()

    def __len__(self) -> int:
        if not self.ndim:
            raise InvalidArgumentError("len() of a 0-d LazyFisher")
        return self.shape[0]

    # -- lazy conversions ---------------------------------------------------------------
    def _view(self, dtype: torch.dtype | None = None, device: Any = None) -> LazyFisher:
        return LazyFisher(
            self._source,
            self.task,
            self.name,
            bias_corrected=self.bias_corrected,
            dtype=dtype or self._dtype,
            device=device if device is not None else self._device,
        )

    def detach(self) -> LazyFisher:
        """Itself: a stored Fisher has no autograd history."""
        return self

    def to(self, *args: Any, **kwargs: Any) -> LazyFisher:
        """A lazy view that casts/moves what it reads (``non_blocking`` and ``copy`` are accepted)."""
        dtype, device = kwargs.pop("dtype", None), kwargs.pop("device", None)
        kwargs.pop("non_blocking", None), kwargs.pop("copy", None), kwargs.pop("memory_format", None)
        if kwargs:
            raise InvalidArgumentError(f"LazyFisher.to() got unexpected arguments {sorted(kwargs)}")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = a
            elif isinstance(a, torch.Tensor):
                dtype, device = a.dtype, a.device
            else:
                raise InvalidArgumentError(f"LazyFisher.to() cannot take {a!r}")
        return self._view(dtype, device)

    def float(self) -> LazyFisher:
        return self._view(torch.float32)

    def cpu(self) -> LazyFisher:
        return self._view(device="cpu")

    def contiguous(self) -> LazyFisher:
        return self

    # -- reading ------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> torch.Tensor:
        region, flips, squeeze, empty = plan_index(key, tuple(self.shape), self.name)
        if empty:
            out = torch.zeros(empty, dtype=torch.float32)
        else:
            out = self._source.read(self.task, self.name, region, bias_corrected=self.bias_corrected)
            if flips:
                out = out.flip(flips)
            if squeeze:
                out = out[tuple(0 if d in squeeze else slice(None) for d in range(out.ndim))]
        return self._finish(out)

    def head(self, head: int, block: str) -> torch.Tensor:
        """The (head, block) slice, block in Q/K/V/O; reads exactly one chunk.

        Raises :class:`~fisherstore.errors.HeadIndexError` for a head outside ``[0, H)``
        or a block this parameter does not hold; it never returns an empty tensor.
        """
        info = self._source.param(self.task, self.name)
        layout = info.layout
        if layout is None:
            raise HeadIndexError(
                f"parameter {self.name!r} of task {self.task!r} has no head layout; slice it "
                "directly, or create it with a ParamLayout"
            )
        # The region straight from the layout (one lookup, no index planning): a head-block read is
        # a latency benchmarked against numpy.memmap, where every 10 µs shows.
        start, stop = layout.head_range(head, block)
        region = tuple(slice(start, stop, 1) if ax == layout.head_axis else slice(0, n, 1)
                       for ax, n in enumerate(info.shape))
        return self._finish(self._source.read(self.task, self.name, region, bias_corrected=self.bias_corrected))

    def iter_heads(self, block: str | None = None, workers: int = 4) -> Iterator[tuple[int, str, torch.Tensor]]:
        """Yield ``(head, block, tensor)`` for every distinct head block, reading ahead.

        K and V blocks are yielded once per key/value head (``head`` is the first query
        head of its group). See :meth:`FisherStore.iter_heads` to sweep many parameters
        with one read-ahead window.
        """
        for _name, h, b, t in self._source.iter_heads(self.task, [self.name], block, workers,
                                                      bias_corrected=self.bias_corrected):
            yield h, b, self._finish(t)

    def load(self) -> torch.Tensor:
        """The whole tensor, read into RAM."""
        return self[...]

    def numpy(self) -> np.ndarray:
        """The whole tensor as a numpy array (read into RAM)."""
        t = self.load().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16

    # -- other libraries: numpy, Dask, torch ------------------------------------------------
    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """``np.asarray(F)``: loads the whole tensor (always a fresh array: nothing to share)."""
        a = self.numpy()
        return a.astype(dtype, copy=False) if dtype is not None else a

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        """Numpy functions (``np.mean(F, axis=0)``) load every LazyFisher argument, then run on numpy."""
        return func(*_loaded(args, np.asarray), **_loaded(kwargs, np.asarray))

    def copy(self) -> LazyArray:
        """A numpy-flavoured lazy view of the same values: slicing it returns ``np.ndarray``.

        ``dask.array.from_array(F)`` works through this: Dask copies an array-like before it
        wraps it, and reads the copy chunk by chunk. Nothing is read here.
        """
        return LazyArray(self)

    def __dask_tokenize__(self) -> Hashable:
        return ("LazyFisher", self.cache_key, str(self._dtype), str(self._device))

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """``torch.sum(F)``, ``t + F``, ``torch.Tensor.mean(F)``: load F, then run the function.

        ``torch.zeros_like(F)`` and the other ``*_like`` factories need only the shape, so
        they read nothing.
        """
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _LIKE and args and isinstance(args[0], LazyFisher):
            f = args[0]
            args = (torch.empty((), dtype=f.dtype, device=f.device).expand(tuple(f.shape)), *args[1:])
        return func(*_loaded(args, _load), **_loaded(kwargs, _load))

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        """``torch.as_tensor(F)`` / ``torch.tensor(F)``: hands over a loaded tensor."""
        return self.load().__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> tuple[Any, int]:
        return torch.empty(0, device=self._device).__dlpack_device__()

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        if self._dtype != torch.float32 or self._device.type != "cpu":
            out = out.to(dtype=self._dtype, device=self._device)
        return out

    def __repr__(self) -> str:
        try:
            shape = tuple(self.shape)
            step = self._source.step(self.task)
        except Exception:  # a closed store still gets a readable repr
            return f"LazyFisher(task={self.task!r}, name={self.name!r}, <store closed>)"
        lay = f", layout={self.layout!r}" if self.layout else ""
        extra = "" if self.bias_corrected else ", bias_corrected=False"
        if self._dtype != torch.float32:
            extra += f", dtype={self._dtype}"
        return (
            f"LazyFisher(task={self.task!r}, name={self.name!r}, shape={shape}{lay}, step={step}, "
            f"backend={self._source.backend_name!r}{extra})"
        )


#: ``*_like`` factories: they take a tensor only for its shape, dtype and device.
_LIKE = frozenset({"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like"})


def _load(x: LazyFisher) -> torch.Tensor:
    return x.load()


def _loaded(obj: Any, convert: Any) -> Any:
    """``obj`` with every LazyFisher in it (also inside lists, tuples and dicts) converted."""
    if isinstance(obj, LazyFisher):
        return convert(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_loaded(o, convert) for o in obj)
    if isinstance(obj, dict):
        return {k: _loaded(v, convert) for k, v in obj.items()}
    return obj


def _operator(name: str) -> Any:
    def op(self: LazyFisher, *other: Any) -> Any:
        return getattr(self.load(), name)(*_loaded(other, _load))

    op.__name__ = name
    op.__doc__ = f"``{name}`` of the loaded tensor (reads the whole tensor)."
    return op


# Arithmetic loads the tensor and does what torch does (``F * 2`` is a tensor). Comparisons
# are left out on purpose: ``==`` must stay identity, so a LazyFisher stays hashable.
for _name in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "floordiv", "rfloordiv", "pow",
              "rpow", "matmul", "rmatmul", "neg", "pos", "abs"):
    setattr(LazyFisher, f"__{_name}__", _operator(f"__{_name}__"))
del _name

_NUMPY_DTYPES = {torch.float32: np.dtype("float32"), torch.float64: np.dtype("float64"),
                 torch.float16: np.dtype("float16"), torch.bfloat16: np.dtype("float32")}


class LazyArray:
    """A numpy-flavoured lazy view of a :class:`LazyFisher`: slicing returns ``np.ndarray``.

    What Dask and numpy-minded code read through (``da.from_array(F.copy(), chunks=...)``);
    it reads exactly the chunks a slice touches. ``dtype`` is a numpy dtype (bfloat16
    views read as float32).
    """

    __slots__ = ("fisher",)

    def __init__(self, fisher: LazyFisher) -> None:
        self.fisher = fisher

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.fisher.shape)

    @property
    def ndim(self) -> int:
        return self.fisher.ndim

    @property
    def dtype(self) -> np.dtype:
        return _NUMPY_DTYPES.get(self.fisher.dtype, np.dtype("float32"))

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.fisher.chunks

    @property
    def size(self) -> int:
        return self.fisher.numel()

    def __len__(self) -> int:
        return len(self.fisher)

    def __getitem__(self, key: Any) -> np.ndarray:
        t = self.fisher[key].cpu()
        return np.asarray(t.float() if t.dtype == torch.bfloat16 else t)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.fisher, dtype=dtype)

    def __dask_tokenize__(self) -> Hashable:
        return ("LazyArray", self.fisher.__dask_tokenize__())

    def __repr__(self) -> str:
        return f"LazyArray({self.fisher!r})"
