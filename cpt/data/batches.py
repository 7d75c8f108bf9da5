"""A stage's global batches split into this rank's micro-batches, on the training device."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from cpt.data.mixing import rank_rows
from cpt.data.stream import DataStream

if TYPE_CHECKING:
    from cpt.recipe import StageConfig


def draw_micro_batches(stream: DataStream, stage: StageConfig, grad_accum: int,
                       accelerator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """This rank's micro-batches of ``stream``'s next global batch (see ``rank_rows``) on its device, and for
    each a bool per row: whether it comes from a replay source rather than ``stage``'s own mixture."""
    rows, names = stream.next_batch()
    own = set(stage.corpora)
    replay = np.array([[name not in own] for name in names])
    world, rank = accelerator.num_processes, accelerator.process_index
    return ([to_device(s, accelerator.device) for s in rank_rows(rows, grad_accum, world, rank)],
            [torch.from_numpy(s[:, 0]) for s in rank_rows(replay, grad_accum, world, rank)])


def to_device(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Token rows onto the training device; to a GPU through pinned host memory without blocking, so the copy
    is queued ahead of the step's kernels instead of stalling the host."""
    rows_BT = torch.from_numpy(rows)
    if device.type == "cuda":
        return rows_BT.pin_memory().to(device, non_blocking=True)
    return rows_BT.to(device)
