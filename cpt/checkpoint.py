"""Checkpoints: a fixed set of named parts written atomically.

``RUN_DIR/checkpoints/<stage>/step-<global step>/`` holds

- the model in Hugging Face format (``save_pretrained``, safetensors) and its tokenizer, so
  ``AutoModelForCausalLM.from_pretrained(path)`` loads it;
- ``train_state.pt``: optimizer, schedule step, data-sampler state and RNG states (tensors and plain
  Python values only, loadable with ``torch.load(weights_only=True)``);
- ``config.yaml``: the resolved recipe;
- ``meta.json``: readable metadata and the size and sha256 of every file, to detect truncation.

Everything is written to a temporary directory beside the target, fsynced, and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

from cpt.config import check, field

FORMAT_VERSION = 1


@dataclass
class CheckpointConfig:
    every: Optional[int] = field(None, doc="also save every N global steps (always at the end of each stage)")

    def __post_init__(self):
        check(self.every is None or self.every > 0, "every", "must be a positive number of steps")


def rng_state() -> dict:
    """RNG states of Python and torch (CPU and CUDA) as tensors and plain values. NumPy's global RNG is not
    saved: cpt's data order uses explicitly seeded generators only."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def checkpoint_dir(run_dir: Path, stage: str, step: int) -> Path:
    return run_dir / "checkpoints" / stage / f"step-{step}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(target: Path, model, tokenizer, train_state: dict, meta: dict, config: dict) -> Path:
    """Write a complete checkpoint to ``target`` atomically (an existing one there is replaced).

    Args:
        model: the unwrapped Hugging Face model.
        train_state: optimizer, sampler and schedule counters, RNG (see module docstring).
        meta: readable fields for ``meta.json`` (stage, steps, tokens...).
        config: the resolved recipe as a plain dict.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(train_state, tmp / "train_state.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        meta = {"format_version": FORMAT_VERSION, **meta, "saved_at": time.time(), "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target
