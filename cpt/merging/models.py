"""The models a merge reads and writes: cpt checkpoints (verified against their recorded sha256 first) or plain
Hugging Face model directories in, a plain Hugging Face directory out, with the tokenizer copied and its lineage
and file hashes in ``merge.json``, written to a temporary sibling and renamed when complete."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cpt import __version__
from cpt.checkpoint import sha256_file, verify_checkpoint
from cpt.errors import CptError

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

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings"))


def read_input(path: Path | str) -> MergeInput:
    """A checkpoint or HF model directory's weights.

    Raises:
        CptError: the directory is missing, is no model directory, or is a checkpoint that does not verify.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CptError(f"merge input '{path}' does not exist; give a cpt checkpoint or a Hugging Face model directory")
    if (path / "meta.json").is_file():
        problem = verify_checkpoint(path)
        if problem is not None:
            raise CptError(f"merge input {path} is a broken checkpoint: {problem}; pick an intact one")
    if not (path / "config.json").is_file():
        raise CptError(f"merge input {path} has no config.json; give a cpt checkpoint or a Hugging Face model directory")
    config = json.loads((path / "config.json").read_text())
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    if not all((path / f).is_file() for f in files):
        raise CptError(f"merge input {path} has no safetensors weights ({', '.join(files)}); save it with "
                       "save_pretrained(safe_serialization=True)")
    state = {}
    for name in files:
        state.update(load_file(str(path / name)))
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # saved by some writers, not by others: the embedding is the one tensor
    digest = sha256_file(path / files[0]) if len(files) == 1 else sha256_file(index)
    return MergeInput(path, state, config, digest)


def check_same_architecture(inputs: list[MergeInput]) -> None:
    """Refuse inputs of different model types or layer structure (shapes are checked tensor by tensor later)."""
    first = inputs[0]
    for other in inputs[1:]:
        for key in ("model_type", "architectures", "num_hidden_layers", "tie_word_embeddings"):
            if first.config.get(key) != other.config.get(key):
                raise CptError(f"{first.path} and {other.path} differ in {key} ({first.config.get(key)} vs "
                               f"{other.config.get(key)}); merge models of one architecture")


def refuse_existing(out: Path) -> None:
    if out.exists():
        raise CptError(f"output directory {out} exists; give a new path (cpt merge never overwrites)")


def write_output(out: Path, state: dict[str, torch.Tensor], like: MergeInput, lineage: dict) -> Path:
    """Write ``state`` as a HF model directory at ``out``: config, tokenizer and generation files from ``like``, the
    weights, and ``merge.json`` (lineage, cpt version, sha256 of every file)."""
    from safetensors.torch import save_file

    refuse_existing(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for item in like.path.iterdir():
            if item.is_file() and item.name not in NOT_COPIED and not item.name.startswith("model-"):
                shutil.copy2(item, tmp / item.name)
        weights = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        record = {**lineage, "cpt_version": __version__, "created": time.time(), "files": files}
        (tmp / MERGE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        refuse_existing(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def lineage(method: str, inputs: dict[str, MergeInput | list[MergeInput]], **params) -> dict:
    """What ``merge.json`` records of a merge: the method, each input (role, path, weights' sha256), parameters."""
    listed = []
    for role, value in inputs.items():
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            listed.append({"role": role if not isinstance(value, list) else f"{role}[{i}]",
                           "path": str(item.path.resolve()), "sha256": item.sha256})
    return {"method": method, "inputs": listed, "params": params}
