"""Tests for cpt.data.replay: the replay config, replay weights, the reservoir buffer, and each replay kind
(corpus, fixed, buffer) drawn through a DataStream."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cpt.config import build
from cpt.data.loader import PackedSequences
from cpt.data.replay import BUFFER, ReplayBuffer, ReplayConfig, fixed_name, replay_weights
from cpt.data.stream import DataStream
from cpt.errors import CptError, RecipeError
from cpt.recipe import StageConfig

SEQ_LEN = 4
STRIDE = 1_000_000
CORPORA = ["a", "b", "c", "d"]
# Measured bound on |count - weight x window| over any window (see tests/data/test_mixing.py).
WINDOW_BOUND = 2.5


def fake_shards(sizes: dict[str, int]) -> dict:
    """TokenShard stand-ins: corpus i's tokens start at i * STRIDE, so a window names (corpus, sequence)."""
    out = {}
    for name, n in sizes.items():
        start = CORPORA.index(name) * STRIDE
        out[name] = SimpleNamespace(train=SimpleNamespace(tokens=np.arange(start, start + n * SEQ_LEN + 1)),
                                    manifest={"fingerprint": f"{name}-{n}"})
    return out


def identify(row: np.ndarray) -> tuple[str, int]:
    return CORPORA[int(row[0]) // STRIDE], int(row[0]) % STRIDE // SEQ_LEN


def stage(name: str, steps: int, mixture: dict, **extra) -> StageConfig:
    return build(StageConfig, {"name": name, "steps": steps, "mixture": mixture, **extra})


def stream(sizes: dict[str, int], stages: list, per_step: int = 20, seed: int = 0, **kw) -> DataStream:
    return DataStream(fake_shards(sizes), stages, [s.steps for s in stages], SEQ_LEN, per_step, seed, **kw)


def run_stages(s: DataStream) -> list[list[tuple[int, str, tuple[str, int]]]]:
    """Every stage's batches in order: per batch, a list of (stage index, source name, (corpus, sequence))."""
    batches = []
    for i, steps in enumerate(s.stage_steps):
        s.start_stage(i)
        for _ in range(steps):
            rows, names = s.next_batch()
            assert rows.shape == (s.per_step, SEQ_LEN + 1)
            batches.append([(i, name, identify(row)) for name, row in zip(names, rows)])
    return batches


# --- config and weights -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, key", [
    ({"rate": 0.0}, "rate"), ({"rate": 1.0}, "rate"), ({"rate": 0.1, "size": 0}, "size"),
    ({"rate": 0.1, "kind": "buffer", "from": ["a"]}, "from"),
])
def test_config_errors_name_the_key(raw, key):
    with pytest.raises(RecipeError, match=rf"replay\.{key}:"):
        build(ReplayConfig, raw, "replay")


def test_replay_weights_of_each_kind():
    assert replay_weights(ReplayConfig(rate=0.2), ["a", "b"]) == {"a": 0.1, "b": 0.1}
    assert replay_weights(ReplayConfig(rate=0.2, from_=["b"]), ["a", "b"]) == {"b": 0.2}
    assert replay_weights(ReplayConfig(rate=0.3, kind="fixed"), ["a"]) == {fixed_name("a"): 0.3}
    assert replay_weights(ReplayConfig(rate=0.3, kind="buffer"), ["a"]) == {BUFFER: 0.3}
    assert fixed_name("a") == "a~fixed"


# --- the reservoir ----------------------------------------------------------------------------------------


def filled(capacity: int, seed: int, offers: int, chunk: int = 7) -> ReplayBuffer:
    buf = ReplayBuffer(capacity, seed, {})
    for start in range(0, offers, chunk):
        stop = min(start + chunk, offers)
        buf.offer(["a" if i % 3 else "b" for i in range(start, stop)], np.arange(start, stop))
    return buf


def test_buffer_fills_in_order_then_stays_bounded():
    buf = filled(10, seed=1, offers=6)
    assert buf.seen == 6 and buf.indices[:6].tolist() == list(range(6)) and (buf.source_ids[6:] == -1).all()
    buf = filled(10, seed=1, offers=500)
    assert buf.seen == 500 and len(buf.indices) == 10 and (buf.source_ids >= 0).all()
    assert len(set(buf.indices.tolist())) == 10 and buf.indices.max() > 10, "the reservoir never replaced a slot"
    buf.offer([BUFFER, BUFFER], np.array([0, 1]))  # replayed sequences are not offered again
    assert buf.seen == 500


def test_buffer_content_is_a_function_of_seed_and_offers():
    a, b = filled(20, seed=3, offers=300, chunk=7), filled(20, seed=3, offers=300, chunk=64)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.source_ids, b.source_ids)
    assert not np.array_equal(a.indices, filled(20, seed=4, offers=300).indices)


def test_buffer_keeps_each_offer_with_equal_probability():
    capacity, offers, seeds = 20, 200, 400
    kept = np.zeros(offers)
    for seed in range(seeds):
        kept[filled(capacity, seed, offers, chunk=offers).indices] += 1
    rate = kept / seeds  # each offer is kept with probability capacity / offers = 0.1
    assert abs(rate[:100].mean() - 0.1) < 0.02 and abs(rate[100:].mean() - 0.1) < 0.02
    assert abs(rate[:20].mean() - 0.1) < 0.03 and abs(rate[-20:].mean() - 0.1) < 0.03


def test_buffer_draws_from_its_snapshot():
    sources = {"a": PackedSequences(np.arange(100 * SEQ_LEN + 1), SEQ_LEN, "a")}
    buf = ReplayBuffer(5, 0, sources)
    buf.offer(["a"] * 3, np.array([40, 7, 12]))
    assert len(buf) == 0, "a stage must not replay its own sequences"
    buf.freeze()
    assert len(buf) == 3
    buf.offer(["a"] * 10, np.arange(50, 60))
    assert len(buf) == 3 and buf.gather(np.array([2, 0, 0]))[:, 0].tolist() == [12 * SEQ_LEN, 160, 160]
    buf.freeze()
    assert len(buf) == 5


def test_buffer_state_round_trips_through_torch_save(tmp_path):
    buf = filled(12, seed=2, offers=40)
    buf.freeze()
    buf.offer(["c"], np.array([99]))
    torch.save(buf.state_dict(), tmp_path / "buffer.pt")
    other = ReplayBuffer(12, 2, {})
    other.load_state_dict(torch.load(tmp_path / "buffer.pt", weights_only=True))
    assert other.seen == buf.seen == 41 and other.names == buf.names == ["b", "a", "c"]
    for key in ("source_ids", "indices", "frozen_ids", "frozen_indices"):
        assert np.array_equal(getattr(other, key), getattr(buf, key)), key
    # Both continue alike.
    for b in (buf, other):
        b.offer(["a"] * 30, np.arange(100, 130))
    assert np.array_equal(other.indices, buf.indices)


# --- each kind through a DataStream -----------------------------------------------------------------------


def per_step_counts(batches, source: str) -> list[int]:
    return [sum(name == source for _, name, _ in batch) for batch in batches]


def test_corpus_replay_takes_its_rate_from_every_batch():
    stages = [stage("one", 10, {"a": 1.0}),
              stage("two", 20, {"b": 0.6, "c": 0.4}, replay={"kind": "corpus", "rate": 0.25})]
    s = stream({"a": 400, "b": 500, "c": 500}, stages)
    assert s.schedules[1].names == ["b", "c", "a"]
    assert np.allclose(s.schedules[1].weights_at(0), [0.45, 0.3, 0.25])
    batches = run_stages(s)
    two = batches[10:]
    for source, per_batch in (("a", 5), ("b", 9), ("c", 6)):  # 25% of 20; the rest split 0.6 : 0.4
        counts = per_step_counts(two, source)
        assert all(abs(c - per_batch) <= WINDOW_BOUND for c in counts), (source, counts)
        assert abs(sum(counts) - 20 * per_batch) <= 1.5, (source, sum(counts))
    # The replayed corpus continues its cursor: stage two reads none of the sequences stage one read.
    a_one = [ref for batch in batches[:10] for _, _, ref in batch]
    a_two = [ref for batch in two for _, name, ref in batch if name == "a"]
    assert len(a_one) == 200 and len(set(a_one + a_two)) == len(a_one) + len(a_two)


def test_corpus_replay_from_named_corpora_splits_the_rate():
    stages = [stage("one", 5, {"a": 1.0, "b": 1.0}),
              stage("two", 20, {"c": 1.0}, replay={"kind": "corpus", "rate": 0.2, "from": ["a", "b"]})]
    batches = run_stages(stream({"a": 400, "b": 400, "c": 500}, stages))[5:]
    assert [sum(per_step_counts(batches, n)) for n in ("a", "b", "c")] == [40, 40, 320]


def test_default_replay_follows_the_start_from_line():
    """A branch replays its ancestors' corpora, not a sibling branch's."""
    stages = [stage("base", 5, {"a": 1.0}), stage("left", 5, {"b": 1.0}),
              stage("right", 5, {"c": 1.0}, start_from="base", replay={"kind": "corpus", "rate": 0.1}),
              stage("after", 5, {"d": 1.0}, replay={"kind": "corpus", "rate": 0.1})]
    s = stream({n: 100 for n in CORPORA}, stages)
    assert s.schedules[2].names == ["c", "a"]
    assert s.schedules[3].names == ["d", "a", "c"]


def test_fixed_replay_draws_only_its_set_in_every_stage():
    stages = [stage("one", 5, {"a": 1.0}),
              stage("two", 15, {"b": 1.0}, replay={"kind": "fixed", "rate": 0.25, "size": 7}),
              stage("three", 15, {"c": 1.0}, replay={"kind": "fixed", "rate": 0.25, "size": 7, "from": ["a"]})]
    s = stream({"a": 300, "b": 300, "c": 300}, stages)
    assert len(s.sources[fixed_name("a")]) == 7
    batches = run_stages(s)
    fixed = {i: [ref for batch in batches for j, name, ref in batch if j == i and name == fixed_name("a")]
             for i in (1, 2)}
    assert all(corpus == "a" for refs in fixed.values() for corpus, _ in refs)
    assert len(fixed[1]) == len(fixed[2]) == 75  # 25% of 15 x 20
    assert set(fixed[1]) == set(fixed[2]) and len(set(fixed[1])) == 7
    assert sorted(i for _, i in set(fixed[1])) == s.sources[fixed_name("a")].indices.tolist()
    # Replaying the set does not move the corpus's own cursor, and the set depends on the seed.
    assert s.state.cursors["a"] == 100
    other = stream({"a": 300, "b": 300, "c": 300}, stages, seed=1)
    assert other.sources[fixed_name("a")].indices.tolist() != s.sources[fixed_name("a")].indices.tolist()


def test_fixed_sets_of_one_corpus_must_agree_on_size():
    stages = [stage("one", 5, {"a": 1.0}),
              stage("two", 5, {"b": 1.0}, replay={"kind": "fixed", "rate": 0.25, "size": 7}),
              stage("three", 5, {"c": 1.0}, replay={"kind": "fixed", "rate": 0.25, "size": 9, "from": ["a"]})]
    with pytest.raises(CptError, match=r"stage 'three'.*corpus 'a' with size 9.*size 7"):
        stream({"a": 300, "b": 300, "c": 300}, stages)


BUFFER_STAGES = [stage("one", 10, {"a": 0.5, "b": 0.5}),
                 stage("two", 10, {"c": 1.0}, replay={"kind": "buffer", "rate": 0.25}),
                 stage("three", 10, {"d": 1.0}, replay={"kind": "buffer", "rate": 0.5})]


def test_buffer_replay_draws_only_what_earlier_stages_trained_on():
    s = stream({n: 500 for n in CORPORA}, BUFFER_STAGES, per_step=8, buffer_size=30)
    batches = run_stages(s)
    trained = {i: {ref for batch in batches for j, name, ref in batch if j == i and name != BUFFER} for i in range(3)}
    replayed = {i: [ref for batch in batches for j, name, ref in batch if j == i and name == BUFFER] for i in (1, 2)}
    assert len(replayed[1]) == 20 and len(replayed[2]) == 40  # 25% and 50% of 10 x 8
    assert set(replayed[1]) <= trained[0]
    assert set(replayed[2]) <= trained[0] | trained[1] and not set(replayed[2]) & trained[2]
    assert {c for c, _ in replayed[2]} == {"a", "b", "c"}, "stage three should replay stage two's data too"
    # Bounded by its capacity: 30 slots, all distinct references, though 80 + 60 sequences were offered.
    assert len(s.buffer) == 30 and s.buffer.seen == 80 + 60 + 40
    assert len(set(replayed[2])) <= 30 and len(set(replayed[1])) == 20  # the first pass over a snapshot repeats none
    # Per batch: 2 and 4 buffer rows.
    assert per_step_counts(batches[10:20], BUFFER) == [2] * 10 and per_step_counts(batches[20:], BUFFER) == [4] * 10


def test_buffer_replay_is_deterministic_by_seed():
    def content(seed):
        s = stream({n: 500 for n in CORPORA}, BUFFER_STAGES, per_step=8, seed=seed, buffer_size=30)
        return run_stages(s), s.buffer.indices.tolist()

    assert content(0) == content(0)
    assert content(0)[1] != content(1)[1]


def test_buffer_replay_in_the_first_stage_is_an_error():
    stages = [stage("one", 5, {"a": 1.0}, replay={"kind": "buffer", "rate": 0.25})]
    s = stream({"a": 100}, stages)
    with pytest.raises(CptError, match="'replay-buffer' has no sequences"):
        s.start_stage(0)
