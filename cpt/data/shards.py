"""Token shards: a corpus tokenized once into memory-mapped token files with a JSON manifest.

Layout of one prepared corpus directory::

    <name>-<fingerprint[:16]>/
        manifest.json          # fingerprints, dtype, per-split document/token/byte counts, the shards, sources
        ranges.npz             # each split as ranges of the shards (runs of consecutive documents)
        shards/00000.bin       # one task's documents in corpus order, uint16 or uint32, each followed by EOS
        shards/00000.docs.npz  # per document: tokens, text bytes, whether its seeded text hash holds it out

A task is a group of the corpus's files (:func:`cpt.data.sources.source_tasks`). Each task's shard is renamed
into place when complete, inside ``.<name>-<fingerprint[:16]>.partial``, so a killed preparation continues with
the unfinished tasks; the split is decided over the whole corpus when every task is done, and the directory is
renamed to its name: nothing half-written ever looks finished. With ``workers > 1`` forked processes tokenize
batches of documents while this one writes, in document order: the files are the same for any count. A split
reads as one flat token array (:class:`cpt.data.pretokenized.TokenRanges`). Corpora prepared by an earlier cpt
(``train.bin`` and ``val.bin`` whole) still open.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
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
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from cpt.data.pretokenized import RANGES, ranges_of, save_arrays
from cpt.errors import CptError, space_for

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHARDS = "shards"
DOCS = ".docs.npz"
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
    return held_out_bytes(text.encode("utf-8", "replace"), seed, fraction)


def held_out_bytes(data: bytes, seed: int, fraction: float) -> bool:
    """:func:`is_held_out` of a document's bytes (a token corpus's token bytes)."""
    digest = hashlib.blake2b(data, digest_size=8, key=str(seed).encode()).digest()
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
        if "in_place" in manifest or manifest.get("layout") == "shards":  # ranges of token files
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
    """Tokenize ``documents`` into ``out_dir`` as one task (see :func:`write_corpus`) and return the opened shard."""
    return write_corpus(name, out_dir, [lambda: documents], ["all"], tokenizer, fingerprint, info, val_fraction,
                        val_max_docs, split_seed, workers, source_bytes)


def write_corpus(
    name: str, out_dir: Path, tasks: Sequence[Callable[[], Iterable[str]]], plan: list, tokenizer, fingerprint: str,
    info: dict, val_fraction: float, val_max_docs: int | None, split_seed: int, workers: int = 1,
    source_bytes: int | None = None, part: tuple[int, int] | None = None,
) -> TokenShard | None:
    """Tokenize a corpus given as ``tasks`` (each a callable giving its documents, in corpus order) into
    ``out_dir``, one token shard per task, and return the opened corpus.

    A task's shard is written under a temporary name and renamed when complete, inside ``.OUT_DIR.partial``;
    a killed preparation run again with the same ``plan`` (a JSON description of the tasks) keeps the finished
    shards and runs the rest. When every task is done the split is decided over the whole corpus (``val_max_docs``
    counts from its start) and written as ranges of the shards, and the directory is renamed to ``out_dir``. The
    files depend on neither ``workers`` nor on how many runs it took.

    Args:
        fingerprint: content fingerprint of sources + tokenizer + split; stored in the manifest.
        info: extra manifest fields (tokenizer fingerprint, source files...).
        workers: processes that tokenize; 1 tokenizes in this process.
        source_bytes: size of the corpus's files, to tell a full disk about how much the shard needs.
        part: ``(I, N)``: write only tasks I, I + N, ... (other processes write the rest at the same time; a
            task is written by one process, under its lock) and return None without assembling.

    Raises:
        DiskFullError: the disk filled up; the finished shards are kept for the next run, a corpus already at
            ``out_dir`` is intact.
    """
    if workers < 1:
        raise CptError(f"workers: expected a positive whole number, got {workers}")
    dtype = token_dtype(len(tokenizer))
    counts = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    partial = out_dir.parent / f".{out_dir.name}.partial"
    start = time.time()
    with _space_for_shard(out_dir, name, counts, dtype.itemsize, source_bytes):
        if part is None:
            _remove_stale_partials(out_dir, partial)
        _claim_partial(partial, plan)
        mine = range(len(tasks)) if part is None else range(part[0], len(tasks), part[1])
        try:
            for index in mine:
                with _task_lock(partial / SHARDS, index):
                    if not (partial / SHARDS / f"{index:05d}{DOCS}").is_file():
                        _write_task(partial / SHARDS, index, tasks[index](), name, tokenizer, dtype, counts,
                                    split_seed, val_fraction, workers)
        finally:
            if part is None and not any((partial / SHARDS).glob(f"*{DOCS}")):  # nothing finished to keep
                shutil.rmtree(partial, ignore_errors=True)
        if part is not None:
            log.info("corpus '%s': tasks %s of %d done (part %d of %d); `cpt prepare` without --task assembles it",
                     name, ",".join(map(str, mine)) or "none", len(tasks), part[0], part[1])
            return None
        try:
            _assemble(partial, len(tasks), name, dtype, counts, val_max_docs, {
                "format_version": FORMAT_VERSION, "corpus": name, "fingerprint": fingerprint, "dtype": dtype.name,
                "vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id,
                "split": {"val_fraction": val_fraction, "val_max_docs": val_max_docs, "seed": split_seed}, **info})
        except CptError:  # a corpus that cannot be split: its recipe must change, and with it the fingerprint
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if out_dir.exists():
            shutil.rmtree(out_dir)
        partial.rename(out_dir)
    log.info("prepared corpus '%s': %s train tokens in %d documents, %s val tokens in %d documents, %d shard(s) "
             "(%.1fs)", name, f"{counts['train']['tokens']:,}", counts["train"]["documents"],
             f"{counts['val']['tokens']:,}", counts["val"]["documents"], len(tasks), time.time() - start)
    return TokenShard.open(out_dir)


@contextmanager
def _space_for_shard(out_dir: Path, name: str, counts: dict, itemsize: int, source_bytes: int | None) -> Iterator[None]:
    """``space_for`` the corpus, needing about as much as the tokens written so far per byte of text, times the
    corpus's bytes."""
    try:
        yield
    except Exception:
        text = sum(c["bytes"] for c in counts.values())
        written = sum(c["tokens"] for c in counts.values()) * itemsize
        needed = written * max(source_bytes or 0, text) // text if written and text else None
        with space_for(out_dir, f"the token shard of corpus '{name}'", needed):
            raise


def _remove_stale_partials(out_dir: Path, partial: Path) -> None:
    """Remove what killed preparations of this corpus left for other fingerprints (its sources, tokenizer or split
    have changed since, so their shards are of no use), unless a process is writing one of their tasks now."""
    pattern = re.compile(re.escape(out_dir.name.rsplit("-", 1)[0]) + r"-[0-9a-f]{16}\.partial")
    for stale in out_dir.parent.glob(".*.partial"):
        if stale == partial or not pattern.fullmatch(stale.name[1:]) or not stale.is_dir():
            continue
        locks = [os.open(lock, os.O_RDWR) for lock in (stale / SHARDS).glob(".*.lock")]
        try:
            for fd in locks:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a task of it is being written (another recipe's preparation, sharing the directory)
        else:
            log.info("removing %s, left by an interrupted preparation of sources that have changed since", stale)
            shutil.rmtree(stale, ignore_errors=True)
        finally:
            for fd in locks:
                os.close(fd)


def _claim_partial(partial: Path, plan: list) -> None:
    """``partial`` ready for this ``plan``: kept with its finished shards when it was made for the same plan
    (by an earlier, killed run, or by the other parts of a slurm array running now), else made anew."""
    stamp = partial / "plan.json"
    if partial.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) != plan:
        shutil.rmtree(partial)  # the source files changed since: their shards are of no use
    if stamp.is_file():
        done = len(list((partial / SHARDS).glob(f"*{DOCS}")))
        if done:
            log.info("continuing an interrupted preparation: %d of %d shard(s) done", done, len(plan))
        return
    (partial / SHARDS).mkdir(parents=True, exist_ok=True)
    tmp = partial / f".plan-{os.getpid()}.json"
    tmp.write_text(json.dumps(plan) + "\n")
    os.replace(tmp, stamp)


@contextmanager
def _task_lock(shards: Path, index: int) -> Iterator[None]:
    """Hold task ``index``'s lock (processes of a slurm array share the directory); on taking it, remove what a
    killed writer of this task left (its lock was released when it died)."""
    fd = os.open(shards / f".{index:05d}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in shards.glob(f".{index:05d}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        os.close(fd)


def _write_task(shards: Path, index: int, documents: Iterable[str], name: str, tokenizer, dtype: np.dtype,
                counts: dict, split_seed: int, val_fraction: float, workers: int) -> None:
    """One task's shard: ``NNNNN.bin`` (every document followed by EOS) and ``NNNNN.docs.npz`` (per document its
    tokens, text bytes and whether its hash holds it out), renamed into place together when complete."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{index:05d}-", dir=shards))
    lengths, text_bytes, held = [], [], []
    try:
        batches = _batches(_progress(documents, name), BATCH if workers == 1 else WORKER_BATCH)
        # closing(): the worker pool, if any, is shut down however the loop ends.
        with open(tmp / "tokens.bin", "wb") as out, closing(_encoded(batches, tokenizer, dtype, workers)) as encoded:
            for batch, tokens, batch_lengths in encoded:
                lengths.append(batch_lengths)
                for text in batch:
                    text_bytes.append(len(text.encode("utf-8")))
                    held.append(is_held_out(text, split_seed, val_fraction))
                counts["train"]["tokens"] += len(tokens)  # progress, for a full disk's estimate
                counts["train"]["bytes"] += sum(text_bytes[-len(batch):])
                # file.write, not ndarray.tofile: a full disk then raises ENOSPC, not a bare "requested and written".
                out.write(tokens)
            out.flush()
            os.fsync(out.fileno())
        save_arrays(tmp / "docs.npz", lengths=np.concatenate(lengths) if lengths else np.zeros(0, np.int64),
                 bytes=np.asarray(text_bytes, np.int64), held=np.asarray(held, bool))
        os.rename(tmp / "tokens.bin", shards / f"{index:05d}.bin")
        os.rename(tmp / "docs.npz", shards / f"{index:05d}{DOCS}")  # last: the task is done
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _assemble(partial: Path, tasks: int, name: str, dtype: np.dtype, counts: dict, val_max_docs: int | None,
              manifest: dict) -> None:
    """Decide the split over the finished shards in corpus order and write ``ranges.npz`` and the manifest."""
    docs = []
    for index in range(tasks):
        with np.load(partial / SHARDS / f"{index:05d}{DOCS}") as d:
            docs.append({k: d[k] for k in ("lengths", "bytes", "held")})
    held = np.concatenate([d["held"] for d in docs])
    if val_max_docs is not None:  # the first val_max_docs held-out documents of the corpus
        held &= np.cumsum(held) <= val_max_docs
    counts.update({s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS})
    pieces = {s: [] for s in SPLITS}
    first = 0
    for index, d in enumerate(docs):
        n = len(d["lengths"])
        in_val = held[first:first + n]
        first += n
        offsets = np.concatenate([[0], np.cumsum(d["lengths"])])
        # runs of consecutive documents of one split become one range of the shard
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(in_val.astype(np.int8))) + 1, [n]]) if n else []
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            split = "val" if in_val[lo] else "train"
            pieces[split].append((index, int(offsets[lo]), int(offsets[hi] - offsets[lo]), False))
        for split, mask in (("val", in_val), ("train", ~in_val)):
            counts[split]["documents"] += int(mask.sum())
            counts[split]["tokens"] += int(d["lengths"][mask].sum())
            counts[split]["bytes"] += int(d["bytes"][mask].sum())
    for split in SPLITS:
        if counts[split]["documents"] == 0:
            total = sum(c["documents"] for c in counts.values())
            if total == 0:
                raise CptError(f"corpus '{name}' yielded no documents; its files are empty or blank")
            fix = "raise" if split == "val" else "lower"
            raise CptError(f"corpus '{name}': the {split} split is empty ({total} documents in all); {fix} "
                           f"corpora.{name}.val_fraction or add documents")
    save_arrays(partial / RANGES, **{f"{split}_{k}": v for split, p in pieces.items() for k, v in ranges_of(p).items()})
    files = [{"path": f"{SHARDS}/{index:05d}.bin", "size": (partial / SHARDS / f"{index:05d}.bin").stat().st_size,
              "dtype": dtype.name, "offset": 0} for index in range(tasks)]
    (partial / MANIFEST).write_text(json.dumps({**manifest, "layout": "shards", "splits": counts,
                                                "token_files": files}, indent=2) + "\n")


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


def _start_worker(tokenizer, dtype: np.dtype, parent: int) -> None:
    global _worker_state
    _worker_state = (tokenizer, dtype)
    # Die with the parent: a worker outliving a `kill -9` of it would keep the locks it inherited (the task's, the
    # data directory's, a run's) and block the next run.
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before that
        os._exit(1)
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
                               initializer=_start_worker, initargs=(tokenizer, dtype, os.getpid()))
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
