"""Data mixing: which source and which sequence every position of a stage reads.

Order is a pure function of (seed, stage, position) and a few counters — no hidden RNG stream:

- **Which source.** Each source has a target count, the running sum of its weight over positions; position
  ``i`` goes to the source furthest behind its target (ties to the first). Every source's count stays
  within a small constant of ``weight x window`` over any window, not only on average.
- **Which sequence.** Each source has a cursor; cursor ``c`` reads sequence ``perm_e[c mod n]`` of a seeded
  permutation for epoch ``e = c // n``. Cursors carry over between stages and across weight changes, so
  changing the mixture never repeats or skips a source's sequences.
- **Weights over time.** A stage's weights are fixed, or anchored at steps and interpolated linearly or held
  piecewise-constant between anchors (``MixtureSchedule``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from cpt.errors import CptError


class Sequences(Protocol):
    """Anything with a length that returns token windows by index (packed corpora, subsets, the buffer)."""

    def __len__(self) -> int: ...

    def gather(self, indices: np.ndarray) -> np.ndarray: ...


def seed_int(*parts: object) -> int:
    """A 64-bit integer seed from any parts, stable across processes and platforms."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class MixtureSchedule:
    """Mixture weights as a function of the stage step.

    Args:
        anchors: step -> {source: weight}; the first anchor must be step 0. Weights are normalised per anchor.
        interpolation: ``linear`` between anchors, or ``step`` (each anchor holds until the next).
    """

    def __init__(self, anchors: dict[int, dict[str, float]], interpolation: Literal["linear", "step"] = "linear"):
        steps = sorted(anchors)
        if not steps or steps[0] != 0:
            raise CptError("a mixture schedule needs an anchor at step 0")
        self.names = list(dict.fromkeys(n for s in steps for n, w in anchors[s].items() if w > 0))
        rows = []
        for s in steps:
            total = sum(anchors[s].values())
            if total <= 0:
                raise CptError(f"mixture anchor at step {s}: weights are all zero")
            rows.append([anchors[s].get(n, 0.0) / total for n in self.names])
        self.steps = np.array(steps, dtype=np.float64)
        self.values = np.array(rows)
        self.interpolation = interpolation

    @classmethod
    def constant(cls, weights: dict[str, float]) -> "MixtureSchedule":
        return cls({0: weights})

    def weights_at(self, step: int) -> np.ndarray:
        """Normalised weights (in ``self.names`` order) for the sequences of 0-based stage step ``step``."""
        j = int(np.searchsorted(self.steps, step, side="right")) - 1
        if self.interpolation == "step" or j == len(self.steps) - 1:
            return self.values[j]
        frac = (step - self.steps[j]) / (self.steps[j + 1] - self.steps[j])
        return self.values[j] + frac * (self.values[j + 1] - self.values[j])

    def cumulative(self, steps: int) -> np.ndarray:
        """``sum(weights_at(k) for k in range(steps))``, in closed form per segment."""
        total = np.zeros(len(self.names))
        bounds = list(self.steps) + [np.inf]
        for j in range(len(self.steps)):
            lo, hi = int(bounds[j]), int(min(bounds[j + 1], steps))
            if hi <= lo:
                break
            n = hi - lo
            if self.interpolation == "step" or j == len(self.steps) - 1:
                total += n * self.values[j]
            else:
                slope = (self.values[j + 1] - self.values[j]) / (bounds[j + 1] - bounds[j])
                offsets = (lo + hi - 1) * n / 2 - n * bounds[j]  # sum of (k - anchor) for k in [lo, hi)
                total += n * self.values[j] + slope * offsets
        return total

    def mean_weights(self, steps: int) -> dict[str, float]:
        """Average weight of each source over a stage of ``steps`` steps."""
        return dict(zip(self.names, self.cumulative(steps) / max(steps, 1)))

    def describe(self) -> dict:
        return {"interpolation": self.interpolation,
                "anchors": {int(s): dict(zip(self.names, map(float, v))) for s, v in zip(self.steps, self.values)}}


@dataclass
class SamplerState:
    """Where the data stream is: a few counters, enough to continue exactly.

    ``counts`` are this stage's draws per source; ``cursors`` are each source's total draws over the run.
    ``base_position``/``base_counts`` re-anchor the targets when the mixture is changed mid-stage (remix, or an
    automatic replay rate's change).
    """

    stage_index: int = 0
    position: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    cursors: dict[str, int] = field(default_factory=dict)
    base_position: int = 0
    base_counts: dict[str, int] = field(default_factory=dict)
    replay_rate: float | None = None  # an automatic replay rate's current value (None: the stage's start)
    held_losses: list[float] = field(default_factory=list)  # the held set's losses this stage, for that rate

    def start_stage(self, index: int) -> None:
        self.stage_index, self.position, self.base_position = index, 0, 0
        self.counts, self.base_counts = {}, {}
        self.replay_rate, self.held_losses = None, []


class MixtureSampler:
    """Draws batches of token windows from weighted sources, exactly and deterministically.

    Args:
        sources: every source the schedule may name, by name.
        schedule: the stage's mixture over time.
        seed: run seed.
        state: the counters to continue from (mutated as batches are drawn).
        sequences_per_step: global batch size in sequences; positions map to steps with it.
    """

    def __init__(self, sources: dict[str, Sequences], schedule: MixtureSchedule, seed: int, state: SamplerState,
                 sequences_per_step: int):
        for name in schedule.names:
            if name not in sources:
                raise CptError(f"mixture names unknown source '{name}'")
            if len(sources[name]) == 0:
                raise CptError(f"source '{name}' has no sequences to draw yet (an empty corpus, or a replay buffer "
                               "before any training); add text, lower train.seq_len, or replay later")
        self.sources, self.schedule, self.seed, self.state = sources, schedule, seed, state
        self.per_step = sequences_per_step
        self._perms: dict[str, tuple[int, int, np.ndarray]] = {}

    def _expected(self, position: int) -> np.ndarray:
        """Sum of the weights over stage positions ``[0, position)``."""
        step, within = divmod(position, self.per_step)
        return self.per_step * self.schedule.cumulative(step) + within * self.schedule.weights_at(step)

    def assign(self, count: int) -> list[str]:
        """Source names for the next ``count`` positions (advances ``counts`` and ``position``).

        Position ``p`` goes to the source with the largest deficit ``target(p + 1) - count``, where
        ``target(q) = base_count + expected(q) - expected(base_position)``.
        """
        names = self.schedule.names
        # Plain floats: the per-position loop runs on a handful of values, where numpy calls cost more than math.
        counts = [float(self.state.counts.get(n, 0)) for n in names]
        base = np.array([self.state.base_counts.get(n, 0) for n in names], dtype=np.float64)
        base -= self._expected(self.state.base_position)
        picks, current_step, order = [], -1, range(len(names))
        for p in range(self.state.position + 1, self.state.position + count + 1):
            step, within = divmod(p, self.per_step)
            if step != current_step:  # step-level terms change once per global batch
                current_step = step
                start = (base + self.per_step * self.schedule.cumulative(step)).tolist()
                weights = self.schedule.weights_at(step).tolist()
            k = max(order, key=lambda j: (start[j] + within * weights[j] - counts[j], -j))
            counts[k] += 1
            picks.append(names[k])
        self.state.position += count
        for name, c in zip(names, counts):
            self.state.counts[name] = int(c)
        return picks

    def _indices(self, name: str, cursors: np.ndarray) -> np.ndarray:
        """Sequence indices of ``cursors`` in source ``name``: a seeded permutation per epoch."""
        n = len(self.sources[name])
        epochs, offsets = np.divmod(cursors, n)
        out = np.empty_like(cursors)
        for epoch in np.unique(epochs):
            cached = self._perms.get(name)
            if cached is None or cached[:2] != (int(epoch), n):
                perm = np.random.default_rng(seed_int(self.seed, name, int(epoch))).permutation(n)
                self._perms[name] = cached = (int(epoch), n, perm)
            mask = epochs == epoch
            out[mask] = cached[2][offsets[mask]]
        return out

    def next_batch(self, count: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """The next ``count`` windows ``[count, seq_len + 1]`` (int64), their source names and sequence indices."""
        picks = self.assign(count)
        names = np.array(picks)
        indices = np.empty(count, dtype=np.int64)
        rows = None
        for name in dict.fromkeys(picks):
            mask = names == name
            start = self.state.cursors.get(name, 0)
            cursors = np.arange(start, start + int(mask.sum()), dtype=np.int64)
            self.state.cursors[name] = start + len(cursors)
            indices[mask] = self._indices(name, cursors)
            windows = self.sources[name].gather(indices[mask])
            if rows is None:
                rows = np.empty((count, windows.shape[1]), dtype=np.int64)
            rows[mask] = windows
        return rows, picks, indices


def rank_rows(rows: np.ndarray, grad_accum: int, world_size: int, rank: int) -> list[np.ndarray]:
    """This rank's micro-batches of a global batch: each accumulation slice is split so rank ``r`` takes rows
    ``r::world_size``. The union over ranks is exactly the single-process batch."""
    slices = rows.reshape(grad_accum, -1, rows.shape[-1])
    return [s[rank::world_size] for s in slices]
