"""The adaptive replay rate (``replay: {rate: auto, hold: ...}``): a proportional-integral controller that keeps
a held-out set's loss within a budget of its value at the stage's start, and spends as little replay as does so.

The law, after the stage's evaluation ``k`` of the held set (``k = 0`` is the stage's start, whose loss ``L_0`` is
the reference; the rate until the next evaluation is ``start``)::

    budget = tolerance * L_0            (hold.tolerance, relative)   or   hold.absolute (nats)
    e_k    = (L_k - L_0) / budget - aim          the excess, in budgets, over the aimed share of the budget
    I_k    = I_{k-1} + e_k                       (not accumulated while the rate is pinned at min or max and e_k
                                                  pushes it further: no wind-up)
    rate_k = clip(start + gain * e_k + integral * I_k, min, max)

``aim`` (default 0.5) sets the point the controller steers to inside the budget, so that noise around it does not
cross the tolerance; ``gain`` and ``integral`` are replay share per budget. The rate is a pure function of the
losses evaluated so far in the stage, which the data stream keeps in its checkpoint state; every rank computes it
from the same all-reduced losses, so all apply it at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cpt.config import check, field


@dataclass
class HoldConfig:
    """What the automatic rate holds: an eval set's loss, within a relative or an absolute tolerance."""

    set: str = field(doc="the eval set (a name in eval.sets) whose loss is held")
    tolerance: Optional[float] = field(None, doc="accepted rise of its loss over the stage's start, relative "
                                                 "(0.03: 3%)")
    absolute: Optional[float] = field(None, doc="accepted rise of its loss in nats (instead of tolerance)")
    aim: float = field(0.5, doc="the share of the accepted rise the controller steers to")

    def __post_init__(self):
        check((self.tolerance is None) != (self.absolute is None), "tolerance",
              "give one of tolerance (relative) or absolute (nats)")
        for key in ("tolerance", "absolute"):
            value = getattr(self, key)
            check(value is None or value > 0, key, f"must be > 0, got {value}")
        check(0 <= self.aim <= 1, "aim", f"must be in [0, 1], got {self.aim}")

    def budget(self, start_loss: float) -> float:
        return self.absolute if self.absolute is not None else self.tolerance * start_loss

    def holds(self, start_loss: float, loss: float) -> bool:
        return loss - start_loss <= self.budget(start_loss)


@dataclass
class Controller:
    """The gains and bounds of the automatic rate (fields of the stage's ``replay``)."""

    hold: HoldConfig
    start: float
    min: float
    max: float
    gain: float
    integral: float

    def rates(self, losses: list[float]) -> list[float]:
        """The rate after each of a stage's evaluations of the held set (``losses[0]``: its start)."""
        if not losses:
            return []
        reference, budget = losses[0], self.hold.budget(losses[0])
        rates, accumulated = [self.start], 0.0
        for loss in losses[1:]:
            excess = (loss - reference) / budget - self.hold.aim
            raw = self.start + self.gain * excess + self.integral * (accumulated + excess)
            pinned = (raw > self.max and excess > 0) or (raw < self.min and excess < 0)
            if not pinned:
                accumulated += excess
            rates.append(min(self.max, max(self.min, self.start + self.gain * excess + self.integral * accumulated)))
        return rates
