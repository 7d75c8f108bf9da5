"""Stability-gap and continual-evaluation metrics over eval-loss curves (shared REFERENCES.md §4).

Two families, both computed offline from ``metrics.jsonl`` rows by :func:`stability_report`:

**Per stage and eval set** (Guo et al. 2024, the V-shaped dip at the start of CPT). A *curve* is the stage's evals
of one set as ``(stage_step, loss)`` pairs in step order, starting with the *baseline*: the eval at stage step 0,
i.e. the model the stage started from. Losses are in nats/token; lower is better.

- gap depth: ``max(0, max(loss) - baseline)``.
- peak step: the stage step of the highest loss (the first on ties; 0 when the loss never rises).
- recovery step: 0 when the curve never leaves the band ``loss <= baseline + tol`` with
  ``tol = max(atol, rtol * |baseline|)`` (default 1% of the baseline); otherwise the first stage step after the
  peak back inside the band; ``None`` when it never comes back. A later second rise is not counted again.
- gap area: the integral over stage steps of ``max(0, loss - baseline)`` with the loss linearly interpolated
  between evals (trapezoids, split where a segment crosses the baseline), in nats x steps.
- final forgetting: ``last - baseline`` (positive: the stage made this set worse).
- downstream sets only: gain ``= baseline - last`` (positive: the stage taught it), and the steps to 90% of the
  gain: the first stage step with ``baseline - loss >= 0.9 * gain`` (``None`` when the gain is <= 0).

**Continual evaluation** (De Lange et al. 2023) with ``A = -loss`` in place of accuracy, so higher is better and
every accuracy-based definition carries over unchanged; the values are negative nats/token. *Tasks* of an LM run:

- an ``upstream`` set is a task learned before the first CPT stage (the first stage that trains on a corpus no
  upstream set evaluates; a still-running stage other than the first counts as CPT, since its ``data`` rows
  come at its end);
- a ``downstream`` set is a task learned in the first CPT stage that trains on its corpus; until that stage it
  is not a task (in pretrain -> cptA -> cptB, a set of cptB's corpus is no task at the end of cptA, and on a
  branch that never trains its corpus it is none at all); only when no stage of the run trains its corpus is
  it learned in the first CPT stage;
- untagged sets are not tasks. A set's tag is its ``tag`` field; without one, the set named ``upstream`` or
  ``downstream`` has that tag.

The metrics are taken at the end of each CPT stage ``s`` along the chain of stages that led to it (``start_from``
branches are followed, so sibling stages of a sweep are scored separately). A task learned in ``s`` is *current*;
the others are *previous*. The chain's evals form one sequence in which a stage's stage-step-0 eval is dropped
when the stage before it in the chain has evals (the same weights, measured twice).

- min-ACC: the mean over previous tasks of their lowest ``A`` from the moment they were learned on, the eval of
  the weights that finished learning them (the learning stage's last eval) included, as De Lange's pre-update
  eval is.
- WC-ACC: the mean over all ``k`` tasks of ``A_final`` for current tasks and of their minimum for previous ones,
  i.e. ``(1/k) * A_current + (1 - 1/k) * min-ACC`` with one current task.
- WF^w / WP^w: for each task, the largest ``A_i - A_j`` (WF, a drop) or ``A_j - A_i`` (WP, a rise) with ``i < j``
  within ``w`` consecutive evals of its sequence (0 when there is none), averaged over tasks. A task's sequence
  starts when it starts being learned: an upstream set's at the first CPT stage's start (so pre-training's own
  descent is not counted as plasticity), a downstream set's at its learning stage's start. De Lange's code uses
  ``w = 10`` and ``100``. WP^w is the paper's definition, the largest rise over every pair in the window; De
  Lange's code reuses its forgetting search, which skips a start below an earlier value (right for a drop,
  never the best start of a rise), so it can report a smaller WP than the definition.

**Non-finite evals.** A NaN or infinite eval loss is not a measurement: it is left out of every curve with a
warning naming the stage, set and steps, and all figures are computed over the finite evals (a NaN baseline
leaves the stage without a baseline, so its figures are ``None``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

Curve = Sequence[tuple[int, float]]
"""``(stage_step, loss)`` pairs in step order; the first is the baseline at stage step 0."""

TAGS = ("upstream", "downstream")

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- stability gap


def gap_depth(curve: Curve) -> float:
    """How far the loss rises above the baseline ``curve[0]``, at its highest (>= 0)."""
    return max(0.0, max(loss for _, loss in curve) - curve[0][1])


def peak_step(curve: Curve) -> int:
    """The stage step of the highest loss, the first on ties (the baseline's step 0 when the loss never rises)."""
    return max(curve, key=lambda point: point[1])[0]


def recovery_step(curve: Curve, rtol: float = 0.01, atol: float = 0.0) -> int | None:
    """The first stage step after the peak where the loss is back within ``max(atol, rtol * |baseline|)`` of the
    baseline; 0 when it never left that band, ``None`` when it never returns."""
    limit = curve[0][1] + max(atol, rtol * abs(curve[0][1]))
    if all(loss <= limit for _, loss in curve):
        return 0
    peak = peak_step(curve)
    return next((step for step, loss in curve if step > peak and loss <= limit), None)


def gap_area(curve: Curve) -> float:
    """The integral of ``max(0, loss - baseline)`` over stage steps, the loss linear between evals (nats x steps)."""
    baseline, area = curve[0][1], 0.0
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        e0, e1, width = l0 - baseline, l1 - baseline, s1 - s0
        if e0 >= 0 and e1 >= 0:
            area += width * (e0 + e1) / 2
        elif e0 > 0 or e1 > 0:
            # The segment crosses the baseline: only the triangle above it counts.
            above = max(e0, e1)
            area += width * above / (abs(e0) + abs(e1)) * above / 2
    return area


def final_forgetting(curve: Curve) -> float:
    """``last - baseline``: positive when the stage left this set worse than it found it."""
    return curve[-1][1] - curve[0][1]


def gain(curve: Curve) -> float:
    """``baseline - last``: positive when the stage taught this set."""
    return curve[0][1] - curve[-1][1]


def steps_to_gain(curve: Curve, fraction: float = 0.9) -> int | None:
    """The first stage step where ``baseline - loss >= fraction * gain``; ``None`` when the gain is <= 0 or not
    finite."""
    total = gain(curve)
    if not 0 < total < math.inf:
        return None
    return next((step for step, loss in curve if curve[0][1] - loss >= fraction * total), None)


def finite_points(curve: Curve, what: str = "curve") -> list[tuple[int, float]]:
    """``curve`` without its NaN or infinite losses, with a warning naming ``what`` and the steps dropped.

    A diverged or broken eval is not a measurement: every figure is computed over the finite evals, so a NaN
    mid-curve neither poisons the gap area nor hides from the depth, and a NaN baseline leaves no baseline.
    """
    kept = [(step, loss) for step, loss in curve if math.isfinite(loss)]
    if len(kept) < len(curve):
        dropped = [str(step) for step, loss in curve if not math.isfinite(loss)]
        log.warning("%s: skipped %d non-finite eval loss(es) at stage step(s) %s; the stability figures use the "
                    "finite evals", what, len(dropped), ", ".join(dropped))
    return kept


def curve_metrics(curve: Curve, downstream: bool = False, rtol: float = 0.01, atol: float = 0.0) -> dict:
    """Every per-stage figure of one curve (see the module docstring); ``None`` throughout without a baseline.

    Args:
        curve: ``(stage_step, loss)`` pairs in step order; non-finite losses are skipped with a warning.
        downstream: also compute ``gain`` and ``steps_to_90`` (``None`` otherwise).
        rtol, atol: the recovery band, ``max(atol, rtol * |baseline|)`` nats above the baseline.

    Returns:
        ``{"baseline", "peak_step", "gap_depth", "recovery_step", "gap_area", "last_step", "final_loss",
        "final_forgetting", "gain", "steps_to_90"}``.
    """
    keys = ("baseline", "peak_step", "gap_depth", "recovery_step", "gap_area", "last_step", "final_loss",
            "final_forgetting", "gain", "steps_to_90")
    curve = finite_points(curve)
    if not curve or curve[0][0] != 0:
        return dict.fromkeys(keys)
    return {"baseline": curve[0][1], "peak_step": peak_step(curve), "gap_depth": gap_depth(curve),
            "recovery_step": recovery_step(curve, rtol, atol), "gap_area": gap_area(curve),
            "last_step": curve[-1][0], "final_loss": curve[-1][1], "final_forgetting": final_forgetting(curve),
            "gain": gain(curve) if downstream else None,
            "steps_to_90": steps_to_gain(curve, 0.9) if downstream else None}


# ------------------------------------------------------------------------------------- continual evaluation


def _max_windowed_delta(values: Sequence[float], window: int, sign: float) -> float:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    best = 0.0
    for j in range(1, len(values)):
        earlier = values[max(0, j - window + 1):j]
        if earlier:
            best = max(best, max(sign * (a - values[j]) for a in earlier))
    return best


def windowed_forgetting(values: Sequence[float], window: int) -> float:
    """WF^w of one task: the largest drop ``A_i - A_j`` (``i < j``) within ``window`` consecutive evals, >= 0."""
    return _max_windowed_delta(values, window, 1.0)


def windowed_plasticity(values: Sequence[float], window: int) -> float:
    """WP^w of one task: the largest rise ``A_j - A_i`` (``i < j``) within ``window`` consecutive evals, >= 0."""
    return _max_windowed_delta(values, window, -1.0)


def min_acc(previous: Iterable[Sequence[float]]) -> float | None:
    """min-ACC: the mean over previous tasks of the lowest ``A`` each reached after it was learned.

    Args:
        previous: per previous task, its ``A`` values from the moment it was learned on.
    """
    minima = [min(values) for values in previous]
    return sum(minima) / len(minima) if minima else None


def wc_acc(current: Sequence[float], previous_minima: Sequence[float]) -> float | None:
    """WC-ACC: the mean of the current tasks' ``A`` and the previous tasks' minima; with one current task of
    ``k``, ``(1/k) * A_current + (1 - 1/k) * min-ACC``."""
    values = [*current, *previous_minima]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------------------- from metrics rows


def set_tag(row: dict) -> str | None:
    """An eval row's tag: its ``tag`` field, else the set's name when that is ``upstream`` or ``downstream``."""
    tag = row.get("tag")
    if tag is None and row.get("set") in TAGS:
        tag = row["set"]
    return tag


def _stages(rows: list[dict]) -> list[dict]:
    """The stages in index order, from their start rows (a resumed run's repeated start row counts once)."""
    starts = {r["index"]: r for r in rows if r.get("kind") == "stage" and r.get("event") == "start"}
    return [starts[i] for i in sorted(starts)]


def stage_curves(rows: list[dict]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """``(stage, set) -> curve`` from the eval rows; a resumed run may log an eval twice, and the later line wins.
    Non-finite losses are left out with a warning (:func:`finite_points`)."""
    points: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        if r.get("kind") == "eval":
            points.setdefault((r["stage"], r["set"]), {})[r["stage_step"]] = float(r["loss"])
    return {key: finite_points(sorted(by_step.items()), f"eval set {key[1]} in stage {key[0]}")
            for key, by_step in points.items()}


def stage_parents(rows: list[dict], start_from: dict[str, str | None] | None = None) -> dict[str, str | None]:
    """Each stage's parent, the stage whose final weights it started from: its ``start_from``, else the stage
    before it (``None`` for the first).

    Args:
        rows: metrics rows; the stages come from their start rows.
        start_from: the recipe's ``start_from`` per stage name, where set.
    """
    names = [s["stage"] for s in _stages(rows)]
    start_from = start_from or {}
    return {name: start_from.get(name) or (names[i - 1] if i else None) for i, name in enumerate(names)}


def _chain(stage: str, parents: dict[str, str | None]) -> list[str]:
    chain = [stage]
    while parents.get(chain[0]) is not None:
        chain.insert(0, parents[chain[0]])
    return chain


def _continual(stage: str, chain: list[str], sets: dict[str, dict], curves: dict, sources: dict[str, set[str]],
               windows: Sequence[int]) -> dict | None:
    """De Lange's metrics at the end of ``stage`` along ``chain``; ``None`` before the first CPT stage or with
    no tasks."""
    upstream_corpora = {info["corpus"] for info in sets.values() if info["tag"] == "upstream"}
    first_cpt = next((i for i, name in enumerate(chain)
                      if (sources.get(name) and sources[name] - upstream_corpora) or (not sources.get(name) and i > 0)),
                     None)
    if first_cpt is None:
        return None

    def trained_elsewhere(corpus: str | None) -> bool:
        # Any CPT-or-later stage of the run, in this chain or not, that trains ``corpus``.
        return any(corpus in srcs for n, srcs in sources.items() if n not in chain[:first_cpt])

    tasks, since_learned = [], []
    for name, info in sets.items():
        if info["tag"] not in TAGS:
            continue
        # The set's A values along the chain, and where each chain stage starts and ends in them.
        values, start, end = [], {}, {}
        for stage_name in chain:
            points = curves.get((stage_name, name), [])
            start[stage_name] = max(len(values) - 1, 0)  # the previous stage's last eval: the weights it starts from
            if values and points and points[0][0] == 0:
                points = points[1:]  # the same weights measured again
            values += [-loss for _, loss in points]
            end[stage_name] = len(values) - 1
        if not values:
            continue
        if info["tag"] == "upstream":
            learned_in, tracked_from, previous_from = None, start[chain[first_cpt]], start[chain[first_cpt]]
        else:
            learned_in = next((n for n in chain[first_cpt:] if info["corpus"] in sources.get(n, ())), None)
            if learned_in is None:
                if trained_elsewhere(info["corpus"]):
                    continue  # learned in a stage after this one (or on another branch): not a task yet
                learned_in = chain[first_cpt]
            tracked_from, previous_from = start[learned_in], end[learned_in]
        current = learned_in == stage
        if not current:
            since_learned.append(values[previous_from:])
        tracked = values[tracked_from:]
        tasks.append({"set": name, "tag": info["tag"],
                      "learned": learned_in or f"before {chain[first_cpt]}", "current": current,
                      "final_acc": values[-1], "min_acc": None if current else min(values[previous_from:]),
                      "wf": {str(w): windowed_forgetting(tracked, w) for w in windows},
                      "wp": {str(w): windowed_plasticity(tracked, w) for w in windows}})
    if not tasks:
        return None
    return {"stage": stage, "chain": chain, "k": len(tasks), "min_acc": min_acc(since_learned),
            "wc_acc": wc_acc([t["final_acc"] for t in tasks if t["current"]],
                             [t["min_acc"] for t in tasks if not t["current"]]),
            "wf": {str(w): sum(t["wf"][str(w)] for t in tasks) / len(tasks) for w in windows},
            "wp": {str(w): sum(t["wp"][str(w)] for t in tasks) / len(tasks) for w in windows},
            "tasks": tasks}


def stability_report(rows: list[dict], rtol: float = 0.01, atol: float = 0.0, windows: Sequence[int] = (10, 100),
                     start_from: dict[str, str | None] | None = None) -> dict:
    """Every stability figure of a run, from its ``metrics.jsonl`` rows (definitions in the module docstring).

    Args:
        rows: metrics rows as returned by :func:`cpt.report.read_metrics`.
        rtol, atol: the recovery band above the baseline, ``max(atol, rtol * |baseline|)`` nats.
        windows: the window sizes ``w`` of WF^w and WP^w, in evals.
        start_from: stage name -> the stage whose final weights it started from (the recipe's ``start_from``);
            a stage that is missing or maps to ``None`` follows the stage before it.

    Returns:
        ``{"tolerance": {"rtol", "atol"}, "windows", "stages": [per stage and set: {"stage", "index", "set",
        "tag", **curve_metrics}], "continual": [per CPT stage: {"stage", "chain", "k", "min_acc", "wc_acc",
        "wf": {w: ...}, "wp": {w: ...}, "tasks": [...]}]}``; JSON-ready (window keys are strings).
    """
    stages = _stages(rows)
    curves = stage_curves(rows)
    sets: dict[str, dict] = {}
    for r in rows:
        if r.get("kind") == "eval" and r["set"] not in sets:
            sets[r["set"]] = {"tag": set_tag(r), "corpus": r.get("corpus")}
    sources: dict[str, set[str]] = {}
    for r in rows:
        if r.get("kind") == "data":
            sources.setdefault(r["stage"], set()).add(r["source"])

    per_stage = []
    for stage in stages:
        for name, info in sets.items():
            curve = curves.get((stage["stage"], name))
            if curve:
                per_stage.append({"stage": stage["stage"], "index": stage["index"], "set": name, "tag": info["tag"],
                                  **curve_metrics(curve, info["tag"] == "downstream", rtol, atol)})

    parents = stage_parents(rows, start_from)
    continual = [c for s in stages
                 if (c := _continual(s["stage"], _chain(s["stage"], parents), sets, curves, sources, windows))]
    return {"tolerance": {"rtol": rtol, "atol": atol}, "windows": list(windows), "stages": per_stage,
            "continual": continual}
