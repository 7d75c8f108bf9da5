"""Benchmark law fitting: the time to fit 500 synthetic rows with each law, and cross-validation.

What is measured (wall-clock seconds, median of repeats, in one process on this machine):

- **D-CPT**: :func:`cpt.laws.dcpt.fit_dcpt` (general and domain loss, the default 243-point start grid, L-BFGS-B
  from the 8 best starts) on a 500-row table: 4 model sizes x 5 domain ratios x 25 token counts, losses from
  the D-CPT Law with 0.3% log-normal noise. The same with ``method="trf"`` for comparison. Cross-validation:
  :func:`cpt.laws.dcpt.cross_validate_dcpt` by ratio with 5 folds (10 fits), once.
- **CMR**: :func:`cpt.laws.cmr.fit_cmr` on 500 rows: 2 sizes x 5 ratios x 50 evaluations (one at ``D = 0``),
  general loss rising as ``R^2 (0.3 T^0.3 - 0.25 T^0.1)``, domain loss falling as ``0.5 R^0.5 T^0.2``, 0.002
  nats of noise: 20 change-curve fits, then the direct CMR at 49 token counts per size (2 loss-vs-ratio fits
  each) and the CMR law per size.
- **Data Mixing Law**: the form ``L = c + k exp(t r)`` on 500 (ratio, loss) points with 0.3% noise (one fit), and
  :func:`cpt.laws.mixing.fit_mixing` on the D-CPT table (2 fits per size on its final token count: 5 rows each).

Each row also says how well the fit recovers the generating law (R² on the 500 rows, or the largest error of
the CMR estimates against their closed form).

Usage::

    .venv/bin/python scripts/bench_fit.py              # ~3-5 min on 2 cores; rewrites the "Law fitting"
                                                       # section of BENCHMARKS.md and prints JSON
    .venv/bin/python scripts/bench_fit.py --quick      # one repeat, no CV; prints only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import scipy

from cpt.laws.cmr import fit_cmr
from cpt.laws.dcpt import DCPT, cross_validate_dcpt, fit_dcpt
from cpt.laws.fit import FitConfig, fit
from cpt.laws.mixing import MIXING, fit_mixing
from cpt.laws.table import Table, table_from_columns
import benchmarks_md
from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Law fitting"
GENERAL = dict(E=1.8, A=60.0, alpha=0.3, B=8.0, eta=0.6, beta=0.35, C=0.25, gamma=0.5, eps=0.05)
DOMAIN = dict(E=1.2, A=40.0, alpha=0.28, B=6.0, eta=0.5, beta=0.3, C=0.5, gamma=0.4, eps=0.1)
MIX = dict(c=1.6, k=1.2, t=-2.0)


def table(rows: list[tuple]) -> Table:
    """``(run_id, N, D, r, general_loss, domain_loss)`` rows -> a validated table."""
    names = ("run_id", "N", "D", "r", "general_loss", "domain_loss")
    cols = {k: [row[i] for row in rows] for i, k in enumerate(names)}
    n = len(rows)
    return table_from_columns(cols | {"status": ["ok"] * n, "N_total": cols["N"], "step": [0] * n})


def dcpt_table(rng: np.random.Generator) -> Table:
    rows = []
    for n in (1e6, 4e6, 1.6e7, 6.4e7):
        for r in (0.1, 0.3, 0.5, 0.75, 1.0):
            for d in np.geomspace(1e5, 1e8, 25):
                x = {"N": np.array(n), "D": np.array(d)}
                g = float(DCPT.predict(GENERAL, x | {"r": np.array(1 - r)}))
                dm = float(DCPT.predict(DOMAIN, x | {"r": np.array(r)}))
                rows.append((f"{n:g}-{r}", n, d, r, g * np.exp(0.003 * rng.standard_normal()),
                             dm * np.exp(0.003 * rng.standard_normal())))
    return table(rows)


def rise_scale(T):
    return 0.3 * T ** 0.3 - 0.25 * T ** 0.1


def cmr_table(rng: np.random.Generator) -> Table:
    rows = []
    for n, scale in ((1e6, 1.0), (4e6, 0.7)):
        for r in (0.2, 0.4, 0.6, 0.8, 1.0):
            rows.append((f"{n:g}-{r}", n, 0.0, r, 3.0, 2.5))
            for t in np.geomspace(4, 100, 49):
                rows.append((f"{n:g}-{r}", n, t * 2e8, r, 3.0 + scale * r * r * rise_scale(t) + 0.002 *
                             rng.standard_normal(), 2.5 - 0.5 * r ** 0.5 * t ** 0.2 + 0.002 * rng.standard_normal()))
    return table(rows)


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall-clock seconds over ``repeats`` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def machine() -> dict[str, str]:
    return benchmarks_md.machine(numpy=np.__version__, scipy=scipy.__version__)


def code_version() -> str:
    """The commit, and a hash of ``cpt/laws`` as imported, so the table names the code it measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    digest = hashlib.sha256()
    for path in sorted((ROOT / "cpt" / "laws").glob("*.py")):
        digest.update(path.read_bytes())
    return f"commit {commit}, cpt/laws sha256 {digest.hexdigest()[:12]}"


def run(quick: bool) -> dict:
    """Every measurement, as a JSON-able dict."""
    repeats = 1 if quick else 3
    rng = np.random.default_rng(0)
    dcpt, cmr = dcpt_table(rng), cmr_table(rng)
    out = {"machine": machine(), "code": code_version(), "load_start": os.getloadavg(), "repeats": repeats,
           "rows": {}}
    seconds, result = timed(lambda: fit_dcpt(dcpt), repeats)
    out["rows"]["D-CPT, L-BFGS-B (default)"] = {
        "rows": len(dcpt), "fits": 2, "seconds": seconds,
        "quality": f"R² {result.general.r2:.4f} general, {result.domain.r2:.4f} domain"}
    seconds, result = timed(lambda: fit_dcpt(dcpt, FitConfig(method="trf")), repeats)
    out["rows"]["D-CPT, trf"] = {"rows": len(dcpt), "fits": 2, "seconds": seconds,
                                 "quality": f"R² {result.general.r2:.4f} general, {result.domain.r2:.4f} domain"}
    if not quick:
        seconds, cv = timed(lambda: cross_validate_dcpt(dcpt, "ratio", 5), 1)
        out["rows"]["D-CPT cross-validation by ratio, 5 folds"] = {
            "rows": len(dcpt), "fits": 10, "seconds": seconds,
            "quality": f"held-out R² {cv['general'].r2:.4f} general, {cv['domain'].r2:.4f} domain"}
        out["cv_folds"] = {loss: [(fold["held_out"], fold["rmse"]) for fold in result.per_fold]
                           for loss, result in cv.items()}
    seconds, result = timed(lambda: fit_cmr(cmr), repeats)
    worst = max(abs(e["ratio"] - min(1.0, np.sqrt(0.05 / ((1.0 if n == 1e6 else 0.7) * rise_scale(e["T"])))))
                for n, estimates in result.estimates.items() for e in estimates)
    fits = sum(2 * len(c.general) + 2 * len(c.T) + 1 for c in result.sizes.values())
    out["rows"]["CMR (curves, direct CMR at every T, law)"] = {
        "rows": len(cmr), "fits": fits, "seconds": seconds,
        "quality": f"CMR estimates within {worst:.4f} of the closed form"}
    r = rng.uniform(0, 1, 500)
    y = MIXING.predict(MIX, {"r": r}) * np.exp(0.003 * rng.standard_normal(500))
    seconds, result = timed(lambda: fit(MIXING, {"r": r}, y), repeats)
    out["rows"]["Data Mixing Law, one fit on 500 points"] = {"rows": 500, "fits": 1, "seconds": seconds,
                                                             "quality": f"R² {result.r2:.4f}"}
    seconds, result = timed(lambda: fit_mixing(dcpt), repeats)
    out["rows"]["Data Mixing Law, `fit_mixing` on the D-CPT table"] = {
        "rows": len(dcpt), "fits": 2 * len(result), "seconds": seconds,
        "quality": f"R² >= {min(min(m.general.r2, m.domain.r2) for m in result.values()):.4f}"}
    out["load_end"] = os.getloadavg()
    return out


def format_section(out: dict, command: str) -> str:
    m = out["machine"]
    load = " / ".join(f"{x:.2f}" for x in out["load_start"]), " / ".join(f"{x:.2f}" for x in out["load_end"])
    lines = [f"Command: `{command}` ({date.today().isoformat()}). Machine: {m['nproc']} CPUs ({m['cpu']}), "
             f"Python {m['python']}, numpy {m['numpy']}, scipy {m['scipy']}. Code: {out['code']}. Load average "
             f"(1/5/15 min) {load[0]} at the start and {load[1]} at the end: other jobs share this machine, so "
             f"the seconds are noisy. Each figure is the median of {out['repeats']} runs (cross-validation: one).",
             "",
             "Defaults throughout: Huber delta 1e-3 on log-loss residuals, the law's start grid with linear "
             "coefficients set by least squares, L-BFGS-B from the 8 best starts (100 iterations each, then the 3 "
             "best unconverged ones to convergence). Synthetic data as described in `scripts/bench_fit.py`.",
             "",
             "| fit | rows | law fits | seconds | recovery |",
             "|---|---:|---:|---:|---|"]
    lines += [f"| {name} | {row['rows']} | {row['fits']} | {row['seconds']:.2f} | {row['quality']} |"
              for name, row in out["rows"].items()]
    if "cv_folds" in out:
        lines += ["", "Held-out RMSE per cross-validation fold (the held-out domain ratio in brackets):", ""]
        lines += [f"- {loss} loss: " + ", ".join(f"[{', '.join(f'{r:g}' for r in held)}] {rmse:.4f}"
                                                 for held, rmse in folds)
                  for loss, folds in out["cv_folds"].items()]
        lines += ["", "Holding out r = 1 leaves the general-loss law no run at general share 0, where its "
                      "B r^eta / D^beta term vanishes and C / (r + eps)^gamma peaks, set by an eps that no other "
                      "ratio pins down: it extrapolates there badly, and that one fold sets the pooled general R². "
                      "Sweeps should include the largest ratio they will recommend."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, no cross-validation; prints only")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="file to write the section into")
    parser.add_argument("--no-write", action="store_true", help="print without writing BENCHMARKS.md")
    args = parser.parse_args()
    out = run(args.quick)
    print(json.dumps(out, indent=1))
    if not args.quick and not args.no_write:
        write_section(args.out, HEADING, format_section(out, "python scripts/bench_fit.py"))
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
