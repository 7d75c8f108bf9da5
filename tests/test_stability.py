"""Tests for cpt.stability against curves and tables whose figures are worked out by hand in the comments."""

from __future__ import annotations

import pytest

from cpt.stability import (curve_metrics, final_forgetting, gain, gap_area, gap_depth, min_acc, peak_step,
                           recovery_step, set_tag, stability_report, stage_curves, steps_to_gain, wc_acc,
                           windowed_forgetting, windowed_plasticity)

# A V: up 1 nat per 10 steps to a peak of +2 at step 20, back down, and through the baseline between 40 and 50.
# Values are exact in binary so most figures compare with ==.
V = [(0, 4.0), (10, 5.0), (20, 6.0), (30, 5.0), (40, 4.03125), (50, 3.875)]


def test_v_shaped_gap():
    assert gap_depth(V) == 2.0
    assert peak_step(V) == 20
    # Band: 4.0 + 1% = 4.04, and 4.03125 is inside it.
    assert recovery_step(V) == 40
    # An absolute band of 0.01 nats excludes 4.03125: recovered only at step 50.
    assert recovery_step(V, rtol=0.0, atol=0.01) == 50
    # Trapezoids 0-10: 5, 10-20: 15, 20-30: 15, 30-40: (1 + 1/32)/2*10 = 5.15625; 40-50 crosses the baseline:
    # the triangle above it is 10 * (1/32) / (1/32 + 1/8) wide and 1/32 high, 1/32 in area.
    assert gap_area(V) == 5 + 15 + 15 + 5.15625 + 0.03125
    assert final_forgetting(V) == -0.125


def test_gap_that_never_recovers():
    curve = [(0, 2.0), (5, 2.5), (10, 2.25), (15, 2.125)]
    assert (gap_depth(curve), peak_step(curve), recovery_step(curve)) == (0.5, 5, None)
    assert gap_area(curve) == 0.5 / 2 * 5 + (0.5 + 0.25) / 2 * 5 + (0.25 + 0.125) / 2 * 5
    assert final_forgetting(curve) == 0.125


def test_no_gap():
    falling = [(0, 4.0), (5, 3.0), (10, 2.0)]
    assert (gap_depth(falling), peak_step(falling), recovery_step(falling), gap_area(falling)) == (0.0, 0, 0, 0.0)
    # A bump that stays inside the 1% band never left it: recovered at 0, though it has a depth and a peak.
    bump = [(0, 4.0), (5, 4.03125), (10, 3.5)]
    assert (gap_depth(bump), peak_step(bump), recovery_step(bump)) == (0.03125, 5, 0)
    # Ties: the first peak.
    assert peak_step([(0, 1.0), (5, 2.0), (10, 2.0)]) == 5


def test_downstream_gain_and_steps_to_90_percent():
    curve = [(0, 6.0), (10, 4.0), (20, 2.5), (30, 2.25), (40, 2.0)]
    assert gain(curve) == 4.0
    # 90% of 4.0 is 3.6 nats: loss <= 2.4 first at step 30 (2.5 at step 20 is only 3.5 below the baseline).
    assert steps_to_gain(curve) == 30
    assert steps_to_gain(curve, 0.5) == 10
    assert steps_to_gain([(0, 3.0), (10, 3.5)]) is None  # a loss, not a gain
    assert steps_to_gain([(0, 3.0), (10, 3.0)]) is None


def test_curve_metrics():
    figures = curve_metrics(V, downstream=True)
    assert figures == {"baseline": 4.0, "peak_step": 20, "gap_depth": 2.0, "recovery_step": 40, "gap_area": 40.1875,
                       "last_step": 50, "final_loss": 3.875, "final_forgetting": -0.125, "gain": 0.125,
                       "steps_to_90": 50}
    assert curve_metrics(V)["gain"] is None and curve_metrics(V)["steps_to_90"] is None
    # No eval at stage step 0 (no baseline): nothing can be measured.
    assert set(curve_metrics(V[1:]).values()) == {None}
    assert set(curve_metrics([]).values()) == {None}


def test_windowed_forgetting_and_plasticity():
    falling = [0.0, -1.0, -2.0, -3.0, -4.0]  # A falls 1 per eval
    assert [windowed_forgetting(falling, w) for w in (1, 2, 3, 5, 100)] == [0.0, 1.0, 2.0, 4.0, 4.0]
    assert windowed_plasticity(falling, 100) == 0.0
    assert [windowed_plasticity(falling[::-1], w) for w in (2, 3, 100)] == [1.0, 2.0, 4.0]
    mixed = [-1.0, -3.0, -2.0, -4.0, 0.0]
    # WF: -1 -> -3 and -2 -> -4 are drops of 2 within 2 evals; -1 -> -4 (3 apart) needs a window of 4.
    assert [windowed_forgetting(mixed, w) for w in (2, 3, 4)] == [2.0, 2.0, 3.0]
    # WP: -4 -> 0 is a rise of 4 in adjacent evals.
    assert windowed_plasticity(mixed, 2) == 4.0
    assert windowed_forgetting([-1.0], 10) == 0.0 and windowed_forgetting([], 10) == 0.0
    with pytest.raises(ValueError, match="window"):
        windowed_forgetting(mixed, 0)


def test_min_acc_and_wc_acc_on_a_table():
    # A (= -loss) of two previous tasks since they were learned, and the current task's A now.
    previous = {"T1": [-2.0, -3.5, -2.5], "T2": [-1.0, -1.5, -1.25]}
    current = -0.5
    # min-ACC = mean(-3.5, -1.5) = -2.5; WC-ACC = (1/3) * -0.5 + (2/3) * -2.5 = -5.5/3.
    assert min_acc(previous.values()) == -2.5
    assert wc_acc([current], [-3.5, -1.5]) == pytest.approx(-5.5 / 3)
    assert wc_acc([current], [-3.5, -1.5]) == pytest.approx(1 / 3 * current + 2 / 3 * min_acc(previous.values()))
    assert min_acc([]) is None and wc_acc([], []) is None


def test_set_tag():
    assert set_tag({"set": "upstream"}) == "upstream"
    assert set_tag({"set": "downstream", "tag": None}) == "downstream"
    assert set_tag({"set": "kjv", "tag": "downstream"}) == "downstream"
    assert set_tag({"set": "kjv"}) is None


# A run: pretrain (steps 0-20) on english, cpt (20-40) on code + english, and cpt-b (40-60) on code, which the
# recipe branches off pretrain (start_from). Evals at stage steps 0, 10, 20.
LOSSES = {  # stage -> set -> losses at stage steps 0, 10, 20
    "pretrain": {"upstream": [6.0, 5.0, 4.0], "downstream": [7.0, 7.5, 8.0], "other": [9.0, 8.0, 7.0]},
    "cpt": {"upstream": [4.0, 4.5, 4.25], "downstream": [8.0, 5.0, 3.0], "other": [7.0, 7.0, 7.0]},
    "cpt-b": {"upstream": [4.0, 4.125, 4.0], "downstream": [8.0, 6.0, 4.0], "other": [7.0, 7.0, 7.0]},
}
SOURCES = {"pretrain": ["english"], "cpt": ["code", "english"], "cpt-b": ["code"]}
CORPUS = {"upstream": "english", "downstream": "code", "other": "x"}


def _rows(stages=("pretrain", "cpt", "cpt-b"), data=True) -> list[dict]:
    rows = []
    for index, stage in enumerate(stages):
        start = 20 * index
        rows.append({"kind": "stage", "event": "start", "stage": stage, "index": index, "step": start})
        for k, stage_step in enumerate((0, 10, 20)):
            for name, losses in LOSSES[stage].items():
                rows.append({"kind": "eval", "step": start + stage_step, "stage": stage, "stage_step": stage_step,
                             "set": name, "tag": None, "corpus": CORPUS[name], "loss": losses[k]})
        if data:
            rows += [{"kind": "data", "stage": stage, "source": s, "tokens": 100} for s in SOURCES[stage]]
        rows.append({"kind": "stage", "event": "end", "stage": stage, "index": index, "step": start + 20})
    return rows


def test_stability_report_per_stage_and_set():
    report = stability_report(_rows(("pretrain", "cpt")))
    assert report["tolerance"] == {"rtol": 0.01, "atol": 0.0} and report["windows"] == [10, 100]
    assert [(r["stage"], r["set"], r["tag"]) for r in report["stages"]] == [
        ("pretrain", "upstream", "upstream"), ("pretrain", "downstream", "downstream"), ("pretrain", "other", None),
        ("cpt", "upstream", "upstream"), ("cpt", "downstream", "downstream"), ("cpt", "other", None)]
    upstream, downstream = report["stages"][3], report["stages"][4]
    # Up 0.5 at step 10, still 0.25 above at the end: never back within 1%; area 0.5/2*10 + 0.75/2*10.
    assert upstream == {"stage": "cpt", "index": 1, "set": "upstream", "tag": "upstream", "baseline": 4.0,
                        "peak_step": 10, "gap_depth": 0.5, "recovery_step": None, "gap_area": 6.25, "last_step": 20,
                        "final_loss": 4.25, "final_forgetting": 0.25, "gain": None, "steps_to_90": None}
    # Gain 5; 90% = 4.5 nats below the baseline, loss <= 3.5: first at step 20.
    assert (downstream["gain"], downstream["steps_to_90"], downstream["gap_depth"]) == (5.0, 20, 0.0)


def test_continual_metrics_hand_computed():
    report = stability_report(_rows(("pretrain", "cpt")), windows=(2, 10))
    # pretrain trains only on upstream's corpus: no CPT stage yet, no entry.
    [entry] = report["continual"]
    assert (entry["stage"], entry["chain"], entry["k"]) == ("cpt", ["pretrain", "cpt"], 2)
    upstream, downstream = entry["tasks"]  # "other" is untagged: not a task
    # upstream's A since cpt's start: [-4, -4.5, -4.25] (the pretrain end eval; cpt's step-0 repeat is dropped).
    assert upstream == {"set": "upstream", "tag": "upstream", "learned": "before cpt", "current": False,
                        "final_acc": -4.25, "min_acc": -4.5, "wf": {"2": 0.5, "10": 0.5},
                        "wp": {"2": 0.25, "10": 0.25}}
    # downstream is learned in cpt (the first stage on code): current, tracked from [-8, -5, -3].
    assert downstream == {"set": "downstream", "tag": "downstream", "learned": "cpt", "current": True,
                          "final_acc": -3.0, "min_acc": None, "wf": {"2": 0.0, "10": 0.0},
                          "wp": {"2": 3.0, "10": 5.0}}
    # min-ACC = -4.5 (one previous task); WC-ACC = (1/2) * -3 + (1/2) * -4.5.
    assert (entry["min_acc"], entry["wc_acc"]) == (-4.5, -3.75)
    assert entry["wf"] == {"2": 0.25, "10": 0.25} and entry["wp"] == {"2": 1.625, "10": 2.625}


def test_continual_follows_start_from():
    rows = _rows()
    branched = stability_report(rows, start_from={"cpt-b": "pretrain"})["continual"]
    assert [(c["stage"], c["chain"]) for c in branched] == [("cpt", ["pretrain", "cpt"]),
                                                            ("cpt-b", ["pretrain", "cpt-b"])]
    # cpt-b alone after pretrain: upstream's lowest A is -4.125, downstream (learned in cpt-b) ends at -4.
    assert (branched[1]["min_acc"], branched[1]["wc_acc"]) == (-4.125, -4.0625)
    # Read as one line of stages instead, downstream was learned in cpt and is a previous task in cpt-b:
    # its A after cpt's end is [-3, -6, -4] (cpt-b's step-0 eval is taken as a repeat of cpt's last), lowest -6;
    # upstream's lowest since cpt's start is -4.5. No current task: WC-ACC is the mean of the two minima.
    linear = stability_report(rows)["continual"][1]
    assert [t["current"] for t in linear["tasks"]] == [False, False]
    assert (linear["min_acc"], linear["wc_acc"]) == (-5.25, -5.25)


def test_running_stage_counts_as_cpt():
    # cpt is still running (its data rows come at its end); the first stage is not CPT without data rows.
    rows = [r for r in _rows(("pretrain", "cpt")) if not (r["kind"] == "data" and r["stage"] == "cpt")]
    assert [c["stage"] for c in stability_report(rows)["continual"]] == ["cpt"]
    assert stability_report(_rows(("pretrain",), data=False))["continual"] == []


def test_resumed_run_repeats_an_eval_and_the_later_line_wins():
    rows = _rows(("pretrain",))
    rows.append({"kind": "eval", "step": 10, "stage": "pretrain", "stage_step": 10, "set": "upstream",
                 "corpus": "english", "loss": 4.5})
    assert stage_curves(rows)[("pretrain", "upstream")] == [(0, 6.0), (10, 4.5), (20, 4.0)]


# pretrain (english) -> cptA (code) -> cptB (law), in one line; "law" is a downstream set of cptB's corpus.
LATER = {
    "pretrain": {"upstream": [6.0, 5.0, 4.0], "downstream": [7.0, 7.5, 8.0], "law": [9.0, 9.5, 10.0]},
    "cptA": {"upstream": [4.0, 4.5, 4.25], "downstream": [8.0, 5.0, 3.0], "law": [10.0, 10.5, 11.0]},
    "cptB": {"upstream": [4.25, 4.5, 4.75], "downstream": [3.0, 3.5, 4.0], "law": [11.0, 7.0, 5.0]},
}
LATER_SOURCES = {"pretrain": ["english"], "cptA": ["code"], "cptB": ["law"]}
LATER_CORPUS = {"upstream": "english", "downstream": "code", "law": "law"}


def _later_rows(stages=("pretrain", "cptA", "cptB")) -> list[dict]:
    rows = []
    for index, stage in enumerate(stages):
        rows.append({"kind": "stage", "event": "start", "stage": stage, "index": index, "step": 20 * index})
        for k, stage_step in enumerate((0, 10, 20)):
            for name, losses in LATER[stage].items():
                rows.append({"kind": "eval", "step": 20 * index + stage_step, "stage": stage, "stage_step": stage_step,
                             "set": name, "tag": "downstream" if name == "law" else None,
                             "corpus": LATER_CORPUS[name], "loss": losses[k]})
        rows += [{"kind": "data", "stage": stage, "source": s, "tokens": 100} for s in LATER_SOURCES[stage]]
    return rows


def test_a_set_learned_in_a_later_stage_is_no_task_before_it():
    cpt_a, cpt_b = stability_report(_later_rows(), windows=(10,))["continual"]
    # At cptA's end "law" is not yet learned: k = 2, upstream previous (A since cptA's start -4, -4.5, -4.25),
    # downstream current (-3). WC-ACC = (-3 + -4.5) / 2, not (-3 - 11 - 4.5) / 3 with "law" as a current task.
    assert [(t["set"], t["learned"], t["current"]) for t in cpt_a["tasks"]] == [
        ("upstream", "before cptA", False), ("downstream", "cptA", True)]
    assert (cpt_a["k"], cpt_a["min_acc"], cpt_a["wc_acc"]) == (2, -4.5, -3.75)
    # At cptB's end it is cptB's current task; upstream's minimum is -4.75, downstream's since cptA's end -4.
    assert [(t["set"], t["learned"], t["current"]) for t in cpt_b["tasks"]] == [
        ("upstream", "before cptA", False), ("downstream", "cptA", False), ("law", "cptB", True)]
    assert (cpt_b["k"], cpt_b["min_acc"], cpt_b["wc_acc"]) == (3, -4.375, pytest.approx((-5 - 4.75 - 4) / 3))
    # A run in which no stage trains "law"'s corpus: it falls back to the first CPT stage, as before.
    [only] = stability_report(_later_rows(("pretrain", "cptA")))["continual"]
    assert [(t["set"], t["learned"], t["current"]) for t in only["tasks"]][2] == ("law", "cptA", True)
    assert only["k"] == 3


def test_non_finite_evals_are_skipped_with_a_warning(caplog):
    nan = float("nan")
    # A NaN last eval of a downstream set: the figures use the finite evals (gain 6 - 4 = 2, 90% at step 10).
    with caplog.at_level("WARNING", logger="cpt.stability"):
        figures = curve_metrics([(0, 6.0), (10, 4.0), (20, nan)], downstream=True)
    assert (figures["gain"], figures["steps_to_90"], figures["last_step"]) == (2.0, 10, 10)
    assert "skipped 1 non-finite eval loss(es) at stage step(s) 20" in caplog.text
    assert steps_to_gain([(0, 6.0), (10, 4.0), (20, nan)]) is None  # a NaN gain has no 90% of it
    # A NaN mid-curve: area, depth, peak and recovery as if that eval had not been taken.
    holed = V[:3] + [(25, nan)] + V[3:]
    assert curve_metrics(holed) == curve_metrics(V)
    # A NaN baseline: no baseline, nothing measured.
    assert set(curve_metrics([(0, nan), (10, 4.0)]).values()) == {None}
    # From metrics rows: the warning names the set, the stage and the step.
    rows = _rows(("pretrain", "cpt"))
    next(r for r in rows if r.get("kind") == "eval" and (r["stage"], r["set"], r["stage_step"]) == (
        "cpt", "upstream", 10))["loss"] = nan
    caplog.clear()
    with caplog.at_level("WARNING", logger="cpt.stability"):
        report = stability_report(rows)
    assert "eval set upstream in stage cpt: skipped 1 non-finite eval loss(es) at stage step(s) 10" in caplog.text
    upstream = next(r for r in report["stages"] if (r["stage"], r["set"]) == ("cpt", "upstream"))
    # Curve (0, 4), (20, 4.25): depth 0.25 at step 20, area 0.25 / 2 * 20.
    assert (upstream["gap_depth"], upstream["peak_step"], upstream["gap_area"]) == (0.25, 20, 2.5)
    assert report["continual"][0]["tasks"][0]["min_acc"] == -4.25
