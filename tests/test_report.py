"""Tests for cpt.report on a synthetic two-stage run: pretrain (steps 0-10), then cpt (10-20)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest

from cpt.errors import CptError
from cpt.report import (data_table, format_data_table, format_stage_table, read_metrics, stage_table,
                        write_report)

# Eval loss per set at steps 0, 5, 10, 15, 20; the values are exact in binary so changes compare with ==.
LOSSES = {
    "upstream": [8.0, 5.5, 4.0, 4.25, 4.5],
    "target": [9.0, 7.5, 6.0, 3.0, 2.5],
}
STAGES = [("pretrain", 0, 10), ("cpt", 10, 20)]


def _eval(step: int, stage: str, stage_step: int, name: str) -> dict:
    loss = LOSSES[name][step // 5]
    return {"kind": "eval", "step": step, "stage": stage, "stage_step": stage_step, "set": name, "corpus": name,
            "loss": loss, "ppl": math.exp(loss), "bpb": loss / math.log(2) / 4, "tokens": 4096, "time": 0.0}


def _rows() -> list[dict]:
    """Rows in the order a run writes them, with evals at every stage's start and end and at steps 5 and 15."""
    rows = []
    for index, (stage, start, end) in enumerate(STAGES):
        rows.append({"kind": "stage", "event": "start", "stage": stage, "index": index, "step": start, "time": 0.0})
        rows += [_eval(start, stage, 0, name) for name in LOSSES]
        for step in range(start + 1, end + 1):
            stage_step = step - start
            lr = 3e-4 * 0.5 * (1 + math.cos(math.pi * (stage_step - 1) / (end - start)))
            rows.append({"kind": "train", "step": step, "stage": stage, "stage_step": stage_step, "loss": 5.0,
                         "lr": lr, "tokens": 1024 * step, "tokens_per_s": 1e4, "grad_norm": 1.0, "time": 0.0})
            if stage_step in (5, 10):
                rows += [_eval(step, stage, stage_step, name) for name in LOSSES]
        rows.append({"kind": "stage", "event": "end", "stage": stage, "index": index, "step": end, "time": 0.0})
    rows.append({"kind": "checkpoint", "step": 20, "path": "ckpt/step_20"})  # a kind the report does not know
    return rows


def _write_run(run_dir: Path, rows: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")  # one blank line
    return run_dir


def test_read_metrics_skips_blank_lines_and_keeps_order(tmp_path):
    rows = _rows()
    assert read_metrics(_write_run(tmp_path / "run", rows) / "metrics.jsonl") == rows


def test_stage_table_before_after_change():
    assert stage_table(_rows()) == [
        {"set": "upstream", "stage": "pretrain", "before": 8.0, "after": 4.0, "change": -4.0},
        {"set": "upstream", "stage": "cpt", "before": 4.0, "after": 4.5, "change": 0.5},
        {"set": "target", "stage": "pretrain", "before": 9.0, "after": 6.0, "change": -3.0},
        {"set": "target", "stage": "cpt", "before": 6.0, "after": 2.5, "change": -3.5},
    ]


def test_format_stage_table():
    text = format_stage_table(stage_table(_rows()))
    lines = text.splitlines()
    assert lines[0].split() == ["eval", "set", "stage", "before", "after", "change"]
    assert lines[1].split() == ["upstream", "pretrain", "8.00", "4.00", "-4.00"]
    assert lines[2].split() == ["upstream", "cpt", "4.00", "4.50", "+0.50"]
    assert lines[4].split() == ["target", "cpt", "6.00", "2.50", "-3.50"]
    assert len({len(line) for line in lines}) == 1  # fixed width: right-aligned numbers end in one column


def test_format_stage_table_tiny_drop_and_missing_start():
    table = [{"set": "kjv", "stage": "anneal", "before": 3.3149, "after": 3.3141, "change": 3.3141 - 3.3149},
             {"set": "kjv", "stage": "cpt", "before": None, "after": 2.0, "change": None}]
    lines = format_stage_table(table).splitlines()
    assert lines[1].split() == ["kjv", "anneal", "3.31", "3.31", "+0.00"]
    assert lines[2].split() == ["kjv", "cpt", "-", "2.00", "-"]


def test_write_report(tmp_path):
    png, text = write_report(_write_run(tmp_path / "run", _rows()))
    assert png == tmp_path / "run" / "report" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(png).shape[:2]
    assert (width, height) == (1200, 600)
    summary = json.loads((png.parent / "summary.json").read_text())
    assert summary["stage_table"] == stage_table(_rows())
    assert summary["final_loss"] == {"upstream": 4.5, "target": 2.5}
    assert text.startswith(format_stage_table(summary["stage_table"]) + "\n\ntokens per source and stage:")


def test_run_without_evals_still_plots_lr(tmp_path):
    rows = [r for r in _rows() if r["kind"] != "eval"]
    png, text = write_report(_write_run(tmp_path / "run", rows))
    assert png.stat().st_size > 0
    assert text.startswith("(no eval rows)\n")
    assert json.loads((png.parent / "summary.json").read_text()) == {"stage_table": [], "final_loss": {}, "data_table": []}


def test_malformed_line_names_file_and_line(tmp_path):
    run_dir = _write_run(tmp_path / "run", _rows())
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 21,\n')
    n_lines = len((run_dir / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(CptError, match=rf"metrics\.jsonl:{n_lines}: malformed"):
        write_report(run_dir)


def test_missing_metrics_file(tmp_path):
    with pytest.raises(CptError, match=r"no metrics\.jsonl in .*cpt run RECIPE"):
        write_report(tmp_path)


def test_data_table_shares_per_stage():
    rows = [{"kind": "data", "step": 10, "stage": "pretrain", "source": "english", "tokens": 1000},
            {"kind": "data", "step": 20, "stage": "cpt", "source": "code", "tokens": 750},
            {"kind": "data", "step": 20, "stage": "cpt", "source": "english", "tokens": 250}]
    table = data_table(rows)
    assert [(r["stage"], r["source"], r["tokens"], r["share"]) for r in table] == [
        ("pretrain", "english", 1000, 1.0), ("cpt", "code", 750, 0.75), ("cpt", "english", 250, 0.25)]
    text = format_data_table(table)
    assert "75.0%" in text and "1,000" in text and text.count("\n") == 3


def test_stage_labels_name_the_methods(tmp_path):
    rows = _rows()
    for r in rows:
        if r["kind"] == "stage" and r["event"] == "start" and r["stage"] == "cpt":
            r["methods"] = ["distill", "hft"]
    from cpt.report import _stage_spans

    assert [label for label, _, _ in _stage_spans(rows)] == ["pretrain", "cpt [distill+hft]"]
