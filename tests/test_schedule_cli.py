"""`cpt schedule`: every stage's learning rate at chosen steps, as a table, JSON or PNG, without reading data."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_recipe, write_recipe
from cpt.cli import main

ROOT = Path(__file__).resolve().parents[1]
PEAK, LOW = 1e-2, 1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Every `cpt schedule` call of this file: one real process, the rest through ``cli.main`` meanwhile.

    Each process pays the import of torch (cpt.recipe needs it), so only the first goes through
    ``python -m cpt``. The recipe names corpora that do not exist: the command must not read them.
    """
    root = tmp_path_factory.mktemp("schedule")
    raw = tiny_recipe(root / "no-such-corpora", root / "run")  # two stages of 12 steps
    raw["stages"][0]["schedule"] = {"kind": "cosine", "peak_lr": PEAK, "min_lr": LOW, "warmup_steps": 2}
    raw["stages"][1]["schedule"] = {"kind": "wsd", "peak_lr": PEAK, "min_lr": LOW, "warmup_steps": 2,
                                    "cooldown_steps": 4, "cooldown_shape": "linear"}
    recipe = str(write_recipe(root / "tiny.yaml", raw))
    command = [sys.executable, "-m", "cpt", "schedule", recipe, "--steps", "0,10", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
    in_process = {
        "global": ["--steps", "0,2,12,13,24,30", "--global", "--json", "--plot", str(root / "plots/lr.png")],
        "table": ["train.max_steps=10"],
        "one_stage": ["--stage", "cpt", "--steps", "1,2"],
        "bad_stage": ["--stage", "cp"],
        "bad_steps": ["--steps", "1,x"],
    }
    results = {}
    for name, args in in_process.items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["schedule", recipe, *args])
        results[name] = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    out, err = process.communicate(timeout=120)
    results["json"] = subprocess.CompletedProcess(command, process.returncode, out, err)
    return root, results


def cosine(t):  # the first stage: T = 12, T_w = 2 (REFERENCES.md §1)
    return PEAK * t / 2 if t <= 2 else LOW + 0.5 * (PEAK - LOW) * (1 + math.cos(math.pi * (t - 2) / 10))


def wsd_linear(t):  # the second stage: T = 12, T_w = 2, linear cooldown over the last 4 steps to c = 0.1
    if t <= 2:
        return PEAK * t / 2
    p, c = max(0, min(t, 12) - 8) / 4, LOW / PEAK
    return PEAK * (c + (1 - c) * (1 - p))


def ok(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_json_in_stage_steps(runs):
    root, results = runs
    values = json.loads(ok(results["json"]))
    assert list(values) == ["pretrain", "cpt"]
    assert values["pretrain"] == {"0": 0.0, "10": pytest.approx(cosine(10))}
    assert values["cpt"] == {"0": 0.0, "10": pytest.approx(wsd_linear(10))}
    assert values["cpt"]["10"] == pytest.approx(5.5e-3)  # halfway through the cooldown from 1e-2 to 1e-3
    assert not (root / "run").exists() and not (root / "no-such-corpora").exists()


def test_global_steps_and_plot(runs):
    root, results = runs
    values = json.loads(ok(results["global"]))
    # Global step g belongs to the stage whose update completes it; 0 to the first, past the end to the last.
    assert values == {"pretrain": {"0": 0.0, "2": pytest.approx(PEAK), "12": pytest.approx(LOW)},
                      "cpt": {"13": pytest.approx(PEAK / 2), "24": pytest.approx(LOW), "30": pytest.approx(LOW)}}
    png = root / "plots/lr.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert results["global"].stderr.strip() == f"wrote {png}"


def test_default_table(runs):
    lines = ok(runs[1]["table"]).splitlines()
    assert lines[0].split() == ["stage", "kind", "step", "global", "lr"]
    first = [line.split() for line in lines[1:]]
    assert first[0] == ["pretrain", "cosine", "0", "0", "0.000e+00"]
    start = next(i for i, row in enumerate(first) if row[0] == "cpt")
    assert first[start][:4] == ["cpt", "wsd", "0", "10"]  # train.max_steps=10 shortens both stages
    # Evenly spaced steps plus each stage's phase ends: warm-up end (2) and, for wsd, the cooldown start (6).
    assert [int(row[0]) for row in first[1:start]] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    cpt_steps = [int(row[-3]) for row in first[start:]]
    assert {2, 6, 10} <= set(cpt_steps) and cpt_steps == sorted(cpt_steps)
    assert first[-1][-3:] == ["10", "20", "1.000e-03"]


def test_one_stage_table(runs):
    lines = ok(runs[1]["one_stage"]).splitlines()
    assert [line.split() for line in lines[1:]] == [["cpt", "wsd", "1", "13", "5.000e-03"], ["2", "14", "1.000e-02"]]


@pytest.mark.parametrize("name, words", [
    ("bad_stage", "cpt: error: --stage 'cp': no such stage (did you mean 'cpt'?); stages: pretrain, cpt"),
    ("bad_steps", "cpt: error: --steps '1,x': expected comma-separated non-negative integers"),
])
def test_errors_are_one_line(runs, name, words):
    run = runs[1][name]
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith(words), run.stderr
