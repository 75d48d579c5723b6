"""Exact EMA maths for squared gradients (docs/design.md, "The EMA"). Pure functions on tensors; no I/O.

State per (task, parameter): ``F`` (fp32, the parameter's shape), the step ``t_last`` at
which ``F`` was last brought up to date, and the decay ``β``.

* ``F_0 = 0`` and ``F_t = β·F_{t-1} + (1-β)·x_t``.
* Bias-corrected readout: ``F̂_t = F_t / (1 - β^t)``; a constant input reads back as itself.
* Lazy decay: a parameter without a gradient at a step has ``x = 0``; instead of rewriting
  it, its value at task step ``t`` is ``F·β^(t - t_last)``.
* Write-back folding: steps accumulated in RAM as ``A ← β^Δ·A + (1-β)·x`` (``A_0 = 0``)
  fold into the stored state as ``F ← β^(a_last - t_last)·F + A``.

Usage::

    >>> import torch
    >>> F = torch.zeros(3)
    >>> accumulate_(F, step_weight(0.99) * torch.ones(3), beta=0.99, steps_since=1)
    >>> float(F[0] / bias_correction(0.99, 1))
    1.0
"""

from __future__ import annotations

import math

import torch

from ..errors import InvalidArgumentError, PrecisionError

__all__ = [
    "STATE_DTYPE",
    "validate_decay",
    "check_state_dtype",
    "decay_factor",
    "bias_correction",
    "readout_scale",
    "step_weight",
    "accumulate_",
    "fold",
]

#: EMA state is always fp32 on disk and in RAM (docs/design.md, "Precision").
STATE_DTYPE = torch.float32

NONFINITE_POLICIES = ("raise", "skip")


def validate_decay(beta: float, name: str = "decay") -> float:
    """Return ``beta`` as a float if ``0 < beta < 1``, else raise ``ValueError``."""
    try:
        b = float(beta)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a number in (0, 1), got {beta!r}") from None
    if not (0.0 < b < 1.0) or math.isnan(b):
        raise InvalidArgumentError(
            f"{name} must satisfy 0 < {name} < 1 (0.99 is usual), got {beta!r}: "
            "at 0 the EMA forgets everything and at 1 it never learns"
        )
    return b


def check_state_dtype(dtype: object) -> None:
    """Refuse EMA state dtypes that would silently destroy small Fisher values."""
    name = str(dtype).replace("torch.", "").replace("<class 'numpy.", "").rstrip("'>")
    if name in ("float32", "f4", "<f4"):
        return
    if name in ("float16", "f2", "half", "<f2"):
        raise PrecisionError(
            "an fp16 EMA store is refused: realistic grad²/T values (1e-8 to 1e-12) round to 0 "
            "in fp16 (about 97% of them), and values above 65504 overflow to inf. Keep the "
            "default float32, or pass lossy_keepbits=10 for a compressed fp32 store with a "
            "bounded relative error."
        )
    if name in ("bfloat16",):
        raise PrecisionError(
            "a bf16 EMA store is refused: a read-modify-write stalls once (1-β)·x drops below "
            "half an ulp, biasing the EMA by about +1% after 300 steps. Keep float32, or pass "
            "lossy_keepbits=10 for a compressed fp32 store with a bounded relative error."
        )
    raise PrecisionError(f"EMA state dtype must be float32, got {dtype!r}")


def decay_factor(beta: float, steps: int) -> float:
    """``β^steps`` in float64 (exact enough for any step count)."""
    if steps < 0:
        raise InvalidArgumentError(f"cannot decay backwards in time (steps={steps})")
    return beta**steps


def bias_correction(beta: float, t: int) -> float:
    """``1 - β^t``; 0 at ``t = 0``."""
    return 1.0 - beta**t if t > 0 else 0.0


def readout_scale(beta: float, t: int, t_last: int, bias_corrected: bool) -> float:
    """Factor turning stored ``F`` (current at ``t_last``) into the value at task step ``t``.

    At ``t = 0`` nothing has been observed and the value is 0, not ``0/0``.
    """
    if t <= 0:
        return 0.0
    scale = decay_factor(beta, t - t_last)
    if bias_corrected:
        scale /= bias_correction(beta, t)
    return scale


def step_weight(beta: float, tokens: int | None = None) -> float:
    """Weight of one step's input: ``(1-β)``, divided by the token count when given."""
    return (1.0 - beta) / (tokens or 1)


def accumulate_(acc: torch.Tensor, contribution: torch.Tensor, beta: float, steps_since: int) -> None:
    """In place: ``acc ← β^steps_since · acc + contribution``.

    ``contribution`` is one step's weighted input, ``step_weight(β, T)·x``.
    ``steps_since`` is how many task steps passed since ``acc`` was last current; the
    steps in between had ``x = 0`` (lazy decay).
    """
    if steps_since:
        acc.mul_(decay_factor(beta, steps_since))
    acc.add_(contribution)


def fold(F: torch.Tensor, A: torch.Tensor, beta: float, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``β^k·F + A``: ``k`` steps accumulated in ``A`` folded into stored state ``F``."""
    out = F if out is None else out
    torch.mul(F, decay_factor(beta, k), out=out)
    return out.add_(A)
