"""Reptile / MER meta-updates for continual pre-training (Abbes et al. 2025, REFERENCES §2): every ``every``
optimizer steps the weights are pulled back toward where they were ``every`` steps before,

    theta <- theta_prev + beta * (theta - theta_prev),      then theta_prev <- theta

so only a ``beta`` share of each interval's progress is kept. Combined with replay in the same batches, the
update favours directions on which the new data's and the replayed data's gradients agree (the first-order
Reptile argument of MER, Riemer et al. 2019). ``beta = 1`` is plain training.

The stage's last step also closes an interval, so the stage ends on a meta-updated point whatever ``every`` is.
``theta_prev`` is part of every checkpoint taken in the stage (``reptile.safetensors``), so a run killed
mid-interval resumes with the same anchor and continues bit for bit.

The authors' repository README states the update as ``theta <- (1 - eps) * theta + eps * theta_k`` (a pull of
``eps`` toward the weights of k steps before), i.e. ``beta = 1 - eps`` here; REFERENCES gives its code defaults
as k = 500 and 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cpt.config import check, field
from cpt.errors import CptError

ANCHOR_FILE = "reptile.safetensors"


@dataclass
class ReptileConfig:
    every: int = field(doc="optimizer steps between meta-updates (the authors' code: 500)")
    beta: float = field(doc="share of each interval's progress kept: theta_prev + beta (theta - theta_prev); 1 is "
                            "plain training")

    def __post_init__(self):
        check(isinstance(self.every, int) and self.every >= 1, "every",
              f"must be an integer >= 1 (steps between meta-updates), got {self.every}")
        check(0 < self.beta <= 1, "beta", f"must be in (0, 1], got {self.beta}")


class Reptile:
    """Holds ``theta_prev`` (detached copies of the trainable parameters) and applies the meta-update."""

    def __init__(self, model: torch.nn.Module, config: ReptileConfig):
        self.config = config
        self.anchor = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def due(self, stage_step: int, stage_steps: int) -> bool:
        return stage_step % self.config.every == 0 or stage_step == stage_steps

    @torch.no_grad()
    def step(self, model: torch.nn.Module, stage_step: int, stage_steps: int) -> bool:
        """After the optimizer step ``stage_step``: the meta-update when an interval ends; returns whether it did."""
        if not self.due(stage_step, stage_steps):
            return False
        for name, p in model.named_parameters():
            anchor = self.anchor.get(name)
            if anchor is not None:
                p.copy_(torch.lerp(anchor, p, self.config.beta))
                anchor.copy_(p)
        return True

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.anchor.items()}, str(directory / ANCHOR_FILE))

    def load(self, directory: Path) -> None:
        """The anchor saved in checkpoint ``directory`` (same parameter names as this stage trains)."""
        from safetensors.torch import load_file

        path = directory / ANCHOR_FILE
        if not path.is_file():
            raise CptError(f"{directory} has no {ANCHOR_FILE}, which resuming a stage with reptile needs; resume from "
                           "a checkpoint written by this stage")
        saved = load_file(str(path))
        if set(saved) != set(self.anchor):
            raise CptError(f"{path} holds other parameters than this stage trains; resume with the recipe that "
                           "wrote it")
        for name, tensor in saved.items():
            self.anchor[name].copy_(tensor)
