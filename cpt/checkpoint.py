"""Checkpoints: a fixed set of named parts written atomically.

``RUN_DIR/checkpoints/<stage>/step-<global step>/`` holds

- the model in Hugging Face format (``save_pretrained``, safetensors) and its tokenizer, so
  ``AutoModelForCausalLM.from_pretrained(path)`` loads it;
- ``train_state.pt``: optimizer, schedule step, data-sampler state and RNG states (tensors and plain
  Python values only, loadable with ``torch.load(weights_only=True)``);
- ``config.yaml``: the resolved recipe;
- under DeepSpeed, ``deepspeed/state/``: every rank's ZeRO optimizer shard (and fp32 master weights) in
  DeepSpeed's own format, written by the ranks into the same temporary directory (``staging_dir``);
- ``meta.json``: readable metadata and the size and sha256 of every file, to detect truncation.

Everything is written to a temporary directory beside the target, fsynced, and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from cpt.config import check, field
from cpt.errors import CptError

FORMAT_VERSION = 1
INTERNAL_FILES = ("train_state.pt", "meta.json", "config.yaml")
log = logging.getLogger(__name__)


@dataclass
class CheckpointConfig:
    every: Optional[int] = field(None, doc="also save every N global steps (always at the end of each stage)")
    keep_last: int = field(2, doc="keep this many newest mid-stage checkpoints; every stage's final one is kept")

    def __post_init__(self):
        check(self.every is None or self.every > 0, "every", "must be a positive number of steps")
        check(self.keep_last >= 1, "keep_last", "must be at least 1")


def rng_state() -> dict:
    """RNG states of Python and torch (CPU and CUDA) as tensors and plain values. NumPy's global RNG is not
    saved: cpt's data order uses explicitly seeded generators only."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path, stage: str, step: int) -> Path:
    return run_dir / "checkpoints" / stage / f"step-{step}"


def sha256_file(path: Path) -> str:
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


def staging_dir(target: Path) -> Path:
    """Where a checkpoint written by several processes is assembled before it is renamed to ``target``."""
    return target.with_name(f".{target.name}-staging")


def save_checkpoint(target: Path, model, tokenizer, train_state: dict, meta: dict, config: dict,
                    write_extra: Callable[[Path], object] | None = None, staging: Path | None = None,
                    state_dict: dict | None = None) -> Path:
    """Write a complete checkpoint to ``target`` atomically (an existing one there is replaced).

    Args:
        model: the unwrapped Hugging Face model.
        train_state: optimizer, sampler and schedule counters, RNG (see module docstring).
        meta: readable fields for ``meta.json`` (stage, steps, tokens...).
        config: the resolved recipe as a plain dict.
        write_extra: writes more files into the directory before it is hashed (e.g. LoRA adapters).
        staging: a directory beside ``target`` that other processes already wrote parts into (DeepSpeed's
            per-rank optimizer shards); it is completed and renamed like a fresh temporary directory.
        state_dict: the model's weights when ``model`` does not hold them whole (gathered from ZeRO-3).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging or Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        torch.save(train_state, tmp / "train_state.pt")
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        if write_extra is not None:
            write_extra(tmp)
        files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
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


def read_meta(path: Path) -> dict | None:
    """A checkpoint's ``meta.json``, or None when it is missing or unreadable."""
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def verify_checkpoint(path: Path, hashes: bool = True) -> str | None:
    """Why a checkpoint cannot be trusted (missing, truncated or changed files), or None when it is intact."""
    meta = read_meta(path)
    if meta is None:
        return "no readable meta.json (incomplete write?)"
    for name, info in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != info["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, expected {info['bytes']} (truncated?)"
        if hashes and sha256_file(file) != info["sha256"]:
            return f"{name} does not match its sha256 (corrupt)"
    return None


def list_checkpoints(run_dir: Path) -> list[tuple[dict, Path]]:
    """Every checkpoint of a run with readable metadata, oldest first (temporary directories are skipped)."""
    found = []
    for path in (run_dir / "checkpoints").glob("*/step-*"):
        meta = read_meta(path)
        if meta is not None:
            found.append((meta, path))
    return sorted(found, key=lambda item: (item[0]["global_step"], item[0]["stage_index"]))


def latest_intact(run_dir: Path) -> tuple[dict, Path] | None:
    """The newest checkpoint that verifies; broken newer ones are reported and skipped, never loaded."""
    for meta, path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return meta, path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def prune(run_dir: Path, keep_last: int) -> None:
    """Delete mid-stage checkpoints beyond the newest ``keep_last``; stage-final checkpoints always stay."""
    mid = [path for meta, path in list_checkpoints(run_dir) if not meta.get("stage_complete")]
    for path in mid[:-keep_last]:
        shutil.rmtree(path)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint's safetensors weights into ``model`` in place (tied weights are shared, not saved).

    Raises:
        CptError: the files do not fit the model.
    """
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(path / name))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CptError(f"checkpoint {path} does not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                       f"unexpected {sorted(unexpected)[:5]}")


def export_checkpoint(path: Path, out_dir: Path) -> Path:
    """Copy a checkpoint's model and tokenizer into a standalone Hugging Face model directory."""
    problem = verify_checkpoint(path)
    if problem is not None:
        raise CptError(f"checkpoint {path} is not intact ({problem}); export another one")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CptError(f"export directory {out_dir} is not empty; choose a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in sorted(path.iterdir()):
        if file.is_file() and file.name not in INTERNAL_FILES:
            shutil.copy2(file, out_dir / file.name)
    return out_dir
