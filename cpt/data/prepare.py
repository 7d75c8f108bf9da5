"""Data preparation: resolve the recipe's tokenizer and tokenize every corpus into cached token shards.

Everything is cached by content fingerprint: a second run with the same sources and tokenizer reuses the
shards; a changed source file, reading option, split setting or tokenizer re-tokenizes. A full disk stops with
one line naming the path and about how much space is needed; what was finished before stays usable. Processes
that share a data directory (a sweep's slurm array tasks, runs started side by side) prepare one at a time: the
later ones wait, then reuse what the first wrote.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cpt.data import pretokenized
from cpt.data.shards import MANIFEST, FORMAT_VERSION, TokenShard, write_corpus
from cpt.data.sources import CorpusConfig, iter_documents, source_files, source_fingerprint, source_tasks
from cpt.data.tokenizer import TRAINER_VERSION, load_tokenizer, tokenizer_fingerprint, train_sentencepiece
from cpt.errors import CptError

log = logging.getLogger(__name__)

# About this many bytes of source files per task by default (recipe data.task_mb; one shard each).
TASK_BYTES = 256_000_000


@dataclass
class PreparedData:
    tokenizer: object
    tokenizer_fingerprint: str
    corpora: dict[str, TokenShard]


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _source_fingerprints(recipe, base_dir: Path) -> dict[str, str]:
    return {name: (pretokenized.fingerprint if pretokenized.is_tokens(c) else source_fingerprint)(c, base_dir)
            for name, c in recipe.corpora.items()}


def _trained_tokenizer_fingerprint(recipe, fingerprints: dict[str, str]) -> str:
    train = recipe.tokenizer.train
    return _hash("tokenizer", TRAINER_VERSION, train, [fingerprints[n] for n in train.corpora or list(recipe.corpora)])


def _corpus_dir(name: str, config: CorpusConfig, source_fp: str, tok_fp: str, data_dir: Path) -> tuple[Path, str]:
    """A corpus's prepared directory and its fingerprint (sources, tokenizer, split)."""
    fingerprint = _hash(FORMAT_VERSION, source_fp, tok_fp, config.val_fraction, config.val_max_docs, config.split_seed)
    return data_dir / f"{name}-{fingerprint[:16]}", fingerprint


def _is_done(out_dir: Path, fingerprint: str) -> bool:
    manifest = out_dir / MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint


def resolve_tokenizer(recipe, base_dir: Path, data_dir: Path, fingerprints: dict[str, str]):
    """The recipe's tokenizer: a local HF directory, the model's own directory, or one trained here."""
    config = recipe.tokenizer
    if config.path:
        return load_tokenizer(_resolve(config.path, base_dir))
    if config.train is None:
        return load_tokenizer(_resolve(recipe.model.init, base_dir))
    train = config.train
    names = train.corpora or list(recipe.corpora)
    fingerprint = _trained_tokenizer_fingerprint(recipe, fingerprints)

    def texts():
        for name in names:
            budget = train.max_chars_per_corpus
            for doc in iter_documents(recipe.corpora[name], base_dir):
                if budget <= 0:
                    break
                yield doc[:budget]
                budget -= len(doc)

    log.info("tokenizer: sentencepiece %s, vocab %d, trained on %s", train.model_type, train.vocab_size, ", ".join(names))
    return train_sentencepiece(train, texts(), fingerprint, data_dir / "tokenizer")


def prepare_corpus(name: str, config: CorpusConfig, source_fp: str, tokenizer, tok_fp: str,
                   base_dir: Path, data_dir: Path, workers: int = 1, task_bytes: int = TASK_BYTES,
                   part: tuple[int, int] | None = None) -> TokenShard | None:
    """Tokenize one corpus into ``data_dir``, or reuse the shard already there with the same fingerprint.
    ``workers`` (processes that tokenize) is not part of the fingerprint: the shard is the same for any count."""
    out_dir, fingerprint = _corpus_dir(name, config, source_fp, tok_fp, data_dir)
    if _is_done(out_dir, fingerprint):
        log.info("corpus '%s': reusing %s", name, out_dir)
        return TokenShard.open(out_dir, tok_fp)
    if pretokenized.is_tokens(config):
        if part is not None:
            return None  # nothing to tokenize: the whole preparation reads it
        made_with = load_tokenizer(_resolve(config.tokenizer, base_dir))
        pretokenized.prepare_tokens(name, config, base_dir, out_dir, tokenizer, made_with, fingerprint,
                                    {"format_version": FORMAT_VERSION, "tokenizer_fingerprint": tok_fp,
                                     "source_fingerprint": source_fp, "source": config.source})
        shard = TokenShard.open(out_dir, tok_fp)
        log.info("prepared corpus '%s' in place: %s train tokens in %d documents, %s val tokens in %d documents, "
                 "read from %s", name, f"{len(shard.train.tokens):,}", shard.train.documents,
                 f"{len(shard.val.tokens):,}", shard.val.documents, config.source)
        return shard
    paths = source_files(config, base_dir)
    files = [str(p) for p in paths]
    info = {"tokenizer_fingerprint": tok_fp, "source_fingerprint": source_fp, "source": config.source,
            "num_files": len(files), "files": files[:1000]}
    tasks = source_tasks(config, base_dir, task_bytes)
    plan = [[str(p) for p in units] for units in tasks]
    return write_corpus(name, out_dir, [partial(iter_documents, config, base_dir, units) for units in tasks], plan,
                        tokenizer, fingerprint, info, config.val_fraction, config.val_max_docs, config.split_seed,
                        workers=workers, source_bytes=None if config.max_docs else sum(p.stat().st_size for p in paths),
                        part=part)


def prepare(recipe, base_dir: Path, data_dir: Path, workers: int = 1,
            part: tuple[int, int] | None = None) -> PreparedData | None:
    """Tokenizer and token shards for every corpus of ``recipe``, built or reused from ``data_dir``, with
    ``workers`` processes tokenizing each corpus.

    With ``part`` ``(I, N)`` (what slurm array task I of N runs), only tasks I, I + N, I + 2N... of each corpus are
    tokenized, alongside the other parts (the tokenizer is resolved first, one process at a time), and None is
    returned: the preparation that follows without ``part`` finds every shard done and assembles the corpora."""
    tokens = [name for name, c in recipe.corpora.items() if pretokenized.is_tokens(c)]
    if tokens and recipe.tokenizer.train is not None:
        raise CptError(f"corpus '{tokens[0]}' is already tokens (format {recipe.corpora[tokens[0]].format}): the "
                       "recipe must use the tokenizer they were made with; set tokenizer.path to "
                       f"'{recipe.corpora[tokens[0]].tokenizer}' instead of tokenizer.train")
    data_dir.mkdir(parents=True, exist_ok=True)
    source_fps = _source_fingerprints(recipe, base_dir)
    task_bytes = int(recipe.data.task_mb * 1_000_000)
    if part is not None:
        with _one_at_a_time(data_dir):
            tokenizer = resolve_tokenizer(recipe, base_dir, data_dir, source_fps)
        tok_fp = tokenizer_fingerprint(tokenizer)
        for name, c in recipe.corpora.items():
            prepare_corpus(name, c, source_fps[name], tokenizer, tok_fp, base_dir, data_dir, workers, task_bytes, part)
        return None
    with _one_at_a_time(data_dir):
        tokenizer = resolve_tokenizer(recipe, base_dir, data_dir, source_fps)
        tok_fp = tokenizer_fingerprint(tokenizer)
        corpora = {name: prepare_corpus(name, c, source_fps[name], tokenizer, tok_fp, base_dir, data_dir,
                                        workers=workers, task_bytes=task_bytes)
                   for name, c in recipe.corpora.items()}
    return PreparedData(tokenizer, tok_fp, corpora)


def is_prepared(recipe, base_dir: Path, data_dir: Path) -> bool:
    """Whether ``data_dir`` holds the recipe's tokenizer and every corpus, prepared from the sources as they are
    now (the same fingerprints as :func:`prepare` computes; reading the sources to hash them, not tokenizing)."""
    try:
        source_fps = _source_fingerprints(recipe, base_dir)
        config = recipe.tokenizer
        if config.path is None and config.train is not None:
            stamp = data_dir / "tokenizer" / "cpt_fingerprint.txt"
            if not stamp.is_file() or stamp.read_text().strip() != _trained_tokenizer_fingerprint(recipe, source_fps):
                return False
            tokenizer = load_tokenizer(data_dir / "tokenizer")
        else:
            tokenizer = load_tokenizer(_resolve(config.path or recipe.model.init, base_dir))
        tok_fp = tokenizer_fingerprint(tokenizer)
        if not all(_is_done(*_corpus_dir(name, c, source_fps[name], tok_fp, data_dir))
                   for name, c in recipe.corpora.items()):
            return False
    except CptError:
        return False  # what prepare would refuse: the job says so in its log
    return True


@contextmanager
def _one_at_a_time(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir``'s preparation lock, waiting for a process that holds it (two tokenizers trained into
    one directory at once would replace each other's files halfway)."""
    fd = os.open(data_dir / ".prepare.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("waiting for another process that is preparing data in %s", data_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _resolve(path: str, base_dir: Path) -> Path:
    """Relative paths in a recipe are relative to the recipe file's directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else base_dir / p
