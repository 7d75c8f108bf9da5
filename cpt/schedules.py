"""Learning-rate schedules: pure functions of the step within a stage.

Step convention: ``t`` counts completed optimizer steps in the stage, so the update that takes the stage
from ``t - 1`` to ``t`` completed steps uses ``lr(t)``, for ``t = 1 .. T``. A checkpoint only needs ``t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from cpt.config import check, field


@dataclass
class ScheduleConfig:
    kind: Literal["cosine"] = field("cosine", doc="schedule family")
    peak_lr: float = field(3e-4, doc="learning rate after warm-up")
    min_lr: Optional[float] = field(None, doc="final learning rate (default 0.1 * peak_lr)")
    warmup_steps: Optional[int] = field(None, doc="warm-up length in steps (overrides warmup_fraction)")
    warmup_fraction: float = field(0.02, doc="warm-up length as a fraction of the stage")

    def __post_init__(self):
        check(self.peak_lr > 0, "peak_lr", f"must be positive, got {self.peak_lr}")
        if self.min_lr is None:
            self.min_lr = 0.1 * self.peak_lr
        check(0 <= self.min_lr <= self.peak_lr, "min_lr", f"must be in [0, peak_lr={self.peak_lr}], got {self.min_lr}")
        check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0 <= self.warmup_fraction < 1, "warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps for a stage of ``total_steps``."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return round(self.warmup_fraction * total_steps)


def cosine_with_warmup(t: int, total: int, warmup: int, peak_lr: float, min_lr: float) -> float:
    """Linear warm-up then cosine decay to ``min_lr`` (re-warm / re-decay per stage).

    Gupta et al. 2023, "Continual Pre-Training of Large Language Models: How to (re)warm your model?";
    Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train LLMs":
    ``lr(t) = peak * t / T_w`` for ``t <= T_w``, else
    ``min + 0.5 * (peak - min) * (1 + cos(pi * (t - T_w) / (T - T_w)))``.
    """
    if 0 < warmup and t <= warmup:
        return peak_lr * t / warmup
    progress = min((t - warmup) / max(total - warmup, 1), 1.0)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


def lr_at(config: ScheduleConfig, t: int, total: int) -> float:
    """The learning rate of stage step ``t`` (1-based) in a stage of ``total`` steps."""
    return cosine_with_warmup(t, total, config.warmup_for(total), config.peak_lr, config.min_lr)
