"""The run's training data stream: sources, each stage's mixture (replay included), the replay buffer and
the sampler state — built once, advanced batch by batch, saved and restored as a few counters.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import asdict

import numpy as np

from cpt.data.loader import PackedSequences, SubsetSequences
from cpt.data.mixing import MixtureSampler, MixtureSchedule, SamplerState, seed_int
from cpt.data.replay import BUFFER, ReplayBuffer, fixed_name, replay_weights
from cpt.data.shards import TokenShard
from cpt.errors import CptError

log = logging.getLogger(__name__)


def parent_index(stages: list, index: int) -> int | None:
    """The stage whose end stage ``index`` starts from: its ``start_from``, else the stage before it."""
    if stages[index].start_from is not None:
        return next(i for i, s in enumerate(stages) if s.name == stages[index].start_from)
    return index - 1 if index > 0 else None


def earlier_corpora(stages: list, index: int) -> list[str]:
    """Corpora trained on before stage ``index`` along its line of ``start_from`` parents (not in sibling
    branches), oldest first."""
    line, parent = [], parent_index(stages, index)
    while parent is not None:
        line.append(stages[parent])
        parent = parent_index(stages, parent)
    return list(dict.fromkeys(c for stage in reversed(line) for c in stage.corpora))


def stage_schedules(stages: list, corpora: list[str], rates: dict[int, float] | None = None) -> list[MixtureSchedule]:
    """Each stage's mixture schedule, replay folded in: the stage's own weights scale by ``1 - rate`` and the
    replayed sources share ``rate`` (compute-equivalent replay). ``rates`` overrides a stage's rate (an automatic
    rate's current value; by default its ``start``)."""
    return [stage_schedule(stages, i, (rates or {}).get(i)) for i in range(len(stages))]


def stage_schedule(stages: list, index: int, rate: float | None = None) -> MixtureSchedule:
    """Stage ``index``'s mixture schedule with its replay at ``rate`` (default: the stage's own)."""
    stage = stages[index]
    anchors = {s: dict(w) for s, w in stage.anchors.items()}
    if stage.replay is not None:
        rate = stage.replay.initial_rate() if rate is None else rate
        extra = replay_weights(stage.replay, earlier_corpora(stages, index), rate)
        for step, weights in anchors.items():
            total = sum(weights.values())
            scaled = {n: w / total * (1 - rate) for n, w in weights.items()}
            for name, w in extra.items():
                scaled[name] = scaled.get(name, 0.0) + w
            anchors[step] = scaled
    return MixtureSchedule(anchors, stage.mixture_interpolation)


class DataStream:
    """Training batches for every stage of a run.

    Args:
        shards: prepared corpora by name.
        stages: the recipe's stages (mixture, replay).
        stage_steps: each stage's optimizer steps (after ``train.max_steps``).
        seq_len: tokens per sequence; sequences_per_step: global batch in sequences.
        seed: run seed; max_epochs: limit on passes over any source; buffer_size: replay buffer capacity.
    """

    def __init__(self, shards: dict[str, TokenShard], stages: list, stage_steps: list[int], seq_len: int,
                 sequences_per_step: int, seed: int, max_epochs: float = 10.0, buffer_size: int = 10000,
                 world_size: int = 1):
        self.stages, self.stage_steps, self.seq_len, self.seed = stages, stage_steps, seq_len, seed
        self.per_step, self.max_epochs, self.world_size = sequences_per_step, max_epochs, world_size
        self.sources: dict = {name: PackedSequences(s.train.tokens, seq_len, name) for name, s in shards.items()}
        self.shard_fingerprints = {name: s.manifest["fingerprint"] for name, s in shards.items()}
        self.schedules = stage_schedules(stages, list(shards))
        for i, stage in enumerate(stages):
            if stage.replay is not None and stage.replay.kind == "fixed":
                for corpus in stage.replay.from_ or earlier_corpora(stages, i):
                    self._add_fixed(corpus, stage.replay.size, stage.name)
        self.buffer = None
        if any(BUFFER in s.names for s in self.schedules):
            self.buffer = self.sources[BUFFER] = ReplayBuffer(buffer_size, seed_int(seed, "buffer"), self.sources)
        self.state = SamplerState()
        self.sampler: MixtureSampler | None = None

    def _add_fixed(self, corpus: str, size: int, stage: str) -> None:
        existing = self.sources.get(fixed_name(corpus))
        if existing is not None:
            # One fixed set per corpus, the same in every stage: a second size would silently resize the first.
            if len(existing) != min(size, len(self.sources[corpus])):
                raise CptError(f"stage '{stage}' replays a fixed set of corpus '{corpus}' with size {size}, but an "
                               f"earlier stage uses size {len(existing)}; give every stage the same replay.size")
            return
        base = self.sources[corpus]
        order = np.random.default_rng(seed_int(self.seed, corpus, "fixed")).permutation(len(base))
        self.sources[fixed_name(corpus)] = SubsetSequences(base, np.sort(order[:size]), fixed_name(corpus))

    def budget(self) -> list[dict]:
        """Per stage and source: mean weight, tokens to draw, tokens available, passes over the source so far
        (along the stage's line of ``start_from`` parents, as its cursors are).

        Raises:
            CptError: a corpus would be read more than ``max_epochs`` times (fixed replay sets are exempt:
                repeating a small set is what they are for).
        """
        rows, drawn_after = [], []
        # An automatic rate may draw as much as its max: the budget counts that.
        most = {i: s.replay.max for i, s in enumerate(self.stages) if s.replay is not None and s.replay.rate == "auto"}
        schedules = stage_schedules(self.stages, list(self.sources), most)
        for i, (stage, schedule, steps) in enumerate(zip(self.stages, schedules, self.stage_steps)):
            parent = parent_index(self.stages, i)
            drawn = dict(drawn_after[parent]) if parent is not None else {}
            drawn_after.append(drawn)
            for name, weight in schedule.mean_weights(steps).items():
                draws = weight * steps * self.per_step
                drawn[name] = drawn.get(name, 0.0) + draws
                available = None if name == BUFFER else len(self.sources[name])
                epochs = None if available is None else drawn[name] / max(available, 1)
                rows.append({"stage": stage.name, "source": name, "weight": weight,
                             "at_most": i in most and name not in stage.corpora,
                             "tokens": int(round(draws)) * self.seq_len,
                             "available": None if available is None else available * self.seq_len, "epochs": epochs})
                fixed = isinstance(self.sources.get(name), SubsetSequences)
                if epochs is not None and epochs > self.max_epochs and not fixed:
                    raise CptError(f"stage '{stage.name}' would read source '{name}' {epochs:.1f} times (max "
                                   f"{self.max_epochs:g}); add data, lower its weight or the steps, or raise "
                                   "data.max_epochs")
        for row in rows:
            if row["epochs"] is not None and row["epochs"] > 1:
                log.warning("stage '%s' repeats source '%s': %.2f passes over it by the stage's end", row["stage"],
                            row["source"], row["epochs"])
        return rows

    def start_stage(self, index: int) -> None:
        """Begin stage ``index`` at its first position (cursors carry over)."""
        self.state.start_stage(index)
        self.schedules[index] = stage_schedule(self.stages, index)
        if self.buffer is not None:
            self.buffer.freeze()
        self._make_sampler()

    def _make_sampler(self) -> None:
        self.sampler = MixtureSampler(self.sources, self.schedules[self.state.stage_index], self.seed, self.state,
                                      self.per_step)

    def observe(self, results: dict[str, dict]) -> dict | None:
        """After an evaluation: with an automatic replay rate in the current stage, record the held set's loss and
        apply the controller's rate from the next batch on (the sampler re-anchored here, so the proportions are
        exact from this position and every cursor continues). Returns the ``replay`` metrics row's fields."""
        index = self.state.stage_index
        replay = self.stages[index].replay
        controller = replay.controller if replay is not None else None
        if controller is None:
            return None
        loss = results[controller.hold.set]["loss"]
        self.state.held_losses.append(loss)
        rate = controller.rates(self.state.held_losses)[-1]
        if rate != self.state.replay_rate:
            self.state.replay_rate = rate
            self.schedules[index] = stage_schedule(self.stages, index, rate)
            self.state.base_position, self.state.base_counts = self.state.position, dict(self.state.counts)
            self._make_sampler()
        reference = self.state.held_losses[0]
        return {"rate": rate, "set": controller.hold.set, "loss": loss, "start_loss": reference,
                "holds": controller.hold.holds(reference, loss)}

    def next_batch(self) -> tuple[np.ndarray, list[str]]:
        """The next global batch ``[sequences_per_step, seq_len + 1]`` and each row's source."""
        rows, names, indices = self.sampler.next_batch(self.per_step)
        if self.buffer is not None:
            self.buffer.offer(names, indices)
        return rows, names

    def fingerprint(self, stage_index: int) -> dict[str, str]:
        """What must match for a saved position to mean the same data: per component, a short hash."""
        def h(obj):
            return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
        schedule = self.schedules[stage_index]
        fixed_sizes = {n: len(self.sources[n]) for n in schedule.names if isinstance(self.sources[n], SubsetSequences)}
        return {"sources": h([self.shard_fingerprints, self.seq_len]),
                "mixture": h([schedule.describe(), fixed_sizes]),
                "batch": h([self.per_step, self.world_size]), "seed": h(self.seed)}

    def state_dict(self) -> dict:
        state = {"sampler": copy.deepcopy(asdict(self.state)), "fingerprint": self.fingerprint(self.state.stage_index)}
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: dict, remix: bool = False) -> None:
        """Continue exactly where ``state`` was saved.

        Args:
            remix: accept a changed mixture: keep every source's cursor and apply the new weights from the
                current position on. Other changes (sources, batch or world size, seed) are always errors.
        """
        saved = state["sampler"]
        if saved.get("replay_rate") is not None:  # the automatic rate in force when it was saved
            self.schedules[saved["stage_index"]] = stage_schedule(self.stages, saved["stage_index"],
                                                                  saved["replay_rate"])
        current = self.fingerprint(saved["stage_index"])
        changed = [k for k, v in state["fingerprint"].items() if current.get(k) != v]
        allowed = {"mixture"} if remix else set()
        if set(changed) - allowed:
            what = {"sources": "the sources (corpora, tokenization or seq_len)",
                    "mixture": "the stage's mixture (weights or fixed replay set size)",
                    "batch": "the global batch or world size", "seed": "the seed"}
            fix = "" if set(changed) - {"mixture"} else "; pass remix to apply the new mixture from here on"
            raise CptError("cannot continue the data stream: " + ", ".join(what[k] for k in changed) +
                           f" changed since it was saved{fix}")
        self.state = SamplerState(**copy.deepcopy(saved))
        if "mixture" in changed:
            self.state.base_position = self.state.position
            self.state.base_counts = dict(self.state.counts)
            self.state.counts = {n: self.state.counts.get(n, 0) for n in self.schedules[self.state.stage_index].names}
            log.warning("data stream: mixture changed; continuing every source's cursor with the new weights")
        if self.buffer is not None and "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])
        self._make_sampler()

    def continue_from(self, state: dict) -> None:
        """Adopt another run's per-source cursors (and replay buffer) before this run's first stage, so a
        branch reads on where its parent stopped. Its sources and seed must be the same."""
        current = self.fingerprint(0)
        for key in ("sources", "seed"):
            if state["fingerprint"][key] != current[key]:
                raise CptError(f"cannot continue the parent's data position: its {key} differ from this recipe's; "
                               "branch without the data position")
        self.state.cursors = dict(state["sampler"]["cursors"])
        if self.buffer is not None and "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])

    def stage_tokens(self) -> dict[str, int]:
        """Tokens drawn from each source so far in the current stage."""
        return {name: count * self.seq_len for name, count in self.state.counts.items()}
