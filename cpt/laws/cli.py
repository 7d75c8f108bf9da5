"""``cpt fit-law`` and ``cpt plan``: fit a mixture-ratio law to a sweep's results table, write FIT.json and plots;
turn FIT.json into a recommended mixture and a recipe snippet.

``cpt.cli`` calls :func:`add_commands` with its subparsers and :func:`dispatch` with the parsed arguments. The
laws (numpy, scipy) are imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from cpt.errors import CptError

# Kept here rather than imported so that building `cpt`'s parser does not import numpy and scipy (about 1 s);
# tests/test_laws_cli.py checks them against the modules that own them.
CV_KEYS = ("ratio", "size", "D")
METHODS = ("lbfgsb", "trf")
LAWS = ("dcpt", "cmr", "mixing")
USAGES = ("1", "2", "3", "cmr")
FIT_VERSION = 1
_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def count(text: str) -> float:
    """``"1.8B"`` -> 1.8e9; also plain numbers (``2e10``) and K/M/B/G/T suffixes."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a number like 1.8e9 or 1.8B, got {text!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2).lower()]


def grid_option(text: str) -> tuple[str, tuple[float, ...]]:
    """``"alpha=0.1,0.3"`` -> ``("alpha", (0.1, 0.3))``."""
    name, _, values = text.partition("=")
    try:
        return name.strip(), tuple(float(v) for v in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid expects NAME=V1,V2,..., got {text!r}") from None


def add_commands(sub) -> None:
    """Add ``fit-law`` and ``plan`` to ``cpt``'s subparsers."""
    p = sub.add_parser("fit-law", help="fit a D-CPT, CMR or Data Mixing law to a sweep's results table",
                       description="Fit a mixture-ratio law to TABLE (CSV or Parquet, one row per run and "
                                   "evaluation step, as `cpt sweep` writes it): parameters, Huber / R² / RMSE, "
                                   "parameters on a bound, optional grouped cross-validation and plots.")
    p.add_argument("table", help="results table, e.g. runs/sweep/results.csv")
    p.add_argument("--law", choices=LAWS, required=True, help="dcpt: D-CPT Law; cmr: CMR law; mixing: Data "
                   "Mixing Law")
    p.add_argument("--domain", metavar="NAME", help="the domain to fit, when the table holds several")
    p.add_argument("--cross-domain", action="store_true",
                   help="dcpt only: fit the cross-domain law (F/K^mu) over all domains (>= 3)")
    p.add_argument("--out", metavar="FIT.json", help="write the fit here (what `cpt plan --law-fit` reads)")
    p.add_argument("--json", action="store_true", help="print the fit as JSON instead of text")
    p.add_argument("--plot", metavar="DIR", help="write plots (observed vs fitted, predicted surfaces) into DIR")
    p.add_argument("--cv", choices=CV_KEYS, help="dcpt: k-fold cross-validation holding out ratios, "
                   "model sizes or token counts")
    p.add_argument("--folds", type=int, help="cross-validation folds (default: min(5, distinct values))")
    p.add_argument("--huber-delta", type=float, help="Huber delta on log-loss residuals "
                   "(default 1e-3; inf is least squares)")
    p.add_argument("--grid", type=grid_option, action="append", default=[], metavar="NAME=V1,V2",
                   help="start values for a nonlinear parameter, e.g. alpha=0.1,0.3,0.6 (repeatable)")
    p.add_argument("--starts", type=int, help="L-BFGS-B runs from this many best grid points "
                   "(0: all; default 8)")
    p.add_argument("--max-iter", type=int, help="iterations per start (default 3000)")
    p.add_argument("--method", choices=METHODS,
                   help="lbfgsb (default, as the papers) or trf (scipy least_squares, Gauss-Newton)")
    p.add_argument("--pre-cpt-loss", type=float, metavar="LOSS",
                   help="the general loss before CPT, when the table has no D = 0 rows")
    p.add_argument("--epsilon", type=float, help="cmr: allowed general-loss rise in nats (default 0.05, as Gu et al.)")
    p.add_argument("--token-unit", type=count, help="cmr: tokens per unit of T (default 0.2B, as Gu et al.)")

    q = sub.add_parser("plan", help="recommend a mixture ratio from a fitted law and write a recipe snippet",
                       description="D-CPT usages: 1 the largest domain share keeping the general loss within "
                                   "--tolerance of its pre-CPT value; 2 the best share with --domain-tokens of "
                                   "domain data; 3 the (N, D) split of --compute. cmr: the critical mixture ratio "
                                   "for --epsilon. Prints the predicted losses and a stage `mixture:` snippet.")
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument("--law-fit", metavar="FIT.json", help="a fit written by `cpt fit-law --out`")
    source.add_argument("--measured", metavar="R:LOSS,...",
                        help="usage 1 on measured points: domain ratio:general loss pairs, e.g. 0.9:2.905,0.93:2.964")
    q.add_argument("--usage", choices=USAGES, help="default: 1 (cmr for a CMR fit)")
    q.add_argument("--tolerance", type=float, default=0.03, help="usage 1: relative general-loss rise (default 0.03)")
    q.add_argument("--n", type=count, help="model size, non-embedding parameters (default: the largest fitted)")
    q.add_argument("--tokens", type=count, help="CPT tokens D (usage 1, cmr; default: the largest fitted)")
    q.add_argument("--domain-tokens", type=count, help="usage 2: domain tokens available")
    q.add_argument("--compute", type=count, help="usage 3: compute in FLOPs (C ~= 6 N D)")
    q.add_argument("--ratio", type=float, help="usage 3: the domain share to train with")
    q.add_argument("--epsilon", type=float, help="cmr: allowed general-loss rise in nats (default: the fit's)")
    q.add_argument("--pre-cpt-loss", type=float, metavar="LOSS", help="general loss before CPT (usage 1)")
    q.add_argument("--domain", metavar="NAME", help="cross-domain fits: the domain to predict")
    q.add_argument("--snippet", metavar="OUT.yaml", help="also write the mixture snippet here")
    q.add_argument("--domain-name", default="domain", help="the domain corpus's name in the recipe")
    q.add_argument("--general-name", default="general", help="the general corpus's name in the recipe")
    q.add_argument("--json", action="store_true", help="print the recommendation as JSON")


def dispatch(args: argparse.Namespace) -> bool:
    """Run ``fit-law`` or ``plan`` if ``args.command`` is one of them; False otherwise.

    Raises:
        CptError: user errors (bad table, too little data, a fit that does not converge, a bad FIT.json).
    """
    if args.command == "fit-law":
        fit_law(args)
    elif args.command == "plan":
        plan(args)
    else:
        return False
    return True


def _config(args):
    """The fit options given on the command line; the others keep :class:`cpt.laws.fit.FitConfig`'s defaults."""
    from cpt.laws.fit import FitConfig

    given = {"huber_delta": args.huber_delta, "starts": args.starts, "max_iter": args.max_iter,
             "method": args.method}
    return FitConfig(grid=dict(args.grid), **{k: v for k, v in given.items() if v is not None})


def fit_law(args) -> dict:
    """``cpt fit-law``: fit, report, optionally cross-validate, plot and write FIT.json; returns the document."""
    import numpy as np

    from cpt.laws.cmr import EPSILON, T_UNIT, fit_cmr
    from cpt.laws.dcpt import cross_validate_dcpt, fit_cross_domain, fit_dcpt
    from cpt.laws.mixing import fit_mixing
    from cpt.laws.table import load_table, select_domain

    table = load_table(args.table)
    config = _config(args)
    if args.cross_domain and args.law != "dcpt":
        raise CptError("--cross-domain applies to --law dcpt only")
    if args.cv and args.law != "dcpt":
        raise CptError("--cv applies to --law dcpt (the CMR and mixing laws are fitted per size and ratio)")
    if args.cv and args.cross_domain:
        raise CptError("--cv cross-validates the single-domain D-CPT Law; drop --cross-domain or --cv")
    if not args.cross_domain:
        table = select_domain(table, args.domain)
    doc = {"law": args.law, "version": FIT_VERSION, "table": str(args.table), "fit_config": config.to_dict(),
           "pre_cpt_general_loss": args.pre_cpt_loss, "cv": None}
    plots = []
    if args.law == "dcpt":
        result = fit_cross_domain(table, config) if args.cross_domain else fit_dcpt(table, config)
        doc["dcpt"] = result.to_dict()
        if args.cv:
            values = np.unique(getattr(table.cpt_rows(), {"ratio": "r", "size": "N", "D": "D"}[args.cv]))
            folds = args.folds or min(5, len(values))
            doc["cv"] = {k: v.to_dict() for k, v in cross_validate_dcpt(table, args.cv, folds, config).items()}
        if args.plot:
            plots = _plot_dcpt(table, result, Path(args.plot), args.cross_domain)
    elif args.law == "cmr":
        result = fit_cmr(table, EPSILON if args.epsilon is None else args.epsilon,
                         args.token_unit or T_UNIT, config)
        doc["cmr"] = result.to_dict()
        if args.plot:
            from cpt.laws.plots import plot_cmr

            plots = [plot_cmr(table, result, Path(args.plot) / "cmr_fit.png")]
    else:
        result = fit_mixing(table, config)
        doc["mixing"] = {repr(n): m.to_dict() for n, m in result.items()}
        if args.plot:
            from cpt.laws.plots import plot_mixing

            plots = [plot_mixing(table, result, Path(args.plot) / "mixing_fit.png")]
    doc["plots"] = [str(p) for p in plots]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1) if args.json else format_fit(doc, table))
    return doc


def _plot_dcpt(table, result, where: Path, cross: bool) -> list[Path]:
    from cpt.laws.plots import plot_dcpt, plot_dcpt_surface

    if cross:
        paths = [plot_dcpt(table.subset(table.domain == d), result, where / f"dcpt_fit_{d}.png", d)
                 for d in sorted(set(table.domain))]
    else:
        paths = [plot_dcpt(table, result, where / "dcpt_fit.png")]
    return paths + [plot_dcpt_surface(result, result.ranges["N"][1], where / "dcpt_surface.png")]


def _format_result(title: str, data: dict) -> list[str]:
    from cpt.laws.fit import describe_bounds

    params = "  ".join(f"{k} {v:.4g}" for k, v in data["params"].items())
    lines = [f"{title}: {data['formula']}", f"  {params}",
             f"  Huber {data['huber']:.3g}, R² {data['r2']:.4f}, RMSE {data['rmse']:.4g} over {data['n']} points "
             f"(converged from {data['converged_starts']} of {data['starts']} starts)"]
    if data["on_bound"]:
        lines.append(f"  WARNING: parameter on a bound: {describe_bounds(data['on_bound'])}; the law may not fit "
                     "this data, or the data cannot pin this parameter down")
    return lines


def format_fit(doc: dict, table) -> str:
    """The human-readable report of a FIT.json document and the table it was fitted to."""
    import numpy as np

    from cpt.laws.fit import describe_bounds

    rows = table.cpt_rows()
    lines = [f"{doc['law']} fit of {doc['table']}: {len(table)} ok rows ({len(rows)} with D > 0), "
             f"{len(np.unique(table.N))} sizes, {len(np.unique(table.r))} ratios, "
             f"{len(np.unique(rows.D))} token counts"]
    if doc["law"] == "dcpt":
        d = doc["dcpt"]
        lines += _format_result("general loss (r = general share 1 - r_domain)", d["general"])
        lines += _format_result(f"domain loss ({d['domain_name']})" if not d["learnability"] else
                                "domain loss (cross-domain)", d["domain"])
        if d["learnability"]:
            lines += [f"  K inputs {name}: k1 {k['k1']:.4g}, k2 {k['k2']:.4g} (first eval at D = {k['D1']:.3g})"
                      for name, k in d["learnability"].items()]
        pre = d["pre_cpt"]["general"]
        lines.append("pre-CPT general loss: " + (", ".join(f"N {float(n):.3g}: {v:.4f}" for n, v in pre.items())
                                                 or "unknown (no D = 0 rows; give --pre-cpt-loss)"))
        for loss, cv in (doc["cv"] or {}).items():
            lines.append(f"cross-validation by {cv['key']} ({cv['folds']} folds), {loss} loss: held-out R² "
                         f"{cv['r2']:.4f}, RMSE {cv['rmse']:.4g}")
    elif doc["law"] == "cmr":
        c = doc["cmr"]
        for n, size in c["sizes"].items():
            lines.append(f"N {float(n):.3g}: pre-CPT general {size['general0']:.4f}, domain {size['domain0']:.4f}")
            for r in size["general"]:
                g, dm = size["general"][r], size["domain"][r]
                lines.append(f"  r {float(r):g}: dL_gen R² {g['r2']:.4f}, dL_dom R² {dm['r2']:.4f}"
                             + (f"  WARNING: {describe_bounds(g['on_bound'] + dm['on_bound'])}"
                                if g["on_bound"] or dm["on_bound"] else ""))
            est = c["estimates"][n][-1]
            lines.append(f"  CMR at T {est['T']:.4g} (epsilon {c['epsilon']:g}): {est['ratio']:.4f}")
            law = c["laws"][n]
            if law:
                lines += ["  " + s for s in _format_result("CMR law", law)]
            else:
                lines.append(f"  CMR law: {c['notes'][n]}")
    else:
        for n, m in doc["mixing"].items():
            lines.append(f"N {float(n):.3g} at D {m['D']:.4g}:")
            lines += ["  " + s for s in _format_result("general loss", m["general"])]
            lines += ["  " + s for s in _format_result("domain loss", m["domain"])]
    if doc["plots"]:
        lines.append("plots: " + ", ".join(doc["plots"]))
    return "\n".join(lines)


def read_fit(path: str | Path) -> dict:
    """Load and check a FIT.json document."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CptError(f"{path}: no such fit; write one with `cpt fit-law TABLE --law ... --out {path}`") from None
    except json.JSONDecodeError as e:
        raise CptError(f"{path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("law") not in LAWS or doc["law"] not in doc:
        raise CptError(f"{path}: not a `cpt fit-law` output (expected a law of {', '.join(LAWS)} and its fit)")
    if doc.get("version") != FIT_VERSION:
        raise CptError(f"{path}: fit version {doc.get('version')}, this cpt reads version {FIT_VERSION}; refit")
    return doc


def parse_measured(text: str) -> tuple[list[float], list[float]]:
    """``"0.9:2.905,0.93:2.964"`` -> ratios, losses (their ranges are checked by
    :func:`cpt.laws.plan.usage1_measured`)."""
    if not text.strip():
        raise CptError("--measured is empty; give domain ratio:general loss pairs separated by commas, "
                       "e.g. 0.9:2.905,0.93:2.964")
    ratios, losses = [], []
    for item in text.split(","):
        r, _, loss = item.partition(":")
        try:
            ratios.append(float(r))
            losses.append(float(loss))
        except ValueError:
            raise CptError(f"--measured expects RATIO:LOSS pairs separated by commas, e.g. 0.9:2.905,0.93:2.964; "
                           f"got {item!r}") from None
    return ratios, losses


def recommend(args):
    """The recommendation (:class:`cpt.laws.plan.Recommendation`) that ``cpt plan`` asks for."""
    from cpt.laws import plan as plans
    from cpt.laws.cmr import CmrFit
    from cpt.laws.dcpt import DcptFit
    from cpt.laws.fit import FitConfig
    from cpt.laws.mixing import SizeMix

    if not 0 <= args.tolerance < math.inf:  # also NaN
        raise CptError(f"--tolerance must be a relative rise >= 0 (0.03 is 3%), got {args.tolerance:g}")
    if args.pre_cpt_loss is not None and not 0 < args.pre_cpt_loss < math.inf:
        raise CptError(f"--pre-cpt-loss must be a finite loss > 0 (nats/token), got {args.pre_cpt_loss:g}")
    if args.measured is not None:
        if args.usage not in (None, "1"):
            raise CptError("--measured points answer usage 1 only")
        if args.pre_cpt_loss is None:
            raise CptError("--measured needs --pre-cpt-loss (the general loss before CPT)")
        return plans.usage1_measured(*parse_measured(args.measured), args.pre_cpt_loss, args.tolerance)
    doc = read_fit(args.law_fit)
    law = doc["law"]
    usage = args.usage or ("cmr" if law == "cmr" else "1")
    allowed = {"dcpt": ("1", "2", "3"), "cmr": ("cmr",), "mixing": ("1",)}[law]
    if usage not in allowed:
        raise CptError(f"usage {usage} needs a {'CMR' if usage == 'cmr' else 'D-CPT'} fit; {args.law_fit} holds "
                       f"a {law} fit, which answers usage {' / '.join(allowed)}")
    pre = args.pre_cpt_loss if args.pre_cpt_loss is not None else doc.get("pre_cpt_general_loss")
    if law == "cmr":
        cmr = CmrFit.from_dict(doc["cmr"])
        N = args.n or max(cmr.sizes)
        tokens = args.tokens or (max(cmr.sizes[N].T) * cmr.t_unit if N in cmr.sizes else 0.0)
        return plans.usage_cmr(cmr, N, tokens, args.epsilon or cmr.epsilon, FitConfig(**_stored(doc)))
    if law == "mixing":
        sizes = {float(n): SizeMix.from_dict(m) for n, m in doc["mixing"].items()}
        N = args.n or max(sizes)
        if N not in sizes:
            raise CptError(f"the mixing fit has sizes N = {', '.join(f'{n:g}' for n in sizes)}; --n {N:g} is "
                           "not one")
        return plans.usage1_mixing(sizes[N], args.tolerance, pre)
    fit = DcptFit.from_dict(doc["dcpt"])
    if args.domain:
        fit.domain_name = args.domain
    N = args.n or fit.ranges["N"][1]
    if usage == "1":
        return plans.usage1(fit, N, args.tokens or fit.ranges["D"][1], args.tolerance, pre)
    if usage == "2":
        if args.domain_tokens is None:
            raise CptError("usage 2 needs --domain-tokens (how many domain tokens you have)")
        return plans.usage2(fit, N, args.domain_tokens)
    if args.compute is None or args.ratio is None:
        raise CptError("usage 3 needs --compute (FLOPs, C ~= 6 N D) and --ratio (the domain share to train with, "
                       "e.g. the usage 1 answer)")
    return plans.usage3(fit, args.compute, args.ratio)


def _stored(doc: dict) -> dict:
    c = dict(doc["fit_config"])
    c["grid"] = {k: tuple(v) for k, v in c.get("grid", {}).items()}
    return c


def plan(args):
    """``cpt plan``: print the recommendation and its snippet; write the snippet to ``--snippet``."""
    from cpt.laws import plan as plans

    rec = recommend(args)
    snippet = plans.mixture_snippet(rec, args.domain_name, args.general_name)
    if args.snippet:
        Path(args.snippet).parent.mkdir(parents=True, exist_ok=True)
        Path(args.snippet).write_text(snippet)
    if args.json:
        print(json.dumps(rec.to_dict() | {"snippet": snippet}, indent=1))
    else:
        print(plans.format_recommendation(rec))
        print(snippet, end="")
    return rec

