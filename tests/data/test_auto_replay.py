"""Tests for the automatic replay rate: the controller's arithmetic against the documented law, its bounds and
wind-up, the recipe's one-line refusals, and the data stream under a changing rate (exact proportions after every
change, no repeated or skipped sequence, resumed bit for bit)."""

import pytest
from data.test_stream import WINDOW_BOUND, advance, identify, round_trip, stage, stream

from cpt.config import build
from cpt.data.auto_replay import HoldConfig
from cpt.data.replay import ReplayConfig
from cpt.errors import RecipeError


def auto(**kw) -> ReplayConfig:
    # gains given here, not the defaults (tuned on the demo, they may change): the arithmetic below is by hand
    raw = {"rate": "auto", "hold": {"set": "upstream", "tolerance": 0.02}, "from": ["a"], "gain": 0.05,
           "integral": 0.05} | kw
    return build(ReplayConfig, raw, "replay")


def test_rates_follow_the_documented_law():
    """Budget 2% of 5.0 = 0.1 nats, aim half of it; start 0.05, gain 0.05, integral 0.05:
    e = (L - 5) / 0.1 - 0.5 gives 0, 1.5, 0.5, -2.5; I = 0, 1.5, 2.0; at the last, adding e to I would push the rate
    below min (0.05 - 0.125 - 0.025 < 0), so I stays 2.0 and the rate is 0.05 - 0.125 + 0.1."""
    rates = auto().controller.rates([5.0, 5.05, 5.2, 5.1, 4.8])
    expected = [0.05, 0.05, 0.05 + 0.05 * 1.5 + 0.05 * 1.5, 0.05 + 0.05 * 0.5 + 0.05 * 2.0,
                0.05 + 0.05 * -2.5 + 0.05 * 2.0]
    assert rates == pytest.approx(expected, rel=1e-9)


def test_absolute_tolerance_is_in_nats():
    controller = auto(hold={"set": "upstream", "absolute": 0.25, "aim": 0.0}, gain=0.1, integral=0.0).controller
    assert controller.rates([3.0, 3.25, 3.5]) == pytest.approx([0.05, 0.05 + 0.1 * 1.0, 0.05 + 0.1 * 2.0])
    assert controller.hold.holds(3.0, 3.25) and not controller.hold.holds(3.0, 3.2501)


def test_no_wind_up_while_pinned_at_max():
    """Ten evaluations far over budget (e = 9.5) pin the rate at max without accumulating; when the loss comes
    back (e = -0.5) the rate falls to 0.05 - 0.025 - 0.025 = 0 at once. An integrator that wound up (I = 95) would
    hold it at max: 0.05 - 0.025 + 0.05 x 94.5."""
    controller = auto(max=0.3).controller
    rates = controller.rates([5.0] + [6.0] * 10 + [5.0])
    assert rates[1:11] == [0.3] * 10
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("raw, message", [
    ({"rate": "auto", "from": ["a"]}, "replay.hold: rate auto needs the eval set to hold"),
    ({"rate": 0.1, "hold": {"set": "upstream", "tolerance": 0.02}}, "replay.hold: only with rate: auto"),
    ({"rate": "auto", "hold": {"set": "upstream", "tolerance": 0}}, "replay.hold.tolerance: must be > 0, got 0"),
    ({"rate": "auto", "hold": {"set": "upstream", "absolute": -1.0}}, "replay.hold.absolute: must be > 0, got -1.0"),
    ({"rate": "auto", "hold": {"set": "upstream"}}, "replay.hold.tolerance: give one of tolerance (relative) or"),
    ({"rate": "auto", "hold": {"set": "upstream", "tolerance": 0.1}, "min": 0.4, "max": 0.2},
     "replay.min: expected 0 <= min <= max < 1, got min 0.4, max 0.2"),
    ({"rate": "auto", "hold": {"set": "upstream", "tolerance": 0.1}, "start": 0.6},
     "replay.start: must be within [min, max] = [0.0, 0.5], got 0.6"),
    ({"rate": "sometimes"}, "replay.rate"),
])
def test_bad_auto_replay_is_one_line(raw, message):
    with pytest.raises(RecipeError) as info:
        build(ReplayConfig, raw, "replay")
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_held_set_must_be_an_eval_set(recipe_file, capsys):
    import yaml

    from cpt.cli import main

    raw = yaml.safe_load(recipe_file.read_text())
    raw["stages"][1]["replay"] = {"rate": "auto", "hold": {"set": "upstreem", "tolerance": 0.05}}
    raw["stages"][1]["mixture"] = {"code": 1.0}
    recipe_file.write_text(yaml.safe_dump(raw))
    assert main(["check", str(recipe_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpt: error: stages[1].replay.hold.set: 'upstreem' is not an eval set (did you mean "
                          "'upstream'?)") and err.count("\n") == 1, err


# --- the stream under a changing rate ---------------------------------------------------------------------

SIZES = {"a": 50, "b": 400}
PER_STEP = 10


def auto_stream():
    stages = [stage("one", 4, {"a": 1.0}),
              stage("two", 30, {"b": 1.0}, replay={"rate": "auto", "from": ["a"], "start": 0.1, "max": 0.5,
                                                    "hold": {"set": "upstream", "tolerance": 0.02}})]
    return stream(SIZES, stages, per_step=PER_STEP)


# the held set's loss at stage two's start, then after steps 5, 10, 15, 20, 25: the rates that follow
LOSSES = [5.0, 5.2, 5.3, 5.05, 4.9, 5.0]


def run_two(s, losses=LOSSES, resume_at=None):
    """Stage one, then stage two with an evaluation at its start and every 5 steps; returns its batches, the
    rates the evaluations gave and the state saved after the evaluation at step ``resume_at``."""
    advance(s, 4)
    s.start_stage(1)
    batches, rates, saved = [], [], None
    for t in range(0, 30):
        if t % 5 == 0:
            rates.append(s.observe({"upstream": {"loss": losses[t // 5]}})["rate"])
            if t == resume_at:
                saved = round_trip(s.state_dict())
        batches.append(s.next_batch())
    return batches, rates, saved


def test_every_rate_holds_exactly_from_its_step_and_no_sequence_repeats():
    batches, rates, _ = run_two(auto_stream())
    assert rates[0] == 0.1 and len(set(rates)) >= 4 and max(rates) <= 0.5
    for k, rate in enumerate(rates):
        window = batches[5 * k:5 * k + 5]  # the 5 steps the rate of evaluation k applies to
        replayed = sum(names.count("a") for _, names in window)
        assert abs(replayed - rate * 5 * PER_STEP) <= WINDOW_BOUND, (k, rate, replayed)
        for _, names in window:  # and within each batch
            assert abs(names.count("a") - rate * PER_STEP) <= WINDOW_BOUND
    # Replayed sequences continue stage one's cursor (40 of a's 50 drawn): the first 10 are the rest of its epoch,
    # the next 50 the whole of the second; b's are all distinct (one epoch).
    drawn = [identify(row)[1] for x, names in batches for row, n in zip(x, names) if n == "a"]
    assert len(drawn) >= 60 and len(set(drawn[:10])) == 10 and sorted(drawn[10:60]) == list(range(50))
    reference = [identify(row)[1] for x, names in advance(auto_stream(), 30) for row, n in zip(x, names) if n == "a"]
    assert len(reference) > 60 and drawn[:len(reference) - 40] == reference[40:]  # the order of a fixed rate
    b = [identify(row)[1] for x, names in batches for row, n in zip(x, names) if n == "b"]
    assert len(set(b)) == len(b) == 300 - len(drawn)


@pytest.mark.parametrize("resume_at", [0, 5, 15])
def test_resume_with_an_auto_rate_is_exact(resume_at):
    batches, rates, saved = run_two(auto_stream(), resume_at=resume_at)
    resumed = auto_stream()
    resumed.load_state_dict(saved)
    assert resumed.state.replay_rate == rates[resume_at // 5]
    rest, rest_rates = [], []
    for t in range(resume_at, 30):
        if t % 5 == 0 and t > resume_at:
            rest_rates.append(resumed.observe({"upstream": {"loss": LOSSES[t // 5]}})["rate"])
        rest.append(resumed.next_batch())
    assert rest_rates == rates[resume_at // 5 + 1:]
    assert all((x == y).all() and n == m for (x, n), (y, m) in zip(rest, batches[resume_at:]))
    assert len(rest) == 30 - resume_at


def test_budget_counts_the_auto_rate_at_its_max():
    rows = auto_stream().budget()
    replayed = next(r for r in rows if r["stage"] == "two" and r["source"] == "a")
    assert replayed["at_most"] and replayed["weight"] == pytest.approx(0.5)
    assert replayed["tokens"] == 0.5 * 30 * PER_STEP * 4
    own = next(r for r in rows if r["stage"] == "two" and r["source"] == "b")
    assert not own["at_most"]


def test_hold_config_alone():
    hold = build(HoldConfig, {"set": "upstream", "tolerance": 0.03})
    assert hold.budget(4.0) == pytest.approx(0.12) and hold.aim == 0.5
