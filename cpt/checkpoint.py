"""Checkpoints: a fixed set of named parts written atomically.

``RUN_DIR/checkpoints/<stage>/step-<global step>/`` holds

- the model in Hugging Face format (``save_pretrained``, safetensors) and its tokenizer, so
  ``AutoModelForCausalLM.from_pretrained(path)`` loads it;
- ``train_state.pt``: optimizer, schedule step, data-sampler state and RNG states (tensors and plain
  Python values only, loadable with ``torch.load(weights_only=True)``);
- ``config.yaml``: the resolved recipe;
- under DeepSpeed, ``deepspeed/state/``: every rank's ZeRO optimizer shard (and fp32 master weights) in
  DeepSpeed's own format, written by the ranks into the same temporary directory (``staging_dir``);
- ``meta.json``: readable metadata, the size and sha256 of every file (to detect truncation), and the sha256
  of its own other fields (``meta_sha256``, to detect an edit: resume trusts its step and row counts).

Everything is written to a temporary directory beside the target, fsynced, and renamed when complete.
Before a resume a checkpoint is verified (:func:`verify_checkpoint`): every file's size and hash, meta's own
hash, and meta's counters against ``train_state.pt``'s; one that fails is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
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
from cpt.errors import CptError, space_for

# 2: meta.json carries meta_sha256 (version 1 checkpoints, without it, still load).
FORMAT_VERSION = 2
INTERNAL_FILES = ("train_state.pt", "meta.json", "config.yaml")
# meta.json's counters that train_state.pt repeats; a resume trusts them only when both agree.
COUNTERS = ("stage_index", "stage_step", "global_step", "tokens")
# Weights beyond this magnitude are not those of a trained transformer (real models stay within ~1e2): a
# checkpoint holding them (or non-finite ones) is not named as the one to go back to after a NaN loss.
SANE_MAX_ABS = 1e3
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
    needed = tensor_bytes(state_dict if state_dict is not None else model.state_dict()) + tensor_bytes(train_state)
    with space_for(target.parent, f"checkpoint {target.name}", needed):
        return _write_checkpoint(target, model, tokenizer, train_state, meta, config, write_extra, staging, state_dict)


def tensor_bytes(obj) -> int:
    """The bytes of every tensor in a (nested) state dict: about what writing it takes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(tensor_bytes(v) for v in values)


def _write_checkpoint(target, model, tokenizer, train_state, meta, config, write_extra, staging, state_dict) -> Path:
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
        meta["meta_sha256"] = _meta_hash(meta)
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


def _meta_hash(meta: dict) -> str:
    fields = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def verify_checkpoint(path: Path) -> str | None:
    """Why a checkpoint cannot be trusted, or None when it is intact: a missing, truncated or changed file,
    an edited meta.json, or meta counters that disagree with ``train_state.pt``'s."""
    meta = read_meta(path)
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        return "no readable meta.json (incomplete write, or deleted?)"
    for name, info in meta["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != info["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, expected {info['bytes']} (truncated?)"
        if sha256_file(file) != info["sha256"]:
            return f"{name} does not match its sha256 (corrupt)"
    if meta.get("format_version", 1) >= 2 and meta.get("meta_sha256") != _meta_hash(meta):
        return "meta.json was edited after it was written (its checksum does not match)"
    if "train_state.pt" in meta["files"]:
        try:
            load_train_state(path, meta, mmap=True)  # loads (memory-mapped) or names what is wrong
        except CptError as e:
            return str(e)
    if _named_step(path, meta) != meta.get("global_step"):
        return f"meta.json says global step {meta.get('global_step')} in {path.name} (edited?)"
    return None


def load_train_state(path: Path, meta: dict | None = None, mmap: bool = False) -> dict:
    """``train_state.pt``, loaded as tensors and plain values only (``weights_only``), with its counters checked
    against ``meta`` when given.

    Raises:
        CptError: the file holds other objects or is corrupt, or it disagrees with meta.json.
    """
    file = path / "train_state.pt"
    try:
        state = torch.load(file, weights_only=True, mmap=mmap, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, AttributeError,
            IndexError, OSError):
        # torch's message advises weights_only=False, i.e. running whatever the file holds: never pass that on.
        raise CptError(f"{file} is not a state cpt wrote (objects other than tensors and plain values, or corrupt); "
                       f"resume from another checkpoint (delete {path.name})") from None
    counters = state.get("counters") if isinstance(state, dict) else None
    if meta is not None and isinstance(counters, dict):
        differ = [f"{k} {meta.get(k)} vs {counters.get(k)}" for k in COUNTERS if meta.get(k) != counters.get(k)]
        if "metrics_rows" in state and meta.get("metrics_rows") != state["metrics_rows"]:
            differ.append(f"metrics_rows {meta.get('metrics_rows')} vs {state['metrics_rows']}")
        if differ:
            raise CptError(f"{path.name}: meta.json disagrees with train_state.pt ({'; '.join(differ)}); it was "
                           "changed after it was written: resume from another checkpoint")
    return state


def list_checkpoints(run_dir: Path) -> list[tuple[dict, Path]]:
    """Every checkpoint of a run with readable metadata, oldest first (temporary directories are skipped)."""
    found = []
    for path in (run_dir / "checkpoints").glob("*/step-*"):
        meta = read_meta(path)
        if isinstance(meta, dict) and isinstance(meta.get("global_step"), int) and isinstance(meta.get("stage_index"), int):
            found.append((meta, path))
    # By the step in the directory's name, which cpt wrote, rather than meta's (an edit must not reorder them).
    return sorted(found, key=lambda item: (_named_step(item[1], item[0]), item[0]["stage_index"]))


def _named_step(path: Path, meta: dict) -> int:
    name = path.name.removeprefix("step-")
    return int(name) if name.isdigit() else meta["global_step"]


def weight_magnitude(state_dict: dict[str, torch.Tensor]) -> float:
    """The largest absolute floating-point weight (``nan`` when any is not finite)."""
    largest = 0.0
    for tensor in state_dict.values():
        if tensor.is_floating_point() and tensor.numel():
            value = tensor.detach().abs().max().float().item()
            if not math.isfinite(value) or not torch.isfinite(tensor).all():
                return float("nan")
            largest = max(largest, value)
    return largest


def last_sane(run_dir: Path) -> Path | None:
    """The newest checkpoint whose weights were finite and within :data:`SANE_MAX_ABS` when it was saved."""
    for meta, path in reversed(list_checkpoints(run_dir)):
        magnitude = meta.get("max_abs_weight")
        if isinstance(magnitude, (int, float)) and math.isfinite(magnitude) and magnitude <= SANE_MAX_ABS:
            return path
    return None


def latest_intact(run_dir: Path) -> tuple[dict, Path] | None:
    """The newest checkpoint that verifies; every one skipped (broken, or without a readable meta.json) is
    reported, none of them is loaded."""
    listed = {path for _, path in list_checkpoints(run_dir)}
    for path in sorted(set((run_dir / "checkpoints").glob("*/step-*")) - listed):
        log.warning("skipping checkpoint %s: no readable meta.json (incomplete write, or deleted?)", path)
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
    if out_dir.exists() and not out_dir.is_dir():
        raise CptError(f"export directory {out_dir} is a file; choose a new directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CptError(f"export directory {out_dir} is not empty; choose a new directory")
    files = [file for file in sorted(path.iterdir()) if file.is_file() and file.name not in INTERNAL_FILES]
    with space_for(out_dir, "the exported model", sum(file.stat().st_size for file in files)):
        out_dir.mkdir(parents=True, exist_ok=True)
        for file in files:
            shutil.copy2(file, out_dir / file.name)
    return out_dir
