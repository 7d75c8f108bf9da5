"""Evaluation: mean token loss, perplexity and bits-per-byte of a model on named held-out sets.

Callable from the training loop and on its own: give it a model and the fixed evaluation windows.
Bits-per-byte converts the token loss with the held-out split's bytes-per-token ratio, so runs with
different tokenizers can be compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cpt.config import check, field
from cpt.model import token_loss_sum


@dataclass
class EvalConfig:
    every: int = field(50, doc="evaluate every N steps (and always at each stage's start and end)")
    max_tokens: int = field(65536, doc="token budget per eval set (the first windows of its held-out split)")
    batch_size: int = field(8, doc="sequences per evaluation forward pass")
    sets: dict[str, str] = field(default_factory=dict, doc="eval set name -> corpus whose held-out split it uses")

    def __post_init__(self):
        check(self.every > 0, "every", "must be a positive number of steps")
        check(self.max_tokens > 0, "max_tokens", "must be positive")
        check(self.batch_size > 0, "batch_size", "must be positive")


@dataclass
class EvalSet:
    """One named eval set: its fixed windows and the bytes-per-token ratio of its split."""

    name: str
    corpus: str
    sequences: np.ndarray
    bytes_per_token: float


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_set: EvalSet, batch_size: int, accelerator) -> dict[str, float]:
    """Loss, perplexity and bits-per-byte of ``model`` on ``eval_set``; ranks split the windows and sum."""
    was_training = model.training
    model.eval()
    rows = eval_set.sequences[accelerator.process_index::accelerator.num_processes]
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    count = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(rows[start:start + batch_size]).to(accelerator.device)
        with accelerator.autocast():
            loss_sum += token_loss_sum(model, batch[:, :-1], batch[:, 1:]).double()
        count += batch[:, 1:].numel()
    loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    model.train(was_training)
    loss = (loss_sum / count).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": loss / math.log(2) / eval_set.bytes_per_token,
            "tokens": int(count.item())}
