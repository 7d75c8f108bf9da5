"""Learning-rate schedules: pure functions of the step within a stage.

Step convention: ``t`` counts completed optimizer steps in the stage, so the update that takes the stage
from ``t - 1`` to ``t`` completed steps uses ``lr(t)``, for ``t = 1 .. T``; ``lr(0)`` is the value before
any step. A checkpoint only needs ``t``. Every kind starts with an optional linear warm-up from 0 to
``peak_lr`` over ``T_w`` steps; steps past the end of the stage keep the final value.

Phase lengths are given in steps or as fractions of the stage (steps win when both are set). Fractions are
resolved with ``round(fraction * T)`` when the stage length ``T`` is known; their sum is checked when the
recipe loads, and a one-step rounding excess is taken from the later phase. Phases that do not fit a stage
of known length are reported by :meth:`ScheduleConfig.validate_length`; ``lr_at`` itself never fails on
them (it clamps each phase to what the earlier ones leave).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

from cpt.config import check, field

Kind = Literal["cosine", "wsd", "infinite", "constant", "inverse_sqrt", "linear"]
CooldownShape = Literal["linear", "1-sqrt", "cosine", "exponential", "inv_sqrt"]

# Which optional keys each kind reads; any other one set in a recipe is an error naming it.
_KEYS_FOR = {
    "min_lr": ("cosine", "linear", "wsd", "infinite"),
    "cooldown_steps": ("wsd", "infinite"),
    "cooldown_fraction": ("wsd", "infinite"),
    "cooldown_shape": ("wsd", "infinite"),
    "const_lr": ("infinite",),
    "timescale": ("infinite",),
    "anneal_steps": ("infinite",),
    "anneal_fraction": ("infinite",),
}
_SHAPES_FOR = {"wsd": ("linear", "1-sqrt", "cosine", "exponential"), "infinite": ("cosine", "inv_sqrt")}
_DEFAULT_SHAPE = {"wsd": "1-sqrt", "infinite": "cosine"}
# Hägele et al. find a 10-20% cooldown matches a tuned cosine; Ibrahim et al.'s 405M runs cool down over 60%.
_DEFAULT_COOLDOWN_FRACTION = {"wsd": 0.2, "infinite": 0.6}
DEFAULT_TIMESCALE = 10.0


@dataclass
class ScheduleConfig:
    kind: Kind = field("cosine", doc="schedule family: cosine, wsd, infinite, constant, inverse_sqrt or linear")
    peak_lr: float = field(3e-4, doc="learning rate after warm-up (the optimizer is created with it)")
    min_lr: Optional[float] = field(
        None, doc="final learning rate: end of the decay (cosine, linear), of the cooldown (wsd) or of the "
                  "anneal (infinite, only with anneal_*); default 0.1 * peak_lr")
    warmup_steps: Optional[int] = field(None, doc="warm-up length in steps (overrides warmup_fraction)")
    warmup_fraction: float = field(0.02, doc="warm-up length as a fraction of the stage")
    cooldown_steps: Optional[int] = field(
        None, doc="wsd, infinite: cooldown length in steps (overrides cooldown_fraction; 0 = no cooldown)")
    cooldown_fraction: Optional[float] = field(
        None, doc="wsd, infinite: cooldown length as a fraction of the stage (default wsd 0.2, infinite 0.6)")
    cooldown_shape: Optional[CooldownShape] = field(
        None, doc="wsd: linear, 1-sqrt (default), cosine or exponential; infinite: cosine (default) or inv_sqrt")
    const_lr: Optional[float] = field(
        None, doc="infinite (required): the learning rate held after the cooldown, in (min_lr, peak_lr]")
    timescale: Optional[float] = field(
        None, doc="infinite with cooldown_shape inv_sqrt: alpha of 1/sqrt(1 + alpha*x) (default 10, as every "
                  "config of the authors' gpt-neox fork)")
    anneal_steps: Optional[int] = field(
        None, doc="infinite: exponential anneal from const_lr to min_lr over the last N steps (overrides "
                  "anneal_fraction; default no anneal)")
    anneal_fraction: Optional[float] = field(
        None, doc="infinite: anneal length as a fraction of the stage (1.0 = anneal the whole stage)")

    def __post_init__(self):
        kind = self.kind
        for key, kinds in _KEYS_FOR.items():
            check(getattr(self, key) is None or kind in kinds, key,
                  f"only for kind {', '.join(kinds)} (this schedule is {kind})")
        check(self.peak_lr > 0, "peak_lr", f"must be positive, got {self.peak_lr}")
        check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0 <= self.warmup_fraction < 1, "warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        for key in ("cooldown_steps", "anneal_steps"):
            check(getattr(self, key) is None or getattr(self, key) >= 0, key, "must be >= 0")
        for key in ("cooldown_fraction", "anneal_fraction"):
            value = getattr(self, key)
            check(value is None or 0 <= value <= 1, key, f"must be in [0, 1], got {value}")

        if kind in _DEFAULT_SHAPE:
            if self.cooldown_steps is None and self.cooldown_fraction is None:
                self.cooldown_fraction = _DEFAULT_COOLDOWN_FRACTION[kind]
            self.cooldown_shape = self.cooldown_shape or _DEFAULT_SHAPE[kind]
            check(self.cooldown_shape in _SHAPES_FOR[kind], "cooldown_shape",
                  f"'{self.cooldown_shape}' is not a {kind} cooldown; use one of {', '.join(_SHAPES_FOR[kind])}")
        annealed = self.anneal_steps is not None or self.anneal_fraction is not None
        if kind in ("cosine", "linear", "wsd") or annealed:
            if self.min_lr is None:
                self.min_lr = 0.1 * self.peak_lr
            check(0 <= self.min_lr <= self.peak_lr, "min_lr",
                  f"must be in [0, peak_lr={self.peak_lr}], got {self.min_lr}")
        elif kind == "infinite":
            check(self.min_lr is None, "min_lr", "for kind infinite, only with anneal_steps or anneal_fraction")

        if kind == "wsd" and self.cooldown_shape == "exponential":
            check(self.min_lr > 0, "min_lr", "the exponential cooldown needs min_lr > 0 (final factor min_lr/peak_lr)")
        if kind == "infinite":
            check(self.const_lr is not None, "const_lr",
                  "required for kind infinite: the learning rate held after the cooldown")
            low = self.min_lr if annealed else 0.0
            check(low < self.const_lr <= self.peak_lr, "const_lr",
                  f"must be in ({'min_lr=' if annealed else ''}{low:g}, peak_lr={self.peak_lr:g}], got {self.const_lr}")
            check(not annealed or self.min_lr > 0, "min_lr", "the exponential anneal needs min_lr > 0")
            if self.cooldown_shape == "inv_sqrt":
                # The authors' gpt-neox code leaves it None; every config in their fork sets 10 (REFERENCES §1).
                self.timescale = DEFAULT_TIMESCALE if self.timescale is None else self.timescale
                check(self.timescale > 0, "timescale", f"must be positive, got {self.timescale}")
            else:
                check(self.timescale is None, "timescale", "only for cooldown_shape inv_sqrt")

        # Phases measured in fractions must fit together; step counts are checked by validate_length.
        used, parts = 0.0, []
        for phase in ("warmup", "cooldown", "anneal"):
            fraction = getattr(self, f"{phase}_fraction")
            if getattr(self, f"{phase}_steps") is None and fraction:
                used += fraction
                parts.append((phase, fraction))
                # Defaults (warm-up 2%, cooldown) count too, so say how to drop the earlier phases.
                drop = " and ".join(f"{p}_steps: 0" for p, _ in parts[:-1])
                check(used <= 1 + 1e-9, f"{phase}_fraction",
                      " + ".join(f"{p}_fraction {f:g}" for p, f in parts) + f" = {used:g} is more than the whole "
                      f"stage (shorten them, or drop earlier phases with {drop})")

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps for a stage of ``total_steps``."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return round(self.warmup_fraction * total_steps)

    def cooldown_for(self, total_steps: int) -> int:
        """Cooldown steps (wsd, infinite; 0 for other kinds), clamped to what the warm-up leaves."""
        return min(self._length("cooldown", total_steps), total_steps - self.warmup_for(total_steps))

    def anneal_for(self, total_steps: int) -> int:
        """Anneal steps (infinite; 0 for other kinds), clamped to what warm-up and cooldown leave."""
        left = total_steps - self.warmup_for(total_steps) - self.cooldown_for(total_steps)
        return min(self._length("anneal", total_steps), left)

    def _length(self, phase: str, total_steps: int) -> int:
        steps, fraction = getattr(self, f"{phase}_steps"), getattr(self, f"{phase}_fraction")
        if steps is not None:
            return steps
        return round(fraction * total_steps) if fraction is not None else 0

    def validate_length(self, total_steps: int) -> None:
        """Check that warm-up, cooldown and anneal fit a stage of ``total_steps``.

        Lengths are compared before rounding, so fractions that fit never fail here by a rounding step.

        Raises:
            ConfigValueError: naming the key of the first phase that does not fit.
        """
        used, parts = 0.0, []
        for phase in ("warmup", "cooldown", "anneal"):
            steps, fraction = getattr(self, f"{phase}_steps"), getattr(self, f"{phase}_fraction")
            length = steps if steps is not None else (fraction or 0.0) * total_steps
            if length == 0:
                continue
            used += length
            parts.append(f"{phase} {length:g}")
            check(used <= total_steps + 1e-9, f"{phase}_steps" if steps is not None else f"{phase}_fraction",
                  f"{' + '.join(parts)} = {used:g} steps exceed the stage's {total_steps} steps")


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


def linear_with_warmup(t: int, total: int, warmup: int, peak_lr: float, min_lr: float) -> float:
    """Linear warm-up then linear decay from ``peak_lr`` at ``T_w`` to ``min_lr`` at ``T``.

    The common "linear decay" baseline (e.g. Hägele et al. 2024 compare against it):
    ``lr(t) = peak + (min - peak) * (t - T_w) / (T - T_w)`` after warm-up.
    """
    if 0 < warmup and t <= warmup:
        return peak_lr * t / warmup
    progress = min((t - warmup) / max(total - warmup, 1), 1.0)
    return peak_lr + (min_lr - peak_lr) * progress


def constant_with_warmup(t: int, warmup: int, peak_lr: float) -> float:
    """Linear warm-up then ``peak_lr`` for good (Hägele et al. 2024's stable phase without a cooldown)."""
    if 0 < warmup and t <= warmup:
        return peak_lr * t / warmup
    return peak_lr


def inverse_sqrt_with_warmup(t: int, warmup: int, peak_lr: float) -> float:
    """Linear warm-up then ``peak * sqrt(T_w / t)``: Vaswani et al. 2017, "Attention Is All You Need".

    The decay is continuous at ``t = T_w``. Without warm-up (``T_w = 0``) the formula would be 0, so ``T_w``
    is taken as 1 in the decay: ``lr(0) = lr(1) = peak``, then ``peak / sqrt(t)``.
    """
    if 0 < warmup and t <= warmup:
        return peak_lr * t / warmup
    return peak_lr * math.sqrt(max(warmup, 1) / max(t, 1))


def cooldown_factor(p: float, final_factor: float, shape: str) -> float:
    """The multiplier of ``peak_lr`` at fraction ``p`` in [0, 1] through a cooldown to ``final_factor``.

    Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations" (with
    ``c`` the final factor): linear ``c + (1-c)(1-p)``, 1-sqrt ``c + (1-c)(1-sqrt(p))``, cosine
    ``c + (1-c) * 0.5 * (1 + cos(pi p))``, exponential ``c**p`` (needs ``c > 0``).
    """
    c = final_factor
    if shape == "linear":
        return c + (1 - c) * (1 - p)
    if shape == "1-sqrt":
        return c + (1 - c) * (1 - math.sqrt(p))
    if shape == "cosine":
        return c + (1 - c) * 0.5 * (1 + math.cos(math.pi * p))
    if shape == "exponential":
        return c**p
    raise ValueError(f"unknown wsd cooldown shape {shape!r}")


def wsd(t: int, total: int, warmup: int, cooldown: int, peak_lr: float, min_lr: float, shape: str) -> float:
    """Warmup-Stable-Decay: warm-up, constant ``peak_lr``, then a cooldown over the last ``T_cd`` steps.

    Hägele et al. 2024 ("constant LR with cooldown"); Hu et al. 2024, "MiniCPM". With
    ``p = (t - (T - T_cd)) / T_cd`` the LR is ``peak * cooldown_factor(p, min/peak, shape)``, reaching
    ``min_lr`` at ``t = T``.
    """
    if 0 < warmup and t <= warmup:
        return peak_lr * t / warmup
    start = total - cooldown
    if cooldown == 0 or t <= start:
        return peak_lr
    p = min((t - start) / cooldown, 1.0)
    return peak_lr * cooldown_factor(p, min_lr / peak_lr, shape)


def infinite(t: int, total: int, warmup: int, cooldown: int, anneal: int, peak_lr: float, const_lr: float,
             min_lr: Optional[float], shape: str, timescale: Optional[float]) -> float:
    """Ibrahim et al. 2024 §7, "Simple and Scalable Strategies to Continually Pre-train LLMs": infinite LR.

    Phases: warm-up to ``peak`` over ``T_w``; cooldown to ``const`` over ``T_cd``; constant ``const``; an
    optional exponential anneal to ``min`` over the last ``T_a`` steps. With ``x = (t - T_w) / T_cd``:
    cosine cooldown ``const + 0.5 * (peak - const) * (1 + cos(pi x))``; inverse-sqrt cooldown
    ``peak + (const - peak) * h(x) / h(1)`` with ``h(u) = 1/sqrt(1 + alpha u) - 1`` (``alpha`` = timescale);
    anneal ``const * (min/const)**(u / T_a)`` with ``u`` steps into it. A stage with ``T_w = T_cd = 0``
    continues at ``const`` (the next dataset of an infinite run); ``T_a = T`` anneals the whole stage.
    """
    if 0 < warmup and t <= warmup:
        return peak_lr * t / warmup
    if 0 < cooldown and t <= warmup + cooldown:
        x = (t - warmup) / cooldown
        if shape == "cosine":
            return const_lr + 0.5 * (peak_lr - const_lr) * (1 + math.cos(math.pi * x))
        if shape == "inv_sqrt":
            def h(u: float) -> float:
                return 1 / math.sqrt(1 + timescale * u) - 1
            return peak_lr + (const_lr - peak_lr) * h(x) / h(1)
        raise ValueError(f"unknown infinite cooldown shape {shape!r}")
    start = total - anneal
    if anneal == 0 or t <= start:
        return const_lr
    u = min(t - start, anneal)
    return const_lr * (min_lr / const_lr) ** (u / anneal)


# Users choose a schedule by name (``kind``); each entry calls its pure function with the config's values.
SCHEDULES: dict[str, Callable[[ScheduleConfig, int, int], float]] = {
    "cosine": lambda c, t, total: cosine_with_warmup(t, total, c.warmup_for(total), c.peak_lr, c.min_lr),
    "linear": lambda c, t, total: linear_with_warmup(t, total, c.warmup_for(total), c.peak_lr, c.min_lr),
    "constant": lambda c, t, total: constant_with_warmup(t, c.warmup_for(total), c.peak_lr),
    "inverse_sqrt": lambda c, t, total: inverse_sqrt_with_warmup(t, c.warmup_for(total), c.peak_lr),
    "wsd": lambda c, t, total: wsd(t, total, c.warmup_for(total), c.cooldown_for(total), c.peak_lr, c.min_lr,
                                   c.cooldown_shape),
    "infinite": lambda c, t, total: infinite(t, total, c.warmup_for(total), c.cooldown_for(total),
                                             c.anneal_for(total), c.peak_lr, c.const_lr, c.min_lr,
                                             c.cooldown_shape, c.timescale),
}


def lr_at(config: ScheduleConfig, t: int, total: int) -> float:
    """The learning rate of stage step ``t`` (1-based; 0 = before any step) in a stage of ``total`` steps."""
    return SCHEDULES[config.kind](config, min(t, total), total)
