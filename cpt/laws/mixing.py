"""The Data Mixing Law (Ye et al. 2024, "Data Mixing Laws: Optimizing Data Mixtures by Predicting Language
Modeling Performance", Eq. 1); see ``shared/REFERENCES.md`` §5.

``L_i(r) = c_i + k_i * exp(sum_j t_ij * r_j)``. With two corpora (general and domain) the proportions sum to 1,
so ``t_i1 * r_1 + t_i2 * (1 - r_1)`` is ``t_i2 + (t_i1 - t_i2) * r_1``: the law is ``L = c + k * exp(t * r)`` in the
domain share ``r`` alone, for the general and for the domain loss (``k > 0``, ``c > 0``, ``t`` of either sign).

The law has no ``N`` or ``D``: it is fitted per model size at that size's final token count (the largest ``D``
reached by at least 3 ratios), as Ye et al. fit mixtures at a fixed model and budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cpt.errors import CptError
from cpt.laws.fit import FitConfig, FitResult, Form, Inputs, Param, fit
from cpt.laws.table import Table, require


def mixing_loss(x: Inputs, c, k, t) -> np.ndarray:
    """Ye et al. 2024, Eq. 1 for two corpora."""
    return c + k * np.exp(t * x["r"])


MIXING = Form("mixing", "L = c + k*exp(t*r)", ("r",),
              (Param("c", 1e-6, 100.0, log=True), Param("k", 1e-10, 100.0, log=True),
               Param("t", -50.0, 50.0, (-5.0, -1.0, 1.0, 5.0))), mixing_loss)


@dataclass
class SizeMix:
    """The law at one model size and token count, for both losses."""

    N: float
    D: float
    general: FitResult
    domain: FitResult
    general0: float | None  # the pre-CPT general loss, when the table has it

    def to_dict(self) -> dict:
        return {"N": self.N, "D": self.D, "general": self.general.to_dict(), "domain": self.domain.to_dict(),
                "general0": self.general0}

    @classmethod
    def from_dict(cls, d: dict) -> "SizeMix":
        return cls(d["N"], d["D"], FitResult.from_dict(d["general"], MIXING),
                   FitResult.from_dict(d["domain"], MIXING), d.get("general0"))


def final_rows(table: Table, n: float) -> Table:
    """Size ``n``'s rows at the largest ``D`` that >= 3 ratios reached."""
    rows = table.subset((table.N == n) & (table.D > 0))
    for d in sorted(np.unique(rows.D), reverse=True):
        at = rows.subset(rows.D == d)
        if len(np.unique(at.r)) >= 3:
            return at
    raise CptError(f"the Data Mixing Law needs >= 3 ratios at a common token count; N = {n:g} has none "
                   f"(ratios {', '.join(f'{r:g}' for r in np.unique(rows.r))})")


def fit_mixing(table: Table, config: FitConfig | None = None) -> dict[float, SizeMix]:
    """Fit ``L = c + k exp(t r)`` to both losses at each size's final common token count."""
    require(table.cpt_rows(), "the Data Mixing Law", ratios=3)
    pre = table.pre_cpt("general_loss")
    out = {}
    for n in np.unique(table.N):
        rows = final_rows(table, float(n))
        try:
            fits = {loss: fit(MIXING, {"r": rows.r}, getattr(rows, f"{loss}_loss"), config)
                    for loss in ("general", "domain")}
        except CptError as e:
            raise CptError(f"Data Mixing Law, N = {n:g}: {e}") from None
        out[float(n)] = SizeMix(float(n), float(rows.D[0]), fits["general"], fits["domain"], pre.get(float(n)))
    return out
