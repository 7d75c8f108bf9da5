"""The models a merge reads and writes: cpt checkpoints (verified against their recorded sha256 first) or plain
Hugging Face model directories in, a plain Hugging Face directory out, with the tokenizer copied and its lineage
and file hashes in ``merge.json``, written to a temporary sibling and renamed when complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cpt import __version__
from cpt.checkpoint import sha256_file, verify_checkpoint
from cpt.errors import CptError, space_for

MERGE_FILE = "merge.json"
# Files of a checkpoint that are not part of the model a merge writes.
NOT_COPIED = {"model.safetensors", "model.safetensors.index.json", "meta.json", "train_state.pt", "config.yaml",
              "reptile.safetensors", MERGE_FILE}


@dataclass
class MergeInput:
    """One model a merge reads: its directory, weights (tied ``lm_head`` left out), config and weights' hash."""

    path: Path
    state: dict[str, torch.Tensor]
    config: dict
    sha256: str
    shards: dict[str, str] | None = None  # each shard's sha256, when the weights are sharded


def read_input(path: Path | str) -> MergeInput:
    """A checkpoint or HF model directory's weights.

    Raises:
        CptError: the directory is missing, is no model directory, has an unreadable config or weights file, or is
            a checkpoint that does not verify.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CptError(f"merge input '{path}' does not exist; give a cpt checkpoint or a Hugging Face model directory")
    if (path / "meta.json").is_file():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CptError(f"merge input {path} is a broken checkpoint: {problem}; pick an intact one")
    config, index = _read_json(path / "config.json"), path / "model.safetensors.index.json"
    if config is None:
        raise CptError(f"merge input {path} has no config.json; give a cpt checkpoint or a Hugging Face model directory")
    weight_map = _read_json(index)["weight_map"] if index.is_file() else None
    files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
    if not all((path / f).is_file() for f in files):
        raise CptError(f"merge input {path} has no safetensors weights ({', '.join(files)}); save it with "
                       "save_pretrained(safe_serialization=True)")
    state = {}
    for name in files:
        try:
            state.update(load_file(str(path / name)))
        except SafetensorError as e:  # a truncated or overwritten file in a directory with no hashes to check
            raise CptError(f"merge input {path / name} is not a readable safetensors file ({e}); "
                           "give an intact model directory") from None
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # saved by some writers, not by others: the embedding is the one tensor
    digests = {name: sha256_file(path / name) for name in files}
    return MergeInput(path, state, config, _weights_digest(digests), digests if len(files) > 1 else None)


def _read_json(path: Path) -> dict | None:
    """``path``'s JSON object, None when the file does not exist.

    Raises:
        CptError: the file is not a JSON object.
    """
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CptError(f"merge input file {path} is not valid JSON ({e}); give an intact model directory") from None
    if not isinstance(value, dict) or (path.name.endswith(".index.json") and not isinstance(value.get("weight_map"),
                                                                                              dict)):
        raise CptError(f"merge input file {path} does not hold what a model directory's {path.name} holds")
    return value


def _weights_digest(digests: dict[str, str]) -> str:
    """One sha256 for a model's weights: that of ``model.safetensors`` itself, or for shards the sha256 of the lines
    ``NAME SHA256`` of every shard (the index alone is the same for any two models of one architecture)."""
    if len(digests) == 1:
        return next(iter(digests.values()))
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def check_same_architecture(inputs: list[MergeInput], vocabulary: bool = True) -> None:
    """Refuse inputs of different model types or layer structure (shapes are checked tensor by tensor later).

    Args:
        vocabulary: also refuse different vocabulary sizes, with a message that says so (a chat vector has its own
            policy for a grown vocabulary and passes False).
    """
    first = inputs[0]
    for other in inputs[1:]:
        for key in ("model_type", "architectures", "num_hidden_layers", "tie_word_embeddings"):
            if first.config.get(key) != other.config.get(key):
                raise CptError(f"{first.path} and {other.path} differ in {key} ({first.config.get(key)} vs "
                               f"{other.config.get(key)}); merge models of one architecture")
        if vocabulary and first.config.get("vocab_size") != other.config.get("vocab_size"):
            raise CptError(f"{first.path} and {other.path} have different vocabularies (vocab_size "
                           f"{first.config.get('vocab_size')} vs {other.config.get('vocab_size')}); this merge needs "
                           "one tokenizer (only chat-vector/task-arithmetic has a policy for a grown one: --vocab target)")


def refuse_existing(out: Path) -> None:
    """Refuse an output path that exists, or that cannot be created because a parent of it is a file."""
    if out.exists():
        raise CptError(f"output directory {out} exists; give a new path (cpt merge never overwrites)")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise CptError(f"output directory {out} cannot be made: {blocking} is a file; give a new path")


def write_output(out: Path, state: dict[str, torch.Tensor], like: MergeInput, lineage: dict) -> Path:
    """Write ``state`` as a HF model directory at ``out``: config, tokenizer and generation files from ``like``, the
    weights, and ``merge.json`` (lineage, cpt version, sha256 of every file).

    Raises:
        CptError: ``out`` exists or cannot be made, or the disk fills up (nothing is left behind).
    """
    refuse_existing(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except PermissionError as e:
        raise CptError(f"output directory {out} cannot be made ({e.strerror}: {e.filename}); give another path") from None
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    needed = sum(t.numel() * t.element_size() for t in weights.values())
    with space_for(out.parent, f"the merged model {out.name}", needed):
        _write(out, weights, like, lineage)
    return out


def _write(out: Path, weights: dict[str, torch.Tensor], like: MergeInput, lineage: dict) -> None:
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        # mkdtemp makes the directory private (0700); the merged model is an export, so it gets the umask's mode
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for item in like.path.iterdir():
            if item.is_file() and item.name not in NOT_COPIED and not item.name.startswith("model-"):
                shutil.copy2(item, tmp / item.name)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        record = {**lineage, "cpt_version": __version__, "created": time.time(), "files": files}
        (tmp / MERGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        refuse_existing(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def lineage(method: str, inputs: dict[str, MergeInput | list[MergeInput]], **params) -> dict:
    """What ``merge.json`` records of a merge: the method, each input (role, path, weights' sha256 and, for sharded
    weights, each shard's), parameters."""
    listed = []
    for role, value in inputs.items():
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            listed.append({"role": role if not isinstance(value, list) else f"{role}[{i}]",
                           "path": str(item.path.resolve()), "sha256": item.sha256,
                           **({"shards": item.shards} if item.shards else {})})
    return {"method": method, "inputs": listed, "params": params}
