"""D-CPT Law (Que et al. 2024): parameter recovery from synthetic sweeps, the general share 1 - r, the
cross-domain variant's K, cross-validation and the data it needs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq

from cpt.errors import CptError
from cpt.laws.dcpt import (CROSS, DCPT, DcptFit, cross_validate_dcpt, dcpt_loss, fit_cross_domain, fit_dcpt,
                           learnability)
from cpt.laws.fit import FitConfig, fit
from cpt.laws.table import table_from_columns

GENERAL = dict(E=1.8, A=60.0, alpha=0.3, B=8.0, eta=0.6, beta=0.35, C=0.25, gamma=0.5, eps=0.05)
DOMAIN = dict(E=1.2, A=40.0, alpha=0.28, B=6.0, eta=0.5, beta=0.3, C=0.5, gamma=0.4, eps=0.1)
SIZES = (1e6, 4e6, 1.6e7)
RATIOS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
TOKENS = tuple(np.geomspace(1e5, 1e8, 6))


def law(params: dict, N, D, r) -> float:
    return float(dcpt_loss({"N": np.array(N), "D": np.array(D), "r": np.array(r)}, **params))


def sweep(noise: float = 0.0, sizes=SIZES, ratios=RATIOS, tokens=TOKENS, seed: int = 0):
    """A results table from the law: general loss at general share 1 - r, domain loss at domain share r, plus
    a D = 0 row per run holding the pre-CPT losses 3.9 and 4.2."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        for r in ratios:
            rows.append(dict(run_id=f"{n:g}-{r}", N=n, D=0.0, r=r, step=0, general_loss=3.9, domain_loss=4.2))
            for i, d in enumerate(tokens):
                g, dm = law(GENERAL, n, d, 1 - r), law(DOMAIN, n, d, r)
                rows.append(dict(run_id=f"{n:g}-{r}", N=n, D=d, r=r, step=i + 1,
                                 general_loss=g * np.exp(noise * rng.standard_normal()),
                                 domain_loss=dm * np.exp(noise * rng.standard_normal())))
    cols = {k: [row[k] for row in rows] for k in rows[0]}
    return table_from_columns(cols | {"status": ["ok"] * len(rows), "N_total": cols["N"]}, "sweep.csv")


@pytest.fixture(scope="module")
def exact_fit() -> DcptFit:
    return fit_dcpt(sweep())


def test_recovers_all_nine_parameters_of_both_losses_without_noise(exact_fit):
    # The default fitter reaches the optimum: E, C, gamma and eps trade off along a flat valley where L-BFGS-B
    # alone stops on its tolerances (1e-5 off here); the trf polish from its best point recovers every parameter.
    assert FitConfig().method == "lbfgsb" and FitConfig().to_dict()["polish"] is True
    for result, true in ((exact_fit.general, GENERAL), (exact_fit.domain, DOMAIN)):
        assert result.params == pytest.approx(true, rel=1e-8)
        assert result.rmse < 1e-10
    for result in (exact_fit.general, exact_fit.domain):
        assert result.r2 == pytest.approx(1.0, abs=1e-9) and result.on_bound == []
        assert result.n == len(SIZES) * len(RATIOS) * len(TOKENS)  # the D = 0 rows are not fitted
    assert exact_fit.pre_cpt == {"general": pytest.approx(dict.fromkeys(SIZES, 3.9)),
                                 "domain": pytest.approx(dict.fromkeys(SIZES, 4.2))}
    assert exact_fit.ranges == {"N": [1e6, 1.6e7], "D": [pytest.approx(1e5), pytest.approx(1e8)], "r": [0.1, 1.0]}


def test_general_loss_sees_the_general_share(exact_fit):
    # Domain share 1 is general share 0: the C / (0 + eps)^gamma term, finite.
    for r in (0.3, 1.0):
        assert float(exact_fit.general_loss(4e6, 1e7, r)) == pytest.approx(law(GENERAL, 4e6, 1e7, 1 - r), rel=1e-4)
        assert float(exact_fit.domain_loss(4e6, 1e7, r)) == pytest.approx(law(DOMAIN, 4e6, 1e7, r), rel=1e-4)


def test_noisy_sweep_recovers_the_well_determined_parameters_and_the_curves():
    result = fit_dcpt(sweep(noise=0.002, seed=1))
    for name, true in (("general", GENERAL), ("domain", DOMAIN)):
        got = getattr(result, name).params
        # At 0.2% noise the size and token exponents come back to 10%, the ratio exponent and B to 30%.
        for key, rel in (("A", 0.1), ("alpha", 0.1), ("beta", 0.1), ("B", 0.3), ("eta", 0.3)):
            assert got[key] == pytest.approx(true[key], rel=rel), (name, key)
        # E, C, gamma and eps trade off against each other; their sum over the ratios is what is determined.
        r = np.linspace(0.05, 1.0, 20)
        np.testing.assert_allclose(got["E"] + got["C"] / (r + got["eps"]) ** got["gamma"],
                                   true["E"] + true["C"] / (r + true["eps"]) ** true["gamma"], rtol=0.02)
        assert getattr(result, name).r2 > 0.999
    # Predictions inside the sweep stay within 0.5% of the noiseless law.
    assert float(result.domain_loss(2e6, 3e7, 0.6)) == pytest.approx(law(DOMAIN, 2e6, 3e7, 0.6), rel=5e-3)


def test_dcpt_needs_sizes_ratios_and_token_counts():
    with pytest.raises(CptError, match=r"D-CPT needs >= 2 model sizes, >= 3 ratios, >= 3 token counts \(D > 0\); "
                                       r"sweep.csv has 1 model size \(1e\+06\), 7 ratios"):
        fit_dcpt(sweep(sizes=(1e6,)))
    with pytest.raises(CptError, match="has 2 model sizes .*, 2 ratios \\(0.5, 1\\), 2 token counts"):
        fit_dcpt(sweep(sizes=(1e6, 4e6), ratios=(0.5, 1.0), tokens=(1e6, 1e7)))


def test_cross_validation_by_ratio_holds_out_whole_ratios():
    table = sweep(noise=0.002, sizes=(1e6, 1.6e7), tokens=TOKENS[::2], seed=2)
    cv = cross_validate_dcpt(table, "ratio", 3, FitConfig(starts=2, finalists=1))
    for loss in ("general", "domain"):
        held = sorted(v for fold in cv[loss].per_fold for v in fold["held_out"])
        assert held == pytest.approx(RATIOS)
        # Fold 1 holds out both ends (0.1 and 1.0): extrapolation, worse than the folds inside the range.
        rmse = [fold["rmse"] for fold in cv[loss].per_fold]
        assert cv[loss].per_fold[0]["held_out"] == [0.1, 0.55, 1.0] and rmse[0] == max(rmse)
        assert max(rmse[1:]) < 0.02
    with pytest.raises(CptError, match="needs >= 2 model sizes"):
        cross_validate_dcpt(table, "size", 2, FitConfig(starts=2))
    with pytest.raises(CptError, match="--cv must be one of ratio, size, D"):
        cross_validate_dcpt(table, "seed", 2)


def test_learnability_k1_is_the_initial_loss_and_k2_the_first_relative_drop():
    rows = [  # the smallest model: D = 0 loss 3.0; at r = 1 (the largest ratio) the first eval drops to 2.7
        ("a", 1e6, 0.0, 1.0, 3.0), ("b", 1e6, 0.0, 0.5, 3.0), ("a", 1e6, 1e6, 1.0, 2.7), ("b", 1e6, 1e6, 0.5, 2.9),
        ("a", 1e6, 2e6, 1.0, 2.5), ("c", 4e6, 0.0, 1.0, 2.0), ("c", 4e6, 1e6, 1.0, 1.0)]
    cols = {"run_id": [r[0] for r in rows], "status": ["ok"] * 7, "N": [r[1] for r in rows],
            "N_total": [r[1] for r in rows], "D": [r[2] for r in rows], "r": [r[3] for r in rows],
            "step": [0] * 7, "general_loss": [3.0] * 7, "domain_loss": [r[4] for r in rows], "domain": ["x"] * 7}
    assert learnability(table_from_columns(cols)) == {"x": {"k1": 3.0, "k2": pytest.approx(0.1), "D1": 1e6}}
    cols["D"] = [1.0 if d == 0 else d for d in cols["D"]]
    with pytest.raises(CptError, match="domain 'x' has no D = 0 row"):
        learnability(table_from_columns(cols))


CROSS_TRUE = DOMAIN | dict(F=0.5, mu=0.5, w2=2.0)
DOMAINS = {"law": (10.0, 0.05), "code": (11.0, 0.15), "math": (12.5, 0.30), "bio": (14.0, 0.10)}  # k1, k2


def test_cross_domain_form_recovers_its_parameters():
    n, d, r = np.meshgrid(SIZES, TOKENS[::2], (0.2, 0.5, 0.8, 1.0), indexing="ij")
    x = {"N": np.tile(n.ravel(), 4), "D": np.tile(d.ravel(), 4), "r": np.tile(r.ravel(), 4),
         "k1": np.repeat([k[0] for k in DOMAINS.values()], n.size),
         "k2": np.repeat([k[1] for k in DOMAINS.values()], n.size)}
    result = fit(CROSS, x, CROSS.predict(CROSS_TRUE, x), FitConfig(method="trf", starts=4))
    assert result.r2 == pytest.approx(1.0, abs=1e-9)
    K = 1 / x["k1"] + CROSS_TRUE["w2"] * x["k2"]
    got = result.params
    # F / K^mu is determined up to the constant it shares with E; its differences between domains are not.
    np.testing.assert_allclose(np.diff(got["F"] / (1 / x["k1"] + got["w2"] * x["k2"]) ** got["mu"]),
                               np.diff(CROSS_TRUE["F"] / K ** CROSS_TRUE["mu"]), atol=1e-6)
    for key in ("alpha", "beta", "eta", "A", "B"):
        assert got[key] == pytest.approx(CROSS_TRUE[key], rel=1e-3)


def cross_loss(name: str, k2: float, n, d, r) -> float:
    x = {"N": np.array(n), "D": np.array(d), "r": np.array(r), "k1": np.array(DOMAINS[name][0]), "k2": np.array(k2)}
    return float(CROSS.predict(CROSS_TRUE, x))


def test_cross_domain_fit_from_a_table_measures_K_and_predicts_each_domain():
    rows, k2s = [], {}
    for name, (k1, _) in DOMAINS.items():
        # k2 is measured from the table's own first eval (smallest size, largest ratio), which the law produces:
        # solve k2 = 1 - L1(k2) / k1.
        k2s[name] = brentq(lambda k: 1 - cross_loss(name, k, SIZES[0], TOKENS[0], 1.0) / k1 - k, 0.0, 0.999)
        for n in SIZES:
            for r in (0.25, 0.5, 1.0):
                rows.append((f"{name}-{n:g}-{r}", n, 0.0, r, 3.9, k1, name))
                rows += [(f"{name}-{n:g}-{r}", n, d, r, law(GENERAL, n, d, 1 - r), cross_loss(name, k2s[name], n, d, r),
                          name) for d in TOKENS[::2]]
    cols = {key: [row[i] for row in rows] for i, key in enumerate(("run_id", "N", "D", "r", "general_loss",
                                                                   "domain_loss", "domain"))}
    table = table_from_columns(cols | {"status": ["ok"] * len(rows), "N_total": cols["N"], "step": cols["D"]})
    result = fit_cross_domain(table, FitConfig(starts=4))
    assert result.domain.form is CROSS and result.domain.r2 == pytest.approx(1.0, abs=1e-8)
    assert result.learnability == {k: {"k1": DOMAINS[k][0], "k2": pytest.approx(k2s[k]), "D1": TOKENS[0]}
                                   for k in DOMAINS}
    for name in DOMAINS:  # between the fitted points, for every domain
        assert float(result.domain_loss(2e6, 5e6, 0.7, name)) == pytest.approx(
            cross_loss(name, k2s[name], 2e6, 5e6, 0.7), rel=1e-3)
    again = DcptFit.from_dict(result.to_dict())
    assert float(again.domain_loss(4e6, 1e7, 0.5, "math")) == float(result.domain_loss(4e6, 1e7, 0.5, "math"))
    with pytest.raises(CptError, match="no learnability coefficient for domain 'chem'"):
        result.domain_loss(4e6, 1e7, 0.5, "chem")
    with pytest.raises(CptError, match=r"D-CPT \(cross-domain\) needs .*>= 3 domains; .* 1 domain \(law\)"):
        fit_cross_domain(table.subset(table.domain == "law"))


def test_round_trip_through_a_dict_predicts_the_same(exact_fit):
    again = DcptFit.from_dict(exact_fit.to_dict())
    assert float(again.general_loss(1e6, 2e7, 0.9)) == float(exact_fit.general_loss(1e6, 2e7, 0.9))
    assert again.pre_cpt == exact_fit.pre_cpt and DCPT.name == again.domain.form.name
