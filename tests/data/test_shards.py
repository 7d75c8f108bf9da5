"""Tests for cpt.data.shards: exact round trip per split, the held-out split, dtypes, corrupt or partial shards, and
tokenizing in worker processes."""

import json
import multiprocessing
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_recipe, write_recipe

from cpt.data import shards
from cpt.data.prepare import prepare
from cpt.data.shards import MANIFEST, SPLITS, TokenShard, is_held_out, token_dtype, write_shard
from cpt.data.sources import iter_documents
from cpt.errors import CptError
from cpt.recipe import load_recipe


@pytest.fixture(scope="module")
def prepared(tiny_corpora, tmp_path_factory):
    """The tiny recipe prepared once: (recipe, base_dir, PreparedData)."""
    root = tmp_path_factory.mktemp("shards")
    recipe, base_dir = load_recipe(write_recipe(root / "tiny.yaml", tiny_recipe(tiny_corpora, root / "run")))
    return recipe, base_dir, prepare(recipe, base_dir, root / "data")


@pytest.fixture(scope="module")
def tokenizer(prepared):
    return prepared[2].tokenizer


def documents_of(tokens: np.ndarray, eos: int, tokenizer) -> list[str]:
    """Split a token stream on EOS (every document ends with one) and decode each document."""
    assert len(tokens) == 0 or tokens[-1] == eos, "the stream must end with EOS"
    ends = np.flatnonzero(np.asarray(tokens) == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


def write(tmp_path: Path, documents, tokenizer, name: str = "c", val_fraction: float = 0.2,
          val_max_docs: int | None = None, split_seed: int = 0, workers: int = 1) -> TokenShard:
    info = {"tokenizer_fingerprint": "tok"}
    return write_shard(name, tmp_path / f"{name}-0123", documents, tokenizer, "fp", info, val_fraction, val_max_docs,
                       split_seed, workers=workers)


SYNTHETIC = [f"document {i}: {'word ' * (i % 7)}end\n" for i in range(300)]


@pytest.mark.parametrize("name", ["english", "code"])
def test_round_trip_gives_back_each_splits_documents(prepared, name):
    recipe, base_dir, data = prepared
    config, shard, tokenizer = recipe.corpora[name], data.corpora[name], data.tokenizer
    docs = list(iter_documents(config, base_dir))
    held = [is_held_out(d, config.split_seed, config.val_fraction) for d in docs]
    expected = {"train": [d for d, h in zip(docs, held) if not h], "val": [d for d, h in zip(docs, held) if h]}
    assert expected["train"] and expected["val"], "the tiny corpora should give both splits documents"
    eos = shard.manifest["eos_id"]
    assert eos == tokenizer.eos_token_id
    for split in ("train", "val"):
        part = getattr(shard, split)
        assert documents_of(part.tokens, eos, tokenizer) == expected[split]
        counts = shard.manifest["splits"][split]
        assert counts["documents"] == part.documents == len(expected[split])
        assert counts["tokens"] == len(part.tokens)
        assert counts["bytes"] == part.bytes == sum(len(d.encode("utf-8")) for d in expected[split])


@pytest.mark.parametrize("name", ["english", "code"])
def test_train_and_val_partition_the_corpus(prepared, name):
    recipe, base_dir, data = prepared
    shard, tokenizer = data.corpora[name], data.tokenizer
    eos = shard.manifest["eos_id"]
    train = documents_of(shard.train.tokens, eos, tokenizer)
    val = documents_of(shard.val.tokens, eos, tokenizer)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(iter_documents(recipe.corpora[name], base_dir))


def test_manifest_records_what_the_shard_was_made_from(prepared):
    recipe, _, data = prepared
    manifest = data.corpora["code"].manifest
    assert manifest["corpus"] == "code"
    assert manifest["tokenizer_fingerprint"] == data.tokenizer_fingerprint
    assert manifest["vocab_size"] == len(data.tokenizer) == 512
    assert manifest["dtype"] == "uint16" and data.corpora["code"].train.tokens.dtype == np.uint16
    assert manifest["split"] == {"val_fraction": 0.2, "val_max_docs": None, "seed": 0}
    assert manifest["num_files"] == 10 and len(manifest["files"]) == 10


def test_special_token_text_in_a_document_stays_text(tokenizer, tmp_path):
    docs = ["ends with </s> inside", "<s> starts like BOS", "has <unk> and </s></s> twice"] + SYNTHETIC
    shard = write(tmp_path, docs, tokenizer, val_fraction=0.3)
    eos = tokenizer.eos_token_id
    for split in ("train", "val"):
        part = getattr(shard, split)
        tokens = np.asarray(part.tokens)
        assert int((tokens == eos).sum()) == part.documents
        assert not {tokenizer.bos_token_id, tokenizer.unk_token_id} & set(tokens.tolist())
    decoded = documents_of(shard.train.tokens, eos, tokenizer) + documents_of(shard.val.tokens, eos, tokenizer)
    assert sorted(decoded) == sorted(docs)


def test_split_is_deterministic_and_independent_of_order(tokenizer, tmp_path):
    shuffled = SYNTHETIC[:]
    random.Random(1).shuffle(shuffled)
    orders = [SYNTHETIC, SYNTHETIC[::-1], shuffled]
    shards = [write(tmp_path, docs, tokenizer, name=f"c{i}") for i, docs in enumerate(orders)]
    eos = tokenizer.eos_token_id
    vals = [sorted(documents_of(s.val.tokens, eos, tokenizer)) for s in shards]
    assert vals[0] == vals[1] == vals[2]
    assert vals[0] == sorted(d for d in SYNTHETIC if is_held_out(d, 0, 0.2))
    assert len({s.manifest["splits"]["val"]["tokens"] for s in shards}) == 1
    again = write(tmp_path, SYNTHETIC, tokenizer, name="again")
    assert np.array_equal(again.val.tokens, shards[0].val.tokens)
    assert np.array_equal(again.train.tokens, shards[0].train.tokens)


def test_held_out_share_and_seed():
    texts = [f"doc {i}" for i in range(4000)]
    share = np.mean([is_held_out(t, 0, 0.2) for t in texts])
    assert abs(share - 0.2) < 0.03
    assert [is_held_out(t, 0, 0.2) for t in texts] != [is_held_out(t, 1, 0.2) for t in texts]
    # Monotone in the fraction: a document held out at 0.1 is held out at 0.2.
    assert all(is_held_out(t, 0, 0.2) for t in texts if is_held_out(t, 0, 0.1))


def test_val_max_docs_caps_the_held_out_documents(tokenizer, tmp_path):
    shard = write(tmp_path, SYNTHETIC, tokenizer, val_fraction=0.5, val_max_docs=3)
    held = [d for d in SYNTHETIC if is_held_out(d, 0, 0.5)]
    assert len(held) > 3
    assert shard.val.documents == 3
    assert shard.train.documents == len(SYNTHETIC) - 3
    assert documents_of(shard.val.tokens, tokenizer.eos_token_id, tokenizer) == held[:3]
    assert shard.manifest["split"]["val_max_docs"] == 3


def test_token_dtype_boundaries():
    assert token_dtype(512) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535
    assert token_dtype(65537) == np.uint32
    assert token_dtype(150_000) == np.uint32


class BigVocab:
    """The real tokenizer, reporting a vocabulary too large for uint16."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id

    def __len__(self) -> int:
        return 70_000

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)


def test_large_vocab_writes_uint32(tokenizer, tmp_path):
    small = write(tmp_path, SYNTHETIC, tokenizer, name="small")
    big = write(tmp_path, SYNTHETIC, BigVocab(tokenizer), name="big")
    assert big.manifest["dtype"] == "uint32" and big.train.tokens.dtype == np.uint32
    tokens = len(big.train.tokens) + len(big.val.tokens)
    assert (big.path / "shards" / "00000.bin").stat().st_size == 4 * tokens
    assert (small.path / "shards" / "00000.bin").stat().st_size == 2 * tokens
    assert np.array_equal(np.asarray(big.train.tokens), np.asarray(small.train.tokens))


def test_open_with_another_tokenizer_fingerprint(prepared):
    _, _, data = prepared
    path = data.corpora["english"].path
    assert TokenShard.open(path, data.tokenizer_fingerprint).train.documents == data.corpora["english"].train.documents
    with pytest.raises(CptError, match="re-tokenize"):
        TokenShard.open(path, "0" * 64)


@pytest.mark.parametrize("damage", ["truncate", "extend", "delete"])
def test_damaged_bin_is_missing_or_truncated(prepared, tmp_path, damage):
    copy = tmp_path / "english"
    shutil.copytree(prepared[2].corpora["english"].path, copy)
    file = copy / "shards" / "00000.bin"
    if damage == "delete":
        file.unlink()
    else:
        data = file.read_bytes()
        file.write_bytes(data[:-2] if damage == "truncate" else data + b"\0\0")
    with pytest.raises(CptError, match="missing or truncated"):
        TokenShard.open(copy)


def test_missing_manifest(tmp_path):
    with pytest.raises(CptError, match="no readable manifest"):
        TokenShard.open(tmp_path)


def test_empty_val_split_names_val_fraction(tokenizer, tmp_path):
    docs = [d for d in SYNTHETIC if not is_held_out(d, 0, 0.01)][:20]
    with pytest.raises(CptError, match=r"val split is empty.*raise corpora\.c\.val_fraction"):
        write(tmp_path, docs, tokenizer, val_fraction=0.01)
    assert list(tmp_path.iterdir()) == []


def test_empty_train_split_names_val_fraction(tokenizer, tmp_path):
    docs = [d for d in SYNTHETIC if is_held_out(d, 0, 0.5)][:5]
    with pytest.raises(CptError, match=r"train split is empty.*lower corpora\.c\.val_fraction"):
        write(tmp_path, docs, tokenizer, val_fraction=0.5)
    assert list(tmp_path.iterdir()) == []


class FailingTokenizer:
    """The real tokenizer until its ``fail_on``-th call, which raises (a crash mid-way through a corpus)."""

    def __init__(self, tokenizer, fail_on: int):
        self.tokenizer, self.fail_on, self.calls = tokenizer, fail_on, 0
        self.eos_token_id = tokenizer.eos_token_id

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("interrupted")
        return self.tokenizer(*args, **kwargs)


def test_interrupted_write_leaves_nothing_that_looks_finished(tokenizer, tmp_path):
    docs = SYNTHETIC * 3  # 900 documents: 4 tokenizer batches of up to 256
    failing = FailingTokenizer(tokenizer, fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, iter(docs), failing)
    assert failing.calls == 3
    assert list(tmp_path.iterdir()) == [], "neither a finished-looking nor a temporary directory may remain"


def test_interrupted_rewrite_keeps_the_previous_shard(tokenizer, tmp_path):
    first = write(tmp_path, SYNTHETIC, tokenizer)
    manifest = (first.path / MANIFEST).read_text()
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path, iter(SYNTHETIC * 3), FailingTokenizer(tokenizer, fail_on=2))
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]
    assert (first.path / MANIFEST).read_text() == manifest
    assert TokenShard.open(first.path).train.documents == json.loads(manifest)["splits"]["train"]["documents"]


@pytest.mark.parametrize("val_max_docs", [None, 2])
def test_two_workers_write_the_same_bytes_as_one(prepared, tokenizer, tmp_path, monkeypatch, val_max_docs):
    recipe, base_dir, _ = prepared
    docs = [doc for name in ("english", "code") for doc in iter_documents(recipe.corpora[name], base_dir)]
    # 22 documents in 8 batches: more than the 2 batches per worker in flight, so results arrive while submitting.
    monkeypatch.setattr(shards, "WORKER_BATCH", 3)
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    one = write(tmp_path, docs, tokenizer, name="one", val_max_docs=val_max_docs)
    two = write(tmp_path, iter(docs), tokenizer, name="two", val_max_docs=val_max_docs, workers=2)
    assert two.val.documents == (2 if val_max_docs else one.val.documents) and two.train.documents > 0
    assert (two.path / "shards" / "00000.bin").read_bytes() == (one.path / "shards" / "00000.bin").read_bytes()
    for split in SPLITS:
        assert np.array_equal(np.asarray(getattr(two, split).tokens), np.asarray(getattr(one, split).tokens))
    assert two.manifest["splits"] == one.manifest["splits"]
    assert not multiprocessing.active_children(), "the worker processes must be gone"
    assert os.environ.get("TOKENIZERS_PARALLELISM") == parallelism


def test_workers_must_be_positive(tokenizer, tmp_path):
    with pytest.raises(CptError, match="workers: expected a positive whole number, got 0"):
        write(tmp_path, SYNTHETIC, tokenizer, workers=0)
    assert list(tmp_path.iterdir()) == []


class CrashingTokenizer:
    """The real tokenizer, raising in whichever process meets the document ``poison``."""

    def __init__(self, tokenizer, poison: str):
        self.tokenizer, self.poison = tokenizer, poison
        self.eos_token_id = tokenizer.eos_token_id

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __call__(self, batch, **kwargs):
        if self.poison in batch:
            raise RuntimeError(f"tokenizer crashed in process {os.getpid()}")
        return self.tokenizer(batch, **kwargs)


def test_a_crashing_worker_leaves_no_shard_and_no_workers(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "WORKER_BATCH", 16)
    docs = SYNTHETIC[:100] + ["poison"] + SYNTHETIC[100:]  # the 7th of 19 batches fails
    with pytest.raises(RuntimeError, match="tokenizer crashed in process") as failure:
        write(tmp_path, iter(docs), CrashingTokenizer(tokenizer, "poison"), workers=2)
    assert f"process {os.getpid()}" not in str(failure.value), "a worker, not this process, tokenizes"
    assert list(tmp_path.iterdir()) == [], "neither a finished-looking nor a temporary directory may remain"
    assert not multiprocessing.active_children()
