"""The optimizer: AdamW over a model's trainable parameters, and a checkpoint's optimizer state found and loaded
into whichever engine (DDP, FSDP, DeepSpeed) the run uses."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cpt import distributed
from cpt.checkpoint import read_meta
from cpt.errors import CptError

if TYPE_CHECKING:
    from cpt.recipe import TrainConfig


def build_optimizer(model: torch.nn.Module, train: TrainConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices decay, vectors (norms, biases) do not.

    The fused kernel (one kernel per tensor group) where torch has it for the parameters' device (CUDA; CPU since
    torch 2.4), as the HF Trainer's default ``adamw_torch_fused``; on a 2-core CPU it measured the same as the
    per-parameter loop torch picks there by default (BENCHMARKS.md, "Training throughput"). With DeepSpeed's
    optimizer offload, Accelerate swaps it for DeepSpeed's CPU AdamW with the same groups: hand it a
    ``torch.optim.AdamW`` (any other class becomes Adam with L2 decay there).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": train.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    options = dict(lr=lr, betas=(train.beta1, train.beta2), eps=train.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.AdamW(groups, **options)


def optimizer_state(path: Path, train_state: dict) -> dict | Path | None:
    """A checkpoint's optimizer state: the torch state dict, or for DeepSpeed the directory of its shards."""
    if train_state.get("optimizer") is not None:
        return train_state["optimizer"]
    shards = path / distributed.DEEPSPEED_DIR
    return shards if shards.is_dir() else None


def load_optimizer_state(model, optimizer, state: dict | Path, engine: str, world_size: int) -> None:
    """Load ``state`` into a run's optimizer: a torch optimizer state dict (DDP checkpoints), a whole one keyed by
    parameter name (FSDP, split here into this rank's shards), or a checkpoint's ``deepspeed/`` directory: ZeRO
    state split per rank, loadable only by a DeepSpeed run with the same number of processes.

    Args:
        engine: the run's engine, ``"DDP"``, ``"FSDP"`` or ``"DeepSpeed"`` (FSDP on 1 process is DDP).
    """
    theirs = ("DeepSpeed" if isinstance(state, Path) else "FSDP" if distributed.is_name_keyed(state) else "DDP")
    if theirs != engine:
        article = "an" if theirs == "FSDP" else "a"
        raise CptError(f"this run uses {engine} but the optimizer state comes from {article} {theirs} checkpoint; use "
                       "the same distributed.engine, or start without it (cpt branch without --with-optimizer)")
    if engine == "FSDP":
        distributed.load_fsdp_optimizer_state(model, optimizer, state)
        return
    if engine == "DDP":
        optimizer.load_state_dict(state)
        return
    world = (read_meta(state.parent) or {}).get("world_size")
    if world != world_size:
        raise CptError(f"{state.parent} holds ZeRO optimizer state split over {world} processes; run with "
                       f"{world} processes, or branch from it without --with-optimizer (weights only)")
    model.load_checkpoint(state, tag=distributed.DEEPSPEED_TAG, load_optimizer_states=True,
                          load_lr_scheduler_states=False)
