"""A merge at a stage's end (``merge:`` in a stage), so the next stage starts from the merged weights:

- ``{kind: average, last: k}`` — the mean of the stage's last ``k`` checkpoints, the stage's end weights being
  the last of them (checkpoint averaging, as OLMo-core's model merger; needs ``checkpoint.every`` and
  ``checkpoint.keep_last >= k - 1`` so the ``k - 1`` mid-stage ones are on disk at the end);
- ``{kind: interpolate, alpha: a}`` — ``(1 - a) theta_start + a theta_end``, back toward the stage's starting
  weights (WiSE-FT; ``a = 1`` is no merge).

The stage's final checkpoint holds the merged weights (its optimizer state is the unmerged run's, which the next
stage does not keep: it must reset its optimizer). The inputs are files the run wrote and the stage's starting
weights, so a resumed or branched run merges the same tensors again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from cpt.config import check, field
from cpt.errors import CptError
from cpt.merging.arithmetic import weighted_average


@dataclass
class StageMergeConfig:
    kind: Literal["average", "interpolate"] = field(doc="average the last checkpoints, or interpolate toward the "
                                                        "stage's start")
    last: Optional[int] = field(None, doc="average: how many of the stage's last checkpoints (its end included)")
    alpha: Optional[float] = field(None, doc="interpolate: weight of the stage's end weights, in [0, 1]")

    def __post_init__(self):
        if self.kind == "average":
            check(self.last is not None and self.last >= 2, "last",
                  f"average needs last >= 2 (checkpoints to average), got {self.last}")
            check(self.alpha is None, "alpha", "is an interpolate option; average takes last")
        else:
            check(self.alpha is not None and 0 <= self.alpha <= 1, "alpha",
                  f"interpolate needs alpha in [0, 1], got {self.alpha}")
            check(self.last is None, "last", "is an average option; interpolate takes alpha")

    def describe(self) -> str:
        return f"average of the last {self.last} checkpoints" if self.kind == "average" else \
            f"interpolation (1 - {self.alpha}) start + {self.alpha} end"


def checkpoint_steps(first_global_step: int, steps: int, every: int | None) -> list[int]:
    """The global steps of a stage's mid-stage checkpoints (the stage's steps are ``first_global_step + 1`` to
    ``first_global_step + steps``; the last one is the stage's final checkpoint, not listed)."""
    if not every:
        return []
    return [g for g in range(first_global_step + 1, first_global_step + steps) if g % every == 0]


def average_inputs(run_dir: Path, stage: str, last: int, first_global_step: int, steps: int,
                   every: int | None) -> list[Path]:
    """The ``last - 1`` newest mid-stage checkpoints an average takes, by the checkpoint cadence (not by what is on
    disk: a checkpoint written on a stop signal is not one of them), each verified."""
    from cpt.checkpoint import checkpoint_dir, verify_checkpoint

    wanted = checkpoint_steps(first_global_step, steps, every)[-(last - 1):]
    paths = [checkpoint_dir(run_dir, stage, g) for g in wanted]
    for path in paths:
        if verify_checkpoint(path) is not None:
            raise CptError(f"merge: checkpoint {path} is missing or broken; it is one of the last {last} of stage "
                           f"'{stage}' (raise checkpoint.keep_last)")
    return paths


def merged_weights(config: StageMergeConfig, end: dict[str, torch.Tensor], start: dict[str, torch.Tensor] | None,
                   checkpoints: list[Path]) -> dict[str, torch.Tensor]:
    """The merged state dict from the stage's end weights ``end`` and, by kind, its start weights or its
    ``last - 1`` newest mid-stage checkpoints (oldest first)."""
    if config.kind == "interpolate":
        return weighted_average([start, end], [1 - config.alpha, config.alpha])
    from safetensors.torch import load_file

    states = []
    for path in checkpoints:
        state = load_file(path / "model.safetensors")
        if "lm_head.weight" in end and "lm_head.weight" not in state:  # tied: saved once
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        missing = set(end) - set(state)
        if missing:
            raise CptError(f"{path} lacks {sorted(missing)[0]}; the stage's checkpoints must hold the whole model")
        states.append({k: state[k] for k in end})
    return weighted_average(states + [end], [1 / (len(states) + 1)] * (len(states) + 1))
