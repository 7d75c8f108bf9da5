"""L2 to the initial weights ("A Closer Look at Rehearsal-Free Continual Learning"): a pull of every trainable
parameter toward its value at the start of the stage, ``lambda * ||theta - theta_0||^2``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cpt.config import check, field


@dataclass
class L2InitConfig:
    lambda_: float = field(doc="weight of ||theta - theta_0||^2 (recipe key: lambda)")

    def __post_init__(self):
        check(self.lambda_ >= 0, "lambda", f"must be >= 0, got {self.lambda_}")


class L2ToInit:
    """Holds ``theta_0`` (detached copies of the trainable parameters) and computes the penalty."""

    def __init__(self, reference: torch.nn.Module, lambda_: float, names: set[str] | None = None):
        """``reference`` holds theta_0; ``names`` are the trainable parameters (default: its own trainable ones)."""
        self.lambda_ = lambda_
        self.reference = {name: p.detach().clone() for name, p in reference.named_parameters()
                          if (p.requires_grad if names is None else name in names)}

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """``lambda * sum ||theta - theta_0||^2`` over the parameters captured at construction."""
        total = torch.zeros((), device=next(model.parameters()).device)
        for name, p in model.named_parameters():
            if name in self.reference:
                total = total + (p - self.reference[name]).pow(2).sum()
        return self.lambda_ * total
