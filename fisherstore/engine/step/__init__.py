"""One EMA step, from ``begin_step`` to settle: the writer, its resident side, and its value checks.

========================  ==============================================================
module                    job
========================  ==============================================================
:mod:`.writer`            :class:`StepWriter`: feeding a step, streaming what is not
                          resident, settling it whole (the one place a step is applied)
:mod:`.fills`             the resident side: each resident accumulator's twin, filled
:mod:`.checks`            what a squared gradient is (type, shape) and its values (NaN,
                          Inf, sign), read once per step so no hook waits for a device
========================  ==============================================================

Beneath it: :mod:`fisherstore.engine.generations` (the write path the step drives),
:mod:`fisherstore.engine.staging` (GPU to host), :mod:`fisherstore.spec.ema` (the maths).
docs/architecture.md draws the life of a step.
"""

from .writer import StepWriter

__all__ = ["StepWriter"]
