"""Token windows over prepared shards: packed training sequences, fixed subsets of them, and the fixed
evaluation windows of a held-out split. Reads are vectorised gathers from the memory-mapped tokens."""

from __future__ import annotations

import numpy as np

from cpt.errors import CptError


class PackedSequences:
    """Fixed windows of ``seq_len + 1`` tokens over a flat token stream (documents separated by EOS, no
    padding); window ``i`` starts at token ``i * seq_len``, so consecutive windows share one token and
    every token after the first is a target exactly once."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str = ""):
        self.tokens = tokens
        self.seq_len = seq_len
        self.name = name
        self.num_sequences = max((len(tokens) - 1) // seq_len, 0)
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Windows ``[len(indices), seq_len + 1]`` (int64) in one fancy-indexing read."""
        starts = np.asarray(indices, dtype=np.int64) * self.seq_len
        return self.tokens[starts[:, None] + self._offsets].astype(np.int64)


class SubsetSequences:
    """A fixed subset of another source's windows (e.g. a GeRe-style general set replayed in every stage)."""

    def __init__(self, base: PackedSequences, indices: np.ndarray, name: str = ""):
        self.base, self.indices, self.name = base, np.asarray(indices, dtype=np.int64), name

    def __len__(self) -> int:
        return len(self.indices)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        return self.base.gather(self.indices[np.asarray(indices, dtype=np.int64)])


def eval_sequences(tokens: np.ndarray, seq_len: int, max_tokens: int, name: str) -> np.ndarray:
    """The fixed evaluation windows of a held-out split: the first ``max_tokens // seq_len`` windows."""
    packed = PackedSequences(tokens, seq_len, name)
    count = min(len(packed), max(max_tokens // seq_len, 1))
    if count == 0:
        raise CptError(f"held-out split of corpus '{name}' has {len(tokens)} tokens, fewer than one sequence "
                       f"({seq_len + 1}); raise corpora.{name}.val_fraction or lower train.seq_len")
    return packed.gather(np.arange(count))
