"""CMR Scaling Law (Gu et al. 2024): the published Finance numbers, recovery of each form, and the direct CMR
estimate against a sweep whose answer is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest

from cpt.errors import CptError
from cpt.laws.cmr import (CMR_LAW, DOMAIN_CHANGE, GENERAL_CHANGE, LOSS_VS_RATIO, CmrFit, cmr_law, critical_ratio,
                          fit_cmr)
from cpt.laws.fit import FitConfig, fit
from cpt.laws.table import table_from_columns

# REFERENCES.md §5: the published CMR law per model size (Finance) and its value at T = 100 (20B tokens).
PUBLISHED = {"460M": ((0.22524761, 0.26944345, -0.48139982), 0.298),
             "940M": ((0.7520627, 0.13720245, -1.06581937), 0.349),
             "1.6B": ((-2.36384831, -0.15125569, 1.59223649), 0.414),
             "3.1B": ((-2.5368197, -0.42071423, 0.84375368), 0.478)}


@pytest.mark.parametrize("size", PUBLISHED)
def test_published_cmr_at_T100(size):
    (a4, s4, b3), percent = PUBLISHED[size]
    assert float(cmr_law(100, a4, s4, b3)) == pytest.approx(percent, abs=5e-4)


@pytest.mark.parametrize("size", PUBLISHED)
def test_cmr_law_fit_recovers_the_published_laws(size):
    (a4, s4, b3), percent = PUBLISHED[size]
    T = np.geomspace(1, 100, 12)
    result = fit(CMR_LAW, {"T": T}, cmr_law(T, a4, s4, b3))
    assert result.params == pytest.approx({"a4": a4, "s4": s4, "b3": b3}, rel=1e-4)
    assert float(result.predict({"T": np.array([100.0])})[0]) == pytest.approx(percent, abs=5e-4)


def test_finance_loss_vs_ratio_predicts_the_measured_25_percent_point():
    # Domain loss at 20B tokens, 460M. "33%" is the 1:2 mixture, R = 1/3 (with R = 0.33 the fit gives 1.5550).
    R = np.array([1.0, 0.75, 0.5, 1 / 3])
    loss = np.array([1.4628, 1.4844, 1.5122, 1.5387])
    result = fit(LOSS_VS_RATIO, {"R": R}, loss)
    assert float(result.predict({"R": np.array([0.25])})[0]) == pytest.approx(1.5561, abs=2e-4)
    assert abs(float(result.predict({"R": np.array([0.25])})[0]) - 1.5561) < abs(1.5566 - 1.5561) + 2e-4


@pytest.mark.parametrize("noise", [0.0, 0.002])
def test_change_forms_recover_their_curves(noise):
    T = np.geomspace(1, 100, 10)
    rng = np.random.default_rng(0)
    dom_true = {"a1": -0.3, "s1": 0.25, "b1": 0.05}
    gen_true = {"a2": 0.4, "s2": 0.3, "a3": -0.35, "s3": 0.1, "b2": 0.0}
    dom = DOMAIN_CHANGE.predict(dom_true, {"T": T}) + noise * rng.standard_normal(len(T))
    gen = GENERAL_CHANGE.predict(gen_true, {"T": T}) + noise * rng.standard_normal(len(T))
    fd, fg = fit(DOMAIN_CHANGE, {"T": T}, dom), fit(GENERAL_CHANGE, {"T": T}, gen)
    if noise == 0:
        assert fd.params == pytest.approx(dom_true, rel=1e-4, abs=1e-6)
    else:
        assert fd.params == pytest.approx(dom_true, rel=0.15, abs=0.03)
    # Two power terms trade off; the curve is what is determined.
    grid = {"T": np.geomspace(1, 100, 40)}
    np.testing.assert_allclose(fg.predict(grid), GENERAL_CHANGE.predict(gen_true, grid), atol=1e-5 + 2 * noise)


def rise_scale(T):
    """The general-loss rise at domain ratio 1 after T units; at ratio R it is R^2 times this."""
    return 0.3 * T ** 0.3 - 0.25 * T ** 0.1


def sweep(scale=1.0, ratios=(0.2, 0.4, 0.6, 0.8, 1.0), T=tuple(np.geomspace(4, 100, 5)), with_start=True):
    """Every run's general loss rises as R^2 * scale * rise_scale(T) (in the dL_gen family for each R), its domain
    loss falls as 0.5 R^0.5 T^0.2. The CMR for epsilon is then sqrt(epsilon / (scale * rise_scale(T)))."""
    rows = []
    for r in ratios:
        if with_start:
            rows.append((f"r{r}", 0.0, r, 3.0, 2.5))
        rows += [(f"r{r}", t * 2e8, r, 3.0 + scale * r ** 2 * rise_scale(t), 2.5 - 0.5 * r ** 0.5 * t ** 0.2)
                 for t in T]
    cols = {k: [row[i] for row in rows] for i, k in enumerate(("run_id", "D", "r", "general_loss", "domain_loss"))}
    n = len(rows)
    return table_from_columns(cols | {"status": ["ok"] * n, "N": [1e6] * n, "N_total": [1e6] * n, "step": [0] * n})


@pytest.fixture(scope="module")
def cmr() -> CmrFit:
    return fit_cmr(sweep(), epsilon=0.05)


def test_direct_estimate_matches_the_closed_form(cmr):
    curves = cmr.sizes[1e6]
    assert (curves.general0, curves.domain0) == (3.0, 2.5) and curves.ratios == [0.2, 0.4, 0.6, 0.8, 1.0]
    for estimate in cmr.estimates[1e6]:
        expected = min(1.0, np.sqrt(0.05 / rise_scale(estimate["T"])))
        assert estimate["ratio"] == pytest.approx(expected, abs=2e-3)
        assert estimate["general_rise"] == pytest.approx(0.05, abs=1e-3) and estimate["domain_change"] < 0
    # A tighter tolerance gives a smaller ratio, by the same formula, at a T between the measured ones.
    assert critical_ratio(curves, 30.0, 0.02)["ratio"] == pytest.approx(np.sqrt(0.02 / rise_scale(30.0)), abs=2e-3)


def test_cmr_law_is_fitted_to_the_direct_estimates(cmr):
    law = cmr.laws[1e6]
    T = np.array([e["T"] for e in cmr.estimates[1e6]])
    np.testing.assert_allclose(law.predict({"T": T}), np.sqrt(0.05 / rise_scale(T)), atol=0.01)
    assert law.r2 > 0.99 and law.params["s4"] < 0  # the CMR shrinks as training goes on
    again = CmrFit.from_dict(cmr.to_dict())
    assert again.laws[1e6].params == law.params and again.sizes[1e6].ratios == cmr.sizes[1e6].ratios


def test_a_tolerance_never_reached_gives_no_law():
    result = fit_cmr(sweep(scale=0.001, ratios=(0.5, 0.75, 1.0)), epsilon=0.05, config=FitConfig(starts=3))
    assert result.laws[1e6] is None and "R_CMR is 1 at every measured T" in result.notes[1e6]
    assert all(e["ratio"] == 1.0 for e in result.estimates[1e6])


def test_cmr_needs_a_baseline_ratios_and_evaluations():
    with pytest.raises(CptError, match="N = 1e\\+06 has no D = 0 row"):
        fit_cmr(sweep(with_start=False))
    with pytest.raises(CptError, match="CMR needs >= 3 ratios"):
        fit_cmr(sweep(ratios=(0.5, 1.0)))
    with pytest.raises(CptError, match="CMR needs >= 3 ratios, >= 5 token counts \\(D > 0\\); .* has 5 ratios .*, "
                                       "3 token counts"):
        fit_cmr(sweep(T=(4.0, 10.0, 100.0)))
    table = sweep()
    short = table.subset(~((table.r == 0.4) & (table.D > 2e9)))  # that run stopped early: 2 evals after D = 0
    with pytest.raises(CptError, match="N = 1e\\+06, r = 0.4 has 2 evaluation\\(s\\) with D > 0, needs >= 5"):
        fit_cmr(short)
    with pytest.raises(CptError, match="epsilon and the token unit must be > 0"):
        fit_cmr(sweep(), epsilon=0.0)
