"""``cpt schedule``: a recipe's learning rates at chosen steps, as a table, JSON or a PNG, without training.

Only the recipe's stages, their schedules and step counts are read; no corpus, tokenizer or model is touched.
Stage ``k``'s step ``t`` is global step ``sum(steps of stages before k) + t``, so a stage's step 0 (the value
before its first update) shares its global step with the previous stage's last step.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cpt.config import suggest
from cpt.errors import CptError
from cpt.recipe import Recipe, StageConfig, load_recipe
from cpt.schedules import ScheduleConfig, lr_at

PLOT_POINTS = 2000  # per stage: enough for a smooth curve, few enough for a million-step stage


@dataclass
class Span:
    """One stage placed on the run's global step axis."""

    stage: StageConfig
    offset: int  # global steps completed before the stage starts
    steps: int  # the stage's length (after train.max_steps)


@dataclass
class Row:
    stage: str
    step: int  # within the stage
    global_step: int
    lr: float


def spans(recipe: Recipe) -> list[Span]:
    """Every stage with its global offset and length, in order."""
    out, offset = [], 0
    for stage in recipe.stages:
        steps = recipe.train.stage_steps(stage)
        out.append(Span(stage, offset, steps))
        offset += steps
    return out


def parse_steps(text: str) -> list[int]:
    """``"0,10,100"`` -> ``[0, 10, 100]``.

    Raises:
        CptError: anything but comma-separated non-negative integers.
    """
    items = [item.strip() for item in text.split(",")]
    if not all(re.fullmatch(r"[0-9]+", item) for item in items):
        raise CptError(f"--steps '{text}': expected comma-separated non-negative integers, e.g. 0,10,100")
    return [int(item) for item in items]


def landmarks(schedule: ScheduleConfig, total: int) -> list[int]:
    """Eleven evenly spaced steps of a stage plus its phase boundaries (warm-up end, cooldown, anneal)."""
    warmup, cooldown, anneal = (schedule.warmup_for(total), schedule.cooldown_for(total),
                                schedule.anneal_for(total))
    marks = {round(i * total / 10) for i in range(11)} | {warmup}
    if schedule.kind == "wsd":
        marks.add(total - cooldown)
    if schedule.kind == "infinite":
        marks |= {warmup + cooldown, total - anneal}
    return sorted(marks)


def rows(recipe: Recipe, stage: str | None = None, steps: list[int] | None = None,
         global_steps: bool = False) -> list[Row]:
    """The learning rate of every stage (or only ``stage``) at ``steps``.

    Args:
        recipe: a validated recipe.
        stage: a stage name, or None for every stage.
        steps: stage steps, or global steps with ``global_steps``; None for :func:`landmarks` of each stage.
        global_steps: read ``steps`` as global steps: each goes to the stage whose update completes it
            (global step 0 to the first stage; steps past the run's end to the last stage).

    Raises:
        CptError: an unknown stage name.
    """
    placed = spans(recipe)
    names = [s.stage.name for s in placed]
    if stage is not None and stage not in names:
        raise CptError(f"--stage '{stage}': no such stage{suggest(stage, names)}; stages: {', '.join(names)}")
    if steps is None or not global_steps:
        wanted = [(s, t) for s in placed
                  for t in (steps if steps is not None else landmarks(s.stage.schedule, s.steps))]
    else:
        wanted = []
        for g in steps:
            span = next((s for s in placed if g <= s.offset + s.steps), placed[-1])
            wanted.append((span, g - span.offset))
    return [Row(s.stage.name, t, s.offset + t, lr_at(s.stage.schedule, t, s.steps))
            for s, t in wanted if stage is None or s.stage.name == stage]


def as_json(table: list[Row], global_steps: bool) -> dict[str, dict[int, float]]:
    """``{stage: {step: lr}}``, steps in each stage's own numbering or, with ``global_steps``, the run's."""
    out: dict[str, dict[int, float]] = {}
    for r in table:
        out.setdefault(r.stage, {})[r.global_step if global_steps else r.step] = r.lr
    return out


def format_table(recipe: Recipe, table: list[Row]) -> str:
    """One line per row: stage and kind (on the stage's first row), stage step, global step, learning rate."""
    kinds = {s.name: s.schedule.kind for s in recipe.stages}
    lengths = {s.stage.name: s.steps for s in spans(recipe)}
    width = max([5] + [len(r.stage) for r in table])
    lines = [f"{'stage':<{width}}  {'kind':<12}  {'step':>8}  {'global':>8}  {'lr':>10}"]
    previous = None
    for r in table:
        first = r.stage != previous
        previous = r.stage
        # Past its end a stage keeps its final value; its global step there belongs to the next stage.
        where = f"{r.global_step:>8}" if r.step <= lengths[r.stage] else f"{'(past)':>8}"
        lines.append(f"{r.stage if first else '':<{width}}  {kinds[r.stage] if first else '':<12}  "
                     f"{r.step:>8}  {where}  {r.lr:>10.3e}")
    return "\n".join(lines)


def plot(recipe: Recipe, path: Path) -> Path:
    """Draw every stage's schedule over global steps into a PNG, stages separated and named."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(10, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    placed = spans(recipe)
    for i, s in enumerate(placed):
        schedule = s.stage.schedule
        if s.steps <= PLOT_POINTS:
            ts = list(range(s.steps + 1))
        else:
            # Phase boundaries (and their neighbours) keep kinks and jumps sharp between the sampled points.
            edges = {b + d for b in landmarks(schedule, s.steps) for d in (-1, 0, 1) if 0 <= b + d <= s.steps}
            ts = sorted({round(k * s.steps / PLOT_POINTS) for k in range(PLOT_POINTS + 1)} | edges)
        ax.plot([s.offset + t for t in ts], [lr_at(schedule, t, s.steps) for t in ts], linewidth=1.8,
                color=f"C{i % 10}", clip_on=False)
        if i > 0:
            ax.axvline(s.offset, color="0.4", linestyle="--", linewidth=1)
        ax.text(s.offset + s.steps / 2, 1.01, f"{s.stage.name}\n{schedule.kind}", ha="center", va="bottom",
                transform=ax.get_xaxis_transform(), color=f"C{i % 10}")
    ax.set_xlim(0, placed[-1].offset + placed[-1].steps)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
    ax.set_xlabel("global step")
    ax.set_ylabel("learning rate")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{recipe.name}: learning rate by stage", pad=30)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def show(recipe_path: str, overrides: list[str], stage: str | None = None, steps: str | None = None,
         json_out: bool = False, global_steps: bool = False, plot_path: str | None = None) -> None:
    """The ``cpt schedule`` command: print a table (or JSON) of learning rates; optionally write a plot."""
    recipe, _ = load_recipe(recipe_path, overrides)
    table = rows(recipe, stage, parse_steps(steps) if steps is not None else None, global_steps)
    if json_out:
        print(json.dumps(as_json(table, global_steps), indent=2))
    else:
        print(format_table(recipe, table))
    if plot_path:
        print(f"wrote {plot(recipe, Path(plot_path))}", file=sys.stderr)
