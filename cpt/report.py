"""Run report: read a run's ``metrics.jsonl``, tabulate each stage's effect on every eval set, plot the curves,
measure the stability gap (:mod:`cpt.stability`), and write it all as a self-contained HTML page.

``write_report(run_dir)`` writes into ``report/``: ``curves.png`` (eval losses over global steps with stages shaded,
the learning rate in a panel below), ``gap.png`` (the first steps of every stage, per eval set), ``summary.json``
(before/after per stage, final losses, tokens per source), ``stability.json`` and ``index.html`` (the figures and
every table; inline CSS, images by relative path, so the folder can be copied as it is). ``compare_runs`` overlays
several runs; ``report_runs`` is ``cpt report``.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
from pathlib import Path

import yaml

from cpt.errors import CptError
from cpt.plots import of_kind, plot_comparison, plot_curves, plot_gap_zoom, run_label
from cpt.stability import stability_report

log = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict]:
    """Parse a ``metrics.jsonl`` file into its rows, in file order; blank lines are skipped.

    A run killed while writing a row leaves a partial last line without its newline: that line is skipped with
    a warning, so the report of a killed run can still be written. A bad line anywhere else is an error.

    Args:
        path: the JSONL file, one JSON object per line.

    Returns:
        Every row, including kinds this module does not use (callers filter on ``row["kind"]``).

    Raises:
        CptError: a line is not UTF-8 text or not a JSON object; the message names the file and line number.
    """
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    rows = []
    for lineno, raw in enumerate(lines, start=1):
        cut = lineno == len(lines)  # after the last newline: empty, or a row the writer never finished
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            # A kill can cut a row inside a multi-byte character; a row starts with "{" (cpt writes objects).
            if cut and raw.startswith(b"{"):
                _skip_partial(path, lineno)
                continue
            raise CptError(f"{path}:{lineno}: not UTF-8 text (a binary file?); metrics.jsonl holds one JSON object "
                           "per line, as `cpt run` writes it") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if cut and line.startswith("{"):
                _skip_partial(path, lineno)
                continue
            raise CptError(f"{path}:{lineno}: malformed metrics line ({e.msg})") from None
        if not isinstance(row, dict):
            raise CptError(f"{path}:{lineno}: malformed metrics line (expected a JSON object)")
        rows.append(row)
    return rows


def _skip_partial(path: Path, lineno: int) -> None:
    log.warning("%s:%d: skipped a partial last line (no newline: the run was stopped while writing it)",
                path, lineno)


def stage_table(rows: list[dict]) -> list[dict]:
    """One row per eval set and stage: the eval loss at the stage's start and end, and their difference.

    ``before`` is the stage's ``stage_step`` 0 eval; ``after`` is its eval with the highest global step (the
    latest one while the stage is still running). Either is ``None`` when missing, and then so is ``change``.

    Args:
        rows: metrics rows as returned by :func:`read_metrics`; non-eval rows are ignored.

    Returns:
        Dicts ``{"set", "stage", "before", "after", "change"}``, ordered by eval set, then by stage, each in
        order of first appearance.
    """
    evals = of_kind(rows, "eval")
    sets = list(dict.fromkeys(r["set"] for r in evals))
    stages = list(dict.fromkeys(r["stage"] for r in evals))
    table = []
    for name in sets:
        for stage in stages:
            ours = [r for r in evals if r["set"] == name and r["stage"] == stage]
            if not ours:
                continue
            # A resumed run may log an eval twice; the later line holds the weights that carried on.
            starts = [r for r in ours if r["stage_step"] == 0]
            before = starts[-1]["loss"] if starts else None
            after = max(reversed(ours), key=lambda r: r["step"])["loss"]
            change = after - before if before is not None else None
            table.append({"set": name, "stage": stage, "before": before, "after": after, "change": change})
    return table


def format_stage_table(table: list[dict]) -> str:
    """Render :func:`stage_table` as a fixed-width text table, losses to 2 decimals and the change signed."""
    if not table:
        return "(no eval rows)"

    def num(x: float | None, fmt: str) -> str:
        # Adding 0.0 turns the -0.0 that round() gives tiny drops into 0.0, so they print as +0.00, not -0.00.
        return "-" if x is None else format(round(x, 2) + 0.0, fmt)

    header = ("eval set", "stage", "before", "after", "change")
    lines = [(r["set"], r["stage"], num(r["before"], ".2f"), num(r["after"], ".2f"), num(r["change"], "+.2f"))
             for r in table]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join([cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
                  + [c.rjust(w) for c, w in zip(cells[2:], widths[2:])]).rstrip()
        for cells in [header, *lines]
    )


def data_table(rows: list[dict]) -> list[dict]:
    """Tokens drawn from each source in each stage, replay included: ``{"stage", "source", "tokens", "share"}``."""
    table = []
    for r in of_kind(rows, "data"):
        total = sum(x["tokens"] for x in of_kind(rows, "data") if x["stage"] == r["stage"])
        table.append({"stage": r["stage"], "source": r["source"], "tokens": r["tokens"],
                      "share": r["tokens"] / total if total else 0.0})
    return table


def format_data_table(table: list[dict]) -> str:
    """The tokens-per-source table for the terminal."""
    if not table:
        return "(no data rows)"
    width = max(len(r["source"]) for r in table) + 2
    lines = [f"{'stage':<14}{'source':<{width}}{'tokens':>12}{'share':>8}"]
    lines += [f"{r['stage']:<14}{r['source']:<{width}}{r['tokens']:>12,}{r['share']:>8.1%}" for r in table]
    return "\n".join(lines)


def format_gap_table(figures: list[dict]) -> str:
    """The stability-gap figures of :func:`cpt.stability.stability_report` (``["stages"]``) for the terminal."""
    if not figures:
        return "(no eval rows)"
    header = ("stage", "eval set", "baseline", "depth", "peak", "recovery", "area", "forgetting", "gain", "to 90%")
    lines = [tuple(_cells(r)[i] for i in (0, 1, 3, 4, 5, 6, 7, 8, 9, 10)) for r in figures]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join([c.ljust(w) for c, w in zip(cells[:2], widths)]
                               + [c.rjust(w) for c, w in zip(cells[2:], widths[2:])]).rstrip()
                     for cells in [header, *lines])


def fmt(x: float | int | None, signed: bool = False) -> str:
    """How the report prints a number: 4 significant digits (thousands separated from 10,000), ``-`` when missing."""
    if x is None:
        return "-"
    sign = "+" if signed else ""
    if isinstance(x, int):
        return f"{x:{sign},}"
    # Adding 0.0 turns -0.0 into 0.0, so an exact zero never prints as -0.
    return f"{x:{sign},.0f}" if abs(x) >= 1e4 else f"{x + 0.0:{sign}.4g}"


GAP_HEADER = ("stage", "eval set", "tag", "baseline", "gap depth", "peak step", "recovery step", "gap area",
              "final forgetting", "gain", "steps to 90% gain")


def _cells(r: dict) -> tuple[str, ...]:
    """One row of the stability-gap table; a recovery step of ``None`` with a baseline reads "never"."""
    recovery = "never" if r["recovery_step"] is None and r["baseline"] is not None else fmt(r["recovery_step"])
    return (r["stage"], r["set"], r["tag"] or "-", fmt(r["baseline"]), fmt(r["gap_depth"]), fmt(r["peak_step"]),
            recovery, fmt(r["gap_area"]), fmt(r["final_forgetting"], signed=True), fmt(r["gain"], signed=True),
            fmt(r["steps_to_90"]))


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{padding:.25em .7em;border-bottom:1px solid #e4e4e4}
th{background:#f3f5f8;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee}p.note{color:#555;font-size:.9em;max-width:60em}"""


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], numeric_from: int = 0) -> str:
    """An HTML table; cells from column ``numeric_from`` on are right-aligned (when that is > 0)."""
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{html.escape(c)}</td>' if numeric_from and i >= numeric_from
                                    else f"<td>{html.escape(c)}</td>" for i, c in enumerate(row)) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: list[str]) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(body)
            + "\n</body></html>\n")


def _continual_tables(continual: list[dict], windows: list[int]) -> list[str]:
    if not continual:
        return ["<p>(no CPT stage with upstream/downstream eval sets)</p>"]
    header = ("stage", "tasks k", "min-ACC", "WC-ACC", *(f"WF{w}" for w in windows), *(f"WP{w}" for w in windows))
    rows = [(c["stage"], fmt(c["k"]), fmt(c["min_acc"]), fmt(c["wc_acc"]), *(fmt(c["wf"][str(w)]) for w in windows),
             *(fmt(c["wp"][str(w)]) for w in windows)) for c in continual]
    task_header = ("stage", "eval set", "learned", "current", "final A", "min A",
                   *(f"WF{w}" for w in windows), *(f"WP{w}" for w in windows))
    task_rows = [(c["stage"], t["set"], t["learned"], "yes" if t["current"] else "no", fmt(t["final_acc"]),
                  fmt(t["min_acc"]), *(fmt(t["wf"][str(w)]) for w in windows),
                  *(fmt(t["wp"][str(w)]) for w in windows)) for c in continual for t in c["tasks"]]
    return [_table(header, rows, numeric_from=1), "<h3>per task</h3>", _table(task_header, task_rows, numeric_from=4)]


DEFINITIONS = """<p class="note">Per stage and eval set, against the baseline (the eval at the stage's step 0):
<b>gap depth</b> = max(0, max loss &minus; baseline); <b>peak step</b> = stage step of the highest loss;
<b>recovery step</b> = first stage step after the peak back within the band
baseline + max(atol, rtol&middot;|baseline|) (rtol {rtol:g}, atol {atol:g} nats; 0 = never left it);
<b>gap area</b> = &int; max(0, loss &minus; baseline) d(step), linear between evals;
<b>final forgetting</b> = last &minus; baseline; downstream sets: <b>gain</b> = baseline &minus; last and the first
step reaching 90% of it. Losses in nats/token.</p>"""

CONTINUAL_NOTE = """<p class="note">De Lange et al. (2023) with A = &minus;loss (higher is better; values are
negative nats/token). Tasks: upstream sets are learned before the first CPT stage, a downstream set in the first CPT
stage that trains on its corpus; at the end of each CPT stage, tasks learned in it are current, the others previous.
<b>min-ACC</b>: mean over previous tasks of the lowest A since they were learned; <b>WC-ACC</b>: mean over the k
tasks of A now (current tasks) and that minimum (previous ones); <b>WF<sup>w</sup></b> / <b>WP<sup>w</sup></b>:
largest drop / rise of A within w consecutive evals, averaged over tasks.</p>"""


def _start_from(run_dir: Path) -> dict[str, str | None]:
    """Each stage's ``start_from`` from the run's resolved ``config.yaml`` (empty when there is none)."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    stages = (yaml.safe_load(config.read_text()) or {}).get("stages") or []
    return {s["name"]: s.get("start_from") for s in stages if isinstance(s, dict) and "name" in s}


def _load_run(run_dir: Path) -> list[dict]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise CptError(f"no metrics.jsonl in {run_dir}; run `cpt run RECIPE` first")
    return read_metrics(metrics)


def _final_losses(rows: list[dict]) -> dict[str, float]:
    final: dict[str, tuple[int, float]] = {}
    for r in of_kind(rows, "eval"):
        if r["set"] not in final or r["step"] >= final[r["set"]][0]:
            final[r["set"]] = (r["step"], r["loss"])
    return {name: loss for name, (_, loss) in final.items()}


def write_report(run_dir: Path, out: Path | None = None, rtol: float = 0.01, atol: float = 0.0,
                 windows: tuple[int, ...] = (10, 100)) -> tuple[Path, str]:
    """Write a run's report: ``curves.png``, ``gap.png``, ``summary.json``, ``stability.json`` and ``index.html``.

    ``index.html`` is self-contained next to its PNGs (inline CSS, images by relative path): copy the folder.

    Args:
        run_dir: a run directory holding ``metrics.jsonl`` (and ``config.yaml`` for stages' ``start_from``).
        out: the report folder (default ``run_dir/report``).
        rtol, atol: the stability-gap recovery band (see :mod:`cpt.stability`).
        windows: the WF/WP window sizes, in evals.

    Returns:
        The curves PNG path, and the stage, data and stability-gap tables formatted for the terminal.

    Raises:
        CptError: there is no ``metrics.jsonl``, or a line of it is malformed.
    """
    rows = _load_run(run_dir)
    out = out or run_dir / "report"
    table, data = stage_table(rows), data_table(rows)
    start_from = _start_from(run_dir)
    stability = stability_report(rows, rtol, atol, windows, start_from=start_from)
    png = plot_curves(rows, out / "curves.png", title=f"{run_dir.name}: eval loss by stage", start_from=start_from)
    plot_gap_zoom(rows, stability, out / "gap.png")
    summary = {"stage_table": table, "final_loss": _final_losses(rows), "data_table": data}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "stability.json").write_text(json.dumps(stability, indent=2) + "\n")

    body = [f"<p>{html.escape(run_label(rows, run_dir.name))} &mdash; from <code>{html.escape(str(run_dir))}"
            "/metrics.jsonl</code></p>",
            "<h2>Eval loss by stage</h2>", '<img src="curves.png" alt="eval loss by stage, learning rate below">',
            "<h2>Stability gap</h2>", '<img src="gap.png" alt="the first steps of each stage">',
            DEFINITIONS.format(rtol=rtol, atol=atol),
            _table(GAP_HEADER, [_cells(r) for r in stability["stages"]], numeric_from=3),
            "<h2>Continual evaluation</h2>", CONTINUAL_NOTE, *_continual_tables(stability["continual"], list(windows)),
            "<h2>Before and after each stage</h2>",
            _table(("eval set", "stage", "before", "after", "change"),
                   [(r["set"], r["stage"], fmt(r["before"]), fmt(r["after"]), fmt(r["change"], signed=True))
                    for r in table], numeric_from=2),
            "<h2>Tokens per source and stage</h2>",
            _table(("stage", "source", "tokens", "share"),
                   [(r["stage"], r["source"], fmt(r["tokens"]), f"{r['share']:.1%}") for r in data], numeric_from=2)]
    body += _merge_sweep_section(run_dir, out)
    (out / "index.html").write_text(_page(f"{run_dir.name}: run report", body))
    text = (format_stage_table(table) + "\n\ntokens per source and stage:\n" + format_data_table(data)
            + "\n\nstability gap per stage and eval set:\n" + format_gap_table(stability["stages"]))
    return png, text


def _merge_sweep_section(run_dir: Path, out: Path) -> list[str]:
    """The table and plot of ``cpt merge --sweep ... --eval RUN_DIR``, when one was run."""
    from cpt.merging.sweep import SWEEP_FILE

    record_path = run_dir / "report" / f"{SWEEP_FILE}.json"
    if not record_path.is_file():
        return []
    record = json.loads(record_path.read_text())
    png = run_dir / "report" / f"{SWEEP_FILE}.png"
    if png.is_file() and out.resolve() != png.parent.resolve():
        shutil.copy2(png, out / png.name)
    names = record["sets"]
    rows = [(f"{r['alpha']:g}", *(fmt(r[n]) for n in names)) for r in record["rows"]]
    return ["<h2>Merging: interpolation toward the base</h2>",
            f"<p>(1 - alpha) <code>{html.escape(record['base'])}</code> + alpha "
            f"<code>{html.escape(record['model'])}</code>, evaluated on this run's eval sets (cpt merge --sweep).</p>",
            f'<img src="{SWEEP_FILE}.png" alt="upstream against downstream loss across alpha">',
            _table(("alpha", *names), rows, numeric_from=0)]


def compare_runs(run_dirs: list[Path], out: Path, rtol: float = 0.01, atol: float = 0.0,
                 windows: tuple[int, ...] = (10, 100)) -> Path:
    """Write a comparison of runs into ``out``: ``comparison.png`` (each eval set's curves overlaid, one line per
    run), ``comparison.json`` and ``index.html`` (final losses, the continual metrics at each run's last CPT stage,
    every run's stability-gap table, and links to the runs' own reports).

    Args:
        run_dirs: run directories holding ``metrics.jsonl``.
        out: the comparison folder.
        rtol, atol, windows: as for :func:`write_report`.

    Returns:
        The path of ``index.html``.
    """
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):  # runs of one name under different parents: tell them apart by path
        names = [str(d) for d in run_dirs]
    runs = [(name, d, _load_run(d), _start_from(d)) for name, d in zip(names, run_dirs)]
    plot_comparison([(run_label(rows, name), rows, start_from) for name, _, rows, start_from in runs],
                    out / "comparison.png")
    result = {}
    for name, d, rows, start_from in runs:
        stability = stability_report(rows, rtol, atol, windows, start_from=start_from)
        last = stability["continual"][-1] if stability["continual"] else None
        result[name] = {"label": run_label(rows, name), "run_dir": str(d), "final_loss": _final_losses(rows),
                        "continual": last, "stability": stability}
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")

    sets = list(dict.fromkeys(s for r in result.values() for s in r["final_loss"]))
    finals = [(r["label"], *(fmt(r["final_loss"].get(s)) for s in sets),
               *(fmt(r["continual"] and r["continual"][k]) for k in ("min_acc", "wc_acc")))
              for r in result.values()]
    body = ["<h2>Eval loss, runs overlaid</h2>", '<img src="comparison.png" alt="eval loss per set, one line per run">',
            "<h2>Final loss</h2>",
            _table(("run", *(f"{s} final loss" for s in sets), "min-ACC", "WC-ACC"), finals, numeric_from=1),
            '<p class="note">min-ACC and WC-ACC at the end of each run\'s last CPT stage (A = &minus;loss).</p>',
            "<h2>Stability gap</h2>", DEFINITIONS.format(rtol=rtol, atol=atol),
            _table(("run", *GAP_HEADER), [(name, *_cells(f)) for name, r in result.items()
                                          for f in r["stability"]["stages"]], numeric_from=4),
            "<h2>Run reports</h2><ul>"
            + "".join(f'<li><a href="{html.escape(os.path.relpath(d / "report" / "index.html", out))}">'
                      f"{html.escape(name)}</a></li>" for name, d, _, _ in runs) + "</ul>"]
    index = out / "index.html"
    index.write_text(_page("comparison of runs", body))
    return index


def report_runs(run_dirs: list[Path], out: Path | None = None, rtol: float = 0.01, atol: float = 0.0) -> str:
    """``cpt report``: (re)write each run's report and, with several runs, their comparison.

    One run: its report goes to ``out`` (default ``RUN_DIR/report``). Several: each run's report goes to its own
    ``RUN_DIR/report`` and the comparison to ``out`` (default ``FIRST_RUN_DIR/report/compare``).

    Returns:
        What to print: the tables of a single run, and the paths of the pages written.
    """
    if len(run_dirs) == 1:
        png, text = write_report(run_dirs[0], out, rtol, atol)
        return f"{text}\n\nreport: {png.parent / 'index.html'}"
    pages = []
    for d in run_dirs:
        png, _ = write_report(d, rtol=rtol, atol=atol)
        pages.append(f"report: {png.parent / 'index.html'}")
    index = compare_runs(run_dirs, out or run_dirs[0] / "report" / "compare", rtol, atol)
    return "\n".join([*pages, f"comparison: {index}"])
