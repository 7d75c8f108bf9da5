"""``cpt fit-law`` and ``cpt plan`` end to end through argparse: table -> FIT.json -> plan -> recipe snippet, the
plots, and user errors."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from scipy.optimize import brentq

from cpt.cli import main
from cpt.errors import CptError
from cpt.laws.cli import add_commands, count, dispatch
from cpt.laws.dcpt import DCPT

GENERAL = dict(E=1.8, A=60.0, alpha=0.3, B=8.0, eta=0.6, beta=0.35, C=0.25, gamma=0.5, eps=0.05)
DOMAIN = dict(E=1.2, A=40.0, alpha=0.28, B=6.0, eta=0.5, beta=0.3, C=0.5, gamma=0.4, eps=0.1)
PRE_CPT = {1e6: 3.3, 4e6: 3.0, 1.6e7: 2.8}  # general loss before CPT, per size


def run(*argv: str):
    """Parse and dispatch like ``cpt`` does once cpt.cli wires these commands in."""
    p = argparse.ArgumentParser(prog="cpt")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run")
    add_commands(sub)
    args = p.parse_args(list(argv))
    assert dispatch(args)
    return args


def loss(params, n, d, r):
    return float(DCPT.predict(params, {"N": np.array(n), "D": np.array(d), "r": np.array(r)}))


def write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def dcpt_csv(tmp_path_factory):
    rows, rng = [], np.random.default_rng(0)
    for n in PRE_CPT:
        for r in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
            for step, d in enumerate((0.0, *np.geomspace(1e5, 1e8, 5))):
                g = PRE_CPT[n] if d == 0 else loss(GENERAL, n, d, 1 - r) * np.exp(0.001 * rng.standard_normal())
                dm = 4.5 if d == 0 else loss(DOMAIN, n, d, r) * np.exp(0.001 * rng.standard_normal())
                rows.append({"run_id": f"n{n:g}-r{r}", "status": "ok", "N": int(n), "N_total": int(n) + 50_000,
                             "D": int(d), "r": r, "step": step, "general_loss": g, "domain_loss": dm,
                             "domain": "code"})
    rows.append(dict(rows[-1], run_id="crashed", status="failed", general_loss="nan", domain_loss=""))
    return write(tmp_path_factory.mktemp("sweep") / "results.csv", rows)


@pytest.fixture(scope="module")
def dcpt_fit(dcpt_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    run("fit-law", dcpt_csv, "--law", "dcpt", "--out", str(out / "fit.json"), "--plot", str(out / "plots"),
        "--cv", "size", "--starts", "4")
    return out


def test_fit_law_writes_everything_plan_needs(dcpt_fit, capsys):
    doc = json.loads((dcpt_fit / "fit.json").read_text())
    assert doc["law"] == "dcpt" and doc["version"] == 1 and doc["fit_config"]["huber_delta"] == 1e-3
    fit = doc["dcpt"]
    assert fit["domain_name"] == "code" and fit["learnability"] is None
    assert {float(n): v for n, v in fit["pre_cpt"]["general"].items()} == pytest.approx(PRE_CPT)
    for loss_name, true in (("general", GENERAL), ("domain", DOMAIN)):
        result = fit[loss_name]
        assert result["r2"] > 0.999 and result["converged"] and result["n"] == 3 * 6 * 5
        for key in ("A", "alpha", "beta"):
            assert result["params"][key] == pytest.approx(true[key], rel=0.1)
        cv = doc["cv"][loss_name]
        assert cv["key"] == "size" and cv["folds"] == 3 and [f["held_out"] for f in cv["per_fold"]] == [[1e6], [4e6],
                                                                                                       [1.6e7]]
    assert sorted(p.rsplit("/", 1)[1] for p in doc["plots"]) == ["dcpt_fit.png", "dcpt_surface.png"]
    for name in ("dcpt_fit.png", "dcpt_surface.png"):
        assert (dcpt_fit / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_law_text_report(dcpt_csv, capsys):
    run("fit-law", dcpt_csv, "--law", "dcpt", "--starts", "2")
    text = capsys.readouterr().out
    assert "108 ok rows (90 with D > 0), 3 sizes, 6 ratios, 5 token counts" in text  # the failed run is not counted
    assert "general loss (r = general share 1 - r_domain): L = E + A/N^alpha" in text
    assert "pre-CPT general loss: N 1e+06: 3.3000, N 4e+06: 3.0000, N 1.6e+07: 2.8000" in text


def test_plan_usage1_round_trip_to_a_recipe_snippet(dcpt_fit, capsys):
    snippet = dcpt_fit / "stage.yaml"
    run("plan", "--law-fit", str(dcpt_fit / "fit.json"), "--usage", "1", "--tolerance", "0.05", "--n", "16M",
        "--tokens", "5e7", "--snippet", str(snippet), "--domain-name", "code", "--general-name", "web")
    out = capsys.readouterr().out
    mixture = yaml.safe_load(snippet.read_text())["mixture"]
    assert set(mixture) == {"code", "web"} and sum(mixture.values()) == pytest.approx(1.0)
    # The answer solves general_loss(1.6e7, 5e7, 1 - r) = 1.05 * 2.8 on the true law, to the fit's accuracy.
    truth = brentq(lambda r: loss(GENERAL, 1.6e7, 5e7, 1 - r) - 1.05 * 2.8, 0.0, 1.0)
    assert mixture["code"] == pytest.approx(truth, abs=0.02)
    assert "usage 1: domain share" in out and "mixture: {code: " in out


def test_plan_usage2_and_3_and_json(dcpt_fit, capsys):
    fit = str(dcpt_fit / "fit.json")
    run("plan", "--law-fit", fit, "--usage", "2", "--n", "4e6", "--domain-tokens", "30K", "--json")
    rec = json.loads(capsys.readouterr().out)
    grid = np.linspace(0.01, 1, 2000)
    truth = grid[np.argmin([loss(DOMAIN, 4e6, 3e4 / r, r) for r in grid])]
    assert rec["usage"] == "2" and rec["ratio"] == pytest.approx(truth, abs=0.05)
    assert yaml.safe_load(rec["snippet"])["mixture"]["domain"] == round(rec["ratio"], 3)
    run("plan", "--law-fit", fit, "--usage", "3", "--compute", "1e15", "--ratio", "0.8", "--json")
    rec = json.loads(capsys.readouterr().out)
    assert 6 * rec["predicted"]["N"] * rec["predicted"]["D"] == pytest.approx(1e15)
    with pytest.raises(CptError, match="usage 2 needs --domain-tokens"):
        run("plan", "--law-fit", fit, "--usage", "2")
    with pytest.raises(CptError, match="usage 3 needs --compute"):
        run("plan", "--law-fit", fit, "--usage", "3", "--compute", "1e15")
    with pytest.raises(CptError, match="usage cmr needs a CMR fit; .* holds a dcpt fit"):
        run("plan", "--law-fit", fit, "--usage", "cmr")


def test_plan_on_measured_points_gives_the_papers_0924(tmp_path, capsys):
    points = "0.90:2.9052,0.91:2.9193,0.92:2.9376,0.924:2.9445,0.93:2.9644,0.94:2.9848,1.00:3.4667"
    run("plan", "--measured", points, "--pre-cpt-loss", "2.8602", "--tolerance", "0.03", "--snippet",
        str(tmp_path / "s.yaml"), "--domain-name", "chemistry")
    assert yaml.safe_load((tmp_path / "s.yaml").read_text())["mixture"] == {"chemistry": 0.924, "general": 0.076}
    with pytest.raises(CptError, match="--measured needs --pre-cpt-loss"):
        run("plan", "--measured", points)
    with pytest.raises(CptError, match="RATIO:LOSS pairs"):
        run("plan", "--measured", "0.9-2.9", "--pre-cpt-loss", "2.8")


@pytest.mark.parametrize("measured, message", [
    ("", "--measured is empty; give domain ratio:general loss pairs separated by commas, e.g. 0.9:2.905,0.93:2.964"),
    ("0.9:nan,0.95:2.9", "--measured: loss nan in 0.9:nan is not a loss; losses must be finite and > 0 (nats/token)"),
    ("nan:2.9", "--measured: ratio nan in nan:2.9 is not a domain share; ratios must be in (0, 1]"),
    ("0.9:2.9,3:2.95", "--measured: ratio 3 in 3:2.95 is not a domain share; ratios must be in (0, 1]"),
    ("0:2.9", "--measured: ratio 0 in 0:2.9 is not a domain share"),
    ("-2:2.9", "--measured: ratio -2 in -2:2.9 is not a domain share"),
])
def test_plan_refuses_measured_points_that_are_not_shares_and_losses(capsys, measured, message):
    """Before: '' fell through to --law-fit's error, NaN and 3.0 printed a mixture with a general weight of -2."""
    assert main(["plan", f"--measured={measured}", "--pre-cpt-loss", "2.86", "--tolerance", "0.03"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("cpt: error: " + message) and err.count("\n") == 1


def test_plan_refuses_a_nan_tolerance_and_pre_cpt_loss(capsys):
    points = "0.9:2.9,0.95:2.95"
    assert main(["plan", "--measured", points, "--pre-cpt-loss", "nan", "--tolerance", "0.03"]) == 2
    assert "--pre-cpt-loss must be a finite loss > 0" in capsys.readouterr().err
    assert main(["plan", "--measured", points, "--pre-cpt-loss", "2.8", "--tolerance", "nan"]) == 2
    assert "--tolerance must be a relative rise >= 0" in capsys.readouterr().err


def test_cmr_round_trip(tmp_path, capsys):
    rows = []
    for r in (0.2, 0.4, 0.6, 0.8, 1.0):
        for step, t in enumerate((0.0, *np.geomspace(4, 100, 5))):
            rise = r * r * (0.3 * t ** 0.3 - 0.25 * t ** 0.1) if t else 0.0
            rows.append({"run_id": f"r{r}", "status": "ok", "N": 1_000_000, "N_total": 1_200_000, "D": int(t * 2e8),
                         "r": r, "step": step, "general_loss": 3.0 + rise,
                         "domain_loss": 2.5 - 0.5 * r ** 0.5 * t ** 0.2})
    table = write(tmp_path / "cmr.csv", rows)
    run("fit-law", table, "--law", "cmr", "--out", str(tmp_path / "cmr.json"), "--plot", str(tmp_path / "p"),
        "--starts", "3")
    assert "CMR at T 100 (epsilon 0.05): 0.250" in capsys.readouterr().out
    assert (tmp_path / "p" / "cmr_fit.png").exists()
    run("plan", "--law-fit", str(tmp_path / "cmr.json"), "--tokens", "8e9", "--epsilon", "0.05", "--json")
    rec = json.loads(capsys.readouterr().out)
    assert rec["usage"] == "cmr" and rec["ratio"] == pytest.approx(np.sqrt(0.05 / (0.3 * 40 ** 0.3 - 0.25 * 40 ** 0.1)),
                                                                  abs=2e-3)
    with pytest.raises(CptError, match="--cv applies to --law dcpt"):
        run("fit-law", table, "--law", "cmr", "--cv", "ratio")


def test_mixing_round_trip(dcpt_csv, tmp_path, capsys):
    run("fit-law", dcpt_csv, "--law", "mixing", "--out", str(tmp_path / "mix.json"), "--plot", str(tmp_path))
    assert (tmp_path / "mixing_fit.png").exists() and "N 1.6e+07 at D 1e+08:" in capsys.readouterr().out
    run("plan", "--law-fit", str(tmp_path / "mix.json"), "--n", "1.6e7", "--tolerance", "0.05", "--json")
    rec = json.loads(capsys.readouterr().out)
    assert rec["usage"] == "1 (Data Mixing Law)" and rec["inputs"]["pre_cpt_general_loss"] == pytest.approx(2.8)
    assert rec["predicted"]["general_loss"] == pytest.approx(1.05 * 2.8, abs=1e-6)


def test_user_errors_are_cpt_errors(tmp_path, dcpt_csv):
    with pytest.raises(CptError, match="no such results table"):
        run("fit-law", str(tmp_path / "missing.csv"), "--law", "dcpt")
    bad = write(tmp_path / "bad.csv", [{"run_id": "a", "status": "ok", "N": 1}])
    with pytest.raises(CptError, match="missing column\\(s\\) D, r, general_loss, domain_loss"):
        run("fit-law", bad, "--law", "dcpt")
    with pytest.raises(CptError, match="no such fit"):
        run("plan", "--law-fit", str(tmp_path / "nofit.json"))
    (tmp_path / "other.json").write_text('{"law": "chinchilla"}')
    with pytest.raises(CptError, match="not a `cpt fit-law` output"):
        run("plan", "--law-fit", str(tmp_path / "other.json"))
    with pytest.raises(CptError, match="--grid names delta \\(did you mean 'eta'\\?\\), which dcpt does not have"):
        run("fit-law", dcpt_csv, "--law", "dcpt", "--grid", "delta=1,2")
    with pytest.raises(CptError, match="did not converge from any of 1 starts within 1 iterations"):
        run("fit-law", dcpt_csv, "--law", "dcpt", "--starts", "1", "--max-iter", "1")


def test_count_suffixes():
    assert count("1.8B") == 1.8e9 and count("30K") == 3e4 and count("2e10") == 2e10 and count("7m") == 7e6
    with pytest.raises(argparse.ArgumentTypeError):
        count("lots")


def test_parser_choices_match_the_modules_and_building_it_stays_light():
    from cpt.laws import cli, dcpt, fit

    assert cli.CV_KEYS == tuple(dcpt.CV_KEYS) and cli.METHODS == fit.METHODS
    code = ("import argparse, sys; from cpt.laws.cli import add_commands; "
            "add_commands(argparse.ArgumentParser().add_subparsers()); "
            "print(sorted(m for m in ('numpy', 'scipy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
