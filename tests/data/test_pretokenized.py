"""Corpora of tokens read in place: Megatron .bin/.idx and OLMo .npy memmaps, written here with those formats'
documented layouts from the tiny corpora, prepared (split by document, ids and tokenizer checked) and trained on."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import read_rows, tiny_recipe, write_recipe

from cpt.cli import main
from cpt.data.prepare import prepare
from cpt.data.pretokenized import RANGES, TokenRanges
from cpt.data.sources import CorpusConfig, iter_documents
from cpt.data.tokenizer import load_tokenizer
from cpt.errors import CptError
from cpt.recipe import load_recipe

MEGATRON_CODES = {np.uint16: 8, np.int32: 4}


def write_megatron(prefix: Path, docs: list[list[int]], eos: int, dtype=np.uint16, eod: bool = True,
                   split_first: bool = False) -> Path:
    """PREFIX.bin and PREFIX.idx as Megatron's _IndexWriter lays them out: one sequence per document (the first
    document in two sequences with ``split_first``, as --split-sentences writes), EOS appended with ``eod``."""
    sequences, bounds = [], [0]
    for i, doc in enumerate(docs):
        doc = doc + [eos] if eod else doc
        parts = [doc[:len(doc) // 2], doc[len(doc) // 2:]] if split_first and i == 0 else [doc]
        sequences += [np.asarray(p, dtype) for p in parts]
        bounds.append(len(sequences))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{prefix}.bin", "wb") as f:
        for seq in sequences:
            f.write(seq.tobytes())
    lengths = np.asarray([len(s) for s in sequences], np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64) * np.dtype(dtype).itemsize])
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, MEGATRON_CODES[dtype], len(lengths), len(bounds)))
        f.write(lengths.tobytes() + pointers.astype(np.int64).tobytes() + np.asarray(bounds, np.int64).tobytes())
    return prefix


def write_olmo(path: Path, docs: list[list[int]], eos: int, dtype=np.uint16, header: bool = False) -> Path:
    """A flat token memmap with EOS after every document, as OLMo-core's guide writes it (or np.save's .npy)."""
    tokens = np.asarray([t for doc in docs for t in doc + [eos]], dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    if header:
        np.save(path, tokens)
    else:
        tokens.tofile(path)
    return path


@pytest.fixture(scope="module")
def tokenized(tiny_corpora, tmp_path_factory):
    """The tiny recipe's tokenizer (prepared once) and the code corpus's documents as its token ids."""
    root = tmp_path_factory.mktemp("tokens")
    recipe = tiny_recipe(tiny_corpora, root / "run")
    recipe["run"]["data_dir"] = str(root / "data")
    assert main(["prepare", str(write_recipe(root / "text.yaml", recipe))]) == 0
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    docs = [tokenizer.encode(d, add_special_tokens=False, split_special_tokens=True)
            for d in iter_documents(CorpusConfig(source=str(tiny_corpora / "code")))]
    return root / "data" / "tokenizer", tokenizer, docs


def recipe_with(tiny_corpora, root: Path, tokenizer_dir: Path, code: dict, english: dict | None = None) -> Path:
    recipe = tiny_recipe(tiny_corpora, root / "run", pretrain=4, cpt=8)
    recipe["tokenizer"] = {"path": str(tokenizer_dir)}
    recipe["corpora"]["code"] = {"val_fraction": 0.2, "tokenizer": str(tokenizer_dir), **code}
    if english:
        recipe["corpora"]["english"] = {"val_fraction": 0.2, "tokenizer": str(tokenizer_dir), **english}
    recipe["run"]["data_dir"] = str(root / "data")
    return write_recipe(root / "tokens.yaml", recipe)


def held_out(doc: np.ndarray, seed: int = 0, fraction: float = 0.2) -> bool:
    digest = hashlib.blake2b(doc.tobytes(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


@pytest.mark.parametrize("layout", ["megatron", "megatron-no-eod", "megatron-int32-split", "olmo", "olmo-npy"])
def test_token_files_are_read_in_place_split_by_document(tiny_corpora, tmp_path, tokenized, layout):
    tokenizer_dir, tokenizer, docs = tokenized
    eos = tokenizer.eos_token_id
    if layout.startswith("megatron"):
        dtype = np.int32 if "int32" in layout else np.uint16
        write_megatron(tmp_path / "mg" / "code_text_document", docs, eos, dtype, eod=layout != "megatron-no-eod",
                       split_first="split" in layout)
        code = {"source": "mg/code_text_document", "format": "megatron"}
    else:
        dtype = np.uint16
        write_olmo(tmp_path / "olmo" / "part-0.npy", docs, eos, header=layout == "olmo-npy")
        code = {"source": "olmo", "format": "olmo", **({} if layout == "olmo-npy" else {"dtype": "uint16"})}
    recipe, base_dir = load_recipe(recipe_with(tiny_corpora, tmp_path, tokenizer_dir, code))
    shard = prepare(recipe, base_dir, tmp_path / "data").corpora["code"]
    # Each document (as stored: with its EOS where the file has one) goes to one split by a hash of its tokens;
    # each split is its documents in file order, each followed by EOS (a virtual one where the file has none).
    stored = [np.asarray(d + ([eos] if layout != "megatron-no-eod" else []), dtype) for d in docs]
    expected = {"train": [], "val": []}
    for doc, as_stored in zip(docs, stored):
        expected["val" if held_out(as_stored) else "train"].append(doc + [eos])
    assert expected["val"] and expected["train"]
    for split in ("train", "val"):
        tokens = getattr(shard, split).tokens
        assert isinstance(tokens, TokenRanges)
        np.testing.assert_array_equal(np.asarray(tokens), [t for doc in expected[split] for t in doc])
        assert getattr(shard, split).documents == len(expected[split])
    # Nothing copied: the prepared directory holds the manifest and the ranges, a few hundred bytes.
    assert sorted(p.name for p in shard.path.iterdir()) == ["manifest.json", RANGES]
    manifest = json.loads((shard.path / "manifest.json").read_text())
    assert manifest["in_place"] == code["format"] and manifest["bytes_estimated"] == ["train"]
    # bits per byte: the held-out documents' decoded bytes, exactly
    assert shard.val.bytes == sum(len(tokenizer.decode(d[:-1]).encode()) for d in expected["val"])


def test_ranges_read_what_the_concatenation_holds():
    rng = np.random.default_rng(0)
    files = [rng.integers(0, 500, 1000).astype(np.uint16) for _ in range(3)]
    pieces = [(0, 10, 50, 0), (2, 0, 7, 1), (1, 300, 1, 1), (0, 900, 100, 0), (2, 500, 20, 1)]
    view = TokenRanges(files, *(np.asarray(c, np.int64) for c in zip(*pieces)), eos=2, dtype=np.uint16)
    whole = np.concatenate([np.append(files[f][s:s + n], [2] * e).astype(np.uint16) for f, s, n, e in pieces])
    assert len(view) == len(whole) == 50 + 8 + 2 + 100 + 21
    np.testing.assert_array_equal(view[:], whole)
    index = rng.integers(0, len(whole), (7, 33))
    np.testing.assert_array_equal(view[index], whole[index])
    assert view[-1] == whole[-1] and view[57] == 2
    np.testing.assert_array_equal(view[5:70], whole[5:70])
    with pytest.raises(IndexError):
        view[np.asarray([len(whole)])]


def test_the_tiny_model_trains_on_megatron_and_olmo_corpora(tiny_corpora, tmp_path, tokenized):
    """Both corpora of the two-stage recipe are token files: English as an OLMo memmap, code as Megatron."""
    tokenizer_dir, tokenizer, code_docs = tokenized
    eos = tokenizer.eos_token_id
    english = [tokenizer.encode(d, add_special_tokens=False)
               for d in iter_documents(CorpusConfig(source=str(tiny_corpora / "english.jsonl")))]
    write_megatron(tmp_path / "mg" / "code", code_docs, eos)
    write_olmo(tmp_path / "english.npy", english, eos, dtype=np.uint32)
    path = recipe_with(tiny_corpora, tmp_path, tokenizer_dir, {"source": "mg/code", "format": "megatron"},
                       {"source": "english.npy", "format": "olmo", "dtype": "uint32"})
    assert main(["run", str(path)]) == 0
    rows = read_rows(tmp_path / "run")
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 13)) and all(np.isfinite(r["loss"]) for r in train)
    evals = {(r["stage"], r["set"]): r for r in rows if r["kind"] == "eval"}
    assert evals[("cpt", "downstream")]["loss"] < evals[("pretrain", "downstream")]["loss"]
    assert all(np.isfinite(r["bpb"]) and r["bpb"] > 0 for r in evals.values())


def one_line_error(capsys, path: Path, *overrides: str) -> str:
    assert main(["prepare", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("cpt: error:")]
    assert "Traceback" not in err
    return line


def test_bad_token_corpora_are_one_line_errors(tiny_corpora, tmp_path, tokenized, capsys):
    tokenizer_dir, tokenizer, docs = tokenized
    eos = tokenizer.eos_token_id
    prefix = write_megatron(tmp_path / "mg" / "code", docs, eos)
    mg = {"source": "mg/code", "format": "megatron"}

    # Another tokenizer: one trained on English alone, 400 tokens.
    other = tiny_recipe(tiny_corpora, tmp_path / "other-run")
    other["tokenizer"]["train"] = {"vocab_size": 400, "corpora": ["english"]}
    other["run"]["data_dir"] = str(tmp_path / "other")
    assert main(["prepare", str(write_recipe(tmp_path / "other.yaml", other))]) == 0
    capsys.readouterr()
    path = recipe_with(tiny_corpora, tmp_path, tokenizer_dir, mg | {"tokenizer": str(tmp_path / "other" / "tokenizer")})
    line = one_line_error(capsys, path)
    assert line.startswith(f"cpt: error: corpus 'code' was tokenized with the tokenizer in '{tmp_path / 'other'}")
    assert "(400 tokens" in line and f"not with this recipe's ({len(tokenizer):,} tokens" in line

    path = recipe_with(tiny_corpora, tmp_path, tokenizer_dir, mg)
    write_megatron(prefix, [docs[0] + [len(tokenizer) + 5]] + docs[1:], eos)
    assert f"holds token id {len(tokenizer) + 5:,}, beyond the tokenizer's {len(tokenizer):,} ids" in \
        one_line_error(capsys, path)
    write_megatron(prefix, docs, eos)
    Path(f"{prefix}.bin").write_bytes(Path(f"{prefix}.bin").read_bytes()[:100])
    assert "is shorter than its index says" in one_line_error(capsys, path)
    Path(f"{prefix}.idx").write_bytes(b"not an index at all")
    assert "is not a Megatron index (no MMIDIDX header)" in one_line_error(capsys, path)
    Path(f"{prefix}.idx").unlink()
    assert f"has no index {prefix}.idx; give both files" in one_line_error(capsys, path)

    write_olmo(tmp_path / "raw.npy", docs, eos)
    path = recipe_with(tiny_corpora, tmp_path, tokenizer_dir, {"source": "raw.npy", "format": "olmo"})
    assert "is a raw token memmap: set the corpus's dtype (uint16 or uint32" in one_line_error(capsys, path)

    # A recipe that would train its tokenizer cannot use tokens made by another.
    raw = tiny_recipe(tiny_corpora, tmp_path / "run")
    raw["corpora"]["code"] = {"source": "mg/code", "format": "megatron", "tokenizer": str(tokenizer_dir)}
    line = one_line_error(capsys, write_recipe(tmp_path / "train.yaml", raw))
    assert "corpus 'code' is already tokens (format megatron)" in line and "set tokenizer.path" in line
    raw["corpora"]["code"] = {"source": "mg/code", "format": "megatron"}
    assert "corpora.code.tokenizer: required for format megatron" in one_line_error(
        capsys, write_recipe(tmp_path / "train.yaml", raw))


def test_a_token_file_changed_after_preparing_is_refused(tiny_corpora, tmp_path, tokenized):
    tokenizer_dir, tokenizer, docs = tokenized
    write_olmo(tmp_path / "part.npy", docs, tokenizer.eos_token_id, header=True)
    recipe, base_dir = load_recipe(recipe_with(tiny_corpora, tmp_path, tokenizer_dir,
                                               {"source": "part.npy", "format": "olmo"}))
    shard = prepare(recipe, base_dir, tmp_path / "data").corpora["code"]
    write_olmo(tmp_path / "part.npy", docs[:-1], tokenizer.eos_token_id, header=True)
    from cpt.data.shards import TokenShard

    with pytest.raises(CptError, match=r"token file '.*part\.npy' is missing or changed since it was prepared"):
        TokenShard.open(shard.path)
    # Preparing again sees the change (size and mtime are in the fingerprint) and splits the new file.
    again = prepare(recipe, base_dir, tmp_path / "data").corpora["code"]
    assert again.path != shard.path and again.train.documents + again.val.documents == len(docs) - 1
