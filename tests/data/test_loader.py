"""Tests for cpt.data.loader: packed windows, vectorised gathers, fixed subsets and eval windows."""

import numpy as np
import pytest

from cpt.data.loader import PackedSequences, SubsetSequences, eval_sequences
from cpt.errors import CptError


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


def test_gather_equals_indexing_in_any_order(tmp_path):
    # A memory-mapped uint16 file, as the shards are, with values above int16's range.
    path = tmp_path / "train.bin"
    np.arange(40_000, 40_000 + 8 * 20 + 1, dtype=np.uint16).tofile(path)
    seqs = PackedSequences(np.memmap(path, dtype=np.uint16, mode="r"), 8)
    indices = np.array([19, 0, 7, 7, 3])
    rows = seqs.gather(indices)
    assert rows.dtype == np.int64 and rows.shape == (5, 9)
    assert np.array_equal(rows, np.stack([seqs[i] for i in indices]))
    assert rows[0, 0] == 40_000 + 19 * 8 and rows[0, -1] == 40_000 + 20 * 8  # the last window reaches the end
    assert seqs.gather(np.array([], dtype=np.int64)).shape == (0, 9)


def test_gather_past_the_end_is_an_error():
    seqs = PackedSequences(np.arange(41), 8)
    assert len(seqs) == 5
    with pytest.raises(IndexError):
        seqs.gather(np.array([5]))


def test_subset_maps_its_indices_to_the_base():
    base = PackedSequences(np.arange(10 * 4 + 1), 4)
    subset = SubsetSequences(base, np.array([8, 2, 5]), "x~fixed")
    assert len(subset) == 3 and subset.name == "x~fixed"
    rows = subset.gather(np.array([0, 2, 1, 0]))
    assert np.array_equal(rows, base.gather(np.array([8, 5, 2, 8])))
    assert rows[:, 0].tolist() == [32, 20, 8, 32]
    with pytest.raises(IndexError):
        subset.gather(np.array([3]))


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
