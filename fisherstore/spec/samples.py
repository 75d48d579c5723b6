"""Per-sample gradients as the format holds them, and the maths Phase 6 does with them. No I/O.

A store keeps each sample's **signed** gradient ``g_i`` of its token-summed loss, with its
token count ``T_i`` (docs/format.md, "Per-sample gradients"). Everything else is derived
when it is read, by these functions (the out-of-core heat map alone fuses the same maths
into its tiled matmul, ``fisherstore.qkov.outofcore.weighted_gram``, taking ``T`` from
:func:`token_divisors`):

* ``C_i = g_i² / T_i``, the per-sample contribution (:func:`contributions`);
* ``g_i / T_i``, the gradient of the token-mean loss (:func:`signed`);
* ``mean_i C_i``, the contribution Fisher of a block (:func:`contribution_mean`).

A sample with no target token has ``T_i = 0``; it divides by 1, so its (zero) gradient
counts as zero rather than NaN.

Element types: ``float32``, ``float16`` and ``bfloat16`` (:data:`TORCH_DTYPES`); numpy has
no bfloat16, so its values travel as their bits in ``uint16`` (:func:`to_carrier`,
:func:`to_torch`).

Usage::

    >>> import torch
    >>> contributions(torch.tensor([[2.0], [3.0]]), torch.tensor([4, 0]))
    tensor([[1.],
            [9.]])
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["TORCH_DTYPES", "dtype_name", "to_torch", "to_carrier", "token_divisors", "contributions", "signed",
           "contribution_mean"]

#: The element types of per-sample arrays, by their Zarr v3 names.
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str | None:
    """The Zarr name of a torch dtype per-sample arrays store as it is (None: not one of them)."""
    return _NAMES.get(dtype)


def to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored array (bfloat16 held as its ``uint16`` bits) as a torch tensor of ``dtype``, sharing memory."""
    t = torch.from_numpy(np.require(a, requirements=["C", "W"]))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def to_carrier(x: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as numpy holds them on disk (bfloat16 by its bits)."""
    x = x.contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def token_divisors(tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``max(T_i, 1)``: what each sample's gradient is divided by (a sample with no target token by 1)."""
    return tokens.clamp_min(1).to(dtype)


def _per_sample(tokens: torch.Tensor, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`token_divisors` shaped to divide a ``[n, ...]`` tensor of ``ndim`` axes sample by sample."""
    return token_divisors(tokens, dtype).view(-1, *[1] * (ndim - 1))


def _as(g: torch.Tensor, dtype: torch.dtype, reuse: bool) -> tuple[torch.Tensor, bool]:
    """``g`` in ``dtype``, and whether it may be changed in place: new memory (``Tensor.to`` returns ``g``
    itself when it is ``dtype`` already), or ``g`` when the caller gives it up (``reuse``)."""
    x = g.to(dtype)
    return x, reuse or x is not g


def contributions(g: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                  reuse: bool = False) -> torch.Tensor:
    """``C_i = g_i² / max(T_i, 1)`` for ``g`` of shape ``[n, ...]`` and ``tokens`` ``[n]``, in ``dtype``.

    ``g`` is left as it is, unless ``reuse=True`` says it is a buffer the caller no longer needs.
    """
    x, own = _as(g, dtype, reuse)
    return (x.square_() if own else x.square()).div_(_per_sample(tokens, x.ndim, dtype))


def signed(g: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype = torch.float32, *,
           reuse: bool = False) -> torch.Tensor:
    """``g_i / max(T_i, 1)``, each sample's gradient of its token-mean loss, in ``dtype`` (``reuse``: as above)."""
    x, own = _as(g, dtype, reuse)
    t = _per_sample(tokens, x.ndim, dtype)
    return x.div_(t) if own else x / t


def contribution_mean(g: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``mean_i g_i² / max(T_i, 1)`` over the sample axis of ``g`` ``[n, ...]``, fp32: a block's contribution Fisher.

    One matmul of the per-sample weights with the squares, so ``g`` is read once.
    """
    scale = 1.0 / (token_divisors(tokens, torch.float64) * g.shape[0])
    # square() and not square_(): an fp32 ``g`` is the caller's tensor, which .float() does not copy
    return (scale.to(torch.float32) @ g.reshape(g.shape[0], -1).float().square()).reshape(g.shape[1:])
