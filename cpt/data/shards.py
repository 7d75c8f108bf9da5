"""Token shards: a corpus tokenized once into flat memory-mapped token files with a JSON manifest.

Layout of one prepared corpus directory::

    <name>-<fingerprint[:16]>/
        manifest.json    # fingerprints, dtype, per-split document/token/byte counts, source files
        train.bin        # uint16 or uint32 token ids, every document followed by EOS
        val.bin          # held-out documents, chosen by a seeded hash of their text

The directory is written under a temporary name and renamed when complete, so a crash (or a full disk) never
leaves a half-written shard that looks finished. With ``workers > 1`` forked processes tokenize batches of documents
while this one decides the split and writes, in document order: the files are the same for any count.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from cpt.errors import CptError, space_for

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1
# Documents per tokenizer call: in this process the tokenizer's own threads share a batch; workers get smaller
# ones, so that a small corpus still gives every worker several (the python stdlib's 731 files: 3 batches of 256).
BATCH = 256
WORKER_BATCH = 64


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_held_out(text: str, seed: int, fraction: float) -> bool:
    """Whether a document belongs to the validation split: a seeded hash of its text, so the choice does not
    depend on document order and the same text always lands in the same split."""
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


@dataclass
class TokenSplit:
    """One split of a prepared corpus: a memory-mapped token array plus its counts."""

    tokens: np.ndarray
    documents: int
    bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(len(self.tokens), 1)


@dataclass
class TokenShard:
    """A prepared corpus on disk."""

    name: str
    path: Path
    manifest: dict
    train: TokenSplit
    val: TokenSplit

    @classmethod
    def open(cls, path: Path, tokenizer_fingerprint: str | None = None) -> "TokenShard":
        """Open a prepared corpus, checking that it was tokenized with ``tokenizer_fingerprint``."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise CptError(f"token shard '{path}' has no readable manifest ({e}); delete it and run `cpt prepare`") from None
        if tokenizer_fingerprint is not None and manifest["tokenizer_fingerprint"] != tokenizer_fingerprint:
            raise CptError(f"token shard '{path}' was tokenized with a different tokenizer than this recipe's; "
                           "delete it and run `cpt prepare` to re-tokenize")
        if "in_place" in manifest:  # a corpus of tokens: ranges of the user's own files
            from cpt.data.pretokenized import open_ranges

            splits = {split: TokenSplit(open_ranges(path, manifest, split), manifest["splits"][split]["documents"],
                                        manifest["splits"][split]["bytes"]) for split in SPLITS}
            return cls(manifest["corpus"], path, manifest, splits["train"], splits["val"])
        splits = {}
        for split in SPLITS:
            info = manifest["splits"][split]
            file = path / f"{split}.bin"
            expected = info["tokens"] * np.dtype(manifest["dtype"]).itemsize
            if not file.is_file() or file.stat().st_size != expected:
                raise CptError(f"token shard '{file}' is missing or truncated; delete '{path}' and run `cpt prepare`")
            tokens = np.memmap(file, dtype=manifest["dtype"], mode="r") if expected else np.zeros(0, manifest["dtype"])
            splits[split] = TokenSplit(tokens, info["documents"], info["bytes"])
        return cls(manifest["corpus"], path, manifest, splits["train"], splits["val"])


def write_shard(
    name: str, out_dir: Path, documents: Iterable[str], tokenizer, fingerprint: str, info: dict,
    val_fraction: float, val_max_docs: int | None, split_seed: int, workers: int = 1,
    source_bytes: int | None = None,
) -> TokenShard:
    """Tokenize ``documents`` into ``out_dir`` (train/val split by document) and return the opened shard.

    Args:
        fingerprint: content fingerprint of sources + tokenizer + split; stored in the manifest.
        info: extra manifest fields (tokenizer fingerprint, source files...).
        workers: processes that tokenize; 1 tokenizes in this process. The files do not depend on it.
        source_bytes: size of the corpus's files, to tell a full disk about how much the shard needs.

    Raises:
        DiskFullError: the disk filled up; nothing of this shard is left, a shard already at ``out_dir`` is intact.
    """
    if workers < 1:
        raise CptError(f"workers: expected a positive whole number, got {workers}")
    dtype = token_dtype(len(tokenizer))
    counts = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _space_for_shard(out_dir, name, counts, dtype.itemsize, source_bytes):
        _write(name, out_dir, documents, tokenizer, dtype, counts, fingerprint, info, val_fraction, val_max_docs,
               split_seed, workers)
    return TokenShard.open(out_dir)


@contextmanager
def _space_for_shard(out_dir: Path, name: str, counts: dict, itemsize: int, source_bytes: int | None) -> Iterator[None]:
    """``space_for`` the shard, needing about as much as the tokens written so far per byte of text, times the
    corpus's bytes."""
    try:
        yield
    except Exception:
        text = sum(c["bytes"] for c in counts.values())
        written = sum(c["tokens"] for c in counts.values()) * itemsize
        needed = written * max(source_bytes or 0, text) // text if written and text else None
        with space_for(out_dir, f"the token shard of corpus '{name}'", needed):
            raise


def _write(name: str, out_dir: Path, documents: Iterable[str], tokenizer, dtype: np.dtype, counts: dict,
           fingerprint: str, info: dict, val_fraction: float, val_max_docs: int | None, split_seed: int,
           workers: int) -> None:
    """``write_shard``'s work, counting into ``counts`` as it goes; the temporary directory goes whatever happens."""
    eos = tokenizer.eos_token_id
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    start = time.time()
    try:
        batches = _batches(_progress(documents, name), BATCH if workers == 1 else WORKER_BATCH)
        # closing(): the worker pool, if any, is shut down however the loop ends.
        with open(tmp / "train.bin", "wb") as f_train, open(tmp / "val.bin", "wb") as f_val, \
                closing(_encoded(batches, tokenizer, dtype, workers)) as encoded:
            for batch, tokens, lengths in encoded:
                held = []
                for text in batch:
                    in_val = is_held_out(text, split_seed, val_fraction)
                    if in_val and val_max_docs is not None and counts["val"]["documents"] >= val_max_docs:
                        in_val = False
                    split = "val" if in_val else "train"
                    counts[split]["documents"] += 1
                    counts[split]["bytes"] += len(text.encode("utf-8"))
                    held.append(in_val)
                # Each split keeps its documents in corpus order: the batch's tokens, masked per document.
                held_tokens = np.repeat(held, lengths)
                val_tokens = int(held_tokens.sum())
                counts["val"]["tokens"] += val_tokens
                counts["train"]["tokens"] += len(tokens) - val_tokens
                # file.write, not ndarray.tofile: a full disk then raises ENOSPC, not a bare "requested and written".
                f_train.write(tokens[~held_tokens])
                f_val.write(tokens[held_tokens])
            for f in (f_train, f_val):
                f.flush()
                os.fsync(f.fileno())
        for split in SPLITS:
            if counts[split]["documents"] == 0:
                fix = "raise" if split == "val" else "lower"
                raise CptError(f"corpus '{name}': the {split} split is empty ({sum(c['documents'] for c in counts.values())} "
                               f"documents in all); {fix} corpora.{name}.val_fraction or add documents")
        manifest = {
            "format_version": FORMAT_VERSION, "corpus": name, "fingerprint": fingerprint, "dtype": dtype.name,
            "vocab_size": len(tokenizer), "eos_id": eos, "splits": counts,
            "split": {"val_fraction": val_fraction, "val_max_docs": val_max_docs, "seed": split_seed},
            "seconds": round(time.time() - start, 2), **info,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log.info("prepared corpus '%s': %s train tokens in %d documents, %s val tokens in %d documents (%.1fs)", name,
             f"{counts['train']['tokens']:,}", counts["train"]["documents"], f"{counts['val']['tokens']:,}",
             counts["val"]["documents"], time.time() - start)


def _encode(tokenizer, dtype: np.dtype, batch: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One batch of documents as token ids, each document followed by EOS, in one flat array of ``dtype``;
    and the length of each document's part (EOS included)."""
    # split_special_tokens: a document that contains "</s>" or "<|endoftext|>" as text must not get a real
    # EOS (or any control token) in the middle of it.
    ids = tokenizer(batch, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    eos = [tokenizer.eos_token_id]
    lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(doc + eos for doc in ids), dtype=dtype,
                         count=int(lengths.sum()))
    return tokens, lengths


def _encoded(batches: Iterable[list[str]], tokenizer, dtype: np.dtype,
             workers: int) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """``(batch, tokens, lengths)`` for each batch, in order: encoded here, or by ``workers`` processes with
    at most two batches per process in flight (``Executor.map`` would read the whole corpus ahead)."""
    if workers == 1:
        for batch in batches:
            yield batch, *_encode(tokenizer, dtype, batch)
        return
    with _worker_pool(tokenizer, dtype, workers) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.submit(_encode_in_worker, batch)))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield done, *future.result()
        while pending:
            done, future = pending.popleft()
            yield done, *future.result()


_worker_state: tuple = ()  # (tokenizer, dtype) in a worker process


def _start_worker(tokenizer, dtype: np.dtype) -> None:
    global _worker_state
    _worker_state = (tokenizer, dtype)
    # Ctrl-C reaches the whole process group: the parent handles it (and removes its temporary directory).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode_in_worker(batch: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode(*_worker_state, batch)


@contextmanager
def _worker_pool(tokenizer, dtype: np.dtype, workers: int) -> Iterator[Executor]:
    """Forked tokenizing processes (the tokenizer is inherited, not pickled); shut down on the way out,
    whether the shard was finished or not. A worker that dies raises ``BrokenProcessPool`` here instead of
    hanging, which is why this is not a ``multiprocessing.Pool``."""
    # The HF tokenizer's Rayon threads exist only in the parent, so a forked child that encodes in parallel
    # would wait on them forever. The variable, set across the fork, keeps every worker on one thread (and
    # silences tokenizers' fork warning); this process does not tokenize while the pool runs.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_start_worker, initargs=(tokenizer, dtype))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _progress(documents: Iterable[str], name: str) -> Iterable[str]:
    if not sys.stderr.isatty():
        return documents
    from tqdm import tqdm

    return tqdm(documents, desc=f"tokenizing {name}", unit=" docs", leave=False)
