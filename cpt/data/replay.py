"""Replay: earlier data mixed into later stages (REFERENCES.md §2).

Three kinds, each one more source in the stage's mixture:

- ``corpus`` — compute-equivalent replay (Ibrahim et al. 2024): ``rate`` of every batch comes from earlier
  corpora and the stage's own mixture shrinks by the same share; replayed corpora continue their cursors.
- ``fixed`` — a fixed general set (GeRe): ``size`` sequences of a corpus chosen once by seed, replayed in
  every stage that asks for it.
- ``buffer`` — a reservoir sample of the sequences the model actually trained on in earlier stages
  (Abbes et al. 2025), stored as (source, sequence) references into the on-disk token shards: bounded,
  deterministic, and saved in every checkpoint. A stage draws from the snapshot taken when it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import numpy as np

from cpt.config import check, field
from cpt.data.auto_replay import Controller, HoldConfig
from cpt.errors import CptError

BUFFER = "replay-buffer"
_MASK = (1 << 64) - 1


def fixed_name(corpus: str) -> str:
    """Source name of a corpus's fixed replay set."""
    return f"{corpus}~fixed"


@dataclass
class ReplayConfig:
    rate: Union[float, Literal["auto"]] = field(
        doc="share of every batch that is replayed (the stage's own mixture shrinks by as much), or auto: the "
            "share that holds an eval set's loss (hold; see cpt/data/auto_replay.py)")
    kind: Literal["corpus", "fixed", "buffer"] = field("corpus", doc="what is replayed (see cpt/data/replay.py)")
    from_: Optional[list[str]] = field(None, doc="corpora to replay (corpus/fixed; default: earlier stages' corpora)")
    size: int = field(1000, doc="sequences in a fixed replay set (kind fixed)")
    hold: Optional[HoldConfig] = field(None, doc="rate auto: the eval set whose loss it holds, and the tolerance")
    start: float = field(0.05, doc="rate auto: the rate until the held set's first evaluation after the stage's start")
    min: float = field(0.0, doc="rate auto: the lowest rate")
    max: float = field(0.5, doc="rate auto: the highest rate (what the data budget counts)")
    gain: float = field(0.1, doc="rate auto: proportional gain, replay share per budget of excess loss (0.1 and "
                                 "integral 0.1 held a 10% budget on the demo; BENCHMARKS.md)")
    integral: float = field(0.1, doc="rate auto: integral gain, replay share per budget of summed excess")

    def __post_init__(self):
        auto = self.rate == "auto"
        check(auto or 0 < self.rate < 1, "rate", f"must be in (0, 1) or auto, got {self.rate}")
        check(self.size > 0, "size", "must be a positive number of sequences")
        check(self.kind != "buffer" or not self.from_, "from", "a buffer replays what was trained on; drop 'from'")
        check(not auto or self.hold is not None, "hold",
              "rate auto needs the eval set to hold, e.g. hold: {set: upstream, tolerance: 0.03}")
        check(auto or self.hold is None, "hold", "only with rate: auto (a fixed rate holds nothing)")
        check(0 <= self.min <= self.max < 1, "min", f"expected 0 <= min <= max < 1, got min {self.min}, max {self.max}")
        check(self.min <= self.start <= self.max, "start",
              f"must be within [min, max] = [{self.min}, {self.max}], got {self.start}")
        check(self.gain >= 0 and self.integral >= 0, "gain", "the gains must be >= 0")

    @property
    def controller(self) -> Controller | None:
        """The automatic rate's controller, for rate auto."""
        if self.rate != "auto":
            return None
        return Controller(self.hold, self.start, self.min, self.max, self.gain, self.integral)

    def initial_rate(self) -> float:
        return self.start if self.rate == "auto" else self.rate


def replay_weights(replay: ReplayConfig, earlier_corpora: list[str], rate: float | None = None) -> dict[str, float]:
    """Mixture weights (summing to ``rate``, by default the stage's fixed rate or its automatic one's start) of the
    replayed sources."""
    rate = replay.initial_rate() if rate is None else rate
    if replay.kind == "buffer":
        return {BUFFER: rate}
    corpora = replay.from_ or earlier_corpora
    names = corpora if replay.kind == "corpus" else [fixed_name(c) for c in corpora]
    return {name: rate / len(names) for name in names}


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


class ReplayBuffer:
    """A bounded reservoir of trained-on sequences, as references into other sources.

    The ``n``-th sequence offered goes to slot ``n`` while the buffer fills, then to slot
    ``hash(seed, n) mod (n + 1)`` if that is inside the buffer (reservoir sampling, Vitter's algorithm R with
    a hash in place of an RNG), so the content is a pure function of the seed and what was offered.

    Draws (``len``, ``gather``) read a snapshot taken by ``freeze`` at the start of each stage, so a stage
    replays only what earlier stages trained on, while its own sequences keep filling the reservoir for the
    stages after it.
    """

    def __init__(self, capacity: int, seed: int, sources: dict):
        self.capacity, self.seed, self.sources = capacity, seed, sources
        self.names: list[str] = []
        self.source_ids = np.full(capacity, -1, dtype=np.int64)
        self.indices = np.zeros(capacity, dtype=np.int64)
        self.seen = 0
        self.frozen_ids = np.zeros(0, dtype=np.int64)
        self.frozen_indices = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.frozen_ids)

    def offer(self, names: list[str], indices: np.ndarray) -> None:
        """Offer sequences just trained on (replayed buffer sequences are not offered again)."""
        for name, index in zip(names, indices):
            if name == BUFFER:
                continue
            if name not in self.names:
                self.names.append(name)
            n = self.seen
            slot = n if n < self.capacity else _mix64(self.seed ^ _mix64(n)) % (n + 1)
            if slot < self.capacity:
                self.source_ids[slot] = self.names.index(name)
                self.indices[slot] = index
            self.seen += 1

    def freeze(self) -> None:
        """Make the reservoir's current content what the next stage draws from."""
        filled = min(self.seen, self.capacity)
        self.frozen_ids, self.frozen_indices = self.source_ids[:filled].copy(), self.indices[:filled].copy()

    def gather(self, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        ids, indices = self.frozen_ids[slots], self.frozen_indices[slots]
        rows = None
        for source_id in np.unique(ids):
            mask = ids == source_id
            windows = self.sources[self.names[source_id]].gather(indices[mask])
            if rows is None:
                rows = np.empty((len(slots), windows.shape[1]), dtype=np.int64)
            rows[mask] = windows
        return rows

    def state_dict(self) -> dict:
        import torch

        arrays = {"source_ids": self.source_ids, "indices": self.indices, "frozen_ids": self.frozen_ids,
                  "frozen_indices": self.frozen_indices}
        return {"seen": self.seen, "names": list(self.names),
                **{key: torch.from_numpy(value.copy()) for key, value in arrays.items()}}

    def load_state_dict(self, state: dict) -> None:
        if len(state["source_ids"]) != self.capacity:
            raise CptError(f"the replay buffer was saved with {len(state['source_ids'])} slots, but "
                           f"data.replay_buffer_size is {self.capacity}; keep the size of the run being continued")
        self.seen, self.names = int(state["seen"]), list(state["names"])
        self.source_ids = np.asarray(state["source_ids"], dtype=np.int64).copy()
        self.indices = np.asarray(state["indices"], dtype=np.int64).copy()
        self.frozen_ids = np.asarray(state["frozen_ids"], dtype=np.int64).copy()
        self.frozen_indices = np.asarray(state["frozen_indices"], dtype=np.int64).copy()
