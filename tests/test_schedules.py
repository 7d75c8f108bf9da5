import math

import pytest

from cpt.config import ConfigValueError, build, to_dict
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


# --- The schedule family (REFERENCES.md §1), each against its formula written out here. -------------------------

PEAK, CONST, LOW = 3e-4, 1.65e-4, 3e-5  # Ibrahim et al.'s 405M infinite-schedule settings


def sched(**raw) -> ScheduleConfig:
    return build(ScheduleConfig, raw, "schedule")


def warm(t, T_w, peak):
    return peak * t / T_w


def wsd_reference(t, T, T_w, T_cd, peak, low, shape):
    """Hägele et al. 2024: warm-up, constant peak, cooldown over the last T_cd steps to c = low / peak."""
    if t <= T_w:
        return warm(t, T_w, peak)
    if t <= T - T_cd:
        return peak
    p, c = (min(t, T) - (T - T_cd)) / T_cd, low / peak
    factor = {"linear": c + (1 - c) * (1 - p), "1-sqrt": c + (1 - c) * (1 - math.sqrt(p)),
              "cosine": c + (1 - c) * 0.5 * (1 + math.cos(math.pi * p)), "exponential": c ** p}[shape]
    return peak * factor


def infinite_reference(t, T, T_w, T_cd, T_a, peak, const, low, shape, alpha=1.0):
    """Ibrahim et al. 2024 §7: warm-up, cooldown to const, constant, exponential anneal over the last T_a."""
    t = min(t, T)
    if T_w and t <= T_w:
        return warm(t, T_w, peak)
    if T_cd and t <= T_w + T_cd:
        x = (t - T_w) / T_cd
        if shape == "cosine":
            return const + 0.5 * (peak - const) * (1 + math.cos(math.pi * x))
        def h(u):
            return 1 / math.sqrt(1 + alpha * u) - 1
        return peak + (const - peak) * h(x) / h(1)
    if T_a and t > T - T_a:
        return const * (low / const) ** ((t - (T - T_a)) / T_a)
    return const


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "cosine", "exponential"])
@pytest.mark.parametrize("t", [0, 1, 5, 10, 50, 80, 81, 90, 99, 100, 150])
def test_wsd_matches_formula(shape, t):
    config = sched(kind="wsd", peak_lr=PEAK, min_lr=LOW, warmup_steps=10, cooldown_fraction=0.2, cooldown_shape=shape)
    assert lr_at(config, t, 100) == pytest.approx(wsd_reference(t, 100, 10, 20, PEAK, LOW, shape), rel=1e-12)


def test_wsd_landmarks_and_defaults():
    config = sched(kind="wsd", peak_lr=1e-3, min_lr=0.0, warmup_steps=0, cooldown_steps=40, cooldown_shape="linear")
    assert [lr_at(config, t, 100) for t in (0, 1, 60, 80, 100)] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 0.0])
    # 1-sqrt at the middle of the cooldown to 0: 1 - sqrt(0.5) of the peak (Hägele et al.'s best shape).
    config = sched(kind="wsd", peak_lr=1e-3, min_lr=0.0, warmup_steps=0, cooldown_steps=40)
    assert lr_at(config, 80, 100) == pytest.approx(1e-3 * (1 - math.sqrt(0.5)))
    default = sched(kind="wsd", peak_lr=1e-3)
    assert (default.cooldown_shape, default.cooldown_fraction, default.min_lr) == ("1-sqrt", 0.2, pytest.approx(1e-4))
    assert default.cooldown_for(1000) == 200 and lr_at(default, 1000, 1000) == pytest.approx(1e-4)


def infinite_405m(shape="cosine", **extra) -> ScheduleConfig:
    return sched(kind="infinite", peak_lr=PEAK, const_lr=CONST, warmup_fraction=0.01, cooldown_fraction=0.6,
                 cooldown_shape=shape, **extra)


@pytest.mark.parametrize("shape, alpha", [("cosine", None), ("inv_sqrt", None), ("inv_sqrt", 1.0), ("inv_sqrt", 10.0)])
@pytest.mark.parametrize("t", [0, 1, 5, 10, 11, 160, 310, 609, 610, 611, 700, 900, 901, 950, 1000, 1200])
def test_infinite_405m_matches_formula(shape, alpha, t):
    extra = {"timescale": alpha} if alpha is not None else {}
    config = infinite_405m(shape, min_lr=LOW, anneal_steps=100, **extra)
    expected = infinite_reference(t, 1000, 10, 600, 100, PEAK, CONST, LOW, shape, alpha or 10.0)
    assert lr_at(config, t, 1000) == pytest.approx(expected, rel=1e-12)


def test_infinite_405m_landmarks():
    cosine = infinite_405m()
    assert (cosine.warmup_for(1000), cosine.cooldown_for(1000), cosine.anneal_for(1000)) == (10, 600, 0)
    assert lr_at(cosine, 10, 1000) == pytest.approx(PEAK)
    assert lr_at(cosine, 310, 1000) == pytest.approx((PEAK + CONST) / 2)  # x = 0.5
    assert lr_at(cosine, 610, 1000) == pytest.approx(CONST)
    assert lr_at(cosine, 1000, 1000) == pytest.approx(CONST)  # no anneal: stays at const_lr
    # Inverse-sqrt cooldown at x = 0.5 and 0.25, numbers worked out by hand from h(u) = 1/sqrt(1 + alpha u) - 1.
    for alpha, half, quarter in [(1.0, 2.154198186e-4, 2.513395043e-4), (10.0, 1.856295229e-4, 2.100350962e-4)]:
        config = infinite_405m("inv_sqrt", timescale=alpha)
        assert lr_at(config, 310, 1000) == pytest.approx(half, rel=1e-9)
        assert lr_at(config, 160, 1000) == pytest.approx(quarter, rel=1e-9)
        assert lr_at(config, 610, 1000) == pytest.approx(CONST)
    # The default is the authors' configs' 10 (their code's own default is None), not 1.
    assert infinite_405m("inv_sqrt").timescale == 10.0
    annealed = infinite_405m(min_lr=LOW, anneal_fraction=0.1)
    assert lr_at(annealed, 900, 1000) == pytest.approx(CONST)
    assert lr_at(annealed, 950, 1000) == pytest.approx(math.sqrt(CONST * LOW))  # halfway, geometrically
    assert lr_at(annealed, 1000, 1000) == pytest.approx(LOW)


def test_infinite_continue_and_anneal_only_stages():
    # The next dataset of an infinite run: no re-warm, no cooldown, constant at const_lr throughout.
    resume = sched(kind="infinite", peak_lr=PEAK, const_lr=CONST, warmup_steps=0, cooldown_steps=0)
    assert [lr_at(resume, t, 500) for t in (0, 1, 250, 500, 600)] == pytest.approx([CONST] * 5)
    # An annealed branch over the whole stage.
    branch = sched(kind="infinite", peak_lr=PEAK, const_lr=CONST, min_lr=LOW, warmup_steps=0, cooldown_steps=0,
                   anneal_fraction=1.0)
    for t in (0, 1, 100, 199, 200, 300):
        assert lr_at(branch, t, 200) == pytest.approx(CONST * (LOW / CONST) ** (min(t, 200) / 200), rel=1e-12)
    # Constant, then anneal over the last 20 steps.
    tail = sched(kind="infinite", peak_lr=PEAK, const_lr=CONST, min_lr=LOW, warmup_steps=0, cooldown_steps=0,
                 anneal_steps=20)
    assert [lr_at(tail, t, 100) for t in (0, 50, 80)] == pytest.approx([CONST] * 3)
    assert lr_at(tail, 90, 100) == pytest.approx(math.sqrt(CONST * LOW))
    assert lr_at(tail, 100, 100) == pytest.approx(LOW)


def test_constant_inverse_sqrt_linear():
    constant = sched(kind="constant", peak_lr=1e-3, warmup_steps=4)
    assert [lr_at(constant, t, 100) for t in (0, 1, 4, 50, 100, 200)] == \
        pytest.approx([0, 2.5e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    assert lr_at(sched(kind="constant", peak_lr=1e-3, warmup_steps=0), 0, 100) == pytest.approx(1e-3)

    inv = sched(kind="inverse_sqrt", peak_lr=1e-3, warmup_steps=16)
    expected = {0: 0, 8: 5e-4, 16: 1e-3, 64: 1e-3 * math.sqrt(16 / 64), 100: 1e-3 * math.sqrt(16 / 100)}
    for t, lr in expected.items():
        assert lr_at(inv, t, 100) == pytest.approx(lr)
    assert lr_at(inv, 400, 100) == pytest.approx(expected[100])  # past the end: keeps the final value
    # Without warm-up T_w is taken as 1: peak at steps 0 and 1, then peak / sqrt(t).
    bare = sched(kind="inverse_sqrt", peak_lr=1e-3, warmup_steps=0)
    assert [lr_at(bare, t, 100) for t in (0, 1, 4, 100)] == pytest.approx([1e-3, 1e-3, 5e-4, 1e-4])

    linear = sched(kind="linear", peak_lr=1e-3, min_lr=1e-4, warmup_steps=10)
    for t in (0, 5, 10, 11, 60, 110, 150):
        T_w, T = 10, 110
        ref = warm(t, T_w, 1e-3) if t <= T_w else 1e-3 + (1e-4 - 1e-3) * (min(t, T) - T_w) / (T - T_w)
        assert lr_at(linear, t, T) == pytest.approx(ref, rel=1e-12)
    assert lr_at(linear, 60, 110) == pytest.approx(5.5e-4)


CONTINUITY = {
    "cosine": dict(kind="cosine", peak_lr=PEAK),
    "linear": dict(kind="linear", peak_lr=PEAK),
    "constant": dict(kind="constant", peak_lr=PEAK),
    "inverse_sqrt": dict(kind="inverse_sqrt", peak_lr=PEAK),
    **{f"wsd-{shape}": dict(kind="wsd", peak_lr=PEAK, cooldown_shape=shape)
       for shape in ("linear", "1-sqrt", "cosine", "exponential")},
    "infinite-cosine": dict(kind="infinite", peak_lr=PEAK, const_lr=CONST, cooldown_fraction=0.6, anneal_fraction=0.1),
    "infinite-inv_sqrt-10": dict(kind="infinite", peak_lr=PEAK, const_lr=CONST, cooldown_fraction=0.6,
                                 cooldown_shape="inv_sqrt", timescale=10.0, anneal_fraction=0.1),
}


@pytest.mark.parametrize("name", CONTINUITY)
def test_continuous_across_phases(name):
    """No jumps after warm-up: the largest step-to-step change shrinks when the same stage has 4x the steps,
    which a jump at a phase boundary would not (1-sqrt's infinite slope at the cooldown start still shrinks)."""
    config = sched(**CONTINUITY[name])

    def largest_change(T):
        T_w = config.warmup_for(T)
        lrs = [lr_at(config, t, T) for t in range(T_w, T + 1)]
        assert lrs[0] == pytest.approx(PEAK) and min(lrs) >= 0
        return max(abs(b - a) for a, b in zip(lrs, lrs[1:]))

    assert largest_change(4000) <= 0.55 * largest_change(1000) + 1e-15


@pytest.mark.parametrize("name", CONTINUITY)
def test_resolved_config_round_trips(name):
    """The resolved config written into a run directory loads back to the same schedule."""
    config = sched(**CONTINUITY[name])
    assert sched(**to_dict(config)) == config


def test_existing_cosine_recipe_unchanged():
    raw = {"kind": "cosine", "peak_lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 7, "warmup_fraction": 0.05}
    config = sched(**raw)
    assert {k: v for k, v in to_dict(config).items() if v is not None} == raw
    for t in range(0, 121):
        assert lr_at(config, t, 120) == cosine_with_warmup(t, 120, 7, 3e-3, 3e-4)


@pytest.mark.parametrize("raw, key, words", [
    ({"kind": "cosine", "const_lr": 1e-4}, "const_lr", "only for kind infinite"),
    ({"kind": "cosine", "cooldown_fraction": 0.2}, "cooldown_fraction", "only for kind wsd, infinite"),
    ({"kind": "linear", "anneal_steps": 10}, "anneal_steps", "only for kind infinite"),
    ({"kind": "constant", "min_lr": 1e-5}, "min_lr", "only for kind"),
    ({"kind": "wsd", "timescale": 10.0}, "timescale", "only for kind infinite"),
    ({"kind": "wsd", "cooldown_fraction": 1.5}, "cooldown_fraction", "must be in [0, 1]"),
    ({"kind": "wsd", "cooldown_steps": -1}, "cooldown_steps", "must be >= 0"),
    ({"kind": "wsd", "cooldown_shape": "inv_sqrt"}, "cooldown_shape", "not a wsd cooldown"),
    ({"kind": "wsd", "min_lr": 0.0, "cooldown_shape": "exponential"}, "min_lr", "min_lr > 0"),
    ({"kind": "wsd", "peak_lr": 1e-3, "min_lr": 2e-3}, "min_lr", "must be in [0, peak_lr"),
    ({"kind": "wsd", "warmup_fraction": 0.5, "cooldown_fraction": 0.6}, "cooldown_fraction", "more than the whole"),
    ({"kind": "infinite"}, "const_lr", "required for kind infinite"),
    ({"kind": "infinite", "anneal_fraction": 0.1}, "const_lr", "required for kind infinite"),
    ({"kind": "infinite", "peak_lr": 3e-4, "const_lr": 4e-4}, "const_lr", "must be in (0, peak_lr"),
    ({"kind": "infinite", "const_lr": 2e-5, "min_lr": 3e-5, "anneal_steps": 5}, "const_lr", "must be in (min_lr="),
    ({"kind": "infinite", "const_lr": 1e-4, "min_lr": 1e-5}, "min_lr", "only with anneal_steps or anneal_fraction"),
    ({"kind": "infinite", "const_lr": 1e-4, "min_lr": 0.0, "anneal_steps": 5}, "min_lr", "min_lr > 0"),
    ({"kind": "infinite", "const_lr": 1e-4, "cooldown_shape": "1-sqrt"}, "cooldown_shape", "not a infinite cooldown"),
    ({"kind": "infinite", "const_lr": 1e-4, "timescale": 10.0}, "timescale", "only for cooldown_shape inv_sqrt"),
    ({"kind": "infinite", "const_lr": 1e-4, "cooldown_shape": "inv_sqrt", "timescale": 0.0}, "timescale", "positive"),
    ({"kind": "infinite", "const_lr": 1e-4, "anneal_fraction": 1.0}, "anneal_fraction",
     "drop earlier phases with warmup_steps: 0 and cooldown_steps: 0"),
    ({"kind": "infinite", "const_lr": 1e-4, "anneal_fraction": -0.1}, "anneal_fraction", "must be in [0, 1]"),
])
def test_invalid_combinations_name_their_key(raw, key, words):
    with pytest.raises(RecipeError) as info:
        build(ScheduleConfig, raw, "stages[1].schedule")
    assert str(info.value).startswith(f"stages[1].schedule.{key}: ")
    assert words in str(info.value)


@pytest.mark.parametrize("raw, total, key", [
    ({"kind": "wsd", "warmup_steps": 10, "cooldown_steps": 95}, 100, "cooldown_steps"),
    ({"kind": "wsd", "cooldown_steps": 99}, 100, "cooldown_steps"),  # with the default 2% warm-up
    ({"kind": "cosine", "warmup_steps": 700}, 200, "warmup_steps"),
    ({"kind": "wsd", "warmup_steps": 50, "cooldown_fraction": 0.6}, 100, "cooldown_fraction"),
    ({"kind": "infinite", "const_lr": 1e-4, "warmup_steps": 0, "cooldown_steps": 60, "anneal_steps": 41}, 100,
     "anneal_steps"),
])
def test_validate_length_names_the_phase_that_does_not_fit(raw, total, key):
    config = sched(**raw)
    with pytest.raises(ConfigValueError) as info:
        config.validate_length(total)
    assert info.value.key == key and f"{total} steps" in str(info.value)
    lr_at(config, total, total)  # lr_at itself clamps rather than fails


@pytest.mark.parametrize("raw, total", [
    ({"kind": "wsd", "warmup_steps": 10, "cooldown_steps": 90}, 100),
    ({"kind": "infinite", "const_lr": 1e-4, "warmup_steps": 0, "cooldown_steps": 0, "anneal_fraction": 1.0}, 7),
    # Fractions that fit never fail by rounding: round(1.5) + round(1.5) = 4 > 3 steps, absorbed by clamping.
    ({"kind": "wsd", "warmup_fraction": 0.5, "cooldown_fraction": 0.5}, 3),
    ({"kind": "infinite", "const_lr": 1e-4, "warmup_fraction": 0.01, "cooldown_fraction": 0.6, "anneal_fraction": 0.39},
     11),
])
def test_validate_length_accepts_phases_that_fit(raw, total):
    config = sched(**raw)
    config.validate_length(total)
    w, c, a = config.warmup_for(total), config.cooldown_for(total), config.anneal_for(total)
    assert w + c + a <= total
