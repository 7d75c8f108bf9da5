"""Recommendations from a fitted law: the three D-CPT usages (Que et al. 2024, §4.3), the CMR for a tolerance
(Gu et al. 2024) and the Data Mixing Law's largest ratio, each with its predicted losses and a recipe snippet.

- Usage 1, general-ability trade-off: the largest domain ratio whose predicted general loss stays within
  ``(1 + tolerance) x`` the pre-CPT general loss. Also on measured ``(ratio, general loss)`` points, as the paper's
  check does (chemistry, 1.8B, 10B tokens, tolerance 3%, pre-CPT 2.8602: 0.924).
- Usage 2, limited domain data: with ``D_dom`` domain tokens, the ratio ``r`` minimising the domain loss
  ``L_d(N, D_dom / r, r)`` (a smaller ``r`` trains on more tokens in all, each domain token still seen once).
- Usage 3, compute allocation: with compute ``C ~= 6 N D`` at a fixed ratio, the ``(N, D)`` minimising the domain
  loss. With ``D = C / 6N`` the law's ``N``-dependence is ``A N^-alpha + B r^eta (6/C)^beta N^beta``, minimal at
  ``N* = (alpha A / (beta B r^eta (6/C)^beta)) ** (1 / (alpha + beta))``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from scipy.optimize import minimize_scalar

from cpt.errors import CptError
from cpt.laws.cmr import CmrFit, critical_ratio, fit_cmr_law
from cpt.laws.dcpt import DcptFit
from cpt.laws.fit import FitConfig
from cpt.laws.mixing import SizeMix


@dataclass
class Recommendation:
    """A recommended domain share with what it was computed from and what the law predicts there."""

    usage: str
    ratio: float  # the domain share
    inputs: dict[str, float | str]
    predicted: dict[str, float]
    notes: list[str] = field(default_factory=list)
    round_down: bool = False  # "the largest ratio such that ...": the snippet must not round up past it

    def to_dict(self) -> dict:
        return asdict(self)


def largest_ratio(general_loss: Callable[[np.ndarray], np.ndarray], limit: float) -> float | None:
    """The largest domain share in [0, 1] with ``general_loss(r) <= limit`` (a dense grid, then bisection to
    the crossing), or None when no share qualifies."""
    grid = np.linspace(0.0, 1.0, 10001)
    ok = general_loss(grid) <= limit
    if not ok.any():
        return None
    i = int(np.flatnonzero(ok)[-1])
    if i == len(grid) - 1:
        return 1.0
    lo, hi = grid[i], grid[i + 1]
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if general_loss(np.array([mid]))[0] <= limit else (lo, mid)
    return float(lo)


def pre_cpt_general(pre_cpt: dict[float, float], N: float, given: float | None) -> float:
    """The pre-CPT general loss: ``given``, else the table's ``D = 0`` loss at exactly this size."""
    if given is not None:
        return given
    if N in pre_cpt:
        return pre_cpt[N]
    known = ", ".join(f"{n:g}" for n in sorted(pre_cpt)) or "none (no D = 0 rows)"
    raise CptError(f"no pre-CPT general loss for N = {N:g}: the table has it for N = {known}; give "
                   "--pre-cpt-loss")


def _extrapolation(fit: DcptFit, **values: float) -> list[str]:
    notes = []
    for key, v in values.items():
        lo, hi = fit.ranges[key]
        if not lo <= v <= hi:
            notes.append(f"{key} = {v:.4g} lies outside the fitted range [{lo:.4g}, {hi:.4g}]: extrapolated")
    return notes


def usage1(fit: DcptFit, N: float, D: float, tolerance: float, pre_cpt: float | None = None) -> Recommendation:
    """D-CPT usage 1: the largest domain share keeping the general loss within ``(1 + tolerance)`` of pre-CPT."""
    base = pre_cpt_general(fit.pre_cpt["general"], N, pre_cpt)
    limit = (1.0 + tolerance) * base
    ratio = largest_ratio(lambda r: fit.general_loss(N, D, r), limit)
    if ratio is None:
        raise CptError(f"no domain ratio keeps the predicted general loss within {tolerance:.1%} of {base:.4f} "
                       f"at N = {N:g}, D = {D:g} (at r = 0 it is {float(fit.general_loss(N, D, 0.0)):.4f})")
    return Recommendation("1", ratio, {"N": N, "D": D, "tolerance": tolerance, "pre_cpt_general_loss": base,
                                       "limit": limit},
                          {"general_loss": float(fit.general_loss(N, D, ratio)),
                           "domain_loss": float(fit.domain_loss(N, D, ratio))},
                          _extrapolation(fit, N=N, D=D), round_down=True)


def usage1_measured(ratios, losses, pre_cpt: float, tolerance: float) -> Recommendation:
    """Usage 1 on measured ``(domain ratio, general loss)`` points: the largest measured ratio within tolerance,
    and the crossing of the limit by linear interpolation towards the next measured ratio."""
    r, loss = np.asarray(ratios, dtype=float), np.asarray(losses, dtype=float)
    if len(r) == 0 or len(r) != len(loss):
        raise CptError(f"--measured needs equal numbers of ratios and losses, got {len(r)} and {len(loss)}")
    for ri, li in zip(r, loss):
        if not 0 < ri <= 1:  # also NaN
            raise CptError(f"--measured: ratio {ri:g} in {ri:g}:{li:g} is not a domain share; ratios must be in "
                           "(0, 1], e.g. 0.9:2.905")
        if not 0 < li < math.inf:
            raise CptError(f"--measured: loss {li:g} in {ri:g}:{li:g} is not a loss; losses must be finite and "
                           "> 0 (nats/token), e.g. 0.9:2.905")
    order = np.argsort(r)
    r, loss = r[order], loss[order]
    limit = (1.0 + tolerance) * pre_cpt
    ok = loss <= limit
    if not ok.any():
        raise CptError(f"no measured ratio keeps the general loss within {tolerance:.1%} of {pre_cpt:.4f} "
                       f"(limit {limit:.4f}; the lowest measured loss is {loss.min():.4f})")
    i = int(np.flatnonzero(ok)[-1])
    crossing = r[i]
    if i + 1 < len(r) and loss[i + 1] > loss[i]:
        crossing = r[i] + (r[i + 1] - r[i]) * (limit - loss[i]) / (loss[i + 1] - loss[i])
    return Recommendation("1 (measured points)", float(r[i]),
                          {"tolerance": tolerance, "pre_cpt_general_loss": pre_cpt, "limit": limit},
                          {"general_loss": float(loss[i]), "interpolated_ratio": float(crossing)})


def usage1_mixing(mix: SizeMix, tolerance: float, pre_cpt: float | None = None) -> Recommendation:
    """Usage 1 with the Data Mixing Law of one size (at its fitted token count)."""
    base = pre_cpt if pre_cpt is not None else mix.general0
    if base is None:
        raise CptError(f"no pre-CPT general loss for N = {mix.N:g} (no D = 0 rows); give --pre-cpt-loss")
    limit = (1.0 + tolerance) * base
    ratio = largest_ratio(lambda r: mix.general.predict({"r": r}), limit)
    if ratio is None:
        raise CptError(f"no domain ratio keeps the predicted general loss within {tolerance:.1%} of {base:.4f}")
    at = {"r": np.array([ratio])}
    return Recommendation("1 (Data Mixing Law)", ratio, {"N": mix.N, "D": mix.D, "tolerance": tolerance,
                                                          "pre_cpt_general_loss": base, "limit": limit},
                          {"general_loss": float(mix.general.predict(at)[0]),
                           "domain_loss": float(mix.domain.predict(at)[0])}, round_down=True)


def usage2(fit: DcptFit, N: float, domain_tokens: float) -> Recommendation:
    """D-CPT usage 2: with ``domain_tokens`` of domain data, the share minimising ``L_d(N, D_dom / r, r)``."""
    if not domain_tokens > 0:
        raise CptError(f"--domain-tokens must be > 0, got {domain_tokens:g}")

    def loss(r):
        return fit.domain_loss(N, domain_tokens / r, r)

    grid = np.geomspace(1e-3, 1.0, 3001)
    values = loss(grid)
    i = int(np.nanargmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = minimize_scalar(lambda r: float(loss(np.array([r]))[0]), bounds=(lo, hi), method="bounded",
                           options={"xatol": 1e-9})
    ratio = float(best.x) if best.fun <= values[i] else float(grid[i])
    D = domain_tokens / ratio
    notes = _extrapolation(fit, N=N, D=D)
    if ratio <= grid[0] * 1.01:
        notes.append("the optimum sits at the smallest share searched (0.001): the law favours ever more "
                     "general data here")
    return Recommendation("2", ratio, {"N": N, "domain_tokens": domain_tokens},
                          {"domain_loss": float(loss(np.array([ratio]))[0]),
                           "general_loss": float(fit.general_loss(N, D, ratio)), "total_tokens": D,
                           "general_tokens": D - domain_tokens}, notes)


def usage3(fit: DcptFit, compute: float, ratio: float) -> Recommendation:
    """D-CPT usage 3: with compute ``C ~= 6ND`` at domain share ``ratio``, the ``(N, D)`` minimising the domain
    loss, in closed form (module docstring)."""
    if not compute > 0 or not 0 < ratio <= 1:
        raise CptError(f"--compute must be > 0 and --ratio in (0, 1], got {compute:g} and {ratio:g}")
    p = fit.domain.params
    N = (p["alpha"] * p["A"] / (p["beta"] * p["B"] * ratio ** p["eta"] * (6.0 / compute) ** p["beta"])) \
        ** (1.0 / (p["alpha"] + p["beta"]))
    D = compute / (6.0 * N)
    return Recommendation("3", ratio, {"compute": compute},
                          {"N": float(N), "D": float(D), "domain_loss": float(fit.domain_loss(N, D, ratio)),
                           "general_loss": float(fit.general_loss(N, D, ratio))}, _extrapolation(fit, N=N, D=D))


def usage_cmr(cmr: CmrFit, N: float, tokens: float, epsilon: float,
              config: FitConfig | None = None) -> Recommendation:
    """The CMR at ``tokens`` for ``epsilon``: the direct estimate from the fitted curves, and the CMR law fitted
    to the direct estimates at the measured token counts, evaluated at ``tokens``."""
    if N not in cmr.sizes:
        raise CptError(f"the CMR fit has sizes N = {', '.join(f'{n:g}' for n in cmr.sizes)}; --n {N:g} is not one")
    curves = cmr.sizes[N]
    T = tokens / cmr.t_unit
    direct = critical_ratio(curves, T, epsilon, config)
    law, _, note = fit_cmr_law(curves, epsilon, config) if epsilon != cmr.epsilon else \
        (cmr.laws[N], None, cmr.notes.get(N, ""))
    predicted = {"general_rise": direct["general_rise"], "domain_change": direct["domain_change"],
                 "general_loss": curves.general0 + direct["general_rise"],
                 "domain_loss": curves.domain0 + direct["domain_change"]}
    notes = [note] if note else []
    if law is not None:
        predicted["law_ratio"] = float(law.predict({"T": np.array([T])})[0])
    if not min(curves.T) <= T <= max(curves.T):
        notes.append(f"T = {T:.4g} lies outside the measured [{min(curves.T):.4g}, {max(curves.T):.4g}]: "
                     "extrapolated")
    if direct["ratio"] == 0.0:
        notes.append(f"even the smallest ratio raises the general loss by more than epsilon = {epsilon:g}")
    return Recommendation("cmr", direct["ratio"], {"N": N, "tokens": tokens, "T": T, "epsilon": epsilon},
                          predicted, notes, round_down=True)


def _name(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name) else json.dumps(name)


def mixture_snippet(rec: Recommendation, domain_name: str = "domain", general_name: str = "general") -> str:
    """A stage ``mixture:`` line for a recipe, with a comment saying where it came from.

    Shares have 3 decimals and sum to 1; a "largest ratio such that" answer is rounded down, never up past it.
    """
    if domain_name == general_name:
        raise CptError(f"--domain-name and --general-name are both {domain_name!r}; name two corpora")
    scaled = rec.ratio * 1000
    domain = (math.floor(scaled + 1e-9) if rec.round_down else round(scaled)) / 1000
    general = round(1.0 - domain, 3)
    said = ", ".join(f"{k} {v:.4g}" for k, v in rec.predicted.items())
    tolerance = rec.inputs.get("tolerance", 0.03)
    return (f"# cpt plan, usage {rec.usage}: domain share {rec.ratio:.4f}; predicted {said}\n"
            f"mixture: {{{_name(domain_name)}: {domain}, {_name(general_name)}: {general}}}\n"
            "# or as a forgetting budget: replay that starts at this share and adapts to hold the general loss\n"
            f"# mixture: {{{_name(domain_name)}: 1.0}}\n"
            f"# replay: {{kind: corpus, from: [{_name(general_name)}], rate: auto, start: {general}, "
            f"max: {max(0.5, general)}, hold: {{set: upstream, tolerance: {tolerance}}}}}\n")


def format_recommendation(rec: Recommendation) -> str:
    """Readable lines: the usage, its inputs, the ratio, predicted losses and notes."""
    def show(v):
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    lines = [f"usage {rec.usage}: domain share {rec.ratio:.4f} (general share {1 - rec.ratio:.4f})",
             "  inputs: " + ", ".join(f"{k} {show(v)}" for k, v in rec.inputs.items()),
             "  predicted: " + ", ".join(f"{k} {show(v)}" for k, v in rec.predicted.items())]
    lines += [f"  note: {n}" for n in rec.notes]
    return "\n".join(lines)
