"""``cpt sweep``: a grid of tiny runs into a results table; finished runs are skipped, failed ones retried."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from conftest import read_rows, run_cpt as cpt, tiny_recipe, write_recipe


def sweep_file(root: Path, corpora: Path, diverge: bool = False) -> Path:
    """Two sizes x two ratios; with ``diverge``, the h32 runs' learning rate makes their loss non-finite."""
    base = tiny_recipe(corpora, root / "unused", pretrain=6, cpt=6)
    base["eval"]["every"] = 3
    write_recipe(root / "base.yaml", base)
    h32 = {"model.arch.hidden": 32} | ({"stages.cpt.schedule.peak_lr": 1.0e12} if diverge else {})
    sweep = {"name": "tiny-sweep", "base": "base.yaml", "stage": "cpt", "domain": "code", "general": "english",
             "ratios": [0.2, 0.9], "dir": str(root / "sweep"), "sizes": {"h16": {"model.arch.hidden": 16}, "h32": h32}}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def table(root: Path) -> list[dict]:
    with open(root / "sweep" / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def swept(tiny_corpora, tmp_path_factory):
    """The sweep run once with the h32 runs diverging (they fail), then again without (only they are retried)."""
    root = tmp_path_factory.mktemp("sweep")
    first = cpt("sweep", str(sweep_file(root, tiny_corpora, diverge=True)))
    rows_first = table(root)
    logs_first = {p.name: p.stat().st_mtime_ns for p in (root / "sweep" / "logs").iterdir()}
    logs_first["failed log"] = (root / "sweep" / "logs" / "h32-r0.9.log").read_text()
    second = cpt("sweep", str(sweep_file(root, tiny_corpora)))
    return root, first, rows_first, logs_first, second


def test_failed_runs_are_recorded_then_retried(swept):
    root, first, rows_first, logs_first, second = swept
    assert first.returncode == 0, first.stderr[-3000:]
    failed = sorted({r["run_id"] for r in rows_first if r["status"] == "failed"})
    assert failed == ["h32-r0.2", "h32-r0.9"]
    assert "2 run(s) failed" in first.stderr and "h32-r0.9: FAILED" in first.stderr
    assert "Lower the stage's peak_lr" in logs_first["failed log"]
    assert second.returncode == 0, second.stderr[-3000:]
    rows = table(root)
    assert {r["status"] for r in rows} == {"ok"}
    assert sorted({r["run_id"] for r in rows}) == ["h16-r0.2", "h16-r0.9", "h32-r0.2", "h32-r0.9"]


def test_finished_runs_are_skipped(swept):
    root, _, rows_first, logs_first, _ = swept
    logs = {p.name: p.stat().st_mtime_ns for p in (root / "sweep" / "logs").iterdir()}
    for name in ("base-h16.log", "base-h32.log", "h16-r0.2.log", "h16-r0.9.log"):
        assert logs[name] == logs_first[name], f"{name} was run again"
    assert logs["h32-r0.9.log"] != logs_first["h32-r0.9.log"]
    kept = [r for r in rows_first if r["status"] == "ok"]
    assert [r for r in table(root) if r["run_id"] in {k["run_id"] for k in kept}] == kept
    again = cpt("sweep", str(root / "sweep.yaml"))
    assert again.returncode == 0 and "4 finished, 0 to run" in again.stderr


def test_rows_match_each_runs_metrics(swept):
    root = swept[0]
    rows = table(root)
    for run_id in ("h16-r0.2", "h32-r0.9"):
        run_rows = [r for r in rows if r["run_id"] == run_id]
        metrics = read_rows(root / "sweep" / "runs" / run_id)
        evals = {(m["stage_step"], m["set"]): m["loss"] for m in metrics if m["kind"] == "eval"}
        train = [m for m in metrics if m["kind"] == "train"]
        per_step = train[0]["tokens"] / train[0]["stage_step"]
        assert [int(r["step"]) for r in run_rows] == [0, 3, 6]
        for r in run_rows:
            step = int(r["step"])
            assert float(r["general_loss"]) == evals[(step, "upstream")]
            assert float(r["domain_loss"]) == evals[(step, "downstream")]
            assert int(r["D"]) == step * per_step == step * 8 * 32
            assert float(r["r"]) == float(run_id.split("-r")[1])
        # The run trained only the swept stage, branched from its size's base run, with the swept mixture.
        config = yaml.safe_load((root / "sweep" / "runs" / run_id / "config.yaml").read_text())
        assert [s["name"] for s in config["stages"]] == ["cpt"]
        r = float(run_id.split("-r")[1])
        assert config["stages"][0]["mixture"] == {"code": r, "english": pytest.approx(1 - r)}
    sizes = {r["size"]: (int(r["N"]), int(r["N_total"])) for r in rows}
    # Non-embedding parameters of a 2-layer Llama with hidden h (MLP 4h rounded as the model builds it) grow
    # with h; the embedding (vocab 512 x h, tied) is the difference to the total.
    assert sizes["h16"][0] < sizes["h32"][0]
    for h, (n, total) in (("h16", sizes["h16"]), ("h32", sizes["h32"])):
        assert total - n == 512 * int(h[1:])


def test_bad_sweep_files_get_one_line_errors(tiny_corpora, tmp_path):
    path = sweep_file(tmp_path, tiny_corpora)
    raw = yaml.safe_load(path.read_text())
    cases = [({"stage": "pretrian"}, "no stage 'pretrian'"), ({"stage": "pretrain"}, "must be the base recipe's last"),
             ({"domain": "cod"}, "'cod' is not a corpus"), ({"ratios": [0.5, 1.5]}, "sweep.ratios[1]"),
             ({"sizes": {"x": {"model.arch.hiden": 8}}}, "model.arch.hiden"), ({"ratio": [0.5]}, "did you mean")]
    for change, message in cases:
        path.write_text(yaml.safe_dump(raw | change))
        result = cpt("sweep", str(path))
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert message in result.stderr, (change, result.stderr[-500:])
