"""Metrics: one JSON object per line in ``RUN_DIR/metrics.jsonl``, mirrored to wandb when enabled."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from cpt.config import field
from cpt.errors import NO_SPACE, space_for


@dataclass
class WandbConfig:
    enabled: bool = field(False, doc="also log to Weights & Biases")
    project: str = field("cpt", doc="wandb project")
    entity: Optional[str] = field(None, doc="wandb entity (team or user)")
    mode: Optional[Literal["online", "offline", "disabled"]] = field(
        None, doc="wandb mode (default: $WANDB_MODE if set, else offline, so nothing is sent unless asked)")


class MetricsLogger:
    """Appends rows to ``metrics.jsonl`` (flushed each row, so a killed run keeps what it logged)."""

    def __init__(self, run_dir: Path, wandb_config: WandbConfig, run_name: str, config: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        # Rows in the file so far (a resumed run appends to what its checkpoint covered).
        self.rows = sum(1 for _ in open(self.path)) if enabled and self.path.exists() else 0
        self._file = open(self.path, "a") if enabled else None
        self._wandb = None
        if enabled and wandb_config.enabled:
            import wandb

            mode = wandb_config.mode or os.environ.get("WANDB_MODE") or "offline"
            self._wandb = wandb.init(project=wandb_config.project, entity=wandb_config.entity, name=run_name,
                                     dir=str(run_dir), config=config, mode=mode)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {**row, "time": round(time.time(), 3)}
        with space_for(self.path, "a metrics row"):
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        self.rows += 1
        if self._wandb is not None:
            prefix = f"eval/{row['set']}" if row["kind"] == "eval" else row["kind"]
            values = {f"{prefix}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            self._wandb.log(values, step=row["step"])

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:  # the row that did not fit was reported already
                if e.errno not in NO_SPACE:
                    raise
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
