"""Data Mixing Law (Ye et al. 2024), L = c + k exp(t r): recovery per size at the final token count."""

from __future__ import annotations

import numpy as np
import pytest

from cpt.errors import CptError
from cpt.laws.fit import fit
from cpt.laws.mixing import MIXING, SizeMix, final_rows, fit_mixing, mixing_loss
from cpt.laws.table import table_from_columns

GENERAL = {1e6: dict(c=2.8, k=0.05, t=2.5), 4e6: dict(c=2.5, k=0.04, t=2.6)}  # rises with the domain share
DOMAIN = {1e6: dict(c=1.6, k=1.2, t=-2.0), 4e6: dict(c=1.4, k=1.1, t=-2.1)}  # falls with it
RATIOS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)


def sweep(noise=0.0, ratios=RATIOS, seed=0):
    """Runs to D = 4e6 with evals at 1e6, 2e6, 4e6; the law holds at the last. One extra ratio stops at 2e6."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in GENERAL:
        for r in ratios + (0.33,):
            rows.append((f"{n:g}-{r}", n, 0.0, r, 3.5, 4.0))  # before CPT
            for d in (1e6, 2e6, 4e6):
                if r == 0.33 and d > 2e6:
                    continue
                early = 1 + 1e5 / d if d < 4e6 else 1.0  # not yet on the law before the last eval
                g = float(mixing_loss({"r": np.array(r)}, **GENERAL[n])) * early
                dm = float(mixing_loss({"r": np.array(r)}, **DOMAIN[n])) * early
                rows.append((f"{n:g}-{r}", n, d, r, g * np.exp(noise * rng.standard_normal()),
                             dm * np.exp(noise * rng.standard_normal())))
    cols = {k: [row[i] for row in rows] for i, k in enumerate(("run_id", "N", "D", "r", "general_loss",
                                                               "domain_loss"))}
    n = len(rows)
    return table_from_columns(cols | {"status": ["ok"] * n, "N_total": cols["N"], "step": [0] * n})


def test_recovers_both_losses_per_size_without_noise():
    result = fit_mixing(sweep())
    assert sorted(result) == [1e6, 4e6]
    for n, m in result.items():
        assert m.D == 4e6  # the last eval every full run reached (the 0.33 run stopped at 2e6)
        assert m.general.params == pytest.approx(GENERAL[n], rel=1e-4)
        assert m.domain.params == pytest.approx(DOMAIN[n], rel=1e-4)
        assert m.general0 == 3.5
    again = SizeMix.from_dict(result[1e6].to_dict())
    assert again.domain.params == result[1e6].domain.params


def test_recovers_with_noise():
    result = fit_mixing(sweep(noise=0.002, seed=3))
    for n, m in result.items():
        assert m.general.params == pytest.approx(GENERAL[n], rel=0.1)
        assert m.domain.params == pytest.approx(DOMAIN[n], rel=0.05)
        r = np.linspace(0, 1, 11)
        np.testing.assert_allclose(m.domain.predict({"r": r}), mixing_loss({"r": r}, **DOMAIN[n]), rtol=0.005)


def test_form_alone_both_signs_of_t():
    r = np.linspace(0.0, 1.0, 9)
    for true in (dict(c=2.0, k=0.3, t=1.5), dict(c=1.5, k=2.0, t=-4.0)):
        assert fit(MIXING, {"r": r}, MIXING.predict(true, {"r": r})).params == pytest.approx(true, rel=1e-5)


def test_needs_three_ratios_at_a_common_token_count():
    with pytest.raises(CptError, match="the Data Mixing Law needs >= 3 ratios; .* has 2 ratios"):
        fit_mixing(sweep(ratios=(0.5,)))
    table = sweep(ratios=(0.5, 1.0))  # with the early-stopping 0.33 run: 3 ratios, but only up to D = 2e6
    assert final_rows(table, 1e6).D[0] == 2e6
