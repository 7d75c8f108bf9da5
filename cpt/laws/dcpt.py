"""The D-CPT Law (Que et al. 2024, "D-CPT Law: Domain-specific Continual Pre-Training Scaling Law for Large
Language Models", Eq. 4 and §3.3), and its cross-domain variant (§3.4); see ``shared/REFERENCES.md`` §5.

    L(N, D, r) = E + A / N**alpha + B * r**eta / D**beta + C / (r + eps)**gamma,   all 9 parameters > 0

is fitted separately to the general and the domain validation loss. ``r`` is the share of *that* loss's own
corpus in the CPT mixture: the table's ``r`` (the domain share) for the domain loss, and ``1 - r`` (the general
share) for the general loss. A run with domain share 1 has general share 0, which the ``C / (r + eps)**gamma``
term takes (``eps > 0``). ``N`` is non-embedding parameters, ``D`` CPT tokens; rows at ``D = 0`` (the model before
CPT) cannot enter a law with ``1 / D**beta`` and give the pre-CPT losses instead.

Cross-domain: ``L(N, D, r, K) = D-CPT + F / K**mu`` with the domain-specific learnability coefficient
``K = w1 / k1 + w2 * k2`` (Que et al. 2024, Eq. 6), one law for the domain losses of several domains. How ``k1``
and ``k2`` are measured here is in :func:`learnability`. ``w1`` is fixed to 1: scaling ``w1`` and ``w2``
together only rescales ``K``, which ``F`` absorbs, so only ``w2 / w1`` can be fitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cpt.errors import CptError
from cpt.laws.fit import CvResult, FitConfig, FitResult, Form, Inputs, Param, cross_validate, fit
from cpt.laws.table import Table, require

LOSSES = ("general", "domain")
CV_KEYS = {"ratio": "r", "size": "N", "D": "D"}


def dcpt_loss(x: Inputs, E, A, alpha, B, eta, beta, C, gamma, eps) -> np.ndarray:
    """Que et al. 2024, Eq. 4."""
    N, D, r = x["N"], x["D"], x["r"]
    return E + A / N ** alpha + B * r ** eta / D ** beta + C / (r + eps) ** gamma


def cross_domain_loss(x: Inputs, E, A, alpha, B, eta, beta, C, gamma, eps, F, mu, w2) -> np.ndarray:
    """Que et al. 2024, Eq. 6, with ``K = 1/k1 + w2*k2`` (``w1 = 1``)."""
    K = 1.0 / x["k1"] + w2 * x["k2"]
    return dcpt_loss(x, E, A, alpha, B, eta, beta, C, gamma, eps) + F / K ** mu


_DCPT_PARAMS = (
    Param("E", 1e-6, 100.0, log=True),
    Param("A", 1e-10, 1e20, log=True),
    Param("alpha", 1e-3, 3.0, (0.1, 0.3, 0.6)),
    Param("B", 1e-10, 1e20, log=True),
    Param("eta", 1e-3, 3.0, (0.1, 0.5, 1.0)),
    Param("beta", 1e-3, 3.0, (0.1, 0.3, 0.6)),
    Param("C", 1e-10, 1e3, log=True),
    Param("gamma", 1e-3, 3.0, (0.1, 0.5, 1.0)),
    Param("eps", 1e-4, 1.0, (0.01, 0.1, 0.5), log=True),
)
DCPT = Form("dcpt", "L = E + A/N^alpha + B*r^eta/D^beta + C/(r+eps)^gamma", ("N", "D", "r"), _DCPT_PARAMS,
            dcpt_loss)
CROSS = Form("dcpt-cross", "L = E + A/N^alpha + B*r^eta/D^beta + C/(r+eps)^gamma + F/K^mu, K = 1/k1 + w2*k2",
             ("N", "D", "r", "k1", "k2"),
             _DCPT_PARAMS + (Param("F", 1e-10, 1e6, log=True), Param("mu", 1e-3, 5.0, (0.5, 1.5)),
                             Param("w2", 1e-6, 1e6, (0.3, 3.0), log=True)), cross_domain_loss)

NEEDS = dict(sizes=2, ratios=3, tokens=3)


def require_dcpt(table: Table, cross: bool = False) -> None:
    """Raise unless ``table`` can pin down the law: >= 2 sizes, >= 3 ratios, >= 3 token counts (3 domains)."""
    require(table.cpt_rows(), "D-CPT" + (" (cross-domain)" if cross else ""), **NEEDS, domains=3 if cross else 0)


def own_share(table: Table, loss: str) -> np.ndarray:
    """The share of ``loss``'s own corpus: the domain share for the domain loss, ``1 - r`` for the general."""
    return table.r if loss == "domain" else 1.0 - table.r


def inputs_of(table: Table, loss: str) -> tuple[Inputs, np.ndarray]:
    """Law inputs and observed losses of the ``D > 0`` rows."""
    rows = table.cpt_rows()
    return {"N": rows.N, "D": rows.D, "r": own_share(rows, loss)}, getattr(rows, f"{loss}_loss")


def learnability(table: Table) -> dict[str, dict[str, float]]:
    """Each domain's ``k1`` (initial loss) and ``k2`` (early loss-decline rate), measured from the table.

    For each domain, on its smallest model's runs: ``k1`` is the mean domain loss at ``D = 0`` (the model before
    CPT); ``k2`` is the fractional drop ``(k1 - L1) / k1`` to the mean domain loss ``L1`` at the first evaluation
    with ``D > 0``, on the runs at that domain's largest ratio (the fastest learners). Sweeps give every domain
    the same evaluation interval, so the ``k2`` are comparable; ``D1`` is returned to check that.

    Raises:
        CptError: a domain without a ``D = 0`` row or without an evaluation after it.
    """
    out = {}
    for name in sorted(set(table.domain)):
        rows = table.subset(table.domain == name)
        rows = rows.subset(rows.N == rows.N.min())
        start = rows.D == 0
        if not start.any():
            raise CptError(f"cross-domain D-CPT measures each domain's initial loss k1 at D = 0; domain {name!r} "
                           f"has no D = 0 row for N = {rows.N[0]:g} (evaluate at step 0)")
        top = rows.subset(rows.r == rows.r.max())
        later = top.D[top.D > 0]
        if not len(later):
            raise CptError(f"cross-domain D-CPT measures k2 from the first evaluation after D = 0; domain {name!r} "
                           f"has none at N = {rows.N[0]:g}, r = {top.r[0]:g}")
        k1 = float(rows.domain_loss[start].mean())
        d1 = float(later.min())
        l1 = float(top.domain_loss[top.D == d1].mean())
        out[name] = {"k1": k1, "k2": (k1 - l1) / k1, "D1": d1}
    return out


@dataclass
class DcptFit:
    """A fitted D-CPT Law: one fit per loss, the pre-CPT losses per model size and the fitted ranges.

    ``learnability`` is set for the cross-domain variant (the domain fit is then :data:`CROSS`), mapping each
    domain to its ``k1``, ``k2``.
    """

    general: FitResult
    domain: FitResult
    pre_cpt: dict[str, dict[float, float]]
    ranges: dict[str, list[float]]
    domain_name: str
    learnability: dict[str, dict[str, float]] | None = None

    def general_loss(self, N, D, r_domain) -> np.ndarray:
        """Predicted general loss at domain share ``r_domain`` (the law sees the general share ``1 - r``)."""
        N, D, r = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (N, D, r_domain)))
        return self.general.predict({"N": N, "D": D, "r": 1.0 - r})

    def domain_loss(self, N, D, r_domain, domain: str | None = None) -> np.ndarray:
        """Predicted domain loss; the cross-domain fit needs ``domain`` (default: the one fitted on)."""
        N, D, r = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (N, D, r_domain)))
        x = {"N": N, "D": D, "r": r}
        if self.learnability is not None:
            name = domain or self.domain_name
            if name not in self.learnability:
                raise CptError(f"no learnability coefficient for domain {name!r}; the fit knows "
                               f"{', '.join(self.learnability)}")
            x |= {"k1": np.full(N.shape, self.learnability[name]["k1"]),
                  "k2": np.full(N.shape, self.learnability[name]["k2"])}
        return self.domain.predict(x)

    def to_dict(self) -> dict:
        return {"general": self.general.to_dict(), "domain": self.domain.to_dict(),
                "pre_cpt": {k: {repr(n): v for n, v in d.items()} for k, d in self.pre_cpt.items()},
                "ranges": self.ranges, "domain_name": self.domain_name, "learnability": self.learnability}

    @classmethod
    def from_dict(cls, data: dict) -> "DcptFit":
        cross = data.get("learnability") is not None
        return cls(FitResult.from_dict(data["general"], DCPT), FitResult.from_dict(data["domain"],
                                                                                   CROSS if cross else DCPT),
                   {k: {float(n): v for n, v in d.items()} for k, d in data["pre_cpt"].items()},
                   data["ranges"], data["domain_name"], data.get("learnability"))


def _ranges(table: Table) -> dict[str, list[float]]:
    rows = table.cpt_rows()
    return {c: [float(getattr(rows, c).min()), float(getattr(rows, c).max())] for c in ("N", "D", "r")}


def fit_dcpt(table: Table, config: FitConfig | None = None) -> DcptFit:
    """Fit the D-CPT Law to the general and the domain loss of one domain's rows.

    Raises:
        CptError: too few sizes / ratios / token counts, or a fit that does not converge.
    """
    require_dcpt(table)
    fits = {}
    for loss in LOSSES:
        try:
            fits[loss] = fit(DCPT, *inputs_of(table, loss), config)
        except CptError as e:
            raise CptError(f"D-CPT, {loss} loss: {e}") from None
    return DcptFit(fits["general"], fits["domain"],
                   {"general": table.pre_cpt("general_loss"), "domain": table.pre_cpt("domain_loss")},
                   _ranges(table), str(table.domain[0]))


def fit_cross_domain(table: Table, config: FitConfig | None = None) -> DcptFit:
    """Fit the cross-domain law to the domain losses of all domains (>= 3), and the D-CPT Law to the general
    loss of all rows; ``domain_name`` is the first domain, ``pre_cpt["domain"]`` is left empty (it differs by
    domain: it is each domain's ``k1`` at the smallest size)."""
    require_dcpt(table, cross=True)
    k = learnability(table)
    rows = table.cpt_rows()
    x, y = inputs_of(table, "domain")
    x |= {"k1": np.array([k[d]["k1"] for d in rows.domain]), "k2": np.array([k[d]["k2"] for d in rows.domain])}
    try:
        general = fit(DCPT, *inputs_of(table, "general"), config)
        domain = fit(CROSS, x, y, config)
    except CptError as e:
        raise CptError(f"cross-domain D-CPT: {e}") from None
    return DcptFit(general, domain, {"general": table.pre_cpt("general_loss"), "domain": {}}, _ranges(table),
                   sorted(k)[0], k)


def cross_validate_dcpt(table: Table, key: str, folds: int, config: FitConfig | None = None) -> dict[str, CvResult]:
    """Grouped k-fold cross-validation of both losses, holding out ratios, sizes or token counts (``key``)."""
    if key not in CV_KEYS:
        raise CptError(f"--cv must be one of {', '.join(CV_KEYS)}, got {key!r}")
    rows = table.cpt_rows()
    groups = getattr(rows, CV_KEYS[key])
    return {loss: cross_validate(DCPT, *inputs_of(table, loss), groups, key, folds, config,
                                 check=lambda train: require_dcpt(rows.subset(train)))
            for loss in LOSSES}
