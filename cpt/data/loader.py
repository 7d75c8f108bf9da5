"""Packed sequences and the mixture sampler that decides, for every sequence of a stage, which source and
which sequence it reads.

Order is a pure function of (seed, stage, position) plus one cursor per source: resuming restores those
counters instead of replaying random draws. Source choice uses a Weyl (golden-ratio) low-discrepancy
sequence, so a source's share over any window stays close to its weight, not only on average. Within a
source, sequences are read in a seeded permutation per epoch; cursors carry over between stages, so a
corpus used again later (replay) continues where it stopped instead of repeating its first sequences.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np

from cpt.errors import CptError

log = logging.getLogger(__name__)

_GOLDEN = (5**0.5 - 1) / 2


class PackedSequences:
    """Fixed windows of ``seq_len + 1`` tokens over a flat token stream (documents separated by EOS, no
    padding); window ``i`` starts at token ``i * seq_len``, so consecutive windows share one token and
    every token after the first is a target exactly once."""

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str = ""):
        self.tokens = tokens
        self.seq_len = seq_len
        self.name = name
        self.num_sequences = max((len(tokens) - 1) // seq_len, 0)

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)


def _seed_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


@dataclass
class SamplerState:
    """Everything needed to continue exactly: the stage position and each source's cursor."""

    stage_index: int = 0
    position: int = 0
    cursors: dict[str, int] = field(default_factory=dict)


class MixtureSampler:
    """Draws sequences from several sources in proportion to their weights, deterministically.

    Args:
        sources: packed sequences by source name.
        weights: mixture weight by source name (normalised here).
        seed: run seed.
        state: where to continue from (stage index, position within the stage, per-source cursors).
    """

    def __init__(self, sources: dict[str, PackedSequences], weights: dict[str, float], seed: int,
                 state: SamplerState):
        self.names = [n for n, w in weights.items() if w > 0]
        for name in self.names:
            if len(sources[name]) == 0:
                raise CptError(f"corpus '{name}' has fewer tokens than one sequence (train.seq_len + 1); "
                               "add text or lower train.seq_len")
        total = sum(weights[n] for n in self.names)
        self.weights = np.array([weights[n] / total for n in self.names])
        self.bounds = np.cumsum(self.weights)
        self.bounds[-1] = 1.0
        self.sources = sources
        self.seed = seed
        self.state = state
        for name in self.names:
            state.cursors.setdefault(name, 0)
        self._offset = _seed_int(seed, state.stage_index, "offset") / 2**64
        self._perms: dict[tuple[str, int], np.ndarray] = {}

    def source_indices(self, start: int, count: int) -> np.ndarray:
        """Which source (index into ``self.names``) each stage position in ``[start, start+count)`` reads."""
        u = np.mod(self._offset + _GOLDEN * np.arange(start, start + count, dtype=np.float64), 1.0)
        return np.searchsorted(self.bounds, u, side="right")

    def _sequence_index(self, name: str, cursor: int) -> int:
        n = len(self.sources[name])
        epoch, offset = divmod(cursor, n)
        key = (name, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != name}
            rng = np.random.default_rng(_seed_int(self.seed, name, epoch))
            self._perms[key] = rng.permutation(n)
        return int(self._perms[key][offset])

    def next_batch(self, count: int) -> tuple[np.ndarray, list[str]]:
        """The next ``count`` sequences as an int64 array ``[count, seq_len + 1]`` and their source names."""
        picks = self.source_indices(self.state.position, count)
        rows, names = [], []
        for pick in picks:
            name = self.names[pick]
            cursor = self.state.cursors[name]
            rows.append(self.sources[name][self._sequence_index(name, cursor)])
            self.state.cursors[name] = cursor + 1
            names.append(name)
        self.state.position += count
        return np.stack(rows), names

    def epochs(self, name: str) -> float:
        """How many passes over source ``name`` its cursor has made."""
        return self.state.cursors.get(name, 0) / max(len(self.sources[name]), 1)


def eval_sequences(tokens: np.ndarray, seq_len: int, max_tokens: int, name: str) -> np.ndarray:
    """The fixed evaluation windows of a held-out split: the first ``max_tokens // seq_len`` windows."""
    packed = PackedSequences(tokens, seq_len, name)
    count = min(len(packed), max(max_tokens // seq_len, 1))
    if count == 0:
        raise CptError(f"held-out split of corpus '{name}' has {len(tokens)} tokens, fewer than one sequence "
                       f"({seq_len + 1}); raise corpora.{name}.val_fraction or lower train.seq_len")
    return np.stack([packed[i] for i in range(count)])
