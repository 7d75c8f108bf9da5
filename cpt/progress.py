"""What a run prints while it trains: the data budget at the start, then a progress bar on a terminal or a
log line every ``train.log_every`` steps."""

from __future__ import annotations

import logging
import sys
from typing import Callable

log = logging.getLogger("cpt.trainer")


def log_budget(rows: list[dict]) -> None:
    """Print the data budget: per stage and source, weight, tokens drawn and available, passes over it."""
    lines = [f"{'stage':<14}{'source':<18}{'weight':>8}{'tokens':>14}{'available':>14}{'epochs':>8}"]
    for r in rows:
        available = "-" if r["available"] is None else f"{r['available']:,}"
        epochs = "-" if r["epochs"] is None else f"{r['epochs']:.2f}"
        most = "<=" if r.get("at_most") else ""
        lines.append(f"{r['stage']:<14}{r['source']:<18}{r['weight']:>8.3f}{most:>4}{r['tokens']:>10,}{available:>14}"
                     f"{epochs:>8}")
    note = " <= : an automatic replay rate, counted at its max" if any(r.get("at_most") for r in rows) else ""
    log.info("data budget (epochs = passes over the source by the stage's end;%s):\n%s", note, "\n".join(lines))


def log_stage_end(metrics, stage: str, index: int, step: int, stage_tokens: dict[str, int], seconds: float,
                  eval_seconds: float) -> None:
    """A stage's end: a ``data`` row per source (tokens drawn in the stage), its time, and the ``stage`` end row."""
    for source, tokens in stage_tokens.items():
        metrics.log({"kind": "data", "step": step, "stage": stage, "source": source, "tokens": tokens})
    log.info("stage '%s' took %.1fs, %.0f%% of it evaluating", stage, seconds, 100 * eval_seconds / seconds)
    metrics.log({"kind": "stage", "event": "end", "stage": stage, "index": index, "step": step,
                 "seconds": round(seconds, 3), "eval_seconds": round(eval_seconds, 3)})


def stage_progress(stage: str, steps: int, log_every: int, main_process: bool) -> Callable[[dict], None]:
    """A function of each training row: a tqdm bar on a terminal, plain log lines otherwise (nothing off rank 0)."""
    if not main_process:
        return lambda row: None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=stage, unit="step", leave=True)

        def update(row):
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if row["stage_step"] == steps:
                bar.close()
        return update

    def line(row):
        if row["stage_step"] % log_every == 0 or row["stage_step"] == steps:
            log.info("%s step %d/%d | loss %.4f | lr %.2e | grad %.2f | %.0f tok/s", stage, row["stage_step"], steps,
                     row["loss"], row["lr"], row["grad_norm"], row["tokens_per_s"])
    return line
