"""Plots of a run's metrics: eval loss curves with stages shaded and the LR below, a zoom on each stage's
first steps (the stability gap), and several runs overlaid. Agg canvas only, so it runs headless."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from cpt.stability import stage_curves, stage_parents

STAGE_SHADES = ("#e8eef6", "#f6f1e6")


def of_kind(rows: list[dict], kind: str) -> list[dict]:
    return [r for r in rows if r.get("kind") == kind]


def _stage_spans(rows: list[dict]) -> list[tuple[str, float, float]]:
    """``(label, start_step, end_step)`` per stage from the stage rows (the label names the stage and its
    anti-forgetting methods); a running stage ends at the last step."""
    marks = of_kind(rows, "stage")
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


def _shade_stages(ax, spans: list[tuple[str, float, float]], label: bool) -> None:
    for i, (name, start, end) in enumerate(spans):
        ax.axvspan(start, end, color=STAGE_SHADES[i % 2], zorder=0)
        if label:
            ax.text((start + end) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom")
        if i > 0:
            ax.axvline(start, color="0.4", linestyle="--", linewidth=1)


def _no_data(ax, text: str, frame: bool = True) -> None:
    ax.set_yticks([])
    if not frame:  # a figure with nothing else to show: no empty axes either
        ax.set_axis_off()
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4",
            bbox={"facecolor": "white", "edgecolor": "0.7"})


def _eval_segments(rows: list[dict], name: str,
                   start_from: dict[str, str | None] | None = None) -> list[tuple[list[int], list[float]]]:
    """One eval set's losses over global steps, as ``(steps, losses)`` lines: a stage continues the line of the
    stage before it, a stage that starts from another (``start_from``) starts a new line. Where the end eval of one
    stage and the start eval of the next share a step and weights, one point is kept."""
    parents = stage_parents(rows, start_from)
    evals = [r for r in of_kind(rows, "eval") if r["set"] == name]
    segments: list[tuple[list[int], list[float]]] = []
    previous = None
    for stage in dict.fromkeys([*parents, *(r["stage"] for r in evals)]):
        # A resumed run may log an eval twice; the later line wins.
        points = sorted({r["step"]: r["loss"] for r in evals if r["stage"] == stage}.items())
        if not points:
            continue
        if segments and previous is not None and parents.get(stage) == previous:
            steps, losses = segments[-1]
            points = [(s, loss) for s, loss in points if s > steps[-1]]
        else:
            steps, losses = [], []
            segments.append((steps, losses))
        steps += [s for s, _ in points]
        losses += [loss for _, loss in points]
        previous = stage
    return segments


def plot_curves(rows: list[dict], path: Path, title: str = "eval loss by stage",
                start_from: dict[str, str | None] | None = None) -> Path:
    """Plot every eval set's loss over global steps with stages shaded, and the learning rate in a panel below
    (and above it, when the run has an automatic replay rate, that rate).

    Args:
        rows: metrics rows as returned by :func:`read_metrics`.
        path: where to write the PNG; parent directories are created.
        title: the figure title.
        start_from: the recipe's ``start_from`` per stage: a stage that branches off an earlier one starts a new
            line rather than joining the stage before it.

    Returns:
        ``path``.
    """
    replay = of_kind(rows, "replay")
    fig = Figure(figsize=(10, 7.5 if replay else 6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax, *rate_ax, lr_ax = fig.subplots(3 if replay else 2, 1, sharex=True, height_ratios=(3, 1, 1) if replay else (3, 1))
    ax.set_ylabel("eval loss (nats/token)")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    spans = _stage_spans(rows)
    for i, axis in enumerate((ax, *rate_ax, lr_ax)):
        _shade_stages(axis, spans, label=i == 0)
    if replay:  # each rate holds from its evaluation to the next (the last one is at the stage's end)
        rate_ax[0].set_ylabel("replay rate")
        for stage in dict.fromkeys(r["stage"] for r in replay):
            points = [r for r in replay if r["stage"] == stage]
            rate_ax[0].step([r["step"] for r in points], [r["rate"] for r in points], where="post", color="C3",
                            linewidth=1.4)
        rate_ax[0].set_ylim(bottom=0)
        rate_ax[0].grid(True, alpha=0.3)

    evals = of_kind(rows, "eval")
    for i, name in enumerate(dict.fromkeys(r["set"] for r in evals)):
        for j, (steps, losses) in enumerate(_eval_segments(rows, name, start_from)):
            # Unclipped so the markers at the first and last step show whole at the plot's edges.
            ax.plot(steps, losses, marker="o", markersize=4, linewidth=1.8, color=f"C{i}", label=None if j else name,
                    clip_on=False)
    if not evals:
        _no_data(ax, "no eval rows")

    train = of_kind(rows, "train")
    if train:
        lr_ax.plot([r["step"] for r in train], [r["lr"] for r in train], color="0.3", linewidth=1.2)
        lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
        lr_ax.yaxis.set_major_locator(MaxNLocator(3))
        lr_ax.set_ylim(bottom=0)
    else:
        _no_data(lr_ax, "no train rows")
    for axis in (ax, lr_ax):
        axis.grid(True, alpha=0.3)
    lr_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if spans:
        ax.set_xlim(spans[0][1], spans[-1][2])
    ax.set_title(title, pad=18)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", frameon=False)

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_gap_zoom(rows: list[dict], stability: dict, path: Path, fraction: float = 0.2) -> Path:
    """One panel per eval set (rows) and stage (columns) over the stage's first steps: the loss, its baseline and
    recovery band, the peak of the gap and the recovery step.

    A column spans the first ``fraction`` of its stage, stretched to show at least four evals and every set's
    recovery step.

    Args:
        rows: metrics rows as returned by :func:`read_metrics`.
        stability: :func:`cpt.stability.stability_report` of the same rows.
        path: where to write the PNG; parent directories are created.
        fraction: the share of each stage to show.

    Returns:
        ``path``.
    """
    curves = stage_curves(rows)
    figures = stability["stages"]
    stages = list(dict.fromkeys(r["stage"] for r in figures))
    sets = list(dict.fromkeys(r["set"] for r in figures))
    lengths = {r["stage"]: r["last_step"] or 0 for r in figures}
    fig = Figure(figsize=(max(4 * len(stages), 8), 1 + 2.5 * max(len(sets), 1)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    if not figures:
        _no_data(fig.add_subplot(), "no eval rows", frame=False)
    else:
        axes = fig.subplots(len(sets), len(stages), squeeze=False, sharex="col")
        rtol, atol = stability["tolerance"]["rtol"], stability["tolerance"]["atol"]
        for col, stage in enumerate(stages):
            ours = [r for r in figures if r["stage"] == stage]
            steps = sorted({s for r in ours for s, _ in curves[(stage, r["set"])]})
            end = max([math.ceil(fraction * lengths[stage]), *steps[:4][-1:],
                       *(r["recovery_step"] for r in ours if r["recovery_step"] is not None)])
            for row, name in enumerate(sets):
                ax = axes[row][col]
                ax.grid(True, alpha=0.3)
                if row == 0:
                    ax.set_title(stage)
                if col == 0:
                    ax.set_ylabel(f"{name}\nloss")
                if row == len(sets) - 1:
                    ax.set_xlabel("stage step")
                figure = next((r for r in ours if r["set"] == name), None)
                if figure is None:
                    _no_data(ax, "no evals")
                    continue
                shown = [(s, loss) for s, loss in curves[(stage, name)] if s <= end]
                ax.plot([s for s, _ in shown], [loss for _, loss in shown], marker="o", markersize=4, color="C0")
                # A little room either side, so markers and a recovery line at the edges show whole.
                ax.set_xlim(-0.03 * max(end, 1), 1.03 * max(end, 1))
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.margins(y=0.12)
                baseline = figure["baseline"]
                if baseline is None:
                    continue
                ax.axhline(baseline, color="0.35", linestyle="--", linewidth=1)
                ax.axhspan(baseline, baseline + max(atol, rtol * abs(baseline)), color="#d9efd9", zorder=0)
                if figure["gap_depth"] > 0 and figure["peak_step"] <= end:
                    ax.plot(figure["peak_step"], baseline + figure["gap_depth"], marker="v", color="C3", markersize=8)
                    ax.annotate(f"+{figure['gap_depth']:.3g}", (figure["peak_step"], baseline + figure["gap_depth"]),
                                textcoords="offset points", va="top", color="C3",
                                # Beside the marker, on the side with room.
                                **({"xytext": (-7, -4), "ha": "right"} if figure["peak_step"] > end / 2
                                   else {"xytext": (7, -4), "ha": "left"}),
                                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
                if figure["recovery_step"]:
                    ax.axvline(figure["recovery_step"], color="C2", linestyle=":", linewidth=1.5)
        fig.suptitle(f"the first {fraction:.0%} of each stage (at least 4 evals)", fontsize=11)
        fig.legend(handles=[Line2D([], [], color="C0", marker="o", markersize=4, label="eval loss"),
                            Line2D([], [], color="0.35", linestyle="--", label="baseline (stage step 0)"),
                            Patch(color="#d9efd9", label="recovery band"),
                            Line2D([], [], color="C3", marker="v", linestyle="", label="gap peak (+depth)"),
                            Line2D([], [], color="C2", linestyle=":", label="recovery step")],
                   loc="outside lower center", ncols=5, frameon=False, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def run_label(rows: list[dict], name: str) -> str:
    """A run's legend label: its name and each stage's anti-forgetting methods, e.g. ``demo [cpt: distill+hft]``."""
    methods = [f"{r['stage']}: {'+'.join(r['methods'])}" for r in of_kind(rows, "stage")
               if r["event"] == "start" and r.get("methods")]
    methods = list(dict.fromkeys(methods))  # a resumed run repeats a start row
    return f"{name} [{'; '.join(methods)}]" if methods else name


def plot_comparison(runs: list[tuple[str, list[dict], dict[str, str | None]]], path: Path) -> Path:
    """One panel per eval set with every run's loss over global steps overlaid.

    Args:
        runs: ``(label, metrics rows, start_from per stage)`` per run, in legend order.
        path: where to write the PNG; parent directories are created.

    Returns:
        ``path``.
    """
    sets = list(dict.fromkeys(r["set"] for _, rows, _ in runs for r in of_kind(rows, "eval")))
    fig = Figure(figsize=(10, 1 + 3 * max(len(sets), 1)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    if not sets:
        _no_data(fig.add_subplot(), "no eval rows", frame=False)
    else:
        axes = fig.subplots(len(sets), 1, squeeze=False, sharex=True)[:, 0]
        for ax, name in zip(axes, sets):
            for i, (label, rows, start_from) in enumerate(runs):
                for j, (steps, losses) in enumerate(_eval_segments(rows, name, start_from)):
                    ax.plot(steps, losses, marker="o", markersize=3, linewidth=1.6, color=f"C{i}",
                            label=None if j else label)
            ax.set_title(name)
            ax.set_ylabel("eval loss (nats/token)")
            ax.grid(True, alpha=0.3)
        axes[-1].set_xlabel("step")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
        handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", frameon=False,
                   ncols=min(len(handles), 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_merge_sweep(record: dict, path: Path) -> Path:
    """Upstream against downstream eval loss of each interpolated model (a Pareto curve), each point labelled
    with its alpha; ``record`` is ``cpt merge --sweep``'s (``sets``, ``tags``, ``rows``)."""
    tags = record.get("tags", {})
    up = next((n for n in record["sets"] if tags.get(n) == "upstream"), record["sets"][0])
    down = next((n for n in record["sets"] if tags.get(n) == "downstream"), record["sets"][-1])
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    xs, ys = [r[down] for r in record["rows"]], [r[up] for r in record["rows"]]
    ax.plot(xs, ys, "o-", color="#1f5f9f")
    for row, x, y in zip(record["rows"], xs, ys):
        ax.annotate(f"{row['alpha']:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"{down} loss (downstream, nats/token)")
    ax.set_ylabel(f"{up} loss (upstream, nats/token)")
    ax.set_title("interpolation (1 - alpha) base + alpha model")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
