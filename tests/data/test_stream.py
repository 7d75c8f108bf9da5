"""Tests for cpt.data.stream: the budget table and its limits, and resuming the stream exactly (across
mixture anchors, stage boundaries and buffer replay), refusing changed inputs, or remixing on request."""

import io
import re
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cpt.config import build
from cpt.data.replay import BUFFER, fixed_name
from cpt.data.stream import DataStream
from cpt.errors import CptError
from cpt.recipe import StageConfig

SEQ_LEN = 4
STRIDE = 1_000_000
CORPORA = ["a", "b", "c", "d"]
WINDOW_BOUND = 2.5  # measured bound on |count - weight x window| (see tests/data/test_mixing.py)


def fake_shards(sizes: dict[str, int], fingerprints: dict[str, str] | None = None) -> dict:
    """TokenShard stand-ins: corpus i's tokens start at i * STRIDE, so a window names (corpus, sequence)."""
    out = {}
    for name, n in sizes.items():
        start = CORPORA.index(name) * STRIDE
        fingerprint = (fingerprints or {}).get(name, f"{name}-{n}")
        out[name] = SimpleNamespace(train=SimpleNamespace(tokens=np.arange(start, start + n * SEQ_LEN + 1)),
                                    manifest={"fingerprint": fingerprint})
    return out


def identify(row: np.ndarray) -> tuple[str, int]:
    return CORPORA[int(row[0]) // STRIDE], int(row[0]) % STRIDE // SEQ_LEN


def stage(name: str, steps: int, mixture: dict, **extra) -> StageConfig:
    return build(StageConfig, {"name": name, "steps": steps, "mixture": mixture, **extra})


def stream(sizes, stages, per_step=10, seed=0, seq_len=SEQ_LEN, fingerprints=None, **kw) -> DataStream:
    return DataStream(fake_shards(sizes, fingerprints), stages, [s.steps for s in stages], seq_len, per_step, seed,
                      **kw)


# --- the budget table -------------------------------------------------------------------------------------

BUDGET_STAGES = [
    stage("one", 20, {"a": 1.0}),
    stage("two", 10, {"b": 1.0}, replay={"kind": "corpus", "rate": 0.2}),
    stage("three", 5, {"b": 1.0}, replay={"kind": "fixed", "rate": 0.5, "size": 10, "from": ["a"]}),
    stage("four", 20, {0: {"a": 1.0}, 10: {"b": 1.0}}),
]


def test_budget_table_for_a_known_setup():
    # a: 100 sequences (400 tokens), b: 50 (200 tokens); 10 sequences of 4 tokens per step.
    rows = stream({"a": 100, "b": 50}, BUDGET_STAGES, max_epochs=100).budget()
    table = [(r["stage"], r["source"], round(r["weight"], 6), r["tokens"], r["available"], round(r["epochs"], 6))
             for r in rows]
    assert table == [
        ("one", "a", 1.0, 800, 400, 2.0),  # 200 sequences over 100
        ("two", "b", 0.8, 320, 200, 1.6),  # 80 sequences over 50
        ("two", "a", 0.2, 80, 400, 2.2),  # 20 more of a: 220 over 100
        ("three", "b", 0.5, 100, 200, 2.1),  # 25 more of b: 105 over 50
        ("three", fixed_name("a"), 0.5, 100, 40, 2.5),  # 25 over a fixed set of 10
        # Linear from a to b over steps 0-10: a's weights 1, 0.9, ..., 0.1 then 0 sum to 5.5 of 20 steps.
        ("four", "a", 0.275, 220, 400, 2.75),  # 55 more of a: 275 over 100
        ("four", "b", 0.725, 580, 200, 5.0),  # 145 more of b: 250 over 50
    ]


def test_budget_follows_the_start_from_line():
    stages = [stage("base", 10, {"a": 1.0}), stage("left", 10, {"a": 1.0}),
              stage("right", 10, {"a": 1.0}, start_from="base"), stage("after", 10, {"a": 1.0})]
    epochs = [r["epochs"] for r in stream({"a": 100}, stages).budget()]
    assert epochs == [1.0, 2.0, 2.0, 3.0]  # right continues base, not left


def test_buffer_rows_have_no_epochs():
    stages = [stage("one", 10, {"a": 1.0}), stage("two", 10, {"b": 1.0}, replay={"kind": "buffer", "rate": 0.25})]
    rows = stream({"a": 1000, "b": 1000}, stages).budget()
    assert rows[-1] == {"stage": "two", "source": BUFFER, "weight": 0.25, "at_most": False, "tokens": 100,
                        "available": None, "epochs": None}


def test_max_epochs_error_names_stage_source_and_key():
    s = stream({"a": 100, "b": 50}, BUDGET_STAGES, max_epochs=2.1)
    with pytest.raises(CptError, match=r"stage 'two' would read source 'a' 2\.2 times \(max 2\.1\).*data\.max_epochs"):
        s.budget()


def test_fixed_sets_are_exempt_from_max_epochs():
    # max 2.2: every corpus fits (a reaches exactly 2.2 in stage two); the fixed set's 2.5 passes are its purpose.
    rows = stream({"a": 100, "b": 50}, BUDGET_STAGES[:3], max_epochs=2.2).budget()
    assert max(r["epochs"] for r in rows) == 2.5


def test_repetition_logs_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="cpt.data.stream"):
        stream({"a": 100, "b": 50}, BUDGET_STAGES[:2], max_epochs=100).budget()
    messages = [r.getMessage() for r in caplog.records]
    assert "stage 'one' repeats source 'a': 2.00 passes over it by the stage's end" in messages
    assert len(messages) == 3  # one/a, two/b, two/a
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cpt.data.stream"):
        stream({"a": 1000, "b": 1000}, BUDGET_STAGES[:2]).budget()
    assert not caplog.records


# --- resume -----------------------------------------------------------------------------------------------

SIZES = {"a": 60, "b": 40, "c": 30, "d": 50}
RESUME_STAGES = [
    stage("one", 12, {0: {"a": 0.7, "b": 0.3}, 6: {"a": 0.2, "b": 0.3, "c": 0.5}}),
    stage("two", 12, {"c": 0.6, "d": 0.4}, replay={"kind": "buffer", "rate": 0.25}),
]


def resume_stream(**kw) -> DataStream:
    args = {"sizes": SIZES, "stages": RESUME_STAGES, "per_step": 8, "buffer_size": 25} | kw
    return stream(**args)


def advance(s: DataStream, batches: int) -> list[tuple[np.ndarray, list[str]]]:
    """The next ``batches`` batches, starting the next stage whenever one ends (as the trainer does)."""
    out = []
    for _ in range(batches):
        if s.sampler is None:
            s.start_stage(0)
        elif s.state.position == s.stage_steps[s.state.stage_index] * s.per_step:
            s.start_stage(s.state.stage_index + 1)
        out.append(s.next_batch())
    return out


def round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(xa, xb) and na == nb for (xa, na), (xb, nb) in zip(a, b))


# Saved before and across the anchor at step 6, at and across the end of stage one, inside the buffer stage.
@pytest.mark.parametrize("k", [1, 5, 6, 12, 11, 17])
def test_resume_continues_exactly(k):
    uninterrupted = resume_stream()
    advance(uninterrupted, k)
    state = round_trip(uninterrupted.state_dict())
    resumed = resume_stream()
    resumed.load_state_dict(state)
    rest = 24 - k
    assert same(advance(resumed, rest), advance(uninterrupted, rest))
    assert resumed.state == uninterrupted.state
    for key in ("indices", "source_ids", "frozen_indices", "frozen_ids"):
        assert np.array_equal(getattr(resumed.buffer, key), getattr(uninterrupted.buffer, key)), key
    # The buffer stage really replayed, and a fresh stream (re-seeding) would not have continued.
    assert uninterrupted.state.counts[BUFFER] == 24
    assert not same(advance(resume_stream(), rest), advance(resume_stream(), k + rest)[k:])


def test_resume_across_a_stage_boundary_after_start_from():
    """A branch point (the data state at a stage's end) restored into a new stream starts the next stage alike."""
    stages = RESUME_STAGES + [stage("three", 6, {"d": 1.0}, start_from="one", replay={"kind": "buffer", "rate": 0.5})]
    original = resume_stream(stages=stages)
    advance(original, 12)
    branch = round_trip(original.state_dict())
    advance(original, 12)
    original.load_state_dict(branch)
    original.start_stage(2)
    fresh = resume_stream(stages=stages)
    fresh.load_state_dict(round_trip(branch))
    fresh.start_stage(2)
    batches = advance(original, 6)
    assert same(batches, advance(fresh, 6))
    replayed = {identify(row) for x, names in batches for row, n in zip(x, names) if n == BUFFER}
    assert replayed and {c for c, _ in replayed} <= {"a", "b", "c"}, "stage three replays only stage one's data"


SOURCES_CHANGED = "the sources (corpora, tokenization or seq_len)"
MIXTURE_CHANGED = "the stage's mixture (weights or fixed replay set size)"
FIXED = [stage("one", 3, {"a": 1.0}), stage("two", 6, {"b": 1.0}, replay={"kind": "fixed", "rate": 0.5, "size": 8})]
FIXED_9 = FIXED[:1] + [stage("two", 6, {"b": 1.0}, replay={"kind": "fixed", "rate": 0.5, "size": 9})]


@pytest.mark.parametrize("saved, change, what", [
    ({}, {"fingerprints": {"a": "retokenized"}}, SOURCES_CHANGED),
    ({}, {"seq_len": SEQ_LEN + 1}, SOURCES_CHANGED),
    ({"stages": FIXED}, {"stages": FIXED_9}, MIXTURE_CHANGED),
    ({}, {"stages": [stage("one", 12, {"a": 0.5, "b": 0.5}), RESUME_STAGES[1]]}, MIXTURE_CHANGED),
    ({}, {"stages": [stage("one", 12, RESUME_STAGES[0].mixture, mixture_interpolation="step"), RESUME_STAGES[1]]},
     MIXTURE_CHANGED),
    ({}, {"per_step": 16}, "the global batch or world size"),
    ({}, {"world_size": 2}, "the global batch or world size"),
    ({}, {"seed": 1}, "the seed"),
])
def test_resume_refuses_changed_inputs(saved, change, what):
    s = resume_stream(**saved)
    advance(s, 5)  # in FIXED's second stage
    state = round_trip(s.state_dict())
    with pytest.raises(CptError, match=rf"cannot continue the data stream: {re.escape(what)} changed since it was"):
        resume_stream(**saved | change).load_state_dict(state)
    resume_stream(**saved).load_state_dict(state)  # the unchanged inputs load


def test_resume_refuses_another_buffer_size():
    s = resume_stream()
    advance(s, 14)
    with pytest.raises(CptError, match=r"saved with 25 slots, but data\.replay_buffer_size is 26"):
        resume_stream(buffer_size=26).load_state_dict(round_trip(s.state_dict()))


def test_later_stages_may_change_without_breaking_resume():
    s = resume_stream(stages=FIXED)
    advance(s, 2)
    resume_stream(stages=FIXED_9).load_state_dict(round_trip(s.state_dict()))  # stage one is unchanged


def test_resume_names_every_change_and_remix_does_not_excuse_others():
    s = resume_stream()
    advance(s, 3)
    state = s.state_dict()
    changed = resume_stream(seed=1, stages=[stage("one", 12, {"a": 1.0}), RESUME_STAGES[1]])
    with pytest.raises(CptError, match=re.escape(f"{MIXTURE_CHANGED}, the seed changed")) as info:
        changed.load_state_dict(state)
    assert "remix" not in str(info.value)
    with pytest.raises(CptError, match="the seed"):
        changed.load_state_dict(state, remix=True)
    with pytest.raises(CptError, match="pass remix"):
        resume_stream(stages=[stage("one", 12, {"a": 1.0}), RESUME_STAGES[1]]).load_state_dict(state)


def test_remix_continues_every_cursor_with_the_new_weights(caplog):
    sizes = {"a": 40, "b": 40, "c": 40}
    old = [stage("one", 30, {"a": 0.5, "b": 0.5})]
    new = [stage("one", 30, {"a": 0.2, "b": 0.3, "c": 0.5})]
    s = stream(sizes, old)
    before = advance(s, 7)  # 70 draws: 35 of a and b each
    state = round_trip(s.state_dict())
    remixed = stream(sizes, new)
    with caplog.at_level(logging.WARNING, logger="cpt.data.stream"):
        remixed.load_state_dict(state, remix=True)
    assert "mixture changed" in caplog.text
    after = advance(remixed, 20)
    for step, (x, names) in enumerate(after):
        counts = {n: names.count(n) for n in "abc"}
        assert all(abs(counts[n] - 10 * w) <= WINDOW_BOUND for n, w in zip("abc", (0.2, 0.3, 0.5))), (step, counts)
    totals = {n: sum(names.count(n) for _, names in after) for n in "abc"}
    assert totals == {"a": 40, "b": 60, "c": 100}
    assert remixed.state.position == 270 and remixed.stage_tokens() == {"a": 75 * SEQ_LEN, "b": 95 * SEQ_LEN,
                                                                        "c": 100 * SEQ_LEN}

    def order(batches, source):
        return [identify(row)[1] for x, names in batches for row, n in zip(x, names) if n == source]

    # Each source continues its own order: what it drew before and after the switch is exactly what an
    # uninterrupted stream under the old mixture draws from it, so nothing repeats within an epoch or is skipped.
    reference = advance(stream(sizes, old), 30)
    for source in "ab":
        drawn = order(before + after, source)
        assert drawn == order(reference, source)[:len(drawn)], source
        assert len(drawn) > 40 and sorted(drawn[:40]) == list(range(40)), source
        assert len(set(drawn[40:80])) == len(drawn[40:80]), source
    c = order(after, "c")  # a new source starts at its first sequence
    assert len(c) == 100 and sorted(c[:40]) == sorted(c[40:80]) == list(range(40)) and len(set(c[80:])) == 20
