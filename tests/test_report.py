"""Tests for cpt.report on a synthetic two-stage run: pretrain (steps 0-10), then cpt (10-20)."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest

from cpt.cli import main
from cpt.errors import CptError
from cpt.plots import _eval_segments, _stage_spans
from cpt.report import data_table, fmt, format_data_table, format_stage_table, read_metrics, stage_table, write_report

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
    assert (width, height) == (1200, 720)  # eval losses above, the learning rate in a panel below
    summary = json.loads((png.parent / "summary.json").read_text())
    assert summary["stage_table"] == stage_table(_rows())
    assert summary["final_loss"] == {"upstream": 4.5, "target": 2.5}
    assert text.startswith(format_stage_table(summary["stage_table"]) + "\n\ntokens per source and stage:")


def test_an_automatic_replay_rate_gets_its_own_panel(tmp_path):
    """The rate of each replay row, held until the next (a step line), between the losses and the learning rate."""
    rows = _rows()
    second = [r for r in rows if r["kind"] == "eval" and r["set"] == "upstream" and r["stage"] == STAGES[1][0]]
    replay = [{"kind": "replay", "step": r["step"], "stage": r["stage"], "stage_step": r["stage_step"],
               "rate": 0.1 * (k + 1), "set": "upstream", "loss": r["loss"], "start_loss": second[0]["loss"],
               "holds": True} for k, r in enumerate(second)]
    png, _ = write_report(_write_run(tmp_path / "run", rows + replay))
    height, width = matplotlib.image.imread(png).shape[:2]
    assert (width, height) == (1200, 900)  # 720 without it (test_write_report)


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
    assert [label for label, _, _ in _stage_spans(rows)] == ["pretrain", "cpt [distill+hft]"]


class _Page(HTMLParser):
    """The image sources and the tables (lists of rows of cell texts) of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.tables, self._cell = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def table(self, first_header: str, second_header: str) -> list[list[str]]:
        return next(t for t in self.tables if t[0][:2] == [first_header, second_header])


def test_report_page_matches_stability_json(tmp_path):
    png, text = write_report(_write_run(tmp_path / "run", _rows()))
    out = png.parent
    assert {p.name for p in out.iterdir()} == {"curves.png", "gap.png", "summary.json", "stability.json", "index.html"}
    page = _Page((out / "index.html").read_text())
    assert page.images == ["curves.png", "gap.png"]  # relative: the folder can be copied as it is
    assert all((out / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for src in page.images)

    stability = json.loads((out / "stability.json").read_text())
    figures = stability["stages"]
    cpt_upstream = next(r for r in figures if (r["stage"], r["set"]) == ("cpt", "upstream"))
    # 4.0 -> 4.25 -> 4.5 over stage steps 0, 5, 10: depth 0.5 at step 10, never back; area 0.625 + 1.875.
    assert (cpt_upstream["gap_depth"], cpt_upstream["peak_step"], cpt_upstream["recovery_step"],
            cpt_upstream["gap_area"], cpt_upstream["final_forgetting"]) == (0.5, 10, None, 2.5, 0.5)
    gap_rows = page.table("stage", "eval set")[1:]
    assert ["cpt", "upstream", "upstream", "4", "0.5", "10", "never", "2.5", "+0.5", "-", "-"] in gap_rows
    assert gap_rows == [[r["stage"], r["set"], r["tag"] or "-", fmt(r["baseline"]), fmt(r["gap_depth"]),
                         fmt(r["peak_step"]), "never" if r["recovery_step"] is None else fmt(r["recovery_step"]),
                         fmt(r["gap_area"]), fmt(r["final_forgetting"], signed=True), fmt(r["gain"], signed=True),
                         fmt(r["steps_to_90"])] for r in figures]
    # "target" is untagged, so the only task is upstream, a previous task during cpt: WC-ACC = its lowest A.
    [entry] = stability["continual"]
    assert (entry["k"], entry["min_acc"], entry["wc_acc"]) == (1, -4.5, -4.5)
    assert page.table("stage", "tasks k")[1][:4] == ["cpt", "1", "-4.5", "-4.5"]
    before_after = page.table("eval set", "stage")[1:]
    assert before_after[1] == ["upstream", "cpt", "4", "4.5", "+0.5"]
    assert "stability gap per stage and eval set:" in text


def test_sibling_stages_draw_separate_lines():
    rows = _rows()
    # Read as a line of stages, cpt continues pretrain (their shared step-10 eval is drawn once).
    assert _eval_segments(rows, "upstream") == [([0, 5, 10, 15, 20], [8.0, 5.5, 4.0, 4.25, 4.5])]
    # A stage that starts from another stage's weights (start_from) begins a new line.
    assert len(_eval_segments(rows, "upstream", {"cpt": "some-earlier-stage"})) == 2


def _second_run(tmp_path: Path) -> Path:
    rows = _rows()
    for r in rows:
        if r["kind"] == "eval":
            r["loss"] += 0.25
        if r["kind"] == "stage" and r["event"] == "start" and r["stage"] == "cpt":
            r["methods"] = ["distill"]
    return _write_run(tmp_path / "b", rows)


def test_cli_report_compares_runs(tmp_path, capsys):
    a, b = _write_run(tmp_path / "a", _rows()), _second_run(tmp_path)
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "cmp"
    assert f"comparison: {out / 'index.html'}" in printed
    assert {p.name for p in out.iterdir()} == {"comparison.png", "comparison.json", "index.html"}
    for run in (a, b):  # each run's own report is refreshed too
        assert (run / "report" / "index.html").is_file() and (run / "report" / "stability.json").is_file()

    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["a"]["final_loss"] == {"upstream": 4.5, "target": 2.5}
    assert comparison["b"]["final_loss"] == {"upstream": 4.75, "target": 2.75}
    assert comparison["b"]["label"] == "b [cpt: distill]"
    page = _Page((out / "index.html").read_text())
    assert page.images == ["comparison.png"] and (out / "comparison.png").stat().st_size > 0
    finals = page.table("run", "upstream final loss")
    assert finals[1:] == [["a", "4.5", "2.5", "-4.5", "-4.5"], ["b [cpt: distill]", "4.75", "2.75", "-4.75", "-4.75"]]
    links = (out / "index.html").read_text()
    assert 'href="../a/report/index.html"' in links and 'href="../b/report/index.html"' in links


def test_cli_report_one_run(tmp_path, capsys):
    run = _write_run(tmp_path / "run", _rows())
    assert main(["report", str(run), "--out", str(tmp_path / "elsewhere"), "--atol", "0.5"]) == 0
    assert "report: " + str(tmp_path / "elsewhere" / "index.html") in capsys.readouterr().out
    stability = json.loads((tmp_path / "elsewhere" / "stability.json").read_text())
    assert stability["tolerance"] == {"rtol": 0.01, "atol": 0.5}
    # With a band of 0.5 nats, cpt's 0.5 rise on upstream never leaves it.
    assert next(r for r in stability["stages"] if (r["stage"], r["set"]) == ("cpt", "upstream"))["recovery_step"] == 0
    assert not (run / "report").exists()


def test_cli_report_without_metrics(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_binary_metrics_file_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_bytes(b'{"kind": "train"}\n\x89PNG\r\n\x1a\n\xff\xfe\x00\x00\n')
    assert main(["report", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    assert err == (f"cpt: error: {run_dir / 'metrics.jsonl'}:2: not UTF-8 text (a binary file?); metrics.jsonl holds "
                   "one JSON object per line, as `cpt run` writes it\n")


@pytest.mark.parametrize("cut", ['{"kind": "train", "step": 21, "lo', '{"kind": "train", "note": "\xe9'])
def test_a_partial_last_line_from_a_kill_is_skipped_with_a_warning(tmp_path, caplog, cut):
    """A kill mid-write leaves a row without its newline (possibly inside a UTF-8 character): the report of the
    finished rows is written, with a warning; the same text followed by a newline is still an error."""
    run_dir = _write_run(tmp_path / "run", _rows())
    whole = read_metrics(run_dir / "metrics.jsonl")
    lineno = (run_dir / "metrics.jsonl").read_bytes().count(b"\n") + 1
    data = cut.encode()[:-1] if cut.endswith("\xe9") else cut.encode()
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(data)
    with caplog.at_level("WARNING", logger="cpt.report"):
        assert read_metrics(run_dir / "metrics.jsonl") == whole
        write_report(run_dir)
    assert f"metrics.jsonl:{lineno}: skipped a partial last line" in caplog.text and "partial" in caplog.text
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b"\n")
    with pytest.raises(CptError, match=rf"metrics\.jsonl:{lineno}: "):
        read_metrics(run_dir / "metrics.jsonl")
