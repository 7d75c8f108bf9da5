"""Run report: read a run's ``metrics.jsonl``, tabulate each stage's effect on every eval set, and plot the curves.

``write_report(run_dir)`` writes ``report/curves.png`` (eval losses over global steps, stages shaded, LR on a
second axis) and ``report/summary.json`` (the stage table and the final loss per eval set).
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from cpt.errors import CptError

STAGE_SHADES = ("#e8eef6", "#f6f1e6")


def read_metrics(path: Path) -> list[dict]:
    """Parse a ``metrics.jsonl`` file into its rows, in file order; blank lines are skipped.

    Args:
        path: the JSONL file, one JSON object per line.

    Returns:
        Every row, including kinds this module does not use (callers filter on ``row["kind"]``).

    Raises:
        CptError: a line is not a JSON object; the message names the file and line number.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CptError(f"{path}:{lineno}: malformed metrics line ({e.msg})") from None
            if not isinstance(row, dict):
                raise CptError(f"{path}:{lineno}: malformed metrics line (expected a JSON object)")
            rows.append(row)
    return rows


def _of_kind(rows: list[dict], kind: str) -> list[dict]:
    return [r for r in rows if r.get("kind") == kind]


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
    evals = _of_kind(rows, "eval")
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


def _stage_spans(rows: list[dict]) -> list[tuple[str, float, float]]:
    """``(label, start_step, end_step)`` per stage from the stage rows (the label names the stage and its
    anti-forgetting methods); a running stage ends at the last step."""
    marks = _of_kind(rows, "stage")
    # Keyed by index so that a resumed run's repeated start row draws one span.
    starts = sorted({r["index"]: r for r in marks if r["event"] == "start"}.values(), key=lambda r: r["index"])
    ends = {r["index"]: r["step"] for r in marks if r["event"] == "end"}
    last_step = max((r["step"] for r in rows if "step" in r), default=0)
    spans = []
    for i, r in enumerate(starts):
        end = ends.get(r["index"], starts[i + 1]["step"] if i + 1 < len(starts) else last_step)
        methods = "+".join(r.get("methods") or [])
        spans.append((f"{r['stage']} [{methods}]" if methods else r["stage"], r["step"], end))
    return spans


def plot_curves(rows: list[dict], path: Path, title: str = "eval loss by stage") -> Path:
    """Plot every eval set's loss over global steps, with stages shaded and the learning rate on a second axis.

    Args:
        rows: metrics rows as returned by :func:`read_metrics`.
        path: where to write the PNG; parent directories are created.
        title: the figure title.

    Returns:
        ``path``.
    """
    fig = Figure(figsize=(10, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (nats/token)")
    ax.grid(True, alpha=0.3)

    spans = _stage_spans(rows)
    for i, (name, start, end) in enumerate(spans):
        ax.axvspan(start, end, color=STAGE_SHADES[i % 2], zorder=0)
        ax.text((start + end) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom")
        if i > 0:
            ax.axvline(start, color="0.4", linestyle="--", linewidth=1)

    evals = _of_kind(rows, "eval")
    for name in dict.fromkeys(r["set"] for r in evals):
        # The end eval of one stage and the start eval of the next share a step and weights: keep one point.
        by_step = {r["step"]: r["loss"] for r in evals if r["set"] == name}
        steps = sorted(by_step)
        # Unclipped so the markers at the first and last step show whole at the plot's edges.
        ax.plot(steps, [by_step[s] for s in steps], marker="o", markersize=4, linewidth=1.8, label=name,
                clip_on=False)
    if not evals:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no eval rows", transform=ax.transAxes, ha="center", va="center", color="0.4",
                bbox={"facecolor": "white", "edgecolor": "0.7"})

    handles, labels = ax.get_legend_handles_labels()
    train = _of_kind(rows, "train")
    if train:
        lr_ax = ax.twinx()
        lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="0.5", linewidth=0.9,
                   label="learning rate")
        lr_ax.set_ylabel("learning rate", color="0.4")
        lr_ax.tick_params(axis="y", colors="0.4")
        lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
        lr_ax.set_ylim(bottom=0)
        more_handles, more_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if spans:
        ax.set_xlim(spans[0][1], spans[-1][2])
    ax.set_title(title, pad=18)
    if handles:
        fig.legend(handles, labels, loc="outside right upper", frameon=False)

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def data_table(rows: list[dict]) -> list[dict]:
    """Tokens drawn from each source in each stage, replay included: ``{"stage", "source", "tokens", "share"}``."""
    table = []
    for r in _of_kind(rows, "data"):
        total = sum(x["tokens"] for x in _of_kind(rows, "data") if x["stage"] == r["stage"])
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


def write_report(run_dir: Path) -> tuple[Path, str]:
    """Write ``report/curves.png`` and ``report/summary.json`` for a run directory.

    Args:
        run_dir: a run directory holding ``metrics.jsonl``.

    Returns:
        The PNG path, and the stage and data tables formatted for the terminal.

    Raises:
        CptError: there is no ``metrics.jsonl``, or a line of it is malformed.
    """
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise CptError(f"no metrics.jsonl in {run_dir}; run `cpt run RECIPE` first")
    rows = read_metrics(metrics)
    table = stage_table(rows)
    final: dict[str, tuple[int, float]] = {}
    for r in _of_kind(rows, "eval"):
        if r["set"] not in final or r["step"] >= final[r["set"]][0]:
            final[r["set"]] = (r["step"], r["loss"])
    out = run_dir / "report"
    png = plot_curves(rows, out / "curves.png", title=f"{run_dir.name}: eval loss by stage")
    data = data_table(rows)
    summary = {"stage_table": table, "final_loss": {name: loss for name, (_, loss) in final.items()},
               "data_table": data}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return png, format_stage_table(table) + "\n\ntokens per source and stage:\n" + format_data_table(data)
