"""Run under torchrun by tests/test_distributed.py: train a recipe with an automatic replay rate and save, per
rank, every decision of the rate's controller (global step, held-set loss, rate, the stage's draws per source so
far) as ``OUT/rank<r>.json``: all ranks must make the same ones at the same steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rank_batches import build_trainer


def main(recipe_path: str, out: str) -> None:
    trainer, accelerator = build_trainer(recipe_path)
    decisions, observe = [], trainer.stream.observe

    def record(results):
        row = observe(results)
        if row is not None:
            decisions.append([trainer.state.global_step, row["loss"], row["rate"], dict(trainer.stream.state.counts)])
        return row

    trainer.stream.observe = record
    trainer.fit()
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{accelerator.process_index}.json").write_text(json.dumps(decisions))
    accelerator.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:])
