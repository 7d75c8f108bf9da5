"""Tests for cpt.data.loader: packed windows, the mixture sampler's proportions, order and resume, eval windows."""

import copy
from collections import Counter

import numpy as np
import pytest

from cpt.data.loader import MixtureSampler, PackedSequences, SamplerState, eval_sequences
from cpt.errors import CptError

SEQ_LEN = 8
# Each source's tokens live in their own range, so a window's first token names its source and sequence.
OFFSETS = {"a": 0, "b": 10_000, "c": 20_000}


def packed(name: str, num_sequences: int) -> PackedSequences:
    start = OFFSETS[name]
    return PackedSequences(np.arange(start, start + num_sequences * SEQ_LEN + 1), SEQ_LEN, name)


def identify(row: np.ndarray) -> tuple[str, int]:
    """(source, sequence index) of a window drawn from the sources built by ``packed``."""
    name = max((n for n in OFFSETS if row[0] >= OFFSETS[n]), key=OFFSETS.get)
    return name, int(row[0] - OFFSETS[name]) // SEQ_LEN


SOURCES = {"a": packed("a", 50), "b": packed("b", 30), "c": packed("c", 20)}
WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}


def sampler(seed: int = 0, weights: dict = WEIGHTS, sources: dict = SOURCES, state: SamplerState | None = None):
    return MixtureSampler(sources, weights, seed, state if state is not None else SamplerState())


def draw(s: MixtureSampler, batches: int, size: int = 4) -> list[tuple[np.ndarray, list[str]]]:
    return [s.next_batch(size) for _ in range(batches)]


def same(batches_a, batches_b) -> bool:
    return len(batches_a) == len(batches_b) and all(
        np.array_equal(xa, xb) and na == nb for (xa, na), (xb, nb) in zip(batches_a, batches_b))


def test_packed_windows():
    tokens = np.arange(103, dtype=np.uint16)
    seqs = PackedSequences(tokens, 10)
    assert len(seqs) == 10  # (103 - 1) // 10
    for i in range(len(seqs)):
        window = seqs[i]
        assert window.dtype == np.int64 and window.shape == (11,)
        assert np.array_equal(window, np.arange(i * 10, i * 10 + 11))
    # Consecutive windows share one token, so every token after the first is a target exactly once.
    targets = np.concatenate([seqs[i][1:] for i in range(len(seqs))])
    assert np.array_equal(targets, np.arange(1, 101))


@pytest.mark.parametrize("length, expected", [(0, 0), (1, 0), (10, 0), (11, 1), (20, 1), (21, 2)])
def test_packed_count(length, expected):
    assert len(PackedSequences(np.arange(length), 10)) == expected


def test_batch_shape_and_names():
    x, names = sampler().next_batch(6)
    assert x.shape == (6, SEQ_LEN + 1) and x.dtype == np.int64
    assert [identify(row)[0] for row in x] == names


def test_same_seed_same_batches():
    assert same(draw(sampler(seed=3), 10), draw(sampler(seed=3), 10))


def test_different_seed_different_order():
    assert not same(draw(sampler(seed=0), 10), draw(sampler(seed=1), 10))


def test_order_is_a_function_of_position_not_batch_size():
    big = sampler().next_batch(40)
    small = draw(sampler(), 10, size=4)
    assert np.array_equal(big[0], np.concatenate([x for x, _ in small]))
    assert big[1] == [n for _, names in small for n in names]


@pytest.mark.parametrize("weights", [WEIGHTS, {"a": 5, "b": 3, "c": 2}])
def test_proportions_follow_weights(weights):
    s = sampler(weights=weights)
    names = [n for _, batch in draw(s, 20, size=100) for n in batch]
    assert len(names) == 2000
    counts = Counter(names)
    total = sum(weights.values())
    for name, weight in weights.items():
        assert abs(counts[name] / 2000 - weight / total) <= 0.02, (name, counts)


def test_cursors_count_draws():
    s = sampler()
    names = [n for _, batch in draw(s, 25, size=8) for n in batch]
    assert s.state.position == 200
    assert s.state.cursors == dict(Counter(names))
    assert s.epochs("a") == pytest.approx(s.state.cursors["a"] / 50)


def test_each_sequence_once_per_epoch():
    s = sampler()
    drawn: dict[str, list[int]] = {name: [] for name in SOURCES}
    for x, _ in draw(s, 60, size=10):
        for row in x:
            name, index = identify(row)
            drawn[name].append(index)
    for name, indices in drawn.items():
        n = len(SOURCES[name])
        assert len(indices) >= 2 * n, "draw at least two epochs of every source"
        assert sorted(indices[:n]) == list(range(n)), f"{name}: first epoch is not a permutation"
        assert sorted(indices[n:2 * n]) == list(range(n)), f"{name}: second epoch is not a permutation"
        assert indices[:n] != indices[n:2 * n], f"{name}: every epoch has the same order"
        assert indices[:n] != list(range(n)), f"{name}: sequences are read in file order"


@pytest.mark.parametrize("k", [0, 3, 17])
def test_resume_from_copied_state_continues_exactly(k):
    uninterrupted = sampler(seed=7)
    draw(uninterrupted, k, size=5)
    saved = copy.deepcopy(uninterrupted.state)
    resumed = sampler(seed=7, state=saved)
    assert same(draw(resumed, 30, size=5), draw(uninterrupted, 30, size=5))  # 150 draws: past an epoch of c
    assert resumed.state == uninterrupted.state


def test_restarting_from_scratch_is_not_resuming():
    uninterrupted = sampler(seed=7)
    draw(uninterrupted, 5)
    assert not same(draw(sampler(seed=7), 5), draw(uninterrupted, 5))


def test_zero_weight_source_is_never_drawn():
    sources = {**SOURCES, "c": PackedSequences(np.arange(3), SEQ_LEN, "c")}  # shorter than a window: never read
    s = sampler(weights={"a": 0.7, "b": 0.3, "c": 0.0}, sources=sources)
    names = [n for _, batch in draw(s, 50, size=10) for n in batch]
    assert set(names) == {"a", "b"}
    assert "c" not in s.state.cursors


def test_source_shorter_than_a_window_is_an_error():
    sources = {**SOURCES, "c": PackedSequences(np.arange(SEQ_LEN), SEQ_LEN, "c")}
    with pytest.raises(CptError, match="corpus 'c' has fewer tokens than one sequence"):
        sampler(sources=sources)


def test_eval_sequences_are_the_first_windows_within_budget():
    tokens = np.arange(1000)
    seqs = PackedSequences(tokens, 10)
    windows = eval_sequences(tokens, 10, max_tokens=55, name="x")
    assert windows.shape == (5, 11)
    assert np.array_equal(windows, np.stack([seqs[i] for i in range(5)]))
    assert len(eval_sequences(tokens, 10, max_tokens=10**6, name="x")) == len(seqs) == 99
    assert len(eval_sequences(tokens, 10, max_tokens=3, name="x")) == 1


def test_eval_sequences_too_short_split():
    with pytest.raises(CptError, match=r"corpus 'x'.*val_fraction"):
        eval_sequences(np.arange(10), 10, max_tokens=100, name="x")
