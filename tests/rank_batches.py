"""Run under torchrun by tests/test_distributed.py: build a recipe's trainer and save, per rank, the rows it
would train on in each step (all micro-batches of the step together), as ``OUT/rank<r>.npy`` [steps, rows, T+1]."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from cpt.data.prepare import prepare
from cpt.distributed import make_accelerator
from cpt.metrics import MetricsLogger
from cpt.model import build_model
from cpt.recipe import load_recipe
from cpt.runner import data_dir, resolve_precision
from cpt.trainer import Trainer


def build_trainer(recipe_path: str) -> tuple[Trainer, object]:
    """The recipe's trainer on this process's accelerator (data prepared by the main process first)."""
    recipe, base_dir = load_recipe(recipe_path)
    accelerator = make_accelerator(recipe, resolve_precision(recipe.train.mixed_precision), base_dir)
    with accelerator.main_process_first():
        data = prepare(recipe, base_dir, data_dir(recipe, base_dir))
    model = build_model(recipe.model, data.tokenizer, recipe.train.seq_len, base_dir)
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(recipe, recipe.run_dir, model, data, accelerator, MetricsLogger(
        recipe.run_dir, recipe.wandb, recipe.name, recipe.to_dict(), accelerator.is_main_process)), accelerator


def main(recipe_path: str, out: str) -> None:
    trainer, accelerator = build_trainer(recipe_path)
    recipe = trainer.recipe
    steps = []
    for index, stage in enumerate(recipe.stages[:2]):
        trainer.stream.start_stage(index)
        for _ in range(8 if index == 0 else 4):
            micro_batches, _ = trainer.next_micro_batches(stage)
            steps.append(torch.cat(micro_batches).cpu().numpy())
    Path(out).mkdir(parents=True, exist_ok=True)
    np.save(Path(out) / f"rank{accelerator.process_index}.npy", np.stack(steps))
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
