"""Evaluation: mean token loss, perplexity and bits-per-byte of a model on named held-out sets.

Callable from the training loop and on its own: give it a model and the fixed evaluation windows.
Bits-per-byte converts the token loss with the held-out split's bytes-per-token ratio, so runs with
different tokenizers can be compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
import torch

from cpt.config import build, check, field
from cpt.model import fp32_output_head, token_loss_sum


@dataclass
class EvalSetConfig:
    corpus: str = field(doc="the recipe corpus this set reads")
    tag: Optional[Literal["upstream", "downstream"]] = field(
        None, doc="upstream (old data to keep) or downstream (new data); default: the set's name if it is one")
    split: Literal["val", "all"] = field("val", doc="val: the corpus's held-out split; all: every document "
                                                  "(for a corpus used only for evaluation, e.g. a separate file)")
    max_tokens: Optional[int] = field(None, doc="token budget of this set (default: eval.max_tokens)")

    def __post_init__(self):
        check(self.max_tokens is None or self.max_tokens > 0, "max_tokens", "must be positive")


@dataclass
class EvalConfig:
    every: int = field(50, doc="evaluate every N steps (and always at each stage's start and end)")
    dense_steps: int = field(0, doc="also evaluate every dense_every steps during each stage's first dense_steps "
                                    "steps, where the stability gap lives")
    dense_every: int = field(1, doc="spacing of the dense evaluations")
    geometric: bool = field(False, doc="also evaluate at stage steps 1, 2, 4, 8, ... (dense early, sparse later)")
    max_tokens: int = field(65536, doc="token budget per eval set (the first windows of its split)")
    batch_size: int = field(8, doc="sequences per evaluation forward pass")
    sets: dict[str, Any] = field(default_factory=dict, doc="eval set name -> corpus name, or {corpus, tag, split, "
                                                           "max_tokens}")

    def __post_init__(self):
        check(self.every > 0, "every", "must be a positive number of steps")
        check(self.dense_steps >= 0, "dense_steps", "must be >= 0")
        check(self.dense_every > 0, "dense_every", "must be a positive number of steps")
        check(self.max_tokens > 0, "max_tokens", "must be positive")
        check(self.batch_size > 0, "batch_size", "must be positive")
        self.resolved: dict[str, EvalSetConfig] = {}
        for name, value in self.sets.items():
            raw = {"corpus": value} if isinstance(value, str) else value
            config = build(EvalSetConfig, raw, f"eval.sets.{name}")
            if config.tag is None and name in ("upstream", "downstream"):
                config.tag = name
            self.resolved[name] = config

    def due(self, t: int, steps: int) -> bool:
        """Whether to evaluate after stage step ``t`` (1-based) of ``steps``; the stage's start and end
        are always evaluated by the loop itself."""
        if t % self.every == 0:
            return True
        if t <= self.dense_steps and t % self.dense_every == 0:
            return True
        return self.geometric and t & (t - 1) == 0


@dataclass
class EvalSet:
    """One named eval set: its fixed windows and the bytes-per-token ratio of its split."""

    name: str
    corpus: str
    sequences: np.ndarray
    bytes_per_token: float
    tag: str | None = None


@torch.no_grad()
def build_eval_sets(recipe, data) -> dict[str, EvalSet]:
    """A run's eval sets, by name, from its recipe and prepared data: the first ``max_tokens`` of each set's split
    in ``seq_len`` windows, the same tokens wherever they are built (the training loop, ``cpt merge --eval``)."""
    from cpt.data.loader import eval_sequences

    sets = {}
    for name, config in recipe.eval.resolved.items():
        shard = data.corpora[config.corpus]
        tokens = shard.val.tokens if config.split == "val" else np.concatenate([shard.train.tokens, shard.val.tokens])
        ratio = (shard.val.bytes_per_token if config.split == "val" else
                 (shard.train.bytes + shard.val.bytes) / max(len(tokens), 1))
        budget = config.max_tokens or recipe.eval.max_tokens
        sets[name] = EvalSet(name, config.corpus, eval_sequences(tokens, recipe.train.seq_len, budget, config.corpus),
                             ratio, config.tag)
    return sets


def evaluate(model: torch.nn.Module, eval_set: EvalSet, batch_size: int, accelerator) -> dict[str, float]:
    """Loss, perplexity and bits-per-byte of ``model`` on ``eval_set``; ranks split the windows and sum. The body
    runs under the run's autocast, the output head in fp32 (``fp32_output_head``)."""
    was_training = model.training
    model.eval()
    world = accelerator.num_processes
    rows = eval_set.sequences[accelerator.process_index::world]
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    count = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    # Every rank runs the same number of forwards: under ZeRO-3 each one gathers weights from all ranks. A rank
    # whose share has run out repeats the set's first window and does not count it.
    shares = -(-len(eval_set.sequences) // world)
    for start in range(0, shares, batch_size):
        part = rows[start:start + batch_size]
        batch = torch.from_numpy(part if len(part) else eval_set.sequences[:1]).to(accelerator.device)
        with accelerator.autocast(), fp32_output_head(accelerator.unwrap_model(model)):
            loss = token_loss_sum(model, batch[:, :-1], batch[:, 1:]).double()
        if len(part):
            loss_sum += loss
            count += batch[:, 1:].numel()
    loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    model.train(was_training)
    loss = (loss_sum / count).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": loss / math.log(2) / eval_set.bytes_per_token,
            "tokens": int(count.item())}
