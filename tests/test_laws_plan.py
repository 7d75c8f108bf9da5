"""Recommendations: the D-CPT usages against the paper's check and brute force, the CMR for an epsilon against
its closed form, and the recipe snippet."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from scipy.optimize import brentq

from cpt.errors import CptError
from cpt.laws import plan
from cpt.laws.cmr import DOMAIN_CHANGE, GENERAL_CHANGE, CmrFit, SizeCurves
from cpt.laws.dcpt import DCPT, DcptFit
from cpt.laws.fit import FitResult, Form
from cpt.laws.mixing import MIXING, SizeMix

# REFERENCES.md §5, D-CPT usage 1 check: chemistry, 1.8B, 10B tokens, tolerance 3%, pre-CPT general loss 2.8602.
PAPER_RATIOS = [0.90, 0.91, 0.92, 0.924, 0.93, 0.94, 1.00]
PAPER_LOSSES = [2.9052, 2.9193, 2.9376, 2.9445, 2.9644, 2.9848, 3.4667]

GENERAL = dict(E=1.8, A=60.0, alpha=0.3, B=8.0, eta=0.6, beta=0.35, C=0.25, gamma=0.5, eps=0.05)
DOMAIN = dict(E=1.2, A=40.0, alpha=0.28, B=6.0, eta=0.5, beta=0.3, C=0.5, gamma=0.4, eps=0.1)


def exact(form: Form, params: dict) -> FitResult:
    return FitResult(form, params, 0.0, 1.0, 0.0, True, [], 0, 0, 0)


@pytest.fixture
def dcpt() -> DcptFit:
    return DcptFit(exact(DCPT, GENERAL), exact(DCPT, DOMAIN), {"general": {4e6: 2.9}, "domain": {4e6: 4.0}},
                   {"N": [1e6, 4e6], "D": [1e6, 1e8], "r": [0.1, 1.0]}, "domain")


def general(N, D, r_domain):
    return float(DCPT.predict(GENERAL, {"N": np.array(N), "D": np.array(D), "r": np.array(1 - r_domain)}))


def domain(N, D, r):
    return float(DCPT.predict(DOMAIN, {"N": np.array(N), "D": np.array(D), "r": np.array(r)}))


def test_usage1_on_the_papers_measured_points_is_0924():
    rec = plan.usage1_measured(PAPER_RATIOS, PAPER_LOSSES, 2.8602, 0.03)
    assert rec.ratio == 0.924 and rec.predicted["general_loss"] == 2.9445
    assert rec.inputs["limit"] == pytest.approx(1.03 * 2.8602) and 2.9445 <= rec.inputs["limit"] < 2.9644
    # The limit is crossed between 0.924 and 0.93, by linear interpolation at:
    assert rec.predicted["interpolated_ratio"] == pytest.approx(0.924 + 0.006 * (2.946006 - 2.9445) / (2.9644 - 2.9445))
    assert yaml.safe_load(plan.mixture_snippet(rec, "chemistry", "general"))["mixture"] == {"chemistry": 0.924,
                                                                                             "general": 0.076}
    with pytest.raises(CptError, match="no measured ratio keeps the general loss within 1.0%"):
        plan.usage1_measured(PAPER_RATIOS, PAPER_LOSSES, 2.8602, 0.01)


def test_usage1_from_the_law_solves_the_tolerance_equation(dcpt):
    N, D, tol = 4e6, 3e7, 0.03
    rec = plan.usage1(dcpt, N, D, tol)
    expected = brentq(lambda r: general(N, D, r) - 1.03 * 2.9, 0.0, 1.0)
    assert rec.ratio == pytest.approx(expected, abs=1e-8)
    assert rec.predicted["general_loss"] == pytest.approx(1.03 * 2.9, abs=1e-6)
    assert rec.predicted["domain_loss"] == pytest.approx(domain(N, D, rec.ratio))
    assert rec.notes == [] and rec.round_down
    snippet = yaml.safe_load(plan.mixture_snippet(rec))["mixture"]
    assert snippet["domain"] == np.floor(expected * 1000) / 1000 and sum(snippet.values()) == pytest.approx(1.0)
    # The commented alternative is a valid stage replay (rate auto) starting at the general share.
    text = plan.mixture_snippet(rec)
    alternative = yaml.safe_load("\n".join(line[2:] for line in text.splitlines()[3:]))
    from cpt.config import build
    from cpt.data.replay import ReplayConfig

    replay = build(ReplayConfig, alternative["replay"], "replay")
    assert alternative["mixture"] == {"domain": 1.0} and replay.rate == "auto"
    assert replay.start == snippet["general"] and replay.hold.set == "upstream"


def test_usage1_errors_and_extrapolation_notes(dcpt):
    with pytest.raises(CptError, match="no pre-CPT general loss for N = 2e\\+06: the table has it for N = 4e\\+06"):
        plan.usage1(dcpt, 2e6, 3e7, 0.03)
    with pytest.raises(CptError, match="no domain ratio keeps the predicted general loss within 3.0% of 1.0000"):
        plan.usage1(dcpt, 4e6, 3e7, 0.03, pre_cpt=1.0)
    rec = plan.usage1(dcpt, 1.6e7, 3e8, 0.03, pre_cpt=2.9)
    assert [n.split(" lies")[0] for n in rec.notes] == ["N = 1.6e+07", "D = 3e+08"]


def test_usage2_minimises_the_domain_loss_over_the_share(dcpt):
    N, d_dom = 4e6, 3e4  # little domain data: the optimum is inside (0, 1)
    rec = plan.usage2(dcpt, N, d_dom)
    grid = np.linspace(0.01, 1.0, 20000)
    brute = grid[np.argmin([domain(N, d_dom / r, r) for r in grid])]
    assert rec.ratio == pytest.approx(brute, abs=1e-3)
    assert rec.predicted["domain_loss"] <= min(domain(N, d_dom / r, r) for r in grid) + 1e-9
    assert rec.predicted["total_tokens"] == pytest.approx(d_dom / rec.ratio)
    assert rec.predicted["general_tokens"] == pytest.approx(d_dom / rec.ratio - d_dom)


def test_usage3_closed_form_matches_brute_force(dcpt):
    C, r = 6 * 4e6 * 2e7, 0.8
    rec = plan.usage3(dcpt, C, r)
    Ns = np.geomspace(1e5, 1e9, 40001)
    brute = Ns[np.argmin([domain(n, C / (6 * n), r) for n in Ns])]
    assert rec.predicted["N"] == pytest.approx(brute, rel=1e-3)
    assert rec.predicted["N"] * rec.predicted["D"] * 6 == pytest.approx(C)
    assert rec.ratio == r
    with pytest.raises(CptError, match="--ratio in \\(0, 1\\]"):
        plan.usage3(dcpt, C, 0.0)


def rise_scale(T):
    return 0.3 * T ** 0.3 - 0.25 * T ** 0.1


@pytest.fixture
def cmr() -> CmrFit:
    """Exact change curves: the general loss rises R^2 * rise_scale(T), the domain loss falls 0.5 R^0.5 T^0.2."""
    ratios = (0.2, 0.4, 0.6, 0.8, 1.0)
    curves = SizeCurves(1e6, 3.0, 2.5, list(np.geomspace(4, 100, 5)),
                        {r: exact(GENERAL_CHANGE, dict(a2=0.3 * r * r, s2=0.3, a3=-0.25 * r * r, s3=0.1, b2=0.0))
                         for r in ratios},
                        {r: exact(DOMAIN_CHANGE, dict(a1=-0.5 * r ** 0.5, s1=0.2, b1=0.0)) for r in ratios})
    return CmrFit({1e6: curves}, 0.05, 2e8, {1e6: None}, {1e6: []}, {1e6: "not fitted"})


def test_cmr_for_an_epsilon_matches_its_closed_form(cmr):
    rec = plan.usage_cmr(cmr, 1e6, 40 * 2e8, 0.03)
    assert rec.ratio == pytest.approx(np.sqrt(0.03 / rise_scale(40.0)), abs=1e-3)
    assert rec.predicted["general_rise"] == pytest.approx(0.03, abs=1e-4)
    assert rec.predicted["general_loss"] == pytest.approx(3.03, abs=1e-4) and rec.predicted["domain_change"] < 0
    # The law refitted for epsilon 0.03 to the direct estimates at the measured T agrees at T = 40.
    assert rec.predicted["law_ratio"] == pytest.approx(rec.ratio, abs=0.01)
    far = plan.usage_cmr(cmr, 1e6, 400 * 2e8, 0.03)
    assert any("extrapolated" in n for n in far.notes) and far.ratio < rec.ratio
    with pytest.raises(CptError, match="--n 2e\\+06 is not one"):
        plan.usage_cmr(cmr, 2e6, 40 * 2e8, 0.03)


def test_mixing_usage1():
    mix = SizeMix(1e6, 4e6, exact(MIXING, dict(c=2.8, k=0.05, t=2.5)), exact(MIXING, dict(c=1.6, k=1.2, t=-2.0)), 2.9)
    rec = plan.usage1_mixing(mix, 0.03)
    # 2.8 + 0.05 exp(2.5 r) = 1.03 * 2.9  ->  r = ln((2.987 - 2.8) / 0.05) / 2.5
    assert rec.ratio == pytest.approx(np.log((1.03 * 2.9 - 2.8) / 0.05) / 2.5, abs=1e-8)


def test_snippet_sums_to_one_quotes_odd_names_and_rounds_down_only_when_asked():
    rec = plan.Recommendation("2", 0.12345, {}, {"domain_loss": 1.5})
    text = plan.mixture_snippet(rec, "my corpus", "web-en")
    assert text.splitlines()[0].startswith("# cpt plan, usage 2: domain share 0.1235")
    assert yaml.safe_load(text) == {"mixture": {"my corpus": 0.123, "web-en": 0.877}}
    rec.ratio, rec.round_down = 0.9999, True
    assert yaml.safe_load(plan.mixture_snippet(rec))["mixture"] == {"domain": 0.999, "general": 0.001}
    rec.round_down = False
    assert yaml.safe_load(plan.mixture_snippet(rec))["mixture"] == {"domain": 1.0, "general": 0.0}
    with pytest.raises(CptError, match="both 'x'"):
        plan.mixture_snippet(rec, "x", "x")


def test_largest_ratio_refines_the_crossing():
    assert plan.largest_ratio(lambda r: 2.0 + r ** 2, 2.5) == pytest.approx(np.sqrt(0.5), abs=1e-12)
    assert plan.largest_ratio(lambda r: 2.0 + 0 * r, 2.5) == 1.0
    assert plan.largest_ratio(lambda r: 3.0 + 0 * r, 2.5) is None
