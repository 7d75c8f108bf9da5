import math

import pytest

from cpt.config import build
from cpt.errors import RecipeError
from cpt.schedules import ScheduleConfig, cosine_with_warmup, lr_at


def reference(t, T, T_w, peak, low):
    """REFERENCES.md §1, linear warm-up + cosine, written out independently."""
    if t <= T_w:
        return peak * t / T_w
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * (t - T_w) / (T - T_w)))


@pytest.mark.parametrize("t", [0, 1, 5, 10, 11, 55, 99, 100])
def test_cosine_matches_formula(t):
    assert cosine_with_warmup(t, 100, 10, 3e-4, 3e-5) == pytest.approx(reference(t, 100, 10, 3e-4, 3e-5), rel=1e-12)


def test_cosine_landmarks():
    peak, low = 1e-3, 1e-4
    assert cosine_with_warmup(0, 100, 10, peak, low) == 0.0
    assert cosine_with_warmup(10, 100, 10, peak, low) == pytest.approx(peak)
    assert cosine_with_warmup(55, 100, 10, peak, low) == pytest.approx((peak + low) / 2)
    assert cosine_with_warmup(100, 100, 10, peak, low) == pytest.approx(low)
    assert cosine_with_warmup(150, 100, 10, peak, low) == pytest.approx(low)  # clamped past the end


def test_no_warmup_starts_at_peak():
    assert cosine_with_warmup(1, 100, 0, 1e-3, 0.0) == pytest.approx(reference(1, 100, 0, 1e-3, 0.0))
    assert cosine_with_warmup(0, 100, 0, 1e-3, 0.0) == pytest.approx(1e-3)


def test_config_defaults_and_warmup():
    config = build(ScheduleConfig, {"peak_lr": 2e-3})
    assert config.min_lr == pytest.approx(2e-4)  # 0.1 * peak (Ibrahim et al.)
    assert config.warmup_for(200) == 4  # 2% default
    assert build(ScheduleConfig, {"warmup_steps": 7}).warmup_for(200) == 7
    assert build(ScheduleConfig, {"warmup_steps": 700}).warmup_for(200) == 200
    stage = build(ScheduleConfig, {"peak_lr": 1e-3, "min_lr": 0.0, "warmup_fraction": 0.1})
    assert lr_at(stage, 10, 100) == pytest.approx(1e-3)
    assert lr_at(stage, 100, 100) == pytest.approx(0.0)


@pytest.mark.parametrize("raw, key", [
    ({"peak_lr": 0}, "peak_lr"),
    ({"peak_lr": 1e-3, "min_lr": 2e-3}, "min_lr"),
    ({"warmup_fraction": 1.0}, "warmup_fraction"),
    ({"warmup_steps": -1}, "warmup_steps"),
])
def test_invalid_schedules(raw, key):
    with pytest.raises(RecipeError, match=f"schedule.{key}"):
        build(ScheduleConfig, raw, "schedule")
