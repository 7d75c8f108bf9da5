"""The CMR Scaling Law (Gu et al. 2024, "CMR Scaling Law: Predicting Critical Mixture Ratios for Continual
Pre-training of Language Models", §3-5); see ``shared/REFERENCES.md`` §5.

The Critical Mixture Ratio at ``T`` tokens is the largest domain ratio ``R`` whose general loss rises by at most
``epsilon`` (absolute, nats; 0.05 in the paper) over the model before CPT, while the domain loss falls. The
paper's forms, each fitted here with :func:`cpt.laws.fit.fit`:

- loss vs ratio at fixed ``T``: ``L(R) = a * R**s + b`` (log residuals, as losses);
- loss change vs tokens at fixed ``R``: ``dL_dom(T) = a1 * T**s1 + b1`` and
  ``dL_gen(T) = a2 * T**s2 + a3 * T**s3 + b2`` (plain residuals: changes can be negative);
- the law: ``R_CMR(T) = a4 * T**s4 + b3`` (plain residuals).

``T`` counts tokens in units of ``t_unit`` (0.2B in the paper, so ``T = 100`` is 20B). ``dL`` is the loss at
``D = T * t_unit`` minus the loss at ``D = 0`` (the run's step-0 evaluation, or its size's mean over runs).

Direct estimate at ``T`` (:func:`critical_ratio`): each ratio's fitted change curves give its general and domain
loss at ``T``; ``L(R) = a R^s + b`` is fitted across the ratios for each loss; the answer is the largest ``R`` in
``(0, 1]`` with ``L_gen(R) - L_gen(0) <= epsilon`` and ``L_dom(R) < L_dom(0)``. The law is then fitted to the
direct estimates at the measured token counts (:func:`fit_cmr_law`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cpt.errors import CptError
from cpt.laws.fit import FitConfig, FitResult, Form, Inputs, Param, fit
from cpt.laws.table import Table, require

T_UNIT = 2e8  # tokens per unit of T (Gu et al. 2024: 0.2B)
EPSILON = 0.05  # nats (Gu et al. 2024)
_S_GRID = (-1.0, -0.3, 0.3, 1.0, 2.0)
MIN_TOKENS = 5  # distinct D > 0 per run: the general-change form has 5 parameters


def power_offset(x: Inputs, a, s, b, key: str = "R") -> np.ndarray:
    return a * x[key] ** s + b


LOSS_VS_RATIO = Form("loss-vs-ratio", "L(R) = a*R^s + b", ("R",),
                     (Param("a", -1e3, 1e3), Param("s", -5.0, 5.0, _S_GRID), Param("b", -1e3, 1e3)),
                     lambda x, a, s, b: power_offset(x, a, s, b, "R"))
DOMAIN_CHANGE = Form("domain-change", "dL_dom(T) = a1*T^s1 + b1", ("T",),
                     (Param("a1", -1e3, 1e3), Param("s1", -5.0, 5.0, _S_GRID), Param("b1", -1e3, 1e3)),
                     lambda x, a1, s1, b1: power_offset(x, a1, s1, b1, "T"), residual="linear")
GENERAL_CHANGE = Form("general-change", "dL_gen(T) = a2*T^s2 + a3*T^s3 + b2", ("T",),
                      (Param("a2", -1e3, 1e3), Param("s2", -5.0, 5.0, (-1.0, -0.3, 0.3, 1.0)),
                       Param("a3", -1e3, 1e3), Param("s3", -5.0, 5.0, (-0.5, 0.1, 0.5)), Param("b2", -1e3, 1e3)),
                      lambda x, a2, s2, a3, s3, b2: a2 * x["T"] ** s2 + a3 * x["T"] ** s3 + b2,
                      residual="linear")
CMR_LAW = Form("cmr-law", "R_CMR(T) = a4*T^s4 + b3", ("T",),
               (Param("a4", -1e3, 1e3), Param("s4", -5.0, 5.0, _S_GRID), Param("b3", -1e3, 1e3)),
               lambda x, a4, s4, b3: power_offset(x, a4, s4, b3, "T"), residual="linear")


def cmr_law(T, a4: float, s4: float, b3: float) -> np.ndarray:
    """``R_CMR(T) = a4 * T**s4 + b3`` (Gu et al. 2024)."""
    return a4 * np.asarray(T, dtype=float) ** s4 + b3


@dataclass
class SizeCurves:
    """One model size: its pre-CPT losses and, per domain ratio, the fitted loss-change curves over ``T``."""

    N: float
    general0: float
    domain0: float
    T: list[float]  # measured token counts (units of t_unit)
    general: dict[float, FitResult]
    domain: dict[float, FitResult]

    @property
    def ratios(self) -> list[float]:
        return sorted(self.general)

    def losses_at(self, T: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ratios, general losses, domain losses)`` predicted at ``T`` by each ratio's change curves."""
        R = np.array(self.ratios)
        t = {"T": np.array([float(T)])}
        gen = np.array([self.general0 + self.general[r].predict(t)[0] for r in R])
        dom = np.array([self.domain0 + self.domain[r].predict(t)[0] for r in R])
        return R, gen, dom

    def to_dict(self) -> dict:
        return {"N": self.N, "general0": self.general0, "domain0": self.domain0, "T": self.T,
                "general": {repr(r): f.to_dict() for r, f in self.general.items()},
                "domain": {repr(r): f.to_dict() for r, f in self.domain.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "SizeCurves":
        return cls(d["N"], d["general0"], d["domain0"], d["T"],
                   {float(r): FitResult.from_dict(f, GENERAL_CHANGE) for r, f in d["general"].items()},
                   {float(r): FitResult.from_dict(f, DOMAIN_CHANGE) for r, f in d["domain"].items()})


@dataclass
class CmrFit:
    """Change curves per model size, and the CMR law per size for ``epsilon`` (None where it could not be
    fitted, with the reason in ``notes``)."""

    sizes: dict[float, SizeCurves]
    epsilon: float
    t_unit: float
    laws: dict[float, FitResult | None]
    estimates: dict[float, list[dict]]  # per size: the direct estimates the law was fitted to
    notes: dict[float, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"epsilon": self.epsilon, "t_unit": self.t_unit,
                "sizes": {repr(n): c.to_dict() for n, c in self.sizes.items()},
                "laws": {repr(n): (f.to_dict() if f else None) for n, f in self.laws.items()},
                "estimates": {repr(n): e for n, e in self.estimates.items()},
                "notes": {repr(n): s for n, s in self.notes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "CmrFit":
        return cls({float(n): SizeCurves.from_dict(c) for n, c in d["sizes"].items()}, d["epsilon"], d["t_unit"],
                   {float(n): (FitResult.from_dict(f, CMR_LAW) if f else None) for n, f in d["laws"].items()},
                   {float(n): e for n, e in d["estimates"].items()}, {float(n): s for n, s in d["notes"].items()})


def require_cmr(table: Table) -> None:
    """Raise unless every size has a ``D = 0`` baseline, >= 3 ratios, and every run >= 5 token counts."""
    require(table, "CMR", ratios=3, tokens=MIN_TOKENS)
    for n in np.unique(table.N):
        rows = table.subset(table.N == n)
        if not (rows.D == 0).any():
            raise CptError(f"CMR measures loss changes from the model before CPT; N = {n:g} has no D = 0 row "
                           "(evaluate each run at step 0)")
        require(rows, f"CMR (at N = {n:g})", ratios=3)
        for r in np.unique(rows.r):
            count = len(np.unique(rows.D[(rows.r == r) & (rows.D > 0)]))
            if count < MIN_TOKENS:
                raise CptError(f"CMR fits dL_gen(T) = a2*T^s2 + a3*T^s3 + b2 (5 parameters) to each run; N = "
                               f"{n:g}, r = {r:g} has {count} evaluation(s) with D > 0, needs >= {MIN_TOKENS}")


def _mean_by(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique = np.unique(keys)
    return unique, np.array([values[keys == k].mean() for k in unique])


def fit_curves(table: Table, t_unit: float = T_UNIT, config: FitConfig | None = None) -> dict[float, SizeCurves]:
    """Fit the change-vs-tokens forms to every (size, ratio) of ``table``."""
    require_cmr(table)
    out = {}
    for n in np.unique(table.N):
        rows = table.subset(table.N == n)
        start = rows.D == 0
        g0, d0 = float(rows.general_loss[start].mean()), float(rows.domain_loss[start].mean())
        general, domain = {}, {}
        for r in np.unique(rows.r):
            run = rows.subset((rows.r == r) & (rows.D > 0))
            D, gen = _mean_by(run.D, run.general_loss)
            _, dom = _mean_by(run.D, run.domain_loss)
            T = {"T": D / t_unit}
            try:
                general[float(r)] = fit(GENERAL_CHANGE, T, gen - g0, config)
                domain[float(r)] = fit(DOMAIN_CHANGE, T, dom - d0, config)
            except CptError as e:
                raise CptError(f"CMR, N = {n:g}, r = {r:g}: {e}") from None
        out[float(n)] = SizeCurves(float(n), g0, d0, [float(t) for t in np.unique(rows.D[rows.D > 0]) / t_unit],
                                   general, domain)
    return out


def critical_ratio(curves: SizeCurves, T: float, epsilon: float = EPSILON,
                   config: FitConfig | None = None) -> dict:
    """The direct CMR estimate at ``T`` (see the module docstring).

    Returns:
        ``ratio`` (0.0 when even the smallest ratio breaks the tolerance), the predicted ``general_rise`` and
        ``domain_change`` there, and the two loss-vs-ratio fits' parameters.
    """
    R, gen, dom = curves.losses_at(T)
    if len(R) < 3:
        raise CptError(f"the CMR estimate fits L(R) = a*R^s + b across ratios and needs >= 3, got {len(R)}")
    try:
        fg = fit(LOSS_VS_RATIO, {"R": R}, gen, config)
        fd = fit(LOSS_VS_RATIO, {"R": R}, dom, config)
    except CptError as e:
        raise CptError(f"CMR at N = {curves.N:g}, T = {T:g}: {e}") from None
    grid = np.linspace(1e-3, 1.0, 4000)
    rise = fg.predict({"R": grid}) - curves.general0
    fall = fd.predict({"R": grid}) - curves.domain0
    ok = (rise <= epsilon) & (fall < 0)
    ratio = 0.0
    if ok.any():
        i = int(np.flatnonzero(ok)[-1])
        ratio = float(grid[i])
        if i + 1 < len(grid):  # refine the crossing between this grid point and the next by bisection
            lo, hi = grid[i], grid[i + 1]
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                m = {"R": np.array([mid])}
                good = fg.predict(m)[0] - curves.general0 <= epsilon and fd.predict(m)[0] < curves.domain0
                lo, hi = (mid, hi) if good else (lo, mid)
            ratio = float(lo)
    at = {"R": np.array([max(ratio, 1e-3)])}
    return {"T": float(T), "ratio": ratio, "general_rise": float(fg.predict(at)[0] - curves.general0),
            "domain_change": float(fd.predict(at)[0] - curves.domain0), "general_vs_ratio": fg.params,
            "domain_vs_ratio": fd.params}


def fit_cmr_law(curves: SizeCurves, epsilon: float = EPSILON,
                config: FitConfig | None = None) -> tuple[FitResult | None, list[dict], str]:
    """Fit ``R_CMR(T) = a4 T^s4 + b3`` to the direct estimates at the size's measured token counts.

    Returns:
        ``(law or None, estimates, note)``: no law when the estimates do not vary with ``T`` (say 1.0 at every
        ``T``: the tolerance is never reached), with the reason in ``note``.
    """
    estimates = [critical_ratio(curves, T, epsilon, config) for T in curves.T]
    R = np.array([e["ratio"] for e in estimates])
    if np.ptp(R) < 1e-6:
        return None, estimates, (f"R_CMR is {R[0]:.3g} at every measured T for epsilon {epsilon:g}: no trend "
                                 "to fit the CMR law to")
    try:
        law = fit(CMR_LAW, {"T": np.array(curves.T)}, R, config)
    except CptError as e:
        return None, estimates, f"the CMR law could not be fitted: {e}"
    return law, estimates, ""


def fit_cmr(table: Table, epsilon: float = EPSILON, t_unit: float = T_UNIT,
            config: FitConfig | None = None) -> CmrFit:
    """Change curves for every size and ratio, then the CMR law per size for ``epsilon``."""
    if not epsilon > 0 or not t_unit > 0:
        raise CptError(f"epsilon and the token unit must be > 0, got {epsilon} and {t_unit}")
    sizes = fit_curves(table, t_unit, config)
    laws, estimates, notes = {}, {}, {}
    for n, curves in sizes.items():
        laws[n], estimates[n], note = fit_cmr_law(curves, epsilon, config)
        if note:
            notes[n] = note
    return CmrFit(sizes, epsilon, t_unit, laws, estimates, notes)
